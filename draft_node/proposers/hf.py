"""Draft proposer on a HF transformers model, with its own KV cache per generation."""

from __future__ import annotations

import threading

import torch
from transformers import DynamicCache, PreTrainedModel

from services.kv_cache import compact_kv


class HFProposer:
    """Greedy K-token proposals; the KV cache keeps whatever prefix the next context shares."""

    def __init__(self, model: PreTrainedModel, forward_lock: threading.Lock) -> None:
        self.model = model
        self.forward_lock = forward_lock
        self.device = next(model.parameters()).device
        self.cache = DynamicCache()
        self.cached_ids: list[int] = []  # tokens whose KV entries are in self.cache

    @torch.inference_mode()
    def propose(self, context: list[int], k: int) -> list[int]:
        """Draft k tokens after `context` (prompt + everything committed so far)."""
        if k <= 0:
            return []
        shared = 0
        limit = min(len(self.cached_ids), len(context) - 1)  # feed at least one token for fresh logits
        while shared < limit and self.cached_ids[shared] == context[shared]:
            shared += 1
        compact_kv(self.cache, range(shared))
        feed = context[shared:]
        draft: list[int] = []
        for _ in range(k):
            with self.forward_lock:
                out = self.model(
                    input_ids=torch.tensor([feed], device=self.device),
                    past_key_values=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            draft.append(int(out.logits[0, -1].argmax()))
            feed = draft[-1:]
        self.cached_ids = context + draft[:-1]
        return draft
