"""Verifier backends: `gguf` (the GGUF decoder on a CPU, any strategy), `hf` (transformers with tree
attention, any strategy) or `vllm` (greedy only); target_node.build picks one from the config."""
