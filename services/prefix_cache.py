"""Automatic prefix caching: the KV entries of recent prompts, so a prompt that starts like an
earlier one (a system prompt, few-shot exemplars, an earlier turn of a chat) prefills only what
differs, as vLLM's automatic prefix caching and SGLang's radix cache do.

An LRU of whole prompts under a memory budget; a lookup takes the longest prefix any of them
shares with the new prompt. Entries are copies, so sessions grow and compact their own caches
freely. The reused entries are the numbers a full prefill of that prefix computed; the rows after
it are computed over them, so the output equals a run that reuses the same prefix (as the
benchmark's target-alone baseline does), up to the summation order of attention.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from services.kv_buffer import KVBuffer
from services.kv_cache import kv_tensors, new_kv_cache


class CacheCopies(Protocol):
    """How a kind of cache is copied into an entry and back."""

    def snapshot(self, cache: Any, length: int) -> tuple[Any, int]:  # noqa: ANN401 - any cache kind
        """A copy of the first `length` positions, and its bytes."""
        ...

    def restore(self, snapshot: Any, length: int) -> Any:  # noqa: ANN401
        """A new cache holding the first `length` positions of a snapshot."""
        ...

    def empty(self) -> Any: ...  # noqa: ANN401


class DynamicCacheCopies:
    """transformers caches (the HF backend and proposer): per layer, keys and values."""

    def snapshot(self, cache: DynamicCache, length: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        tensors = [t[..., :length, :].clone() for t in kv_tensors(cache)]
        layers = list(zip(tensors[::2], tensors[1::2], strict=True))
        return layers, sum(k.nbytes + v.nbytes for k, v in layers)

    def restore(self, snapshot: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> DynamicCache:
        cache = new_kv_cache()
        for layer_idx, (keys, values) in enumerate(snapshot):
            cache.update(keys[..., :length, :], values[..., :length, :], layer_idx)
        return cache

    def empty(self) -> DynamicCache:
        return new_kv_cache()


class KVBufferCopies:
    """The GGUF decoder's per-sequence buffers."""

    def __init__(self, new_buffer: Any) -> None:  # noqa: ANN401 - () -> KVBuffer
        self.new_buffer = new_buffer

    def snapshot(self, cache: KVBuffer, length: int) -> tuple[KVBuffer, int]:
        copy = cache.copy(length, spare=0)
        return copy, copy.nbytes

    def restore(self, snapshot: KVBuffer, length: int) -> KVBuffer:
        return snapshot.copy(length)

    def empty(self) -> KVBuffer:
        return self.new_buffer()


def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class PrefixCache:
    def __init__(self, budget_bytes: int, copies: CacheCopies | None = None) -> None:
        self.budget_bytes = budget_bytes  # 0: off
        self.copies = copies or DynamicCacheCopies()
        self._entries: OrderedDict[tuple[int, ...], tuple[Any, int]] = OrderedDict()  # oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    def lookup(self, token_ids: Sequence[int]) -> tuple[int, Any]:
        """A new cache holding the KV entries of the longest cached prefix of `token_ids` (never
        all of them: the last token is fed for fresh logits), and that prefix's length."""
        with self._lock:
            best, best_length = None, 0
            for ids in self._entries:
                length = min(shared_length(ids, token_ids), len(token_ids) - 1)
                if length > best_length:
                    best, best_length = ids, length
            if best is None:
                return 0, self.copies.empty()
            self._entries.move_to_end(best)
            snapshot = self._entries[best][0]
        return best_length, self.copies.restore(snapshot, best_length)

    def store(self, token_ids: Sequence[int], cache: Any) -> None:  # noqa: ANN401 - any cache kind
        """Keep a copy of the entries of `token_ids`, the first positions of `cache`."""
        if not self.budget_bytes:
            return
        layers, size = self.copies.snapshot(cache, len(token_ids))
        key = tuple(token_ids)
        with self._lock:
            if size > self.budget_bytes:
                return
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[1]
            self._entries[key] = (layers, size)
            self._bytes += size
            self._drop_oldest(self._bytes - self.budget_bytes)

    def shrink(self, nbytes: int) -> int:
        """Drop the least recently used entries until at least `nbytes` are freed (or none is left);
        returns the bytes freed. The target's memory budget calls this before evicting a session."""
        with self._lock:
            return self._drop_oldest(nbytes)

    def _drop_oldest(self, nbytes: int) -> int:
        freed = 0
        while freed < nbytes and self._entries:
            freed += self._entries.popitem(last=False)[1][1]
        self._bytes -= freed
        return freed

    @property
    def nbytes(self) -> int:
        """Bytes the cached entries hold."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
