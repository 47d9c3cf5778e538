"""Draft proposer on a HF transformers model, with its own KV cache per generation."""

from __future__ import annotations

import threading

import torch
from transformers import PreTrainedModel

from draft_node.proposers.base import DraftNoise, draft_token
from services.candidate_tree import ROOT, CandidateTree
from services.kv_cache import new_kv_cache, truncate_kv
from services.rpc.specwire.v1 import target_pb2


class HFProposer:
    """One chain of up to K tokens per round (greedy, or sampled with its exact q); the KV cache
    keeps whatever prefix the next context shares with the last one. With a `confidence_threshold`
    the chain stops after a token the draft gives less than that probability (as HF assisted
    generation's `assistant_confidence_threshold`): the tokens after an unsure one are seldom
    accepted, and each costs a draft step."""

    def __init__(
        self,
        model: PreTrainedModel,
        forward_lock: threading.Lock,
        sampling: target_pb2.SamplingParams | None = None,
        noise: DraftNoise | None = None,
        confidence_threshold: float = 0.0,
    ) -> None:
        self.model = model
        self.forward_lock = forward_lock
        self.sampling = sampling or target_pb2.SamplingParams()
        self.noise = noise or DraftNoise.for_strategy(0, "")
        self.confidence_threshold = confidence_threshold
        self.device = next(model.parameters()).device
        self.cache = new_kv_cache()
        self.cached_ids: list[int] = []  # tokens whose KV entries are in self.cache

    @torch.inference_mode()
    def propose(self, context: list[int], k: int, n: int = 1) -> CandidateTree:
        """One chain (this proposer drafts a single candidate; `n` is ignored)."""
        tree = CandidateTree()
        if k <= 0:
            return tree
        shared = 0
        limit = min(len(self.cached_ids), len(context) - 1)  # feed at least one token for fresh logits
        while shared < limit and self.cached_ids[shared] == context[shared]:
            shared += 1
        truncate_kv(self.cache, shared)
        feed = context[shared:]
        for depth in range(k):
            with self.forward_lock:
                out = self.model(
                    input_ids=torch.tensor([feed], device=self.device),
                    past_key_values=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            logits = out.logits[0, -1].float()
            token, q = draft_token(logits, self.sampling, self.noise, len(context) + depth)
            tree.parents.append(ROOT if depth == 0 else depth - 1)
            tree.token_ids.append(token)
            if q is not None:
                tree.draft_probs.append(q)
            if self.confidence_threshold and float(logits.softmax(-1)[token]) < self.confidence_threshold:
                break
            feed = [token]
        self.cached_ids = context + tree.token_ids[:-1]
        return tree
