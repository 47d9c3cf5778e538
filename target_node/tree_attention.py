"""Inputs for verify forwards: `pending + trie nodes` per session, with a tree attention mask.

Each node attends to its session's cached prefix, the pending token, its ancestors and itself,
and sits at position prefix_length + depth; siblings share a position, so every candidate sees
exactly the context it would have seen if it had been decoded alone. Several sessions' trees
can be stacked into one padded batch (prefixes right-padded to the longest, padding masked out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.candidate_tree import ROOT, CandidateTree


@dataclass
class TreeQuery:
    prefix_length: int  # entries already in the session's KV cache
    token_ids: list[int]  # pending token, then the trie nodes
    positions: list[int]
    visible: torch.Tensor  # bool [1 + n, 1 + n]: query row may attend to tree column


def build_tree_query(pending_token: int, tree: CandidateTree, prefix_length: int) -> TreeQuery:
    n = len(tree)
    visible = torch.zeros(1 + n, 1 + n, dtype=torch.bool)
    visible[:, 0] = True  # everyone sees the pending token
    for node, parent in enumerate(tree.parents):
        row = node + 1
        if parent != ROOT:
            visible[row] = visible[parent + 1]
        visible[row, row] = True
    positions = [prefix_length + depth for depth in (0, *tree.depths())]
    return TreeQuery(prefix_length, [pending_token, *tree.token_ids], positions, visible)


@dataclass
class BatchInputs:
    input_ids: torch.Tensor  # [B, Q]
    position_ids: torch.Tensor  # [B, Q]
    attention_mask: torch.Tensor  # [B, 1, Q, L + Q] additive: 0 attend, dtype-min masked
    prefix_width: int  # L: the longest prefix; session b's prefix is right-padded to it


def batch_inputs(
    queries: Sequence[TreeQuery], dtype: torch.dtype, device: torch.device, min_rows: int = 1
) -> BatchInputs:
    """Stack queries. Multi-token queries are padded to at least `min_rows` rows: CPU BLAS runs 2-3
    rows slower than 4, while a single row (a plain decode step) has its own fast path."""
    width = max(q.prefix_length for q in queries)
    q_max = max(len(q.token_ids) for q in queries)
    q_max = min_rows if 1 < q_max < min_rows else q_max
    allowed = torch.zeros(len(queries), q_max, width + q_max, dtype=torch.bool)
    input_ids = torch.zeros(len(queries), q_max, dtype=torch.long)
    position_ids = torch.zeros(len(queries), q_max, dtype=torch.long)
    for b, query in enumerate(queries):
        size = len(query.token_ids)
        allowed[b, :size, : query.prefix_length] = True
        allowed[b, :size, width : width + size] = query.visible
        allowed[b, size:, 0] = True  # padding rows attend somewhere, so softmax stays finite
        input_ids[b, :size] = torch.tensor(query.token_ids)
        position_ids[b, :size] = torch.tensor(query.positions)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return BatchInputs(input_ids.to(device), position_ids.to(device), mask[:, None].to(device), width)
