"""CUDA verify kernels, JIT-built with torch.utils.cpp_extension.load on first use.

The extension's name carries a hash of the sources, so an edited kernel is rebuilt and an
unchanged one is loaded from torch's extension cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType

import torch

from target_node.kernels.base import DraftQ, GreedyVerifyResult, LaunchedKernels, RejectionResult, TreeBatch

CUDA_DIR = Path(__file__).parent / "cuda"


def cuda_sources() -> list[Path]:
    return sorted([*CUDA_DIR.glob("*.cu"), *CUDA_DIR.glob("*.cpp")])


def build_extension() -> ModuleType:
    """Compile (or load from the cache) the extension for the local GPU."""
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256()
    for path in [*cuda_sources(), *CUDA_DIR.glob("*.h")]:
        digest.update(path.name.encode() + path.read_bytes())
    return load(
        name=f"specwire_verify_{digest.hexdigest()[:16]}",
        sources=[str(p) for p in cuda_sources()],
        extra_include_paths=[str(CUDA_DIR)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        verbose=False,
    )


def current_stream(tensor: torch.Tensor) -> int:
    """The raw cudaStream_t of the current stream on the tensor's device."""
    return torch.cuda.current_stream(tensor.device).cuda_stream


class CudaKernels(LaunchedKernels):
    name = "cuda"

    def __init__(self) -> None:
        self.ext = build_extension()

    def _launch_greedy(self, logits: torch.Tensor, trees: TreeBatch, out: GreedyVerifyResult) -> None:
        self.ext.tree_greedy_verify(
            logits, trees.parents, trees.tokens, trees.num_nodes,
            out.target_argmax, out.node_accepted, out.path_end, out.path_length, current_stream(logits),
        )  # fmt: skip

    def _launch_rejection(
        self,
        probs: torch.Tensor,
        trees: TreeBatch,
        draft_q: DraftQ,
        accept_uniforms: torch.Tensor,
        sample_uniforms: torch.Tensor,
        residual: torch.Tensor,
        out: RejectionResult,
    ) -> None:
        self.ext.tree_rejection_sample(
            probs, trees.parents, trees.tokens, trees.num_nodes, draft_q.tokens, draft_q.probs,
            accept_uniforms, sample_uniforms, residual, out.path_end, out.path_length, out.next_token,
            current_stream(probs),
        )  # fmt: skip

    def _launch_compact(self, table: torch.Tensor, like: torch.Tensor, src: torch.Tensor, dst_start: int) -> None:
        heads = like.numel() // (like.shape[-2] * like.shape[-1])
        self.ext.compact_kv(
            table, like.element_size(), heads, like.shape[-2], like.shape[-1], src, dst_start, current_stream(like)
        )
