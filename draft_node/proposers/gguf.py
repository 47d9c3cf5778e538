"""Draft proposer on the GGUF decoder: one chain per round, drafted as a job of the drafter's
forward loop, so the draft steps of concurrent generations share each pass over the weights."""

from __future__ import annotations

from threading import Event

import torch

from draft_node.proposers.base import ChainRule, DraftNoise
from services.candidate_tree import ROOT, CandidateTree
from services.forward_loop import ForwardLoop
from services.gguf_decoder import Rows
from services.kv_buffer import KVBuffer
from services.prefix_cache import KVBufferCopies, PrefixCache
from services.rpc.specwire.v1 import target_pb2


class ChainJob:
    """Feed what the buffer lacks of the context (in chunks), then one draft token per forward
    until the chain rule stops it or it has `k` tokens."""

    def __init__(
        self, cache: KVBuffer, context: list[int], k: int, rule: ChainRule, chunk: int, stop: Event | None = None
    ) -> None:
        self.cache, self.context, self.k, self.rule, self.chunk, self.stop = cache, context, k, rule, chunk, stop
        self.tree = CandidateTree()
        self.result = self.tree
        self.batch_size = 1
        self.session_key = None  # the draft's next chain waits on the target, not on this loop

    def next_rows(self) -> Rows:
        if self.cache.length < len(self.context):
            return Rows(self.cache, self.context[self.cache.length : self.cache.length + self.chunk], all_logits=False)
        return Rows(self.cache, [self.tree.token_ids[-1]])

    def take(self, logits: torch.Tensor) -> bool:
        if self.cache.length < len(self.context):
            return False
        depth = len(self.tree)
        token, q, more = self.rule.next_token(logits[-1], len(self.context) + depth)
        self.tree.parents.append(ROOT if depth == 0 else depth - 1)
        self.tree.token_ids.append(token)
        if q is not None:
            self.tree.draft_probs.append(q)
        return not more or len(self.tree) == self.k or (self.stop is not None and self.stop.is_set())


class GGUFProposer:
    """One chain of up to K tokens per round (see ChainRule for where it ends); its buffer keeps
    whatever prefix the next context shares with the last one. The first round starts from the
    longest prompt prefix in `prefix_cache`. The decoder computes each row alone, so the chain
    depends on the context only, not on cache hits or batching."""

    prefills_context = True

    def __init__(
        self,
        loop: ForwardLoop,
        sampling: target_pb2.SamplingParams | None = None,
        noise: DraftNoise | None = None,
        confidence_threshold: float = 0.0,
        min_chain_probability: float = 0.0,
        prefix_cache: PrefixCache | None = None,
        chunk: int = 256,
    ) -> None:
        self.loop = loop
        self.rule = ChainRule(
            sampling or target_pb2.SamplingParams(),
            noise or DraftNoise.for_strategy(0, ""),
            confidence_threshold,
            min_chain_probability,
        )
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache(0, KVBufferCopies(loop.decoder.new_cache))
        self.chunk = chunk
        self.cache: KVBuffer | None = None
        self.cached_ids: list[int] = []  # tokens whose entries the buffer holds

    def propose(self, context: list[int], k: int, n: int = 1, stop: Event | None = None) -> CandidateTree:
        """One chain (this proposer drafts a single candidate; `n` is ignored)."""
        if k <= 0:
            return CandidateTree()
        first_round = self.cache is None
        if self.cache is None:
            cached, self.cache = self.loop.call(lambda: self.prefix_cache.lookup(context))
            self.cached_ids = context[:cached]
        shared = 0
        limit = min(len(self.cached_ids), len(context) - 1)  # feed at least one token for fresh logits
        while shared < limit and self.cached_ids[shared] == context[shared]:
            shared += 1
        self.cache.truncate(shared)
        tree = self.loop.run(ChainJob(self.cache, context, k, self.rule.start(), self.chunk, stop))
        if first_round:
            self.loop.call(lambda: self.prefix_cache.store(context, self.cache))
        self.cached_ids = context + tree.token_ids[:-1]
        self.cache.truncate(len(self.cached_ids))
        return tree
