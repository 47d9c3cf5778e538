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


def test_one_client_s_requests_one_after_another_stay_alone():
    """A closed session counts until its client's next one starts verifying, not beside it."""
    clock = Clock()
    advisor = DraftAdvisor(clock=clock)
    simulate(advisor, clock, 1, lambda cap: 10.0, 10)
    advisor.closed("s0")
    clock.now += 0.2
    assert advisor.advise() is None  # (the next session is opened)
    for _ in range(30):
        clock.now += 0.4
        advisor.record_round("next", 4)
        assert advisor.advise() is None


def test_under_load_plain_rounds_win_when_they_give_more_tokens():
    """Two sessions on one machine: speculating 9 tok/s in total, plain rounds 15 (as measured by
    `make bench-capacity` before the advice): the advice settles on 0, re-probing now and then."""
    clock = Clock()
    advisor = DraftAdvisor(clock=clock)
    rates = {None: 9.0, 0: 15.0, 2: 11.0}
    advice = simulate(advisor, clock, 2, lambda cap: rates[cap], 300)
    late = advice[-200:]
    assert late.count(0) > 0.6 * len(late) and advice[len(advice) // 2 :].count(2)  # mostly plain, still probing
    assert advisor.goodput[(2, 0)] == pytest.approx(15.0, rel=0.05)


def test_under_load_speculation_stays_when_it_gives_more_tokens():
    clock = Clock()
    advisor = DraftAdvisor(clock=clock)
    rates = {None: 30.0, 0: 15.0, 2: 22.0}
    late = simulate(advisor, clock, 4, lambda cap: rates[cap], 300)[-400:]
    assert late.count(None) > 0.6 * len(late)


def test_the_draft_follows_the_advice_and_the_output_stays_identical(tiny, target_model, pair_factory):
    """Advised 0 (with the opened session and with every answer), the draft's rounds draft nothing
    (plain decoding), with output identical to the target alone."""
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
    # the advice comes with the opened session too: not even a first round is drafted
    assert sizes.count(0) == len(sizes) and len(sizes) >= 18


def test_a_session_closed_after_sitting_idle_does_not_count():
    """The idle timeout closing a session whose client left long ago adds no one."""
    clock = Clock()
    advisor = DraftAdvisor(clock=clock)
    simulate(advisor, clock, 1, lambda cap: 10.0, 10)
    advisor.record_round("idle", 4)  # one round, then its client goes quiet
    for _ in range(20):
        clock.now += 0.4
        advisor.record_round("s0", 4)
    advisor.closed("idle")
    assert advisor._active(clock.now) == 1


def test_a_new_load_starts_from_plain_rounds_and_climbs_no_further_than_a_cap_that_lost():
    """Exploring costs goodput: a load never seen starts from plain rounds (never slower than the
    target decoding plainly), gives the next cap one epoch, and, as that one lost, never tries a
    full-length draft (which at load can cost seconds of an epoch)."""
    clock = Clock()
    advisor = DraftAdvisor(clock=clock)
    rates = {None: 9.0, 0: 15.0, 2: 11.0}
    advice = simulate(advisor, clock, 2, lambda cap: rates[cap], 60)
    assert advice[0] is None  # the first round's session was alone yet
    assert list(dict.fromkeys(advice[1:])) == [0, 2]
    assert advice[-100:].count(0) > 0.6 * 100


def test_a_new_load_climbs_to_the_full_draft_where_each_step_gains():
    clock = Clock()
    advisor = DraftAdvisor(clock=clock)
    rates = {None: 30.0, 0: 15.0, 2: 22.0}
    advice = simulate(advisor, clock, 2, lambda cap: rates[cap], 60)
    assert list(dict.fromkeys(advice[1:])) == [0, 2, None]
    assert advice[-200:].count(None) > 0.6 * 200


def test_a_longer_draft_must_win_by_a_margin():
    """Cap 2 at 4% over plain rounds (within the noise of an epoch on a busy machine) is not the
    best, so no epoch climbs on to full drafts; at 20% over it, it is."""
    for rate_2, best in ((15.6, 0), (18.0, 2)):
        clock = Clock()
        advisor = DraftAdvisor(clock=clock)
        rates = {None: 9.0, 0: 15.0, 2: rate_2}
        advice = simulate(advisor, clock, 2, lambda cap, rates=rates: rates[cap], 60)
        assert advisor._best(2) == best
        assert (None in advice[1:]) == (best == 2)  # (the first round's session was alone yet)


def test_a_higher_load_starts_from_plain_rounds_and_a_lower_one_from_the_best_above_it():
    clock = Clock()
    advisor = DraftAdvisor(clock=clock)
    rates = {None: 30.0, 0: 15.0, 2: 22.0}
    simulate(advisor, clock, 4, lambda cap: rates[cap], 60)
    assert advisor._best(4) is None
    assert advisor._choose(8) == 0  # never measured above 4: plain rounds first, then a climb
    assert advisor._choose(16) == 0
    assert advisor._choose(2) is None  # speculation won at 4 sessions: it wins at 2 too
    simulate(advisor, clock, 8, lambda cap: rates[cap], 120)
    assert advisor._best(8) is None  # climbed to it


def test_an_epoch_across_a_pause_is_not_booked():
    """Between requests the sessions go quiet; the epoch then open would book a goodput of a few
    tokens over the whole pause against its cap."""
    clock = Clock()
    advisor = DraftAdvisor(clock=clock)
    simulate(advisor, clock, 2, lambda cap: 15.0, 10)
    booked = dict(advisor.goodput)
    clock.now += 60  # nobody verifies for a minute
    advisor.record_round("s0", 4)
    assert advisor.goodput == booked


def test_the_advice_holds_through_the_epoch_when_a_session_leaves_between_requests(target_model):
    """Two clients, each request a new session: while one is between requests the other is alone
    for a moment, and a full-length draft then would cost a long verify at the load just measured;
    so a closed session counts as verifying for a moment, also when an epoch ends meanwhile."""
    from services.rpc.specwire.v1 import target_pb2

    verifier = build_verifier(TargetConfig(model="tiny"), target_model)
    clock = Clock()
    advisor = verifier.advisor = DraftAdvisor(clock=clock)
    opened = [
        verifier.open_session(
            target_pb2.OpenSessionRequest(prompt_token_ids=[5, 6, 7], tokenizer_fingerprint=verifier.fingerprint)
        ).session_id
        for _ in range(2)
    ]
    s0, s1 = opened
    turn = 0
    while clock.now < 10 or clock.now + 0.25 < advisor.epoch_start + advisor._epoch_length():
        clock.now += 0.25
        advisor.record_round(opened[turn % 2], 4)
        turn += 1
    if turn % 2 == 0:
        advisor.record_round(s0, 4)
    advisor.record_round(s1, 4)  # s1's request ends just before an epoch does
    verifier.close_session(s1)
    for _ in range(5):  # its client's next request has not started; s0 goes on, past the epoch's end
        clock.now += 0.25
        advisor.record_round(s0, 4)
        assert advisor.advise() is not None
    assert advisor.epoch_load == 2
    clock.now += 10.0  # an epoch later, and still alone: no advice
    advisor.record_round(s0, 4)
    assert advisor.advise() is None
    verifier.stop()


def test_clients_arriving_together_are_not_each_thought_alone(target_model):
    """A burst of requests after a quiet spell: every opened session counts at once, so the second
    to open already gets the advice of its load (before, each burst's first rounds got none and
    drafted full chains, 1.3-1.5 s each at two clients on the 2-core VM), and the first session's
    first answer starts an epoch at the whole burst's load, not at one."""
    from services.rpc.specwire.v1 import target_pb2

    verifier = build_verifier(TargetConfig(model="tiny"), target_model)
    clock = Clock()
    advisor = verifier.advisor = DraftAdvisor(clock=clock)
    simulate(advisor, clock, 2, lambda cap: {None: 9.0, 0: 15.0, 2: 11.0}[cap], 30)  # load 2 measured
    for s in range(2):
        advisor.closed(f"s{s}")
    clock.now += 60  # nobody verifies for a minute

    def open_session() -> target_pb2.OpenSessionResponse:
        request = target_pb2.OpenSessionRequest(prompt_token_ids=[5, 6, 7], tokenizer_fingerprint=verifier.fingerprint)
        return verifier.open_session(request)

    first = open_session()
    assert not first.HasField("advised_draft_tokens")  # alone so far
    burst = [open_session() for _ in range(3)]
    assert [r.advised_draft_tokens for r in burst if r.HasField("advised_draft_tokens")] == [0, 0, 0]
    clock.now += 0.3
    advisor.record_round(first.session_id, 4)
    assert (advisor.epoch_load, advisor.advise()) == (4, 0)  # above every load measured: plain rounds
    assert not [load for load, _ in advisor.goodput if load == 4]  # the cut-short epochs booked nothing
    verifier.stop()


def test_sessions_that_ignore_the_advice_are_left_out_of_its_measurements(tiny, target_model, pair_factory):
    """`target_only` (plain anyway) and seeded fixed-K requests tell the target they will not follow
    the advice: their rounds neither count as load nor as goodput of a cap, and get no advice."""
    from services.rpc.specwire.v1 import draft_pb2

    verifier = build_verifier(TargetConfig(model="tiny"), target_model)
    recorded = []
    verifier.advisor.record_round = lambda session_id, committed: recorded.append(session_id)
    pair = pair_factory(tiny.draft_same, target_verifier=verifier)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda p: collect(pair.draft_stub, prompt=p, max_tokens=12, target_only=True), ["a b", "c d"]))
    seeded = draft_pb2.GenerateRequest(prompt="def add(a, b):", max_tokens=8, seed=3)  # K its own
    assert list(pair.draft_stub.Generate(seeded))
    assert recorded == []
    collect(pair.draft_stub, prompt="def add(a, b):", max_tokens=8)  # one that follows it is measured
    assert recorded


def test_a_higher_load_tries_no_cap_above_the_best_at_a_lower_one_and_probes_less_while_probes_lose():
    """Plain rounds won at 2 sessions, where the probes of cap 2 keep losing and come ever less
    often; at 4 sessions the advisor stays with plain rounds, not even probing a longer draft."""
    clock = Clock()
    advisor = DraftAdvisor(clock=clock)
    rates = {None: 8.0, 0: 15.0, 2: 11.0}
    advice = simulate(advisor, clock, 2, lambda cap: rates[cap], 600)
    assert advisor._probe_gap[2] == 64  # doubled after each lost probe, up to the bound
    assert 0 < sum(a != 0 for a in advice[1:]) < 0.1 * len(advice)
    advice = simulate(advisor, clock, 4, lambda cap: rates[cap], 600 + 300)
    assert set(advice) == {0}
    assert [cap for load, cap in advisor.goodput if load == 4] == [0]


def test_epochs_last_several_rounds_of_a_session_when_rounds_are_slow():
    """Rounds of a second each (two sessions drafting long chains on a CPU): an epoch of 2 s
    would hold two rounds a session and measure mostly where its edges fell."""
    clock = Clock()
    advisor = DraftAdvisor(clock=clock)
    simulate(advisor, clock, 2, lambda cap: 8.0, 60)  # 4 tokens a round at 8 a second: 1 s per round of both
    assert advisor._epoch_length() >= 6 * 0.9
    starts = []
    start = advisor.epoch_start
    while clock.now < 120:
        simulate(advisor, clock, 2, lambda cap: 8.0, clock.now + 1)
        if advisor.epoch_start != start:
            starts.append(advisor.epoch_start)
            start = advisor.epoch_start
    assert all(b - a >= 5 for a, b in zip(starts, starts[1:], strict=False))
