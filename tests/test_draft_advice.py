"""Speculation that adapts to load: the forward-cost curve, the target's advice, the draft obeying it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from target_node.build import build_verifier
from target_node.config import TargetConfig
from target_node.draft_advice import DraftAdvisor
from tests.helpers import collect, target_only_greedy


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(advisor: DraftAdvisor, clock: Clock, sessions: int, goodput_of, seconds: float) -> list:
    """`sessions` sessions in turn, each round committing 4 tokens, at the total tokens a second the
    current advice gives (`goodput_of(cap)`); returns the advice after each round."""
    advice = []
    while clock.now < seconds:
        for s in range(sessions):
            clock.now += 4 / goodput_of(advisor.advise())
            advisor.record_round(f"s{s}", 4)
            advice.append(advisor.advise())
    return advice


def test_no_advice_for_a_session_alone():
    clock = Clock()
    advisor = DraftAdvisor(clock=clock)
    assert set(simulate(advisor, clock, 1, lambda cap: 10.0, 30)) == {None}


def test_under_load_plain_rounds_win_when_they_give_more_tokens():
    """Two sessions on one machine: speculating 9 tok/s in total, plain rounds 15 (as measured by
    `make bench-capacity` before the advice): the advice settles on 0, re-probing now and then."""
    clock = Clock()
    advisor = DraftAdvisor(clock=clock)
    rates = {None: 9.0, 0: 15.0, 2: 11.0}
    late = simulate(advisor, clock, 2, lambda cap: rates[cap], 300)[-200:]
    assert late.count(0) > 0.6 * len(late) and {None, 2} & set(late)  # mostly plain, still probing
    assert advisor.goodput[(2, 0)] == pytest.approx(15.0, rel=0.05)


def test_under_load_speculation_stays_when_it_gives_more_tokens():
    clock = Clock()
    advisor = DraftAdvisor(clock=clock)
    rates = {None: 30.0, 0: 15.0, 2: 22.0}
    late = simulate(advisor, clock, 4, lambda cap: rates[cap], 300)[-400:]
    assert late.count(None) > 0.6 * len(late)


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
