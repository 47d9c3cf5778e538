"""The speculative loop: draft a candidate trie, verify it on the target, commit accepted + next token."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from draft_node.proposers.base import Proposer
from services.candidate_tree import CandidateTree
from services.rpc.specwire.v1 import target_pb2


class Controller(Protocol):
    def choose(self) -> tuple[int, int]: ...

    def observe(self, arm: tuple[int, int], committed: int, seconds: float) -> None: ...


class Verifier(Protocol):
    def verify(self, tree: CandidateTree) -> target_pb2.VerifyResponse: ...


@dataclass
class RoundOutcome:
    round_id: int
    token_ids: list[int]  # committed this round: accepted draft tokens, then the target's next token
    num_candidates: int  # N asked of the proposer
    drafted: int  # draft positions this round (the trie's depth, K)
    accepted: int
    draft_seconds: float
    verify_seconds: float  # target-side forward + decision
    round_seconds: float  # wall clock of the whole round (draft + network + verify)


def speculative_rounds(
    proposer: Proposer,
    target: Verifier,
    context: list[int],
    controller: Controller,
    max_new_tokens: int,
    max_context: int,
) -> Iterator[RoundOutcome]:
    """Run rounds until `max_new_tokens` more tokens are committed or the context is full.

    `context` is the prompt plus every token produced so far; its last token is the target's
    pending token (chosen by the target, not yet in its KV cache). The controller picks K and N
    each round and hears back how it went. The caller may stop early (EOS, stop strings) by
    closing the generator.
    """
    context = list(context)
    produced = 0
    for round_id in itertools.count():
        remaining = max_new_tokens - produced
        if remaining <= 0 or len(context) > max_context:
            return
        k, n = controller.choose()
        # never draft past what the caller wants, nor past the target's context limit
        k_round = max(0, min(k, remaining - 1, max_context - len(context)))
        start = time.perf_counter()
        tree = proposer.propose(context, k_round, n)
        drafted_at = time.perf_counter()
        result = target.verify(tree)
        committed = [*result.accepted_token_ids, result.next_token_id][:remaining]
        round_seconds = time.perf_counter() - start
        controller.observe((k, n), len(committed), round_seconds)
        context += committed
        produced += len(committed)
        yield RoundOutcome(
            round_id=round_id,
            token_ids=committed,
            num_candidates=n,
            drafted=max(tree.depths(), default=0),
            accepted=len(result.accepted_token_ids),
            draft_seconds=drafted_at - start,
            verify_seconds=result.verify_seconds,
            round_seconds=round_seconds,
        )
