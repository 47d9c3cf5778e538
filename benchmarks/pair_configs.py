"""Configurations of a target + draft pair on one machine, each as users run it: two node
processes started by the CLI, the demo prompt generated over gRPC, tok/s with the per-round
phases and acceptance, next to the target alone (benchmarks/target_alone.py, its own process) in
the same run. Two suites:
- placement: threads per node, OpenMP waiting policy, pipelining;
- draft: the draft's engine and precision (hf fp32 / bf16 / bf16 + int8 steps, vLLM N=1 and N=3,
  n-gram), which change acceptance and cost, never the output.

    python -m benchmarks.pair_configs --suite placement --out benchmarks/results/placement_cpu.json
    python -m benchmarks.pair_configs --suite draft --out benchmarks/results/draft_engines_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc

from services.rpc.specwire.v1 import draft_pb2, draft_pb2_grpc
from specwire.cli import DEMO_PROMPT
from specwire.local_pair import local_pair

# name -> (target flags, draft flags, environment)
SUITES: dict[str, dict[str, tuple[list[str], list[str], dict[str, str]]]] = {
    "placement": {
        "all cores each, sequential rounds": ([], ["--pipeline", "off"], {}),
        "all cores each, sequential rounds, passive waiting": ([], ["--pipeline", "off"], {"OMP_WAIT_POLICY": "PASSIVE"}),
        "all cores each, pipelined": ([], ["--pipeline", "on"], {}),
        "all cores each, pipelined, passive waiting": ([], ["--pipeline", "on"], {"OMP_WAIT_POLICY": "PASSIVE"}),
        "one core each, pipelined": (["--threads", "1"], ["--threads", "1", "--pipeline", "on"], {}),
    },
    "draft": {
        "hf fp32": ([], ["--dtype", "float32", "--weights", "fp32"], {}),
        "hf bf16": ([], ["--dtype", "bfloat16", "--weights", "fp32"], {}),
        "hf bf16, int8 steps": ([], ["--dtype", "bfloat16", "--weights", "int8"], {}),
        "hf fp32, int8 steps (default)": ([], ["--dtype", "float32", "--weights", "int8"], {}),
        "vllm N=1": ([], ["--proposer", "vllm", "--num-candidates", "1", "--dtype", "float32"], {}),
        "vllm N=3": ([], ["--proposer", "vllm", "--num-candidates", "3", "--dtype", "float32"], {}),
        "ngram": ([], ["--proposer", "ngram"], {}),
    },
}  # fmt: skip


def generate(address: str, max_tokens: int, k: int) -> dict:
    stub = draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(address))
    list(stub.Generate(draft_pb2.GenerateRequest(prompt="hi", max_tokens=8, apply_chat_template=True)))
    request = draft_pb2.GenerateRequest(
        prompt=DEMO_PROMPT, max_tokens=max_tokens, apply_chat_template=True, num_speculative_tokens=k
    )
    start, tokens, rounds = time.perf_counter(), 0, []
    for chunk in stub.Generate(request):
        tokens += len(chunk.token_ids)
        if chunk.HasField("stats"):
            rounds.append(chunk.stats)
    seconds = time.perf_counter() - start
    n = len(rounds)
    draft, verify = (sum(getattr(r, f) for r in rounds) / n for f in ("draft_seconds", "verify_seconds"))
    round_s = sum(r.round_seconds for r in rounds) / n
    drafted, accepted = sum(r.drafted_tokens for r in rounds), sum(r.accepted_tokens for r in rounds)
    return {
        "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
        "mean_acceptance_length": round(1 + accepted / n, 3),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 3),
        "rounds": n,
        "tokens_per_round": round(tokens / n, 3),
        "round_ms": {"draft": round(draft * 1e3, 1), "network": round((round_s - draft - verify) * 1e3, 1),
                     "verify": round(verify * 1e3, 1), "total": round(round_s * 1e3, 1)},
    }  # fmt: skip


def target_alone(max_tokens: int) -> dict:
    out = subprocess.run(
        [sys.executable, "benchmarks/target_alone.py", "--max-tokens", str(max_tokens)],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": "."},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="placement")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("-k", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    baseline = target_alone(args.max_tokens)
    print(f"target alone: {baseline['tokens_per_s']} tok/s", flush=True)
    rows = []
    for name, (target_flags, draft_flags, env) in SUITES[args.suite].items():
        try:
            with local_pair(target_flags, draft_flags, env=env) as pair:
                result = generate(pair.draft, args.max_tokens, args.k)
        except (RuntimeError, TimeoutError, grpc.RpcError) as exc:  # a config that cannot run here
            rows.append({"config": name, "draft_flags": draft_flags, "error": str(exc)[-500:]})
            print(json.dumps(rows[-1]), flush=True)
            continue
        speedup = round(result["tokens_per_s"] / baseline["tokens_per_s"], 3)
        rows.append({"config": name, "target_flags": target_flags, "draft_flags": draft_flags, "env": env,
                     "speedup": speedup, **result})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    report = {"command": "python -m benchmarks.pair_configs " + " ".join(sys.argv[1:]), "cpus": os.cpu_count(),
              "k": args.k, "target_alone": baseline, "configs": rows}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
