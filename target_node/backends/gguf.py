"""GGUF backend: the target's packaged quantized weights computed natively on the CPU
(services/gguf_decoder.py), every session's KV in a buffer of its own, rounds of all sessions
batched by one forward loop.

A verify round is one job of the loop: its rows (pending token + trie) join the next forward
with every other session's rows and prompt chunks; the strategy's decision and the compaction of
the session's buffer follow on the same thread. No cache is copied per round.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.candidate_tree import CandidateTree
from services.forward_loop import ForwardLoop
from services.gguf_decoder import GGUFDecoder, Rows
from services.kv_buffer import GROWTH, KVBuffer
from services.limits import mb_to_bytes
from services.prefix_cache import KVBufferCopies, PrefixCache
from target_node.backends.base import RoundResult, VerifyBackend
from target_node.config import TargetConfig
from target_node.kernels import TorchKernels
from target_node.session import Session
from target_node.strategies import STRATEGIES
from target_node.strategies.base import node_logprobs
from target_node.tree_attention import build_tree_query


class PrefillJob:
    """A session's prompt (after its cached prefix), in chunks; result: the target's first token."""

    def __init__(self, session: Session, prefix_cache: PrefixCache, chunk: int) -> None:
        self.session, self.prefix_cache, self.chunk = session, prefix_cache, chunk
        self.result: int = -1
        self.batch_size = 1
        self.session_key = None  # its first round is not awaited: the draft prefills too

    def next_rows(self) -> Rows:
        cache: KVBuffer = self.session.cache
        rest = self.session.token_ids[cache.length : cache.length + self.chunk]
        return Rows(cache, rest, all_logits=False)

    def take(self, logits: torch.Tensor) -> bool:
        session = self.session
        if session.cache.length < session.context_length:
            return False
        self.prefix_cache.store(session.token_ids, session.cache)
        self.result = session.strategy.sample_token(logits[-1], session.noise, session.context_length)
        return True


class VerifyJob:
    """One round: pending token + trie over the session's buffer, then the decision and compaction."""

    def __init__(self, session: Session, tree: CandidateTree) -> None:
        self.session, self.tree = session, tree
        self.prefix = session.context_length
        self.query = build_tree_query(session.pending_token, tree, self.prefix)
        self.result: RoundResult | None = None
        self.batch_size = 1
        self.session_key = session.session_id  # its draft sends the next round once this is answered

    def next_rows(self) -> Rows:
        return Rows(self.session.cache, self.query.token_ids, self.query.positions, self.query.visible)

    def take(self, logits: torch.Tensor) -> bool:
        session, tree, cache = self.session, self.tree, self.session.cache
        try:
            decision = session.strategy.evaluate_posterior(logits, tree, session.noise, self.prefix + 1)
            end_row = decision.accepted_nodes[-1] + 1 if decision.accepted_nodes else 0
            next_logprob = float(logits[end_row].log_softmax(-1)[decision.next_token])
            logprobs = node_logprobs(logits, tree).tolist()
        except BaseException:
            cache.truncate(self.prefix)  # the round's entries go; the session is as before it
            raise
        # node i sits at slot prefix + 1 + i; keep the pending token's entry and the accepted path
        cache.compact(self.prefix + 1, [self.prefix + 1 + node for node in decision.accepted_nodes])
        self.result = RoundResult(decision, logprobs, self.batch_size, next_logprob)
        return True


class GGUFBackend(VerifyBackend):
    strategies = tuple(sorted(STRATEGIES))
    kernels = TorchKernels()

    def __init__(self, build_decoder: Callable[[], GGUFDecoder], config: TargetConfig) -> None:
        self.chunk = config.prefill_chunk_tokens
        self.loop: ForwardLoop = ForwardLoop(
            build_decoder, "gguf-target", max_rows=config.prefill_chunk_tokens, max_jobs=config.max_batch_size
        )
        self.decoder = decoder = self.loop.decoder
        self.vocab_size = decoder.vocab_size
        self.max_context = decoder.settings.max_context
        self.prefix_cache = PrefixCache(mb_to_bytes(config.prefix_cache_mb), KVBufferCopies(decoder.new_cache))

    def prefill(self, session: Session) -> int:
        session.cached_prefix, session.cache = self.loop.call(lambda: self.prefix_cache.lookup(session.token_ids))
        return self.loop.run(PrefillJob(session, self.prefix_cache, self.chunk))

    def verify(self, session: Session, tree: CandidateTree) -> RoundResult:
        return self.loop.run(VerifyJob(session, tree))

    def describe(self) -> dict[str, str]:
        return {
            "backend": "gguf",
            "attention": "specwire cpu",
            "kernels": self.kernels.name,
            "device": "cpu",
            "dtype": "gguf",
            "weights_mb": f"{self.decoder.nbytes / 1e6:.0f}",
        }

    def session_bytes(self, session: Session) -> int:
        cache = session.cache  # read once: a close on another thread may set it to None meanwhile
        return cache.nbytes if cache is not None else 0

    def prefill_bytes(self, num_tokens: int) -> int:
        s = self.decoder.settings
        per_token = s.num_layers * 2 * s.num_kv_heads * s.head_dim * 4  # float32 keys and values
        return per_token * (num_tokens + GROWTH)  # a buffer's spare room included

    def shared_cache_bytes(self) -> int:
        return self.prefix_cache.nbytes

    def shrink_shared_caches(self, nbytes: int) -> int:
        return self.prefix_cache.shrink(nbytes)

    def close(self, session: Session) -> None:
        session.cache = None
        self.loop.forget(session.session_id)

    def stop(self) -> None:
        self.loop.stop()
