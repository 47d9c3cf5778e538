"""The verify-kernel interface: three hot-path operations, identical in every kernel backend.

Trees travel as padded int32 tensors: `parents[b, i]` (-1: child of the pending token) and
`tokens[b, i]` for i < num_nodes[b]; row r of `logits`/`probs` follows the pending token (r = 0)
or node r - 1, so node i is judged on row parents[b, i] + 1. Draft q is sparse per node:
`q_tokens[b, i, s]` (-1 pads) with `q_probs[b, i, s]`; a point-mass node has one entry of 1.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol

import torch

from services.candidate_tree import CandidateTree

PAD_PARENT = -2  # parent of padding nodes: never the root (-1) nor a node


@dataclass(frozen=True)
class TreeBatch:
    parents: torch.Tensor  # [B, N] int32
    tokens: torch.Tensor  # [B, N] int32
    num_nodes: torch.Tensor  # [B] int32


@dataclass(frozen=True)
class DraftQ:
    tokens: torch.Tensor  # [B, N, S] int32, -1 pads
    probs: torch.Tensor  # [B, N, S] float32


@dataclass(frozen=True)
class GreedyVerifyResult:
    target_argmax: torch.Tensor  # [B, R] int32: every row's top-1 by services.sampling.top1 (NaN as -inf, lowest index on ties)
    node_accepted: torch.Tensor  # [B, N] bool: the node's token is its parent row's argmax
    path_end: torch.Tensor  # [B] int32: last node of the longest accepted root path, -1 if none
    path_length: torch.Tensor  # [B] int32


@dataclass(frozen=True)
class RejectionResult:
    path_end: torch.Tensor  # [B] int32: last accepted node, -1 if none
    path_length: torch.Tensor  # [B] int32
    next_token: torch.Tensor  # [B] int32: from the residual (all children rejected) or the leaf row


class VerifyKernels(Protocol):
    name: str

    def tree_greedy_verify(self, logits: torch.Tensor, trees: TreeBatch) -> GreedyVerifyResult:
        """Argmax per row and, per request, the longest root path whose tokens all equal their
        parent row's argmax (ties in length: the lowest node index)."""

    def tree_rejection_sample(
        self,
        probs: torch.Tensor,
        trees: TreeBatch,
        draft_q: DraftQ,
        accept_uniforms: torch.Tensor,
        sample_uniforms: torch.Tensor,
    ) -> RejectionResult:
        """Recursive rejection sampling over siblings (the probabilistic strategy), randomness given.

        From the root, children are tried in index order; child i is accepted when
        accept_uniforms[b, i] * q_i(x) * Z < p~(x), where p~ is the unnormalised residual of the
        current row and Z its mass; a rejection sets p~ <- max(p~ - Z q_i, 0) on q_i's support.
        The next token is the first index whose cumulative p~ exceeds sample_uniforms[b] * sum(p~).
        """

    def compact_kv(self, tensors: Sequence[torch.Tensor], src: torch.Tensor, dst_start: int) -> None:
        """In every [batch, heads, seq, dim] tensor, move positions src[j] (ascending, >= dst_start + j)
        to dst_start + j, in place; the caller then truncates to dst_start + len(src)."""


def pack_trees(trees: Sequence[CandidateTree], device: torch.device | str = "cpu") -> TreeBatch:
    """Pad a batch of tries into kernel input tensors."""
    width = max((len(t) for t in trees), default=0) or 1
    parents = torch.full((len(trees), width), PAD_PARENT, dtype=torch.int32)
    tokens = torch.zeros((len(trees), width), dtype=torch.int32)
    for b, tree in enumerate(trees):
        parents[b, : len(tree)] = torch.tensor(tree.parents, dtype=torch.int32)
        tokens[b, : len(tree)] = torch.tensor(tree.token_ids, dtype=torch.int32)
    num_nodes = torch.tensor([len(t) for t in trees], dtype=torch.int32)
    return TreeBatch(parents.to(device), tokens.to(device), num_nodes.to(device))


def pack_draft_q(trees: Sequence[CandidateTree], device: torch.device | str = "cpu") -> DraftQ:
    """Sparse q per node, duplicate ids merged; a node without q is a point mass on its token."""
    merged = []
    for tree in trees:
        rows = []
        for i, token in enumerate(tree.token_ids):
            q: dict[int, float] = {}
            if tree.draft_probs:
                for t, p in zip(tree.draft_probs[i].token_ids, tree.draft_probs[i].probs, strict=True):
                    q[t] = q.get(t, 0.0) + p
            else:
                q[token] = 1.0
            rows.append(q)
        merged.append(rows)
    width = max((len(t) for t in trees), default=0) or 1
    support = max((len(q) for rows in merged for q in rows), default=0) or 1
    q_tokens = torch.full((len(trees), width, support), -1, dtype=torch.int32)
    q_probs = torch.zeros((len(trees), width, support), dtype=torch.float32)
    for b, rows in enumerate(merged):
        for i, q in enumerate(rows):
            q_tokens[b, i, : len(q)] = torch.tensor(list(q), dtype=torch.int32)
            q_probs[b, i, : len(q)] = torch.tensor(list(q.values()), dtype=torch.float32)
    return DraftQ(q_tokens.to(device), q_probs.to(device))


class LaunchedKernels(ABC):
    """Shared by the Triton and CUDA backends: prepares inputs and outputs, subclasses launch."""

    name: str

    def tree_greedy_verify(self, logits: torch.Tensor, trees: TreeBatch) -> GreedyVerifyResult:
        logits = logits.float().contiguous()
        batch, rows, _ = logits.shape
        new = partial(torch.empty, dtype=torch.int32, device=logits.device)
        result = GreedyVerifyResult(
            new((batch, rows)), new(trees.parents.shape, dtype=torch.int8), new(batch), new(batch)
        )
        with on_device(logits.device):
            self._launch_greedy(logits, _contiguous(trees), result)
        return replace(result, node_accepted=result.node_accepted.bool())

    def tree_rejection_sample(
        self,
        probs: torch.Tensor,
        trees: TreeBatch,
        draft_q: DraftQ,
        accept_uniforms: torch.Tensor,
        sample_uniforms: torch.Tensor,
    ) -> RejectionResult:
        probs = probs.float().contiguous()
        residual = torch.empty((probs.shape[0], probs.shape[2]), dtype=torch.float32, device=probs.device)
        new = partial(torch.empty, probs.shape[0], dtype=torch.int32, device=probs.device)
        result = RejectionResult(new(), new(), new())
        with on_device(probs.device):
            self._launch_rejection(
                probs,
                _contiguous(trees),
                DraftQ(draft_q.tokens.contiguous(), draft_q.probs.float().contiguous()),
                accept_uniforms.float().contiguous(),
                sample_uniforms.float().contiguous(),
                residual,
                result,
            )
        return result

    def compact_kv(self, tensors: Sequence[torch.Tensor], src: torch.Tensor, dst_start: int) -> None:
        if not len(src) or not tensors:
            return
        first = tensors[0]
        if any(t.shape != first.shape or t.dtype != first.dtype or not t.is_contiguous() for t in tensors):
            raise ValueError("compact_kv needs contiguous KV tensors of one shape and dtype")
        table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=first.device)
        with on_device(first.device):
            self._launch_compact(table, first, src.to(first.device, torch.int32).contiguous(), dst_start)

    @abstractmethod
    def _launch_greedy(self, logits: torch.Tensor, trees: TreeBatch, out: GreedyVerifyResult) -> None: ...

    @abstractmethod
    def _launch_rejection(
        self,
        probs: torch.Tensor,
        trees: TreeBatch,
        draft_q: DraftQ,
        accept_uniforms: torch.Tensor,
        sample_uniforms: torch.Tensor,
        residual: torch.Tensor,
        out: RejectionResult,
    ) -> None: ...

    @abstractmethod
    def _launch_compact(self, table: torch.Tensor, like: torch.Tensor, src: torch.Tensor, dst_start: int) -> None:
        """`table`: data pointers of tensors shaped and typed like `like`."""


def on_device(device: torch.device) -> AbstractContextManager:
    """Make `device` current for a launch (kernels start on the current CUDA device and stream)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _contiguous(trees: TreeBatch) -> TreeBatch:
    return TreeBatch(trees.parents.contiguous(), trees.tokens.contiguous(), trees.num_nodes.contiguous())
