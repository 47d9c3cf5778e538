#!/usr/bin/env bash
# The GPU checks, in the phases one lent-GPU call can hold (each well under 10 minutes):
#
#   bash benchmarks/gpu_checks.sh tests OUT         # every `gpu` test, the CUDA CLI pair, kernel timings
#   bash benchmarks/gpu_checks.sh cost OUT SHAPES   # verify cost of the 1.5B's shape, bf16 and fp32
#
# SHAPES holds qwen-1.5b/ (config + tokenizer files of the real model) and qwen-0.5b/ (config):
# the real weights cannot reach the GPU machine, so `cost` times random weights of the same shapes
# (benchmarks/random_weights.py); no acceptance or speedup figure comes from them.
set -uo pipefail
phase=$1 out=$2
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$out/nvidia-smi.csv"

case $phase in
tests)
    timeout 420 python3 -m pytest -q -p no:cacheprovider -rfE \
        tests/test_kernels.py tests/test_device.py \
        tests/test_cli.py::test_target_draft_generate_as_separate_processes 2>&1 | tee "$out/pytest_gpu.log"
    timeout 120 python3 -m benchmarks.verify_kernels --out "$out/kernels_gpu.json" 2>&1 | tail -30
    ;;
cost)
    shapes=$3 models=/tmp/specwire-random
    cp "$shapes"/qwen-1.5b/{tokenizer.json,tokenizer_config.json,chat_template.jinja} "$shapes/qwen-0.5b/" 2>/dev/null
    for m in 1.5b 0.5b; do
        [ -e "$models/qwen-$m/config.json" ] || python3 -m benchmarks.random_weights "$shapes/qwen-$m" "$models/qwen-$m"
    done
    for dtype in bfloat16 float32; do
        timeout 150 python3 -m benchmarks.verify_cost --model "$models/qwen-1.5b" --dtype $dtype --repeats 30 \
            --out "$out/verify_cost_gpu_$dtype.json" 2>&1 | grep -v Warning
    done
    ;;
*)
    echo "unknown phase $phase" >&2
    exit 2
    ;;
esac
