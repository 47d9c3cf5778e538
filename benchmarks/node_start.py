"""Start-up cost of each node as users start it: seconds until its gRPC health says SERVING and its
resident memory, on a first start (empty weight cache and kernel cache: the GGUF files assembled
from their packages, the kernels compiled) and on a later one, then RSS after a generation.

    python -m benchmarks.node_start --out benchmarks/results/node_start_cpu.json

The nodes start one after the other (the target, then the draft against it), each alone on the
machine, so each time is its own. Extra flags for both nodes: `--node-args "--weights fp32"`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from services.channels import is_serving
from services.rpc.specwire.v1 import draft_pb2, draft_pb2_grpc
from specwire.local_pair import free_port

CLI = [sys.executable, "-m", "specwire"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def dir_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / (1 << 20), 1) if path.exists() else 0.0


def start(role: str, args: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    begin = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(
            [*CLI, role, "--port", str(port), "--metrics-port", "-1", *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    address = f"127.0.0.1:{port}"
    while not is_serving(address, 1.0):
        if process.poll() is not None:
            raise RuntimeError(f"{role} exited: {log.read_text()[-3000:]}")
        time.sleep(0.2)
    return process, address, round(time.monotonic() - begin, 2)


def one_start(args: argparse.Namespace, cache: Path, extensions: Path, logs: Path, label: str) -> dict:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    common = ["--cache-dir", str(cache), *shlex.split(args.node_args)]
    target, target_address, target_s = start("target", ["--model", args.target_model, *common], env, logs / f"{label}-target.log")
    row = {"target_ready_s": target_s, "target_rss_mb": rss_mb(target.pid)}
    draft, draft_address, draft_s = start(
        "draft", ["--model", args.draft_model, "--target", target_address, "--http-port", "-1", *common], env,
        logs / f"{label}-draft.log",
    )
    row |= {"draft_ready_s": draft_s, "draft_rss_mb": rss_mb(draft.pid)}
    try:
        with grpc.insecure_channel(draft_address) as channel:
            request = draft_pb2.GenerateRequest(prompt="Write a function that reverses a string.", max_tokens=64)
            tokens = sum(len(chunk.token_ids) for chunk in draft_pb2_grpc.DraftServiceStub(channel).Generate(request))
        row |= {
            "generated_tokens": tokens,
            "target_rss_after_generation_mb": rss_mb(target.pid),
            "draft_rss_after_generation_mb": rss_mb(draft.pid),
        }
    finally:
        for process in (draft, target):
            process.terminate()
            process.wait(60)
    return row | {"weight_cache_mb": dir_mb(cache), "kernel_cache_mb": dir_mb(extensions)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--draft-model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--node-args", default="", help="extra flags for both nodes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="specwire-start-") as tmp:
        cache, extensions, logs = Path(tmp, "cache"), Path(tmp, "torch_extensions"), Path(tmp, "logs")
        logs.mkdir()
        first = one_start(args, cache, extensions, logs, "first")
        later = one_start(args, cache, extensions, logs, "later")
    report = {
        "command": "python -m benchmarks.node_start " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "first_start": first,
        "later_start": later,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
