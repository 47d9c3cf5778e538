"""KV caches for both nodes: a preallocated buffer per layer with a length, plus cache surgery
(move positions, truncate, measure) on any transformers cache.

A transformers `DynamicCache` concatenates every step, copying the whole cache each round. Here
each layer owns a buffer with spare capacity (as gpt-fast does) and the cache's keys/values are
views of its first `length` positions: appending writes the new entries in place, truncating
narrows the view, and compaction moves entries inside the buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

GROWTH_POSITIONS = 256  # spare positions a buffer gets whenever it (re)allocates


class PreallocatedLayer(DynamicLayer):
    """A cache layer whose keys/values are views of a buffer with spare capacity."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._key_buffer = key_states.new_empty((*key_states.shape[:-2], 0, key_states.shape[-1]))
        self._value_buffer = value_states.new_empty((*value_states.shape[:-2], 0, value_states.shape[-1]))
        self.keys, self.values = self._key_buffer, self._value_buffer
        self.is_initialized = True

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if length + new > self._key_buffer.shape[-2] or self.keys.shape[0] != key_states.shape[0]:
            self._grow(length + new + GROWTH_POSITIONS, key_states.shape[0])
        self._key_buffer[..., length : length + new, :] = key_states
        self._value_buffer[..., length : length + new, :] = value_states
        self.keys = self._key_buffer[..., : length + new, :]
        self.values = self._value_buffer[..., : length + new, :]
        return self.keys, self.values

    def _grow(self, capacity: int, batch: int) -> None:
        """Reallocate with room for `capacity` positions, keeping the current entries."""
        length = self.keys.shape[-2]
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)[..., :length, :]
            buffer = old.new_empty((batch, *old.shape[1:-2], capacity, old.shape[-1]))
            buffer[..., :length, :] = old
            setattr(self, name, buffer)
        self.keys = self._key_buffer[..., :length, :]
        self.values = self._value_buffer[..., :length, :]


def new_kv_cache() -> DynamicCache:
    """An empty cache whose layers are `PreallocatedLayer`s (a `DynamicCache` to every model)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = PreallocatedLayer
    return cache


def kv_tensors(cache: DynamicCache) -> list[torch.Tensor]:
    """Every initialised layer's key and value tensors, [batch, heads, seq, dim] each."""
    return [
        t for layer in cache.layers if getattr(layer, "is_initialized", False) for t in (layer.keys, layer.values)
    ]


def kv_buffers(cache: DynamicCache) -> list[torch.Tensor]:
    """Contiguous tensors that hold every layer's keys and values: a preallocated layer's whole
    buffers (for kernels that need contiguous memory), else the tensors themselves."""
    buffers = []
    for layer in cache.layers:
        if isinstance(layer, PreallocatedLayer) and layer.is_initialized:
            buffers += [layer._key_buffer, layer._value_buffer]
        elif getattr(layer, "is_initialized", False):
            buffers += [layer.keys, layer.values]
    return buffers


def move_positions(tensors: Sequence[torch.Tensor], src: torch.Tensor, dst_start: int) -> None:
    """Copy sequence positions src[j] to dst_start + j in every tensor, in place."""
    if not len(src):
        return
    for tensor in tensors:
        index = src.to(tensor.device, torch.long)
        tensor[..., dst_start : dst_start + len(src), :] = tensor.index_select(-2, index)


def truncate_kv(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of every layer (also repairs layers a failed forward left
    longer than others). A preallocated layer keeps its buffer: only its view narrows."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def kv_nbytes(cache: DynamicCache) -> int:
    """Bytes of memory held by a cache's keys and values (whole buffers, spare capacity included)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kv_tensors(cache)}
    return sum(storages.values())


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of keys and values one position takes in every layer of a decoder with this config."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * dtype.itemsize
