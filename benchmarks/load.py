"""Load: bounded concurrent generations against a local pair, level by level, each for a fixed time.

    python -m benchmarks.load --clients 1 4 16 64 --duration 20 --out benchmarks/results/load_cpu.json
    python -m benchmarks.load --real --clients 4 16 --duration 60 --out benchmarks/results/load_real_cpu.json

Tiny random models, in this process, by default (this measures the serving path: gRPC, sessions,
batching, memory, not model quality). `--real`: the packaged Qwen2.5-Coder 0.5B -> 1.5B pair as
users run it, a `specwire target` and a `specwire draft` process started by the CLI.

Requests mix what users send: greedy and seeded sampled ones alternate, and every
`--cancel-every`-th request is cancelled by its client after two chunks. Each client loops until
the level's time is up, then finishes the request it is in; errors are counted, never retried.
After each level: resident memory of the node process(es), and the target's live sessions and KV
bytes (every session must be closed again).

`--capacity` (the real pair, `make bench-capacity`): what one target gives many drafts. At each
number of clients, the same greedy GSM8K and HumanEval chat prompts go through the draft node's
OpenAI API (streamed completions) twice, interleaved: with speculation, and with `target_only`
(the same target node decoding plainly, its rounds batched across the clients: plain batched
decoding). Per mode: total tok/s, TTFT and per-client TPOT p50/p99, errors, each node's RSS; every
speculative output must equal the plain one of its prompt (greedy: the target alone's text).

    python -m benchmarks.load --capacity --clients 1 2 4 8 --out benchmarks/results/capacity_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from benchmarks.bench_report import percentile, save_json
from services.rpc.specwire.v1 import draft_pb2, draft_pb2_grpc
from specwire.local_pair import LocalPair, local_pair

PROMPTS = ["def add(a, b):", "The quick brown fox", "import numpy as np\n", "class Stack:", "SELECT * FROM"]


def rss_mb(pid: str | int = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request_for(index: int, n: int, max_tokens: int) -> draft_pb2.GenerateRequest:
    """Client `index`'s n-th request: greedy and seeded sampling alternate."""
    request = draft_pb2.GenerateRequest(prompt=PROMPTS[(index + n) % len(PROMPTS)], max_tokens=max_tokens)
    if n % 2:
        request.temperature, request.top_p, request.seed = 0.8, 0.95, 1000 * index + n
    return request


def run_level(address: str, clients: int, duration_s: float, max_tokens: int, cancel_every: int) -> dict:
    stub = draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(address))
    latencies: list[float] = []
    counts = {"tokens": 0, "errors": 0, "cancelled": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def client(index: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            request, cancel = request_for(index, n, max_tokens), cancel_every and n % cancel_every == cancel_every - 1
            n += 1
            start = time.perf_counter()
            call = stub.Generate(request, timeout=600)
            tokens = 0
            try:
                for chunk_index, chunk in enumerate(call):
                    tokens += len(chunk.token_ids)
                    if cancel and chunk_index == 1:
                        call.cancel()  # the client walks away mid-stream
            except grpc.RpcError as exc:
                with lock:
                    counts["cancelled" if cancel and exc.code() == grpc.StatusCode.CANCELLED else "errors"] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                counts["tokens"] += tokens

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
        "cancelled": counts["cancelled"],
        "errors": counts["errors"],
        "tokens": counts["tokens"],
        "tokens_per_s": round(counts["tokens"] / elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 3),
        "latency_s_p50": percentile(latencies, 50),
        "latency_s_p99": percentile(latencies, 99),
        "latency_s_mean": statistics.fmean(latencies) if latencies else None,
    }


@dataclass
class Pair:
    draft: str  # the draft node's gRPC address
    memory: Callable[[], dict]  # RSS and the target's live sessions / KV bytes, read now


def scrape(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@contextmanager
def real_pair(logs: Path | None) -> Iterator[Pair]:
    """The packaged pair as two CLI processes; memory from /proc and the target's /metrics."""
    with local_pair(logs=logs, metrics=True) as pair:
        yield Pair(pair.draft, real_memory(pair))


def real_memory(pair: LocalPair) -> Callable[[], dict]:
    """Each node process's RSS and the target's live sessions and KV bytes, read when called."""

    def memory() -> dict:
        port = pair.metrics_ports["target"]
        return {
            "rss_mb": {name: round(rss_mb(pid), 1) for name, pid in pair.pids.items()},
            "target_sessions_after": int(scrape(port, "specwire_target_active_sessions")),
            "target_kv_bytes_after": int(scrape(port, "specwire_target_kv_cache_bytes")),
        }

    return memory


@contextmanager
def in_process_pair(target_model: str | None, draft_model: str | None, most: int) -> Iterator[Pair]:
    """Both nodes in this process (tiny random models unless given)."""
    from draft_node.config import DraftConfig
    from draft_node.server import start_draft
    from services.model_loading import load_model
    from target_node.config import TargetConfig
    from target_node.server import start_target

    with tempfile.TemporaryDirectory() as tmp:
        if target_model is None:
            target_model, draft_model = tiny_pair(Path(tmp))
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

        def memory() -> dict:
            sessions = target.node.sessions.snapshot()
            return {
                "rss_mb": round(rss_mb(), 1),
                "target_sessions_after": len(sessions),
                "target_kv_bytes_after": sum(target.node.backend.session_bytes(s) for s in sessions),
            }

        try:
            yield Pair(f"127.0.0.1:{draft.port}", memory)
        finally:
            draft.stop(0)
            target.stop(0)


def tiny_pair(directory: Path) -> tuple[str, str]:
    from tests.tiny_models import build_model, build_tokenizer

    tokenizer = build_tokenizer(directory / "tok")
    target = build_model(directory / "target", tokenizer, seed=0)
    draft = build_model(directory / "draft", tokenizer, seed=1, perturb_from=target, noise=0.02)
    return str(target), str(draft)


def capacity_level(base_url: str, clients: int, prompts: list[tuple[str, str]], target_only: bool, tokenizer: object,
                   max_tokens: int) -> tuple[dict, dict[str, str]]:  # fmt: skip
    """`clients` threads share the prompts (each request once); returns the level's figures and the
    text of each prompt."""
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.bench_runners import Settings, SpecwireOpenAIRunner

    runner = SpecwireOpenAIRunner(base_url, Settings(max_tokens=max_tokens, target_only=target_only), tokenizer)
    errors = []

    def one(prompt: tuple[str, str]) -> object:
        try:
            return runner.generate(*prompt)
        except Exception as exc:  # noqa: BLE001 - counted, never retried
            errors.append(repr(exc))
            return None

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        generations = [g for g in pool.map(one, prompts) if g is not None]
    elapsed = time.perf_counter() - start
    tokens = sum(len(g.token_ids) for g in generations)
    return {
        "mode": "plain batched (target_only)" if target_only else "specwire",
        "clients": clients,
        "requests": len(prompts),
        "errors": len(errors),
        "error_samples": errors[:3],
        "tokens": tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 3),
        "ttft_s_p50": percentile([g.ttft_s for g in generations], 50),
        "ttft_s_p99": percentile([g.ttft_s for g in generations], 99),
        "tpot_s_p50": percentile([g.tpot_s for g in generations], 50),
        "tpot_s_p99": percentile([g.tpot_s for g in generations], 99),
    }, {g.sample_id: g.text for g in generations}


def run_capacity(args: argparse.Namespace, logs: Path | None) -> list[dict]:
    """Both modes at every number of clients on one pair (CLI processes, OpenAI API)."""
    from benchmarks.bench_data import chat_prompts
    from services.config import DEFAULT_CACHE_DIR
    from services.gguf_file import GGUFFile
    from services.model_loading import gguf_source
    from target_node.config import TargetConfig

    tokenizer = GGUFFile(gguf_source(TargetConfig.model_fields["model"].default)).tokenizer(DEFAULT_CACHE_DIR)
    prompts = chat_prompts(args.prompts)
    levels = []
    with local_pair(logs=logs, metrics=True, http=True) as pair:
        base_url = f"http://127.0.0.1:{pair.http_port}"
        memory = real_memory(pair)
        for target_only in (False, True):  # warm-up: every prompt's prefill in both prefix caches
            capacity_level(base_url, 1, prompts, target_only, tokenizer, 4)
        for clients in args.clients:
            batch = [prompts[i % len(prompts)] for i in range(max(len(prompts), 2 * clients))]
            texts = {}
            for target_only in (False, True):
                before = target_counters(pair.metrics_ports["target"])
                level, texts[target_only] = capacity_level(
                    base_url, clients, batch, target_only, tokenizer, args.max_tokens
                )
                level |= memory() | target_means(before, target_counters(pair.metrics_ports["target"]))
                levels.append(level)
                print(json.dumps(level), flush=True)
            levels[-2]["mismatches"] = sum(texts[False][k] != texts[True].get(k) for k in texts[False])
            levels[-2]["speedup_vs_plain"] = round(levels[-2]["tokens_per_s"] / levels[-1]["tokens_per_s"], 3)
    return levels


TARGET_HISTOGRAMS = {
    "verify_batch_size_mean": "specwire_target_batch_size",  # verify rounds per forward
    "advised_draft_tokens_mean": "specwire_target_advised_draft_tokens",  # over answers that carried advice
}


def target_counters(port: int) -> dict[str, tuple[float, float]]:
    """(sum, count) of the target histograms a level's means come from."""
    return {key: (scrape(port, name + "_sum"), scrape(port, name + "_count")) for key, name in TARGET_HISTOGRAMS.items()}


def target_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict:
    """Each histogram's mean over what was observed between the two readings (None: nothing was)."""
    means = {}
    for key in TARGET_HISTOGRAMS:
        total, count = (a - b for a, b in zip(after[key], before[key], strict=True))
        means[key] = round(total / count, 3) if count else None
    return means


def plot_capacity(levels: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for mode in dict.fromkeys(level["mode"] for level in levels):
        rows = [level for level in levels if level["mode"] == mode]
        ax.plot([r["clients"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("total tokens / s")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--cancel-every", type=int, default=4, help="cancel every n-th request (0: none)")
    parser.add_argument("--real", action="store_true", help="the packaged pair as two CLI processes")
    parser.add_argument("--target-model", help="in process; default: a tiny random model built here")
    parser.add_argument("--draft-model")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--capacity", action="store_true", help="the real pair, specwire vs plain batched decoding")
    parser.add_argument("--prompts", type=int, default=8, help="--capacity: prompts (half GSM8K, half HumanEval)")
    args = parser.parse_args(argv)
    most = max(args.clients)
    logs = args.out.parent / (args.out.stem + "-logs") if args.out else None
    command = "python -m benchmarks.load " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.capacity:
        from benchmarks.bench import machine

        levels = run_capacity(args, logs)
        report = {"command": command, "machine": machine(), "max_tokens": args.max_tokens, "levels": levels,
                  "total_errors": sum(level["errors"] for level in levels),
                  "total_mismatches": sum(level.get("mismatches", 0) for level in levels)}  # fmt: skip
        save_json(args.out, report)
        if args.out:
            plot_capacity(levels, args.out.with_suffix(".png"))
        return report
    pair_context = real_pair(logs) if args.real else in_process_pair(args.target_model, args.draft_model, most)
    levels = []
    with pair_context as pair:
        run_level(pair.draft, 1, 0.1, 4, 0)  # warm-up
        baseline = pair.memory()
        for clients in args.clients:
            level = run_level(pair.draft, clients, args.duration, args.max_tokens, args.cancel_every)
            time.sleep(0.5)  # a cancelled generation closes its target session just after the client left
            level |= pair.memory()
            levels.append(level)
            print(json.dumps(level), flush=True)
    models = ("packaged (CLI processes)",) * 2 if args.real else (args.target_model, args.draft_model)
    report = {
        "command": command,
        "models": {"target": models[0] or "tiny (built)", "draft": models[1] or "tiny (built)"},
        "baseline": baseline,
        "levels": levels,
        "total_errors": sum(level["errors"] for level in levels),
    }
    save_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
