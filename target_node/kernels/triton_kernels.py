"""Triton verify kernels: one program per (request, row) for the greedy argmax, one per request for
the tree walks, one per (tensor, head) for KV compaction. On a machine without CUDA they run under TRITON_INTERPRET=1 (tests only)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from target_node.kernels.base import DraftQ, GreedyVerifyResult, LaunchedKernels, RejectionResult, TreeBatch

BLOCK_V = 1024
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _row_argmax(row_ptr, V, BLOCK: tl.constexpr):
    best_val = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        x = tl.where(x == x, x, float("-inf"))  # services.sampling.top1's rule: NaN counts as -inf
        value, index = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        take = value > best_val
        best_idx = tl.where(take, start + index, best_idx)
        best_val = tl.where(take, value, best_val)
    return best_idx


@triton.jit
def _row_argmax_kernel(logits_ptr, argmax_ptr, R, V, BLOCK_V: tl.constexpr):
    """Rows in parallel: one row of a 152k vocabulary is 600 KB, too much for one program to take
    row after row."""
    row = tl.program_id(0).to(tl.int64) * R + tl.program_id(1)
    tl.store(argmax_ptr + row, _row_argmax(logits_ptr + row * V, V, BLOCK_V))


@triton.jit
def _tree_paths_kernel(
    parents_ptr, tokens_ptr, num_nodes_ptr, argmax_ptr, accepted_ptr, end_ptr, length_ptr,
    R, N,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    n = tl.load(num_nodes_ptr + b)
    nodes = tl.arange(0, BLOCK_N)
    valid = nodes < n
    parents = tl.load(parents_ptr + b * N + nodes, mask=valid, other=-1)
    tokens = tl.load(tokens_ptr + b * N + nodes, mask=valid, other=0)
    accepted = valid & (tokens == tl.load(argmax_ptr + b * R + parents + 1, mask=valid, other=-1))
    tl.store(accepted_ptr + b * N + nodes, accepted.to(tl.int8), mask=nodes < N)
    reach = accepted
    depth = valid.to(tl.int32)
    up_node = parents
    for _ in range(0, n):  # walk every node's ancestors, one level per step
        up = valid & (up_node >= 0)
        up_parent = tl.load(parents_ptr + b * N + up_node, mask=up, other=-1)
        up_token = tl.load(tokens_ptr + b * N + up_node, mask=up, other=0)
        up_argmax = tl.load(argmax_ptr + b * R + up_parent + 1, mask=up, other=-1)
        reach = reach & ((up_token == up_argmax) | (up_node < 0))
        depth += up.to(tl.int32)
        up_node = tl.where(up, up_parent, -1)
    key = tl.where(reach, depth, 0)
    length = tl.max(key, 0)
    first = tl.min(tl.where(reach & (key == length), nodes, BLOCK_N), 0)
    tl.store(end_ptr + b, tl.where(length > 0, first, -1))
    tl.store(length_ptr + b, length)


@triton.jit
def _copy_row(src_ptr, dst_ptr, V, BLOCK: tl.constexpr):
    """dst <- src (float32); returns the row's sum."""
    total = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(src_ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
        tl.store(dst_ptr + offs, x, mask=offs < V)
        total += tl.sum(x, 0)
    return total


@triton.jit
def _inverse_cdf(weights_ptr, u, V, BLOCK: tl.constexpr):
    total = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        total += tl.sum(tl.load(weights_ptr + offs, mask=offs < V, other=0.0), 0)
    threshold = u * total
    running = tl.full([], 0.0, tl.float32)
    found = tl.full([], 2147483647, tl.int32)
    last_positive = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(weights_ptr + offs, mask=offs < V, other=0.0)
        cumulative = running + tl.cumsum(x, 0)
        found = tl.minimum(found, tl.min(tl.where((cumulative > threshold) & (offs < V), offs, 2147483647), 0))
        last_positive = tl.maximum(last_positive, tl.max(tl.where(x > 0, offs, 0), 0))
        running += tl.sum(x, 0)
    return tl.where(found < V, found, last_positive)


@triton.jit
def _tree_rejection_sample_kernel(
    probs_ptr, parents_ptr, tokens_ptr, num_nodes_ptr, q_tokens_ptr, q_probs_ptr,
    accept_u_ptr, sample_u_ptr, residual_ptr,
    end_ptr, length_ptr, next_ptr,
    R, V, N, S,
    BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    n = tl.load(num_nodes_ptr + b)
    rows = probs_ptr + b.to(tl.int64) * R * V
    residual = residual_ptr + b.to(tl.int64) * V
    mass = _copy_row(rows, residual, V, BLOCK_V)
    tl.debug_barrier()
    nodes = tl.arange(0, BLOCK_N)
    valid = nodes < n
    parents = tl.load(parents_ptr + b * N + nodes, mask=valid, other=-2)
    support = tl.arange(0, BLOCK_S)
    node = tl.full([], -1, tl.int32)
    length = tl.full([], 0, tl.int32)
    child = tl.min(tl.where(valid & (parents == node), nodes, BLOCK_N), 0)
    while child < BLOCK_N:
        token = tl.load(tokens_ptr + b * N + child)
        q_offs = (b * N + child) * S + support
        q_tokens = tl.load(q_tokens_ptr + q_offs, mask=support < S, other=-1)
        q_probs = tl.load(q_probs_ptr + q_offs, mask=support < S, other=0.0)
        q_x = tl.sum(tl.where(q_tokens == token, q_probs, 0.0), 0)
        u = tl.load(accept_u_ptr + b * N + child)
        if u * q_x * mass < tl.load(residual + token):
            node = child
            length += 1
            tl.debug_barrier()
            mass = _copy_row(rows + (child + 1).to(tl.int64) * V, residual, V, BLOCK_V)
        else:
            in_support = q_tokens >= 0
            old = tl.load(residual + q_tokens, mask=in_support, other=0.0)
            new = tl.maximum(old - mass * q_probs, 0.0)
            removed = tl.sum(tl.where(in_support, old - new, 0.0), 0)
            if mass - removed > 0:
                tl.store(residual + q_tokens, new, mask=in_support)
                mass = mass - removed
        tl.debug_barrier()
        child = tl.min(tl.where(valid & (parents == node) & (nodes > child), nodes, BLOCK_N), 0)
    tl.store(end_ptr + b, node)
    tl.store(length_ptr + b, length)
    tl.store(next_ptr + b, _inverse_cdf(residual, tl.load(sample_u_ptr + b), V, BLOCK_V))


@triton.jit
def _compact_kv_kernel(
    table_ptr, src_ptr, M, dst_start, seq_len, head_dim,
    DTYPE: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    tensor = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    base = tl.load(table_ptr + tensor).to(tl.pointer_type(DTYPE)) + head * seq_len * head_dim
    offs = tl.arange(0, BLOCK_D)
    mask = offs < head_dim
    for j in range(0, M):  # ascending: a write never lands on a source still to be read
        src = tl.load(src_ptr + j).to(tl.int64)
        row = tl.load(base + src * head_dim + offs, mask=mask)
        tl.store(base + (dst_start + j) * head_dim + offs, row, mask=mask)


def _block(n: int) -> int:
    return max(triton.next_power_of_2(max(n, 1)), 16)


class TritonKernels(LaunchedKernels):
    name = "triton"

    def _launch_greedy(self, logits: torch.Tensor, trees: TreeBatch, out: GreedyVerifyResult) -> None:
        batch, rows, vocab = logits.shape
        if batch and rows:
            _row_argmax_kernel[(batch, rows)](logits, out.target_argmax, rows, vocab, BLOCK_V=min(BLOCK_V, _block(vocab)))
        _tree_paths_kernel[(batch,)](
            trees.parents, trees.tokens, trees.num_nodes,
            out.target_argmax, out.node_accepted, out.path_end, out.path_length,
            rows, trees.parents.shape[1],
            BLOCK_N=_block(trees.parents.shape[1]),
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
        batch, rows, vocab = probs.shape
        width, support = draft_q.tokens.shape[1:]
        _tree_rejection_sample_kernel[(batch,)](
            probs, trees.parents, trees.tokens, trees.num_nodes, draft_q.tokens, draft_q.probs,
            accept_uniforms, sample_uniforms, residual,
            out.path_end, out.path_length, out.next_token,
            rows, vocab, width, support,
            BLOCK_V=min(BLOCK_V, _block(vocab)), BLOCK_N=_block(width), BLOCK_S=_block(support),
        )  # fmt: skip

    def _launch_compact(self, table: torch.Tensor, like: torch.Tensor, src: torch.Tensor, dst_start: int) -> None:
        heads = like.numel() // (like.shape[-2] * like.shape[-1])
        _compact_kv_kernel[(len(table), heads)](
            table, src, len(src), dst_start, like.shape[-2], like.shape[-1],
            DTYPE=TL_DTYPES[like.dtype], BLOCK_D=_block(like.shape[-1]),
        )  # fmt: skip
