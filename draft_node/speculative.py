"""The speculative loop: draft a candidate trie, verify it on the target, commit accepted + next token.

With pipelining, while round r is being verified the proposer already drafts round r + 1 on the
assumption that r's leading candidate is accepted whole and that the target's next token is the
proposer's own guess: it guesses one token, then proposes after it exactly as round r + 1 would.
If the assumption holds, round r + 1 starts with its trie ready (a hit); otherwise it is
discarded (a miss) and round r + 1 drafts normally. Either way round r + 1 verifies the very trie a
sequential loop would have sent, so outputs are the same, seeded `probabilistic` ones included.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from threading import Event
from typing import Protocol

from draft_node.proposers.base import Proposer
from draft_node.target_transport import VerifySession
from services.candidate_tree import CandidateTree
from services.rpc.specwire.v1 import draft_pb2, target_pb2


class Controller(Protocol):
    def choose(self) -> tuple[int, int]: ...

    def observe(self, arm: tuple[int, int], committed: int, seconds: float) -> None: ...


class Pipelining(Protocol):
    """Whether a round drafts the next one while it is verified, and what it learns from how it went."""

    def use(self) -> bool: ...

    def observe(self, pipelined: bool, committed: int, seconds: float) -> None: ...


@dataclass
class RoundOutcome:
    round_id: int
    token_ids: list[int]  # committed this round: accepted draft tokens, then the target's next token
    num_candidates: int  # N asked of the proposer
    drafted: int  # draft positions this round (the trie's depth, K)
    accepted: int
    draft_seconds: float  # time spent drafting before the verify was sent (about 0 on a pipeline hit)
    verify_seconds: float  # target-side forward + decision
    round_seconds: float  # wall clock of the whole round (draft + network + verify)
    pipeline: str = ""  # "hit" / "miss" when the previous round drafted ahead, else ""
    sources: list[int] = field(default_factory=list)  # draft_pb2.TokenSource of each committed token
    logprobs: list[float | None] = field(default_factory=list)  # the target's, per committed token
    candidates: list[tuple[list[int], int]] = field(default_factory=list)  # (tokens, accepted), best first


@dataclass
class DraftAhead:
    context: list[int]  # the context it assumed: leading path accepted, then the guessed next token
    tree: CandidateTree  # what proposer.propose(context, k, n) gave
    k: int
    n: int


def assumption_held(path: list[int], guess: int | None, result: target_pb2.VerifyResponse) -> bool:
    """Whether an answer bears out a draft-ahead's assumption: the leading path `path` accepted
    whole, and the next token the guess (None: not guessed yet, so not contradicted)."""
    return list(result.accepted_node_ids) == path and guess in (None, result.next_token_id)


class AheadWatch:
    """Ends a draft-ahead once the target's answer shows its assumption broken: nothing would use
    the rest of that chain, and with one core per node the round waited for it (0.1-0.2 s a round
    at K = 8 here)."""

    def __init__(self, tree: CandidateTree) -> None:
        self.path = tree.leading_path()
        self.stop = Event()
        self.guess: int | None = None
        self._verify: Future | None = None  # set when answered

    def answered(self, verify: Future) -> None:
        """The verify's done-callback (a failed verify ends the round anyway)."""
        self._verify = verify
        self._check()

    def guessed(self, token_id: int) -> None:
        self.guess = token_id
        self._check()

    def _check(self) -> None:
        verify = self._verify
        if verify is not None and (
            verify.exception() is not None or not assumption_held(self.path, self.guess, verify.result())
        ):
            self.stop.set()


def draft_ahead(
    proposer: Proposer,
    context: list[int],
    tree: CandidateTree,
    round_k: Callable[[int], int],
    n: int,
    watch: AheadWatch | None = None,
) -> DraftAhead | None:
    """The next round's trie, drafted as if `tree`'s leading path were accepted and the target's
    next token were the proposer's most likely one: exactly the trie a round after that context
    proposes, with the K `round_k` gives for that context's length (a guess token drafted within a
    longer chain would have counted in the chain's stop rule and given another trie). None when the
    proposer has no guess, or `watch` says the assumption is already broken (then a chain it
    stopped is cut short: `use_ahead` never takes it)."""
    assumed = context + [tree.token_ids[i] for i in tree.leading_path()]
    guess = proposer.propose(assumed, 1, 1)
    if not len(guess):
        return None
    assumed.append(guess.token_ids[0])
    if watch is not None:
        watch.guessed(guess.token_ids[0])
        if watch.stop.is_set():
            return None
    k = round_k(len(assumed))
    return DraftAhead(assumed, proposer.propose(assumed, k, n, watch.stop if watch is not None else None), k, n)


def use_ahead(ahead: DraftAhead, tree: CandidateTree, result: target_pb2.VerifyResponse) -> DraftAhead | None:
    """The drafted-ahead trie if the assumption held: the leading path accepted, the guess right."""
    path = tree.leading_path()
    return ahead if path and assumption_held(path, ahead.context[-1], result) else None


def committed_provenance(
    tree: CandidateTree, result: target_pb2.VerifyResponse
) -> tuple[list[int], list[float | None]]:
    """Source and target logprob of each token a round commits: accepted draft tokens, then the
    target's bonus token, correction, or (nothing drafted) its own token."""
    if not len(tree):
        last = draft_pb2.TOKEN_SOURCE_TARGET
    else:
        last = draft_pb2.TOKEN_SOURCE_BONUS if result.next_is_bonus else draft_pb2.TOKEN_SOURCE_RECOVERED
    sources = [draft_pb2.TOKEN_SOURCE_ACCEPTED] * len(result.accepted_token_ids) + [last]
    next_logprob = result.next_token_logprob if result.HasField("next_token_logprob") else None
    logprobs = [*result.accepted_logprobs, next_logprob]
    if len(logprobs) != len(sources):  # a target that does not report per-token logprobs
        logprobs = [None] * len(sources)
    return sources, logprobs


def worth_resuming(missed: int, remaining: int) -> bool:
    """Whether to draft again after plain rounds (the target's advice under load): the draft model
    must first prefill the `missed` tokens committed meanwhile, which pays only over enough tokens
    still to come. On the packaged pair (2-core VM) a token of that prefill cost 0.05-0.12 of a
    target step and drafting saved 0.08-0.4 of one per token, so it pays from about as many tokens
    to come as were missed."""
    return remaining >= missed


def speculative_rounds(
    proposer: Proposer,
    target: VerifySession,
    context: list[int],
    controller: Controller,
    max_new_tokens: int,
    max_context: int,
    pipeline: Pipelining | None = None,
    follow_advice: bool = True,
    first_advice: int | None = None,
) -> Iterator[RoundOutcome]:
    """Run rounds until `max_new_tokens` more tokens are committed or the context is full.

    `context` is the prompt plus every token produced so far; its last token is the target's
    pending token (chosen by the target, not yet in its KV cache). The controller picks K and N
    each round and hears back how it went; the target's advice (from its load; `first_advice` for
    the first round, given with the session) caps K unless `follow_advice` is off. The caller may
    stop early (EOS, stop strings) by
    closing the generator.
    """
    context = list(context)
    start_length = len(context)
    produced = 0
    ready: DraftAhead | None = None
    drafted_ahead = False

    advised = first_advice if follow_advice else None  # the target's advice from its load (None: none given)
    missed = 0  # tokens committed by plain rounds since the draft model last drafted

    def round_k(length: int) -> int:
        """K of a round after a context of `length` tokens: never past the target's advice, what
        the caller wants, nor the target's context limit; none after plain rounds that resuming
        would not repay."""
        limit = k if advised is None else min(k, advised)
        remaining = max_new_tokens - (length - start_length)
        if follow_advice and proposer.prefills_context and not worth_resuming(missed, remaining):
            limit = 0
        return max(0, min(limit, remaining - 1, max_context - length))

    with ThreadPoolExecutor(1, thread_name_prefix="verify") as executor:
        for round_id in itertools.count():
            remaining = max_new_tokens - produced
            if remaining <= 0 or len(context) > max_context:
                return
            k, n = controller.choose()
            k_round = round_k(len(context))
            start = time.perf_counter()
            hit = (
                ready is not None
                and ready.context == context
                and (ready.k, ready.n) == (k_round, n)  # what this round would propose
                and len(ready.tree) > 0
            )
            status = ("hit" if hit else "miss") if drafted_ahead else ""
            tree = ready.tree if hit else proposer.propose(context, k_round, n)
            drafted_at = time.perf_counter()
            if k_round:
                missed = 0
            ahead = None
            pipelined = pipeline is not None and pipeline.use()
            drafted_ahead = pipelined and len(tree) > 0
            if drafted_ahead:
                watch = AheadWatch(tree)
                in_flight = executor.submit(target.verify, tree)
                in_flight.add_done_callback(watch.answered)
                ahead = draft_ahead(proposer, context, tree, round_k, n, watch)
                result = in_flight.result()
            else:
                result = target.verify(tree)
            committed = [*result.accepted_token_ids, result.next_token_id][:remaining]
            if follow_advice and result.HasField("advised_draft_tokens"):
                advised = result.advised_draft_tokens
            else:
                advised = None
            round_seconds = time.perf_counter() - start
            if len(tree) and k_round == k:  # (a round the advice or the budget cut short says nothing of K)
                controller.observe((k, n), len(committed), round_seconds)
                if pipeline is not None:
                    pipeline.observe(drafted_ahead, len(committed), round_seconds)
            ready = use_ahead(ahead, tree, result) if ahead is not None else None
            context += committed
            produced += len(committed)
            if not k_round:
                missed += len(committed)
            sources, logprobs = committed_provenance(tree, result)
            yield RoundOutcome(
                round_id=round_id,
                token_ids=committed,
                num_candidates=n,
                drafted=max(tree.depths(), default=0),
                accepted=len(result.accepted_token_ids),
                draft_seconds=drafted_at - start,
                verify_seconds=result.verify_seconds,
                round_seconds=round_seconds,
                pipeline=status,
                sources=sources[: len(committed)],
                logprobs=logprobs[: len(committed)],
                candidates=[
                    ([tree.token_ids[n] for n in tree.path_to(c.leaf_node_id)], c.accepted_length)
                    for c in result.candidates
                ],
            )
