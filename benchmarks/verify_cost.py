"""Time of one verify forward vs the number of trie nodes, against a single-token decode step.

    python -m benchmarks.verify_cost --model qwen2.5-coder-1.5b-instruct --out benchmarks/results/verify_cost_cpu.json

Trees are N chains of K tokens with no shared prefix (N * K nodes), the worst case for sharing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.bench_report import save_json
from services.candidate_tree import CandidateTree
from services.kv_cache import truncate_kv
from services.model_loading import load_model
from services.rpc.specwire.v1 import target_pb2
from target_node.backends.hf import VerifyJob
from target_node.build import build_verifier
from target_node.config import TargetConfig
from target_node.tree_attention import build_tree_query

SHAPES = [(1, 1), (1, 2), (1, 4), (2, 4), (4, 4), (4, 8), (8, 8)]  # (candidates N, tokens K)


def time_forward(verifier, session, tree: CandidateTree, repeats: int) -> list[float]:
    prefix = session.context_length
    times = []
    for _ in range(repeats):
        query = build_tree_query(session.pending_token, tree, prefix)
        if verifier.backend.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        backend = verifier.backend  # the forward alone, on the backend's compute thread
        backend.compute.run(backend._single_forward, VerifyJob(session, tree, query))
        if verifier.backend.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        truncate_kv(session.cache, prefix)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto", help="as on `specwire target`")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small-row-linear", default="auto", help="as on `specwire target` (0: stock F.linear)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    loaded = load_model(args.model, args.dtype, device=args.device)
    verifier = build_verifier(
        TargetConfig(
            model=args.model,
            max_tree_nodes=64,
            max_batch_size=1,
            batch_wait_ms=0,
            small_row_linear=args.small_row_linear,
        ),
        loaded,
    )
    prompt = [
        int(t)
        for t in torch.randint(100, 5000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    ]
    opened = verifier.open_session(
        target_pb2.OpenSessionRequest(prompt_token_ids=prompt, tokenizer_fingerprint=verifier.fingerprint)
    )
    session = verifier.sessions.get(opened.session_id)
    time_forward(verifier, session, CandidateTree(), 2)  # warm-up
    decode = statistics.median(time_forward(verifier, session, CandidateTree(), args.repeats))
    rows = [{"candidates": 0, "tokens": 0, "nodes": 0, "median_s": decode, "vs_decode": 1.0}]
    gen = torch.Generator().manual_seed(1)
    for n, k in SHAPES:
        tree = CandidateTree.from_sequences(
            [torch.randint(100, 5000, (k,), generator=gen).tolist() for _ in range(n)]
        )
        median = statistics.median(time_forward(verifier, session, tree, args.repeats))
        rows.append(
            {
                "candidates": n,
                "tokens": k,
                "nodes": len(tree),
                "median_s": median,
                "vs_decode": median / decode,
            }
        )
        print(
            f"N={n:2d} K={k:2d} nodes={len(tree):3d}  {median * 1000:8.1f} ms  {median / decode:5.2f}x decode",
            flush=True,
        )
    result = {
        "benchmark": "verify_cost",
        "model": args.model,
        "dtype": args.dtype,
        "device": str(verifier.backend.device),
        "device_name": torch.cuda.get_device_name(verifier.backend.device)
        if verifier.backend.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "prompt_tokens": args.prompt_tokens,
        "repeats": args.repeats,
        "decode_step_s": decode,
        "rows": rows,
        "small_row_linear": verifier.backend.small_row_limit,
        "goals": {"cpu": "1 x 4 <= 1.15x, 4 x 4 <= 1.6x a decode step", "gpu": "4 x 4 <= 1.5x a decode step"},
        "one_by_four_vs_decode": next(r["vs_decode"] for r in rows if (r["candidates"], r["tokens"]) == (1, 4)),
        "four_by_four_vs_decode": next(
            r["vs_decode"] for r in rows if (r["candidates"], r["tokens"]) == (4, 4)
        ),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    save_json(args.out, result)
    verifier.stop()


if __name__ == "__main__":
    main()
