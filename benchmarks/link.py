"""Link: the pair over a network link with latency, against the target alone on its own core.

    python -m benchmarks.link --out benchmarks/results/link_cpu.json           # `make bench-link`
    python -m benchmarks.link --rtt-ms 0 20 --prompts 1 --max-tokens 16 --pipeline off   # smoke run

Two one-core machines on one: a `specwire target` pinned to one core and a `specwire draft` to the
other (`taskset`, `--threads 1`), two CLI processes started once per pipelining setting (the
draft's `--pipeline off|on|auto`). The draft reaches the target through a DelayRelay
(benchmarks/delay_relay.py: every byte held RTT/2 each way, in user space as this VM's kernel has
no netem) whose RTT changes between levels on the same open connection. Each level sends the same
greedy GSM8K and HumanEval prompts (chat template applied), one at a time, to the draft's Generate.

Baseline: the target alone on its core, measured in each pair at RTT 0 (`target_only`: the draft
drafts nothing and passes on the target's tokens, one round per token over loopback). A remote
client of a target-alone server pays the RTT once per request (the tokens stream back), not once
per token, so at RTT r each baseline request takes its RTT-0 seconds + r, and the speedup is the
pair's tok/s over tokens / (seconds + r).

Every prompt is generated once (untimed, 8 tokens) first, so every timed request, the baseline's
too, finds its prompt in both nodes' prefix caches: the levels measure decoding, not a one-core
prefill. Each round's time (the stream's round stats) splits into drafting, the target's verify
(timed on the target) and the rest, the wire: relay, gRPC, (de)serialising, plus the RTT; at RTT 0
that rest is the per-round wire overhead. Greedy outputs must be identical to the baseline's,
request by request (`mismatches`). Writes the JSON report and a speedup-vs-RTT plot beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc

from benchmarks.bench import machine
from benchmarks.bench_data import chat_prompts
from benchmarks.bench_report import save_json, summarize
from benchmarks.bench_runners import Generation, Settings, SpecwireGrpcRunner
from benchmarks.delay_relay import DelayRelay
from specwire.local_pair import local_pair

BASELINE = (
    "the target alone on its own core (target_only through the draft at RTT 0, one loopback round per "
    "token); at RTT r each request's seconds + r: a remote client pays the RTT once per request, not per token"
)


class TargetOnly:
    """A DraftService stub whose Generate requests ask for the target alone (K = 0)."""

    def __init__(self, stub: object) -> None:
        self.stub = stub

    def Generate(self, request: object, **kwargs: object) -> object:
        request.target_only = True
        return self.stub.Generate(request, **kwargs)


def run_prompts(runner: SpecwireGrpcRunner, prompts: list[tuple[str, str]]) -> list[Generation]:
    return [runner.generate(sample_id, text) for sample_id, text in prompts]


def level(rtt_ms: float, generations: list[Generation], baseline: list[Generation]) -> dict:
    """The pair's summary at this RTT (bench_report.summarize) against the RTT-adjusted baseline."""
    summary = summarize(f"rtt {rtt_ms:g} ms", generations, {}, {}, baseline)
    baseline_tps = sum(len(g.token_ids) for g in baseline) / sum(g.seconds + rtt_ms / 1000 for g in baseline)
    reference = {g.sample_id: g.token_ids for g in baseline}
    return summary | {
        "rtt_ms": rtt_ms,
        "baseline_tokens_per_s": round(baseline_tps, 3),
        "speedup": round(summary["tokens_per_s"] / baseline_tps, 3),
        "mismatches": summary["requests"] - summary["identical_to_baseline"],
        "generations": [
            {"sample_id": g.sample_id, "tokens": len(g.token_ids), "seconds": round(g.seconds, 3),
             "ttft_s": round(g.ttft_s, 3), "identical": g.token_ids == reference[g.sample_id]}
            for g in generations
        ],
    }  # fmt: skip


def run_setting(pipeline: str, args: argparse.Namespace, prompts: list[tuple[str, str]], logs: Path) -> dict:
    """One pair with the draft's `--pipeline` setting: the baseline at RTT 0, then every RTT level."""
    relay = DelayRelay(0, "127.0.0.1", 0, 0.0)

    def through_relay(target_port: int) -> str:
        relay.target_port = target_port
        return f"127.0.0.1:{relay.start()}"

    pinned = {name: ["taskset", "-c", cpu] for name, cpu in zip(("target", "draft"), args.cpus, strict=True)}
    threads = ["--threads", "1"]
    result: dict = {"pipeline": pipeline, "levels": []}
    try:
        with local_pair(
            threads, [*threads, "--pipeline", pipeline], logs=logs / f"pipeline-{pipeline}", prefixes=pinned,
            draft_target=through_relay,
        ) as pair:  # fmt: skip
            warm = SpecwireGrpcRunner(pair.draft, Settings(min(8, args.max_tokens)))
            run_prompts(warm, prompts)  # fills both prefix caches; the first rounds' one-off costs
            alone = SpecwireGrpcRunner(pair.draft, Settings(args.max_tokens))
            alone.stub = TargetOnly(alone.stub)
            baseline = run_prompts(alone, prompts)
            result["baseline"] = summarize("target alone, RTT 0", baseline, {}, {})
            print(json.dumps({"pipeline": pipeline, "baseline": result["baseline"]}), flush=True)
            specwire = SpecwireGrpcRunner(pair.draft, Settings(args.max_tokens))
            for rtt_ms in args.rtt_ms:
                relay.rtt_s = rtt_ms / 1000
                result["levels"].append(level(rtt_ms, run_prompts(specwire, prompts), baseline))
                print(json.dumps({"pipeline": pipeline} | result["levels"][-1]), flush=True)
    except (RuntimeError, TimeoutError, grpc.RpcError) as exc:  # e.g. a setting this draft does not know
        result["error"] = str(exc)[-800:]
        print(f"pipeline {pipeline}: {result['error']}", file=sys.stderr, flush=True)
    finally:
        relay.stop()
    at_zero = next((lv for lv in result["levels"] if lv["rtt_ms"] == 0 and "round_s_mean" in lv), None)
    if at_zero:  # what a round costs beyond drafting and the target's verify, with no added latency
        result["wire_overhead_ms_per_round"] = round(at_zero["round_breakdown_s"]["network"] * 1e3, 2)
        result["verify_ms_per_round"] = round(at_zero["round_breakdown_s"]["verify"] * 1e3, 2)
        result["round_ms_at_rtt0"] = round(at_zero["round_s_mean"] * 1e3, 2)
    return result


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for run in runs:
        if run["levels"]:
            rtts = [lv["rtt_ms"] for lv in run["levels"]]
            ax.plot(
                rtts, [lv["speedup"] for lv in run["levels"]], marker="o", label=f"pipeline {run['pipeline']}"
            )
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="target alone")
    ax.set_xlabel("round-trip time, draft to target (ms)")
    ax.set_ylabel("speedup vs target alone")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(runs: list[dict]) -> None:
    print("| pipeline | RTT ms | tok/s | target alone tok/s | speedup | round ms | wire ms | verify ms | draft ms "
          "| mean acc. length | identical |")  # fmt: skip
    print("|" + "---|" * 11)
    for run in runs:
        for lv in run["levels"]:
            phases = lv.get("round_breakdown_s", {})
            ms = [f"{phases[k] * 1e3:.1f}" if k in phases else "" for k in ("network", "verify", "draft")]
            round_ms = f"{lv['round_s_mean'] * 1e3:.1f}" if "round_s_mean" in lv else ""
            print(f"| {run['pipeline']} | {lv['rtt_ms']:g} | {lv['tokens_per_s']} | {lv['baseline_tokens_per_s']} "
                  f"| {lv['speedup']} | {round_ms} | {' | '.join(ms)} | {lv.get('mean_acceptance_length', '')} "
                  f"| {lv['identical_to_baseline']}/{lv['requests']} |")  # fmt: skip
        if "error" in run:
            print(f"| {run['pipeline']} | failed: {run['error'].strip().rsplit(chr(10), 1)[-1][:120]} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0, 10, 20, 50, 100])
    parser.add_argument(
        "--pipeline", nargs="+", default=["off", "on", "auto"], help="the draft's --pipeline values"
    )
    parser.add_argument("--prompts", type=int, default=4, help="GSM8K and HumanEval problems, half each")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--cpus", nargs=2, default=["0", "1"], metavar=("TARGET", "DRAFT"), help="taskset cores"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/link_cpu.json"))
    args = parser.parse_args(argv)
    started_on = machine()
    prompts = chat_prompts(args.prompts)
    logs = args.out.parent / (args.out.stem + "-logs")
    runs = [run_setting(pipeline, args, prompts, logs) for pipeline in args.pipeline]
    report = {
        "command": "python -m benchmarks.link " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": started_on,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "baseline": BASELINE,
        "wire_overhead": "per round at RTT 0: the draft's round time less its drafting and the target's verify",
        "runs": runs,
        "total_mismatches": sum(lv["mismatches"] for run in runs for lv in run["levels"]),
    }
    save_json(args.out, report)
    plot(runs, args.out.with_suffix(".png"))
    print_table(runs)
    return report


if __name__ == "__main__":
    main()
