"""Verifier backends: `hf` (transformers, tree attention, any strategy) or `vllm` (greedy only)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from services.model_loading import LoadedModel, load_model, load_tokenizer, resolve_model_dir
from services.tokenizer_fingerprint import tokenizer_fingerprint
from target_node.config import TargetConfig
from target_node.metrics import TargetMetrics
from target_node.verifier import Verifier


def build_verifier(config: TargetConfig, loaded: LoadedModel | None = None) -> Verifier:
    """Load the target model on the configured backend and wrap it in a Verifier."""
    if config.backend == "vllm":
        from target_node.backends.vllm import VllmBackend  # imports vllm: only when asked for

        model_dir = resolve_model_dir(config.model, config.cache_dir)
        tokenizer = load_tokenizer(model_dir)
        backend = VllmBackend(str(model_dir), config)
        model_id = config.model
    else:
        from target_node.backends.hf import HFBackend

        loaded = loaded or load_model(config.model, config.dtype, config.cache_dir, config.device)
        tokenizer, model_id = loaded.tokenizer, loaded.model_id
        backend = HFBackend(loaded, config)
    metrics = TargetMetrics(CollectorRegistry())
    return Verifier(
        backend, model_id, tokenizer_fingerprint(tokenizer), tokenizer.eos_token_id, config, metrics
    )
