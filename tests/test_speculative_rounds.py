"""The round loop's own rules around the target's load advice: when a draft resumes after plain
rounds, and what its controller learns from. The target here is a fake that accepts every drafted
token and advises from a schedule; the loop under test is the real one."""

from __future__ import annotations

import time
from threading import Event

import pytest

from draft_node.pipeline_switch import PipelineSwitch
from draft_node.proposers.ngram import NgramProposer
from draft_node.speculative import speculative_rounds
from services.candidate_tree import CandidateTree
from services.rpc.specwire.v1 import target_pb2

PROMPT = [5, 6, 7, 5, 6, 7, 5, 6]  # repeats, so the n-gram proposer finds a continuation


class ChainProposer:
    """Drafts `k` copies of token 7 and records each K it was asked for."""

    prefills_context = True

    def __init__(self) -> None:
        self.asked: list[int] = []

    def propose(self, context: list[int], k: int, n: int = 1, stop: Event | None = None) -> CandidateTree:
        self.asked.append(k)
        return CandidateTree.from_sequences([[7] * k] if k else [])


class AcceptingTarget:
    """Accepts the whole leading path, then adds token 7; round r's answer carries `advice[r]`
    (past the schedule's end: none)."""

    first_token_id = 7

    def __init__(self, advice: list[int | None]) -> None:
        self.advice = advice
        self.advised_draft_tokens = advice[0] if advice else None
        self.rounds = 0

    def verify(self, tree: CandidateTree) -> target_pb2.VerifyResponse:
        path = tree.leading_path()
        response = target_pb2.VerifyResponse(
            accepted_node_ids=path, accepted_token_ids=[tree.token_ids[i] for i in path], next_token_id=7
        )
        self.rounds += 1
        if self.rounds < len(self.advice) and self.advice[self.rounds] is not None:
            response.advised_draft_tokens = self.advice[self.rounds]
        return response

    def close(self) -> None:
        pass


class RecordingController:
    """Always K = 4, N = 1; records what each observed round committed."""

    def __init__(self) -> None:
        self.heard: list[int] = []

    def choose(self) -> tuple[int, int]:
        return 4, 1

    def observe(self, arm: tuple[int, int], committed: int, seconds: float) -> None:
        self.heard.append(committed)


def run(proposer, advice: list[int | None], max_new_tokens: int, controller=None, pipeline=None) -> list:
    target = AcceptingTarget(advice)
    rounds = speculative_rounds(
        proposer,
        target,
        [*PROMPT, target.first_token_id],
        controller or RecordingController(),
        max_new_tokens,
        max_context=1000,
        pipeline=pipeline,
        first_advice=target.advised_draft_tokens,
    )
    return list(rounds)


@pytest.mark.parametrize(("plain_rounds", "drafts_again"), [(4, True), (12, False)])
def test_a_draft_back_from_plain_rounds_resumes_only_when_enough_tokens_are_still_to_come(
    plain_rounds, drafts_again
):
    """After `plain_rounds` advised plain rounds (one token each) the advice lifts, 20 - plain_rounds
    tokens are still to come: drafting again costs a prefill of the tokens missed, so the draft
    resumes when as many are left as were missed, and stays plain to the end when fewer are."""
    proposer = ChainProposer()
    outcomes = run(proposer, [0] * plain_rounds, max_new_tokens=20)
    assert [o.drafted for o in outcomes[:plain_rounds]] == [0] * plain_rounds
    assert sum(len(o.token_ids) for o in outcomes) == 20
    later = [o.drafted for o in outcomes[plain_rounds:]]
    assert any(later) == drafts_again
    if not drafts_again:
        assert proposer.asked.count(0) == len(proposer.asked)  # not asked to draft: nothing prefilled


def test_a_proposer_without_a_model_to_prefill_resumes_whenever_the_advice_lifts():
    outcomes = run(NgramProposer(), [0] * 12, max_new_tokens=20)
    assert any(o.drafted for o in outcomes[12:])


def test_the_controller_and_the_pipeline_switch_hear_only_rounds_that_drafted_their_k():
    """A round the advice cut to plain says nothing of the K the controller chose, nor of drafting
    ahead: booked under them it would make both learn the target's load, not their own choice."""
    controller, switch = RecordingController(), PipelineSwitch()
    outcomes = run(ChainProposer(), [0] * 6 + [None] * 4, max_new_tokens=40, controller=controller, pipeline=switch)
    drafted = [o for o in outcomes if o.drafted]
    assert drafted and len(drafted) < len(outcomes)
    assert controller.heard == [len(o.token_ids) for o in drafted if o.drafted == 4]
    assert sum(s.rounds for s in switch.stats.values()) == len(controller.heard)


class SlowChainProposer:
    """Drafts token 9 (the target never accepts it) one token per 10 ms, hearing `stop`; records
    each call's K, how many tokens it gave, and whether it drafted ahead (after a guessed 9)."""

    prefills_context = True

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, bool]] = []

    def propose(self, context: list[int], k: int, n: int = 1, stop: Event | None = None) -> CandidateTree:
        drafted = 0
        while drafted < k and not (stop is not None and stop.is_set()):
            time.sleep(0.01)
            drafted += 1
        self.calls.append((k, drafted, context[-1] == 9))
        return CandidateTree.from_sequences([[9] * drafted] if drafted else [])


class RejectingTarget(AcceptingTarget):
    """Accepts nothing, after 35 ms: every drafted-ahead round is a miss."""

    def verify(self, tree: CandidateTree) -> target_pb2.VerifyResponse:
        time.sleep(0.035)
        self.rounds += 1
        return target_pb2.VerifyResponse(next_token_id=7)


class AlwaysPipelined:
    def use(self) -> bool:
        return True

    def observe(self, pipelined: bool, committed: int, seconds: float) -> None:
        pass


def test_a_draft_ahead_the_answer_proved_wrong_stops_at_once():
    """The target rejected the leading path while the next round was being drafted ahead: the
    chain nothing will use ends at its next token, not after all 6 (the output is the same)."""
    proposer = SlowChainProposer()
    controller = RecordingController()
    controller.choose = lambda: (6, 1)
    rounds = speculative_rounds(
        proposer, RejectingTarget([]), [*PROMPT, 7], controller, 20, max_context=1000, pipeline=AlwaysPipelined()
    )
    assert [t for o in rounds for t in o.token_ids] == [7] * 20  # the target's own tokens
    ahead = [(k, drafted) for k, drafted, after_guess in proposer.calls if after_guess and k == 6]
    assert len(ahead) >= 5 and all(drafted < k for k, drafted in ahead)
    assert sum(k for k, _ in ahead) >= 2 * sum(drafted for _, drafted in ahead)
