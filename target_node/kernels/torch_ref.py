"""Torch reference kernels: the definition the Triton and CUDA kernels are tested against.

Written for clarity over speed, but vectorised where it is free: on the CPU these are the kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.kv_cache import move_positions
from services.sampling import top1
from target_node.kernels.base import DraftQ, GreedyVerifyResult, RejectionResult, TreeBatch


def root_paths(accepted: torch.Tensor, parents: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per node: are all nodes from the root down to it accepted, and its depth (pointer jumping)."""
    jump = parents.long()
    ok = accepted & valid
    depth = valid.long()
    while bool((jump >= 0).any()):
        up = jump >= 0
        target = jump.clamp_min(0)
        ok = ok & (~up | ok.gather(1, target))
        depth = depth + torch.where(up, depth.gather(1, target), 0)
        jump = torch.where(up, jump.gather(1, target), jump)
    return ok, depth


def longest_path_end(reach: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deepest reachable node per row, ties to the lowest index (-1 and 0 when none): the rule of
    `CandidateTree.longest_accepted_path_end`."""
    key = torch.where(reach, depth, 0)
    length = key.max(1).values if key.shape[1] else torch.zeros(key.shape[0], dtype=torch.long, device=key.device)
    index = torch.arange(key.shape[1], device=key.device).expand_as(key)
    first = torch.where((key == length[:, None]) & reach, index, key.shape[1]).min(1).values
    end = torch.where(length > 0, first, -1)
    return end.to(torch.int32), length.to(torch.int32)


def inverse_cdf(weights: torch.Tensor, u: float) -> int:
    """First index whose cumulative weight exceeds u * total (the last positive weight if rounding
    leaves none)."""
    cumulative = weights.cumsum(0)
    hits = (cumulative > u * cumulative[-1]).nonzero()
    if len(hits):
        return int(hits[0])
    return int((weights > 0).nonzero()[-1])


class TorchKernels:
    name = "torch"

    def tree_greedy_verify(self, logits: torch.Tensor, trees: TreeBatch) -> GreedyVerifyResult:
        argmax = top1(logits).to(torch.int32)
        valid = torch.arange(trees.parents.shape[1], device=logits.device) < trees.num_nodes[:, None]
        rows = (trees.parents.long() + 1).clamp(0, logits.shape[1] - 1)
        accepted = valid & (argmax.gather(1, rows) == trees.tokens)
        reach, depth = root_paths(accepted, torch.where(valid, trees.parents, -1), valid)
        end, length = longest_path_end(reach, depth)
        return GreedyVerifyResult(argmax, accepted, end, length)

    def tree_rejection_sample(
        self,
        probs: torch.Tensor,
        trees: TreeBatch,
        draft_q: DraftQ,
        accept_uniforms: torch.Tensor,
        sample_uniforms: torch.Tensor,
    ) -> RejectionResult:
        ends, lengths, next_tokens = [], [], []
        for b in range(probs.shape[0]):
            n = int(trees.num_nodes[b])
            parents, tokens = trees.parents[b, :n].tolist(), trees.tokens[b, :n].tolist()
            node, length, start = -1, 0, 0
            residual = probs[b, 0].float().clone()
            mass = residual.sum()
            while (child := next((i for i in range(start, n) if parents[i] == node), None)) is not None:
                start = child + 1
                support = draft_q.tokens[b, child] >= 0
                q_tokens = draft_q.tokens[b, child][support].long()
                q_probs = draft_q.probs[b, child][support].float()
                q_x = q_probs[q_tokens == tokens[child]].sum()
                if accept_uniforms[b, child] * q_x * mass < residual[tokens[child]]:
                    node, length = child, length + 1
                    residual = probs[b, child + 1].float().clone()
                    mass = residual.sum()
                    continue
                old = residual[q_tokens]
                new = (old - mass * q_probs).clamp_min(0)
                removed = (old - new).sum()
                if mass - removed > 0:
                    residual[q_tokens] = new
                    mass = mass - removed
            ends.append(node)
            lengths.append(length)
            next_tokens.append(inverse_cdf(residual, float(sample_uniforms[b])))
        return RejectionResult(
            *(torch.tensor(v, dtype=torch.int32, device=probs.device) for v in (ends, lengths, next_tokens))
        )

    def compact_kv(self, tensors: Sequence[torch.Tensor], src: torch.Tensor, dst_start: int) -> None:
        move_positions(tensors, src, dst_start)
