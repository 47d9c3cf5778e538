"""How fast speculation could be on this machine at best: the forward costs of the packaged pair
measured here, combined with a measured acceptance, with every serving overhead left out.

    python -m benchmarks.speedup_bounds --out benchmarks/results/speedup_bounds_cpu.json

One client: a round drafts K tokens one forward each, then verifies K + 1 rows, and commits
1 + sum_i prod_{j<=i} p_j tokens (p_j: the measured acceptance at draft position j); the target
alone spends one 1-row forward per token. On one machine the draft and the target share the cores,
so their times add (drafting beside a verify only splits the same cores). Many clients: plain
batched decoding commits one token per sequence per forward of all sequences; speculation at K
adds K draft forwards of all sequences and a verify of all their K + 1 rows. The bounds are upper
bounds on what the shipped pair measures (`make bench-capacity`), which also pays attention over
long contexts, sampling, the wire and Python.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.bench import machine
from benchmarks.decode_step import MODELS, forward_ms
from services.config import DEFAULT_CACHE_DIR
from services.gguf_decoder import GGUFDecoder
from services.gguf_file import GGUFFile
from services.model_loading import gguf_source


def committed_per_round(acceptance: list[float], k: int) -> float:
    """Expected tokens a round of K draft tokens commits: the accepted prefix, then the target's own."""
    expected, survive = 1.0, 1.0
    for p in acceptance[:k]:
        survive *= p
        expected += survive
    return expected


def best_speculation(acceptance: list[float], draft_ms: float, verify_ms: dict[int, float], sequences: int) -> dict:
    """The K of the most tokens a second for `sequences` clients (verify_ms: K -> the verify forward)."""
    options = []
    for k, verify in verify_ms.items():
        tokens = sequences * committed_per_round(acceptance, k)
        seconds = (k * draft_ms + verify) / 1e3
        options.append({"k": k, "tokens_per_round": round(tokens, 2), "round_ms": round(seconds * 1e3, 1),
                        "tokens_per_s": round(tokens / seconds, 2)})  # fmt: skip
    return max(options, key=lambda option: option["tokens_per_s"]) | {"all": options}


def acceptance_from(path: Path) -> list[float]:
    """Acceptance by draft position of the first level of a `benchmarks.link` report."""
    report = json.loads(path.read_text())
    return report["runs"][0]["levels"][0]["acceptance_by_position"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--acceptance-from", type=Path, default=Path("benchmarks/results/link_cpu.json"),
                        help="a benchmarks.link report (the pair's greedy acceptance by position)")  # fmt: skip
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    acceptance = acceptance_from(args.acceptance_from)
    decoders = {
        role: GGUFDecoder(GGUFFile(gguf_source(model, DEFAULT_CACHE_DIR)), output_rows=rows)
        for role, (model, rows) in MODELS.items()
    }
    target, draft = decoders["target"], decoders["draft"]
    c, r, n = args.context, args.repeats, args.clients
    one = {
        "target_1_row_ms": forward_ms(target, 1, c, r),
        "draft_1_row_ms": forward_ms(draft, 1, c, r),
        "verify_ms": {k: forward_ms(target, k + 1, c, r) for k in args.k},
    }
    many = {
        "plain_forward_ms": forward_ms(target, 1, c, r, sequences=n),
        "draft_forward_ms": forward_ms(draft, 1, c, r, sequences=n),
        "verify_ms": {k: forward_ms(target, k + 1, c, r, sequences=n) for k in args.k if k <= 4},
    }
    alone = 1e3 / one["target_1_row_ms"]  # tokens a second of the target alone, one client
    spec_one = best_speculation(acceptance, one["draft_1_row_ms"], one["verify_ms"], 1)
    plain_many = n * 1e3 / many["plain_forward_ms"]
    spec_many = best_speculation(acceptance, many["draft_forward_ms"], many["verify_ms"], n)
    best_many = max(plain_many, spec_many["tokens_per_s"])
    bounds = {
        "one_client_speedup_vs_target_alone": round(spec_one["tokens_per_s"] / alone, 3),
        f"{n}_clients_plain_batched_vs_one_client_plain": round(plain_many / alone, 3),
        f"{n}_clients_speculation_vs_plain_batched": round(spec_many["tokens_per_s"] / plain_many, 3),
        f"{n}_clients_best_vs_one_client_speculation": round(best_many / spec_one["tokens_per_s"], 3),
    }
    report = {
        "command": "python -m benchmarks.speedup_bounds " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "context_tokens": c,
        "acceptance_by_position": acceptance,
        "one_client": one | {"target_alone_tokens_per_s": round(alone, 2), "best_speculation": spec_one},
        "clients": n,
        "many_clients": many | {"plain_batched_tokens_per_s": round(plain_many, 2), "best_speculation": spec_many},
        "bounds": bounds,
    }
    print(json.dumps(bounds, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
