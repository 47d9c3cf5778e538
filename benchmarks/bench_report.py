"""Turn timed generations into the benchmark report: JSON, a markdown table and PNG plots."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from benchmarks.bench_data import Sample
from benchmarks.bench_runners import Generation


def save_json(path: Path | None, report: dict) -> None:
    """Write a benchmark's report (nothing when no path was given)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def acceptance_by_position(rounds: Sequence[dict]) -> list[float]:
    """Fraction of rounds whose i-th drafted token (i = 1..) was accepted, among rounds drafting it."""
    depth = max((r["drafted"] for r in rounds), default=0)
    out = []
    for position in range(1, depth + 1):
        drafted = [r for r in rounds if r["drafted"] >= position]
        out.append(sum(r["accepted"] >= position for r in drafted) / len(drafted))
    return out


def summarize(
    name: str,
    generations: Sequence[Generation],
    samples: dict[str, Sample],
    correct: dict[str, bool],
    baseline: Sequence[Generation] | None = None,
) -> dict:
    tokens = sum(len(g.token_ids) for g in generations)
    seconds = sum(g.seconds for g in generations)
    rounds = [r for g in generations for r in g.rounds]
    # time of a generation inside none of its rounds, after its first token (detokenizing, waiting)
    idle = sum(max(0.0, g.seconds - g.ttft_s - sum(r["round_s"] for r in g.rounds)) for g in generations)
    summary: dict = {
        "name": name,
        "requests": len(generations),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 3) if seconds else None,
        "ttft_s_p50": percentile([g.ttft_s for g in generations], 50),
        "ttft_s_p99": percentile([g.ttft_s for g in generations], 99),
        "tpot_s_p50": percentile([g.tpot_s for g in generations], 50),
        "tpot_s_p99": percentile([g.tpot_s for g in generations], 99),
    }
    if rounds:
        drafted, accepted = sum(r["drafted"] for r in rounds), sum(r["accepted"] for r in rounds)
        round_s = statistics.fmean(r["round_s"] for r in rounds)
        draft_s = statistics.fmean(r["draft_s"] for r in rounds)
        verify_s = statistics.fmean(r["verify_s"] for r in rounds)
        summary |= {
            "rounds": len(rounds),
            "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
            "mean_acceptance_length": round(1 + accepted / len(rounds), 3),
            "acceptance_by_position": [round(a, 4) for a in acceptance_by_position(rounds)],
            "round_s_mean": round(round_s, 4),
            "round_breakdown_s": {  # mean per round
                "draft": round(draft_s, 4),  # drafting before the verify was sent (0 on a pipeline hit)
                "network": round(round_s - draft_s - verify_s, 4),  # wire, (de)serialising, queueing
                "verify": round(verify_s, 4),  # the target's forward + decision
                "idle": round(idle / len(rounds), 4),  # between rounds
            },
        }
    for dataset in sorted({s.dataset for s in samples.values()}):
        ids = [g.sample_id for g in generations if samples[g.sample_id].dataset == dataset]
        key = "gsm8k_accuracy" if dataset == "gsm8k" else "humaneval_pass_at_1"
        summary[key] = round(sum(correct[i] for i in ids) / len(ids), 4) if ids else None
    if baseline is not None:
        reference = {g.sample_id: g.token_ids for g in baseline}
        summary["identical_to_baseline"] = sum(g.token_ids == reference.get(g.sample_id) for g in generations)
        base = summarize("baseline", baseline, samples, {i: False for i in samples})
        if summary["tokens_per_s"] and base["tokens_per_s"]:
            summary["speedup"] = round(summary["tokens_per_s"] / base["tokens_per_s"], 3)
    return summary


def compare_with(summaries: Sequence[dict], name: str, key: str) -> None:
    """Each run's tok/s over run `name`'s, as `key` (nothing where that run is absent)."""
    reference = next((s["tokens_per_s"] for s in summaries if s["name"] == name), None)
    if reference:
        for summary in summaries:
            if summary.get("tokens_per_s"):
                summary[key] = round(summary["tokens_per_s"] / reference, 3)


COLUMNS = [
    ("run", "name"),
    ("tok/s", "tokens_per_s"),
    ("speedup", "speedup"),
    ("vs llama.cpp", "vs_llamacpp"),
    ("TTFT p50 s", "ttft_s_p50"),
    ("TPOT p50 / p99 s", ("tpot_s_p50", "tpot_s_p99")),
    ("acceptance", "acceptance_rate"),
    ("mean acc. length", "mean_acceptance_length"),
    ("GSM8K acc.", "gsm8k_accuracy"),
    ("HumanEval pass@1", "humaneval_pass_at_1"),
    ("identical", "identical_to_baseline"),
]


def _cell(summary: dict, key: str | tuple[str, ...]) -> str:
    if isinstance(key, tuple):
        return " / ".join(_cell(summary, k) for k in key)
    value = summary.get(key)
    if value is None:
        return ""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(summaries: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(title for title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(s, key) for _, key in COLUMNS) + " |" for s in summaries]
    return "\n".join(lines) + "\n"


def plot(summaries: Sequence[dict], out_dir: Path) -> list[Path]:
    """speedup.png (every run against the target alone) and acceptance_by_position.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    runs = [s for s in summaries if s.get("speedup") is not None]
    ax.bar([s["name"] for s in runs], [s["speedup"] for s in runs], color="tab:blue")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel("speedup vs target alone")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    paths.append(out_dir / "speedup.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for s in summaries:
        if s.get("acceptance_by_position"):
            curve = s["acceptance_by_position"]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=s["name"])
    ax.set_xlabel("draft position")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("rounds accepting it (of those drafting it)")
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "acceptance_by_position.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
