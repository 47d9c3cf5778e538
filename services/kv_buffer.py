"""One sequence's keys and values for every layer, in one preallocated buffer with a length.

As gpt-fast's static cache: a forward writes new entries in place at [length, length + n), a
rejected tail is dropped by moving `length` back, and a verify round's accepted nodes are moved
next to the committed prefix. Nothing is copied per round but what compaction moves; the buffer is
reallocated only when a sequence outgrows it (in steps of `GROWTH` positions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GROWTH = 256  # positions added whenever a buffer grows


class KVBuffer:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int = GROWTH) -> None:
        self.shape = (layers, 2, kv_heads, head_dim)
        self.data = torch.zeros(layers, 2, kv_heads, capacity, head_dim)
        self.length = 0  # positions [0, length) hold entries

    @property
    def capacity(self) -> int:
        return self.data.shape[3]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def reserve(self, total: int) -> None:
        """Room for `total` positions, keeping the entries held."""
        if total <= self.capacity:
            return
        layers, two, kv_heads, head_dim = self.shape
        grown = torch.zeros(layers, two, kv_heads, total + GROWTH, head_dim)
        grown[:, :, :, : self.length] = self.data[:, :, :, : self.length]
        self.data = grown

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a layer, each [kv_heads, capacity, head_dim], contiguous views."""
        return self.data[index, 0], self.data[index, 1]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def compact(self, kept: int, slots: Sequence[int]) -> None:
        """Keep positions [0, kept) and then `slots` (ascending, each >= kept), in that order."""
        moving = [(i, slot) for i, slot in enumerate(slots) if slot != kept + i]
        if moving:
            index = torch.tensor([slot for _, slot in moving])
            target = torch.tensor([kept + i for i, _ in moving])
            self.data[:, :, :, target] = self.data.index_select(3, index)
        self.length = kept + len(slots)

    def copy(self, length: int | None = None, spare: int = GROWTH) -> KVBuffer:
        """A buffer holding a copy of the first `length` entries (all held: None), with room for
        `spare` more."""
        length = self.length if length is None else min(length, self.length)
        layers, _, kv_heads, head_dim = self.shape
        out = KVBuffer(layers, kv_heads, head_dim, capacity=length + spare)
        out.data[:, :, :, :length] = self.data[:, :, :, :length]
        out.length = length
        return out
