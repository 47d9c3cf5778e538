"""Time each verify kernel against the torch reference: 16/64/256 trie nodes, vocab 32k/152k.

    python -m benchmarks.verify_kernels --out benchmarks/results/kernels_<device>.json

Every backend that loads on the device is timed (cuda and triton need a GPU; on a CPU only the
torch reference runs). Trees are chains of 4 tokens under distinct first tokens; KV compaction
moves a 4-token path in 28 layers x (K, V) of [1, 2, 1025 + nodes, 128], the 1.5B target's shape.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from benchmarks.bench_report import save_json
from services.candidate_tree import CandidateTree
from target_node.kernels import TorchKernels, load_kernels, pack_draft_q, pack_trees

NODES = (16, 64, 256)
VOCABS = (32_000, 151_936)


def chains(nodes: int, depth: int = 4) -> CandidateTree:
    return CandidateTree.from_sequences([[c, *range(1000, 1000 + depth - 1)] for c in range(nodes // depth)])


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of `fn` after two warm-up calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    backends = {"torch": TorchKernels()}
    for name in ("triton", "cuda"):
        try:
            backends[name] = load_kernels(name, device)
        except RuntimeError as exc:
            print(f"{name}: skipped ({exc})")
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for vocab in VOCABS:
        for nodes in NODES:
            tree = chains(nodes)
            trees, draft_q = pack_trees([tree], device), pack_draft_q([tree], device)
            logits = torch.randn(1, nodes + 1, vocab, device=device, generator=gen)
            probs = logits.softmax(-1)
            accept_u = torch.rand(1, nodes, device=device, generator=gen)
            sample_u = torch.rand(1, device=device, generator=gen)
            for name, kernels in backends.items():
                for kernel, fn in {
                    "tree_greedy_verify": partial(kernels.tree_greedy_verify, logits, trees),
                    "tree_rejection_sample": partial(
                        kernels.tree_rejection_sample, probs, trees, draft_q, accept_u, sample_u
                    ),
                }.items():
                    rows.append(
                        dict(kernel=kernel, backend=name, nodes=nodes, vocab=vocab, ms=timed(fn, device, args.repeats))
                    )
                    print(rows[-1])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for nodes in NODES:
        kv = [torch.randn(1, 2, 1025 + nodes, 128, device=device).to(dtype) for _ in range(56)]
        src = torch.tensor([1025 + n for n in (0, 2, 3, nodes - 1)], dtype=torch.int32, device=device)
        for name, kernels in backends.items():
            ms = timed(partial(kernels.compact_kv, kv, src, 1025), device, args.repeats)
            rows.append(dict(kernel="compact_kv", backend=name, nodes=nodes, vocab=None, ms=ms))
            print(rows[-1])
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "backends": list(backends),
        "results": rows,
    }
    save_json(args.out, report)


if __name__ == "__main__":
    main()
