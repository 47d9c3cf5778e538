"""The GGUF decoder's forward against the bytes it must read and this machine's memory bandwidth.

    python -m benchmarks.decode_step --out benchmarks/results/decode_step_cpu.json

For each model: the weight bytes a decode step reads (`GGUFDecoder.nbytes`: every linear's blocks
once, the output head included), the median time of a forward of 1, 2, 4, 8 and 16 rows at a
128-token context, and the bandwidth that implies; beside it the machine's measured read bandwidth
(the median of summing a 1 GiB buffer with torch's threads), so the fraction of the hardware's
limit each forward reaches is one division. On a CPU decoding is bound by these bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from services.config import DEFAULT_CACHE_DIR
from services.gguf_decoder import GGUFDecoder, Rows
from services.gguf_file import GGUFFile
from services.model_loading import gguf_source

MODELS = {"target": ("qwen2.5-coder-1.5b-instruct", None), "draft": ("qwen2.5-coder-0.5b-instruct", 65536)}


def read_bandwidth_gb_s(gib: int = 1, repeats: int = 7) -> float:
    """Bytes a second the machine reads from memory: a large buffer summed (read once, no writes)."""
    buffer = torch.ones(gib << 28, dtype=torch.float32)  # gib GiB of float32
    buffer.sum()  # touch every page first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - start)
    return round(buffer.nbytes / statistics.median(times) / 1e9, 2)


def forward_ms(decoder: GGUFDecoder, rows: int, context: int, repeats: int, sequences: int = 1) -> float:
    """Median time of one forward of `rows` new rows in each of `sequences` sequences of `context` tokens."""
    caches = [decoder.new_cache() for _ in range(sequences)]
    for cache in caches:
        decoder.forward([Rows(cache, list(range(100, 100 + context)), all_logits=False)])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decoder.forward([Rows(cache, list(range(200, 200 + rows))) for cache in caches])
        times.append(time.perf_counter() - start)
        for cache in caches:
            cache.truncate(context)
    return round(statistics.median(times) * 1e3, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bandwidth = read_bandwidth_gb_s()
    report: dict = {
        "command": "python -m benchmarks.decode_step " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "read_bandwidth_gb_s": bandwidth,
        "models": {},
    }
    for role, (model, output_rows) in MODELS.items():
        decoder = GGUFDecoder(GGUFFile(gguf_source(model, DEFAULT_CACHE_DIR)), output_rows=output_rows)
        weight_gb = decoder.nbytes / 1e9
        rows = {}
        for n in args.rows:
            ms = forward_ms(decoder, n, args.context, args.repeats)
            rows[n] = {"ms": ms, "weights_gb_s": round(weight_gb / (ms / 1e3), 2),
                       "fraction_of_read_bandwidth": round(weight_gb / (ms / 1e3) / bandwidth, 3)}  # fmt: skip
        report["models"][role] = {"model": model, "output_rows": output_rows, "weight_gb_per_step": round(weight_gb, 3),
                                  "bandwidth_bound_ms": round(weight_gb / bandwidth * 1e3, 2), "forward": rows}  # fmt: skip
        print(json.dumps({role: report["models"][role]}), flush=True)
    print(json.dumps({"read_bandwidth_gb_s": bandwidth}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
