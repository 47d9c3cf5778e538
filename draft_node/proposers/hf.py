"""Draft proposer on a HF transformers model, with its own KV cache per generation."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from draft_node.proposers.base import DraftNoise, draft_token
from services.candidate_tree import ROOT, CandidateTree
from services.compute_thread import ComputeThread
from services.kv_cache import new_kv_cache, truncate_kv
from services.prefix_cache import PrefixCache
from services.rpc.specwire.v1 import target_pb2


class HFProposer:
    """One chain of up to K tokens per round (greedy, or sampled with its exact q); the KV cache
    keeps whatever prefix the next context shares with the last one. The chain can end early,
    since a token the draft is unsure of is seldom accepted and each costs a draft step: after a
    token whose own probability is below `confidence_threshold` (HF assisted generation's
    `assistant_confidence_threshold`), or once the probability of the whole chain so far (the
    product of its tokens' probabilities, how EAGLE-2 ranks draft paths) is below
    `min_chain_probability`. Forwards run on `compute`, the drafter's one torch thread; the first
    round starts from the longest prompt prefix in `prefix_cache` (shared by the drafter's proposers)."""

    def __init__(
        self,
        model: PreTrainedModel,
        compute: ComputeThread,
        sampling: target_pb2.SamplingParams | None = None,
        noise: DraftNoise | None = None,
        confidence_threshold: float = 0.0,
        min_chain_probability: float = 0.0,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.model = model
        self.compute = compute
        self.sampling = sampling or target_pb2.SamplingParams()
        self.noise = noise or DraftNoise.for_strategy(0, "")
        self.confidence_threshold = confidence_threshold
        self.min_chain_probability = min_chain_probability
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache(0)
        self.device = next(model.parameters()).device
        self.cache = new_kv_cache()
        self.cached_ids: list[int] = []  # tokens whose KV entries are in self.cache

    def propose(self, context: list[int], k: int, n: int = 1) -> CandidateTree:
        """One chain (this proposer drafts a single candidate; `n` is ignored)."""
        return self.compute.run(self._propose, context, k)

    @torch.inference_mode()
    def _propose(self, context: list[int], k: int) -> CandidateTree:
        tree = CandidateTree()
        if k <= 0:
            return tree
        first_round = not self.cached_ids
        if first_round:
            cached, self.cache = self.prefix_cache.lookup(context)
            self.cached_ids = context[:cached]
        shared = 0
        limit = min(len(self.cached_ids), len(context) - 1)  # feed at least one token for fresh logits
        while shared < limit and self.cached_ids[shared] == context[shared]:
            shared += 1
        truncate_kv(self.cache, shared)
        feed = context[shared:]
        chain_probability = 1.0
        for depth in range(k):
            out = self.model(
                input_ids=torch.tensor([feed], device=self.device),
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            if first_round and depth == 0:
                self.prefix_cache.store(context, self.cache)
            logits = out.logits[0, -1].float()
            token, q = draft_token(logits, self.sampling, self.noise, len(context) + depth)
            tree.parents.append(ROOT if depth == 0 else depth - 1)
            tree.token_ids.append(token)
            if q is not None:
                tree.draft_probs.append(q)
            if self.confidence_threshold or self.min_chain_probability:
                probability = float(logits.softmax(-1)[token])
                chain_probability *= probability
                if probability < self.confidence_threshold or chain_probability < self.min_chain_probability:
                    break
            feed = [token]
        self.cached_ids = context + tree.token_ids[:-1]
        return tree
