"""Speculation that adapts to load: the forward-cost curve, the target's advice, the draft obeying it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from services.forward_cost import ForwardCost
from target_node.build import build_verifier
from target_node.config import TargetConfig
from target_node.draft_advice import DraftAdvisor
from tests.helpers import collect, target_only_greedy


def cost_curve(seconds_of_rows) -> ForwardCost:
    cost = ForwardCost()
    for rows in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        cost.record(rows, seconds_of_rows(rows))
    return cost


def test_forward_cost_interpolates_and_extrapolates_the_measured_curve():
    cost = ForwardCost()
    cost.record(1, 0.1)
    assert cost.seconds(4) is None  # one size measured: no curve yet
    cost.record(8, 0.17)
    cost.record(64, 0.80)
    assert cost.seconds(4) == pytest.approx(0.1 + 3 * 0.01)
    assert cost.seconds(128) == pytest.approx(0.80 + 64 * (0.63 / 56))
    assert cost.seconds(1) == pytest.approx(0.1)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def advisor_after_rounds(cost: ForwardCost, sessions: int, drafted: int, accepted: int, gap_s: float) -> DraftAdvisor:
    """`sessions` sessions that each ran rounds of `drafted` tokens, `accepted` accepted, `gap_s`
    apart (drafting and link)."""
    clock = Clock()
    advisor = DraftAdvisor(cost, k_max=8, clock=clock)
    for _ in range(20):
        for s in range(sessions):
            advisor.record_round(f"s{s}", drafted, accepted, clock.now)
        clock.now += gap_s
    return advisor


def test_no_advice_for_a_session_alone():
    advisor = advisor_after_rounds(cost_curve(lambda rows: 0.07 + 0.001 * rows), 1, 4, 3, 0.05)
    assert advisor.advise() is None


def test_cheap_rows_and_good_drafts_keep_speculating():
    """A memory-bound forward (rows nearly free) and 80% acceptance: long drafts pay even for 8."""
    advisor = advisor_after_rounds(cost_curve(lambda rows: 0.07 + 0.0002 * rows), 8, 4, 3, 0.02)
    assert advisor.acceptance() == pytest.approx(0.75)
    assert advisor.advise() >= 4


def test_compute_bound_rows_under_load_turn_speculation_off():
    """Each row costs as much as the fixed part (a CPU past a few rows) and drafts cost time too:
    for 8 sessions a plain decoding round gives the most tokens a second."""
    advisor = advisor_after_rounds(cost_curve(lambda rows: 0.01 + 0.01 * rows), 8, 4, 2, 0.1)
    assert advisor.advise() == 0


def test_the_draft_follows_the_advice_and_the_output_stays_identical(tiny, target_model, pair_factory):
    """Advised 0, the draft's rounds after the first draft nothing (plain decoding), with output
    identical to the target alone."""
    verifier = build_verifier(TargetConfig(model="tiny"), target_model)
    verifier.advisor.advise = lambda: 0
    pair = pair_factory(tiny.draft_same, target_verifier=verifier)
    sizes = []
    original = verifier.verify

    def recording(request, *owner):
        sizes.append(len(request.tree.token_ids))
        return original(request, *owner)

    verifier.verify = recording
    prompts = ["def add(a, b):", "The quick brown fox"]
    with ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(lambda p: collect(pair.draft_stub, prompt=p, max_tokens=12)[0], prompts))
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == target_only_greedy(target_model, target_model.tokenizer.encode(prompt), 12)
    assert sizes.count(0) == len(sizes) - 2 and len(sizes) >= 18  # only each first round drafted
