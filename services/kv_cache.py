"""KV cache surgery on a transformers DynamicCache (both nodes): move positions, truncate, measure."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache


def kv_tensors(cache: DynamicCache) -> list[torch.Tensor]:
    """Every initialised layer's key and value tensors, [batch, heads, seq, dim] each."""
    return [
        t for layer in cache.layers if getattr(layer, "is_initialized", False) for t in (layer.keys, layer.values)
    ]


def move_positions(tensors: Sequence[torch.Tensor], src: torch.Tensor, dst_start: int) -> None:
    """Copy sequence positions src[j] to dst_start + j in every tensor, in place."""
    if not len(src):
        return
    for tensor in tensors:
        index = src.to(tensor.device, torch.long)
        tensor[..., dst_start : dst_start + len(src), :] = tensor.index_select(-2, index)


def truncate_kv(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of every layer (also repairs layers a failed forward left
    longer than others)."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def kv_nbytes(cache: DynamicCache) -> int:
    """Bytes held by a cache's key and value tensors."""
    return sum(t.numel() * t.element_size() for t in kv_tensors(cache))
