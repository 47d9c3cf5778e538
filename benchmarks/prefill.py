"""Prompt processing (prefill) speed of the GGUF decoder against llama.cpp's, same file, same threads.

    python -m benchmarks.prefill --out benchmarks/results/prefill_cpu.json

The decoder prefills a prompt in chunks of `--prefill-chunk-tokens` rows as the target node does
(its default, 256), each chunk one forward over the KV buffer; llama.cpp's figure is `llama-bench
-p N -n 0` (prompt processing, its default batch) on the same GGUF file and thread count. Both
take the median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.llamacpp import DEFAULT_BIN
from services.config import DEFAULT_CACHE_DIR
from services.gguf_decoder import GGUFDecoder, Rows
from services.gguf_file import GGUFFile
from services.model_loading import gguf_source


def decoder_prefill_s(decoder: GGUFDecoder, tokens: list[int], chunk: int) -> float:
    cache = decoder.new_cache()
    start = time.perf_counter()
    for begin in range(0, len(tokens), chunk):
        decoder.forward([Rows(cache, tokens[begin : begin + chunk], all_logits=False)])
    return time.perf_counter() - start


def llama_bench_tok_s(binary: Path, model: Path, tokens: int, threads: int, repeats: int) -> float | None:
    if not binary.exists():
        return None
    out = subprocess.run(
        [str(binary), "-m", str(model), "-p", str(tokens), "-n", "0", "-t", str(threads), "-r", str(repeats), "-o", "json"],
        capture_output=True, text=True, timeout=1800, check=True,
    )  # fmt: skip
    return round(json.loads(out.stdout)[0]["avg_ts"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--prefill-chunk-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llama-bench", type=Path, default=Path(os.environ.get("SPECWIRE_LLAMACPP_BIN", DEFAULT_BIN)) / "llama-bench")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    path = gguf_source(args.model, DEFAULT_CACHE_DIR)
    decoder = GGUFDecoder(GGUFFile(path))
    vocab = decoder.settings.vocab_size
    rows = []
    for n in args.tokens:
        tokens = torch.randint(100, min(vocab, 100_000), (n,), generator=torch.Generator().manual_seed(n)).tolist()
        decoder_prefill_s(decoder, tokens[:32], args.prefill_chunk_tokens)  # warm-up
        seconds = statistics.median(decoder_prefill_s(decoder, tokens, args.prefill_chunk_tokens) for _ in range(args.repeats))
        ours = round(n / seconds, 2)
        theirs = llama_bench_tok_s(args.llama_bench, path, n, torch.get_num_threads(), args.repeats)
        rows.append({"prompt_tokens": n, "specwire_tok_s": ours, "llama_cpp_tok_s": theirs,
                     "ratio": round(ours / theirs, 3) if theirs else None})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    report = {
        "command": "python -m benchmarks.prefill " + " ".join(sys.argv[1:]),
        "model": args.model,
        "threads": torch.get_num_threads(),
        "prefill_chunk_tokens": args.prefill_chunk_tokens,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
