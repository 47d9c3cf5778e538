"""Load: bounded concurrent generations against a local pair, level by level, each for a fixed time.

    python -m benchmarks.load --clients 1 4 16 64 --duration 20 --out benchmarks/results/load_cpu.json

Tiny random models by default (this measures the serving path: gRPC, sessions, batching, memory,
not model quality). Each client loops Generate requests until the level's time is up, then
finishes the request it is in; errors are counted, never retried. Memory is read after each level:
process RSS, the target's live sessions and KV bytes (sessions must all be closed again).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from benchmarks.bench_report import percentile
from draft_node.config import DraftConfig
from draft_node.server import start_draft
from services.model_loading import load_model
from services.rpc.specwire.v1 import draft_pb2, draft_pb2_grpc
from target_node.config import TargetConfig
from target_node.server import start_target

PROMPTS = ["def add(a, b):", "The quick brown fox", "import numpy as np\n", "class Stack:", "SELECT * FROM"]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_level(address: str, clients: int, duration_s: float, max_tokens: int) -> dict:
    stub = draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(address))
    latencies: list[float] = []
    tokens, errors = [0], [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def client(index: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            request = draft_pb2.GenerateRequest(prompt=PROMPTS[(index + n) % len(PROMPTS)], max_tokens=max_tokens)
            n += 1
            start = time.perf_counter()
            try:
                count = sum(len(chunk.token_ids) for chunk in stub.Generate(request, timeout=300))
            except grpc.RpcError:
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += count

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "errors": errors[0],
        "tokens": tokens[0],
        "tokens_per_s": round(tokens[0] / elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 3),
        "latency_s_p50": percentile(latencies, 50),
        "latency_s_p99": percentile(latencies, 99),
        "latency_s_mean": statistics.fmean(latencies) if latencies else None,
    }


def tiny_pair(directory: Path) -> tuple[str, str]:
    from tests.tiny_models import build_model, build_tokenizer

    tokenizer = build_tokenizer(directory / "tok")
    target = build_model(directory / "target", tokenizer, seed=0)
    draft = build_model(directory / "draft", tokenizer, seed=1, perturb_from=target, noise=0.02)
    return str(target), str(draft)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--target-model", help="default: a tiny random model built here")
    parser.add_argument("--draft-model")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        target_model, draft_model = (
            (args.target_model, args.draft_model) if args.target_model else tiny_pair(Path(tmp))
        )
        most = max(args.clients)
        target = start_target(
            TargetConfig(model=target_model, port=0, metrics_port=-1, workers=16, max_sessions=max(64, most)),
            load_model(target_model),
        )
        draft = start_draft(
            DraftConfig(
                model=draft_model,
                target=f"127.0.0.1:{target.port}",
                port=0,
                metrics_port=-1,
                http_port=-1,
                workers=most + 4,
            ),
            load_model(draft_model),
        )
        levels = []
        try:
            run_level(f"127.0.0.1:{draft.port}", 1, 0.1, 4)  # warm-up
            baseline_rss = rss_mb()
            for clients in args.clients:
                level = run_level(f"127.0.0.1:{draft.port}", clients, args.duration, args.max_tokens)
                sessions = target.node.sessions.snapshot()
                level |= {
                    "rss_mb": round(rss_mb(), 1),
                    "target_sessions_after": len(sessions),
                    "target_kv_bytes_after": sum(target.node.backend.session_bytes(s) for s in sessions),
                }
                levels.append(level)
                print(json.dumps(level), flush=True)
        finally:
            draft.stop(0)
            target.stop(0)
    report = {
        "command": "python -m benchmarks.load " + " ".join(argv if argv is not None else sys.argv[1:]),
        "models": {"target": args.target_model or "tiny (built)", "draft": args.draft_model or "tiny (built)"},
        "baseline_rss_mb": round(baseline_rss, 1),
        "levels": levels,
        "total_errors": sum(level["errors"] for level in levels),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
