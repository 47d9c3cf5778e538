"""KV cache surgery on a transformers DynamicCache (both nodes): keep a prefix + chosen entries."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache


def compact_kv(cache: DynamicCache, keep_positions: Sequence[int]) -> None:
    """Keep only the cache entries at `keep_positions` (ascending), in every layer, in place.

    A verify forward appends `pending + all trie nodes`; afterwards only the prefix, the pending
    token and the accepted path's nodes stay. When they are a contiguous prefix this is a slice.
    """
    keep = list(keep_positions)
    contiguous = keep == list(range(len(keep)))
    index = None if contiguous else torch.tensor(keep, dtype=torch.long)
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        if contiguous:  # per-layer slice also repairs layers a failed forward left longer than others
            layer.keys = layer.keys[..., : len(keep), :]
            layer.values = layer.values[..., : len(keep), :]
        else:
            index = index.to(layer.keys.device)
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)


def kv_nbytes(cache: DynamicCache) -> int:
    """Bytes held by a cache's key and value tensors."""
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        if getattr(layer, "is_initialized", False)
        for t in (layer.keys, layer.values)
    )
