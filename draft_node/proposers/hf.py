"""Draft proposer on a HF transformers model, with its own KV cache per generation."""

from __future__ import annotations

from threading import Event

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

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
    round starts from the longest prompt prefix in `prefix_cache` (shared by the drafter's proposers).

    Its numbers depend only on the context, not on how rounds fell (pipelined or not, prefix cache
    warm or cold), so a seeded `probabilistic` text is reproducible: the prompt is prefilled
    without its last token, and later tokens go through forwards of at most `step_rows` rows, whose
    linears compute each row alone (more rows would take the int8 prefill kernel, which quantizes
    all rows with one scale)."""

    prefills_context = True

    def __init__(
        self,
        model: PreTrainedModel,
        compute: ComputeThread,
        sampling: target_pb2.SamplingParams | None = None,
        noise: DraftNoise | None = None,
        confidence_threshold: float = 0.0,
        min_chain_probability: float = 0.0,
        prefix_cache: PrefixCache | None = None,
        step_rows: int = 0,
    ) -> None:
        self.model = model
        self.compute = compute
        self.sampling = sampling or target_pb2.SamplingParams()
        self.noise = noise or DraftNoise.for_strategy(0, "")
        self.confidence_threshold = confidence_threshold
        self.min_chain_probability = min_chain_probability
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache(0)
        self.step_rows = step_rows  # the most rows whose linears are computed row by row (0: no such limit)
        self.device = next(model.parameters()).device
        self.cache = new_kv_cache()
        self.cached_ids: list[int] = []  # tokens whose KV entries are in self.cache

    def _prefill(self, context: list[int]) -> None:
        """KV entries of all but the context's last token: from the prefix cache, then one forward
        over the rest. The last token is then always a one-row step, warm or cold: the int8 prefill
        quantizes activations per tensor and a step per row, so feeding it with the prompt would give
        the draft (and a seeded `probabilistic` text) other numbers on a prefix-cache hit."""
        cached, self.cache = self.prefix_cache.lookup(context)
        if cached < len(context) - 1:
            self._forward(context[cached:-1])
            self.prefix_cache.store(context[:-1], self.cache)
        self.cached_ids = context[:-1]

    def _forward(self, token_ids: list[int]) -> CausalLMOutputWithPast:
        """Feed tokens after the cache's entries (appending theirs); logits of the last one only."""
        return self.model(
            input_ids=torch.tensor([token_ids], device=self.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )

    def propose(self, context: list[int], k: int, n: int = 1, stop: Event | None = None) -> CandidateTree:
        """One chain (this proposer drafts a single candidate; `n` is ignored)."""
        return self.compute.run(self._propose, context, k, stop)

    @torch.inference_mode()
    def _propose(self, context: list[int], k: int, stop: Event | None) -> CandidateTree:
        tree = CandidateTree()
        if k <= 0:
            return tree
        if not self.cached_ids:
            self._prefill(context)
        shared = 0
        limit = min(len(self.cached_ids), len(context) - 1)  # feed at least one token for fresh logits
        while shared < limit and self.cached_ids[shared] == context[shared]:
            shared += 1
        truncate_kv(self.cache, shared)
        feed = context[shared:]
        while len(feed) > self.step_rows > 0:  # more rows would switch to the per-tensor prefill kernel
            self._forward(feed[: self.step_rows])
            feed = feed[self.step_rows :]
        chain_probability = 1.0
        for depth in range(k):
            logits = self._forward(feed).logits[0, -1].float()
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
            if stop is not None and stop.is_set():
                break
            feed = [token]
        self.cached_ids = context + tree.token_ids[:-1]
        return tree
