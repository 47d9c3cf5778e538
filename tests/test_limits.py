"""Limits that keep a node healthy: KV-memory budget with LRU eviction, a deadline on every verify
round, and property-based checks that no VerifyRequest can crash the verifier or corrupt a session."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.candidate_tree import CandidateTree, SparseProbs
from services.errors import InvalidArgument, NotFound, ResourceExhausted, SpecwireError
from services.limits import MAX_Q_SUPPORT
from services.rpc.specwire.v1 import target_pb2
from target_node.build import build_verifier
from target_node.config import TargetConfig
from tests.helpers import collect, forget_sessions_at, target_only_greedy
from tests.test_verifier import open_session, verify

PROMPT = "def add(a, b):"


def session_bytes(verifier, session_id):
    return verifier.backend.session_bytes(verifier.sessions.get(session_id))


def one_session_bytes(target_model, prompt_ids) -> int:
    """Memory one session of this prompt holds (measured on a target without a budget)."""
    probe = build_verifier(TargetConfig(model="tiny", prefix_cache_mb=0, kv_cache_budget_mb=0), target_model)
    try:
        return session_bytes(probe, open_session(probe, prompt_ids).session_id)
    finally:
        probe.stop()


def test_lru_eviction_keeps_kv_memory_within_the_budget(target_model):
    prompt = target_model.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    one = one_session_bytes(target_model, prompt)
    budget_mb = 2.5 * one / (1 << 20)  # room for two sessions of this size, not three
    verifier = build_verifier(TargetConfig(model="tiny", kv_cache_budget_mb=budget_mb), target_model)
    first, second = open_session(verifier, prompt), open_session(verifier, prompt)
    verify(verifier, first.session_id, 0, CandidateTree.from_sequences([[1]]))  # first is now the newer
    third = open_session(verifier, prompt)
    live = {s.session_id for s in verifier.sessions.snapshot()}
    assert live == {first.session_id, third.session_id}
    assert sum(verifier.backend.session_bytes(s) for s in verifier.sessions.snapshot()) <= budget_mb * (1 << 20)
    assert verifier.metrics.sessions_removed.labels("evicted")._value.get() == 1
    with pytest.raises(NotFound):
        verify(verifier, second.session_id, 0, CandidateTree.from_sequences([[1]]))
    verifier.stop()


def test_an_evicted_generation_resumes_with_identical_output(tiny, target_model, pair_factory):
    """Two generations under a budget for about one: they evict each other and resume by re-prefill."""
    budget = 1.5 * one_session_bytes(target_model, target_model.tokenizer.encode(PROMPT))
    verifier = build_verifier(TargetConfig(model="tiny", kv_cache_budget_mb=budget / (1 << 20)), target_model)
    pair = pair_factory(tiny.draft_noisy, target_verifier=verifier)
    original = verifier.verify

    both_opened = threading.Event()

    def between_rounds(request, *owner):  # both generations stay open, idle most of the time
        # no round is answered before both generations opened: otherwise, on a slow machine, the
        # first could finish before the second starts and nothing would ever be evicted
        if verifier.metrics.sessions_opened._value.get() >= 2:
            both_opened.set()
        both_opened.wait(timeout=60)
        time.sleep(0.02)
        return original(request, *owner)

    verifier.verify = between_rounds
    import concurrent.futures

    prompts = [PROMPT, "import numpy as np"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda p: collect(pair.draft_stub, prompt=p, max_tokens=40)[0], prompts))
    for prompt, tokens in zip(prompts, runs, strict=True):
        assert tokens == target_only_greedy(target_model, target_model.tokenizer.encode(prompt), 40)
    assert verifier.metrics.sessions_removed.labels("evicted")._value.get() > 0


def test_a_round_past_its_deadline_fails_and_the_node_keeps_serving(tiny, target_model, pair_factory):
    pair = pair_factory(tiny.draft_noisy, target_round_timeout_s=0.5)
    backend = pair.target.node.backend
    fast_verify = backend.verify

    def stuck(session, tree):
        time.sleep(1.5)
        return fast_verify(session, tree)

    backend.verify = stuck
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        collect(pair.draft_stub, prompt=PROMPT, max_tokens=20)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 5
    backend.verify = fast_verify
    tokens, _ = collect(pair.draft_stub, prompt=PROMPT, max_tokens=20)
    assert tokens == target_only_greedy(target_model, target_model.tokenizer.encode(PROMPT), 20)
    deadline = time.monotonic() + 10
    while len(pair.target.node.sessions) and time.monotonic() < deadline:
        time.sleep(0.1)  # the failed generation's session was closed, not left to the TTL
    assert len(pair.target.node.sessions) == 0


@pytest.fixture(scope="module")
def fuzz_verifier(target_model):
    verifier = build_verifier(TargetConfig(model="tiny", max_tree_nodes=16, max_context_tokens=400), target_model)
    yield verifier
    verifier.stop()


def sparse_q():
    probs = st.one_of(
        st.floats(0, 1), st.just(float("nan")), st.just(-0.5), st.just(float("inf")), st.just(2.0)
    )
    return st.builds(
        lambda ids, ps: target_pb2.SparseDistribution(token_ids=ids, probs=ps),
        st.lists(st.integers(0, 600), max_size=4),
        st.lists(probs, max_size=4),
    )


@st.composite
def verify_requests(draw, vocab: int):
    size = draw(st.integers(0, 20))
    parents = draw(st.lists(st.integers(-3, 22), min_size=size, max_size=size))
    if draw(st.booleans()):  # often a well-formed trie, to reach the forward pass
        parents = [draw(st.integers(-1, i - 1)) for i in range(size)]
    tokens = draw(st.lists(st.integers(0, vocab + 5), min_size=size, max_size=size + draw(st.integers(0, 1))))
    tree = target_pb2.CandidateTree(parents=parents, token_ids=tokens)
    if draw(st.booleans()):
        tree.draft_probs.extend(draw(st.lists(sparse_q(), min_size=0, max_size=size + 1)))
    return tree, draw(st.sampled_from(["ok", "wrong-round", "unknown-session"]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_verify_request_crashes_or_corrupts_a_session(fuzz_verifier, target_model, data):
    for strategy, sampling in (("deterministic", {}), ("probabilistic", {"temperature": 1.0, "seed": 1})):
        opened = open_session(
            fuzz_verifier, [5, 6, 7], strategy=strategy, sampling=target_pb2.SamplingParams(**sampling)
        )
        tree, mode = data.draw(verify_requests(fuzz_verifier.vocab_size))
        session = fuzz_verifier.sessions.get(opened.session_id)
        before = (session.context_length, session.next_round)
        request = target_pb2.VerifyRequest(
            session_id=opened.session_id if mode != "unknown-session" else "nope",
            round_id=0 if mode != "wrong-round" else 3,
            tree=tree,
        )
        try:
            fuzz_verifier.verify(request)
        except SpecwireError as exc:
            assert exc.code != grpc.StatusCode.INTERNAL, exc
            assert (session.context_length, session.next_round) == before  # untouched by a refused round
        assert session.cache.get_seq_length() == session.context_length  # KV matches the context
        reply = fuzz_verifier.verify(  # the session still works
            target_pb2.VerifyRequest(
                session_id=opened.session_id,
                round_id=session.next_round,
                tree=CandidateTree.from_sequences([[1, 2]]).to_proto(),
            )
        )
        assert reply.context_length == session.context_length
        assert fuzz_verifier.close_session(opened.session_id)


def test_a_resume_is_bounded_by_the_context_window_only(tiny, target_model, pair_factory):
    """`max_prompt_tokens` bounds a client's prompt; a resume re-sends the whole committed context
    and is bounded by the context window only (here over HTTP, as a client sees it)."""
    import httpx

    verifier = build_verifier(TargetConfig(model="tiny", max_prompt_tokens=16), target_model)
    pair = pair_factory(tiny.draft_noisy, target_verifier=verifier)
    prompt = "Natalia sold clips to 48 of her friends"
    prompt_ids = target_model.tokenizer.encode(prompt)
    assert len(prompt_ids) <= 16
    forget_sessions_at(verifier, {8})  # K=1: by then at least 7 rounds committed, so the context is past 16
    response = httpx.post(
        f"http://127.0.0.1:{pair.draft.http_port}/v1/completions",
        json={"prompt": prompt, "max_tokens": 30, "temperature": 0, "num_speculative_tokens": 1},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    expected = target_only_greedy(target_model, prompt_ids, 30)
    assert response.json()["choices"][0]["text"] == target_model.tokenizer.decode(expected, skip_special_tokens=True)
    assert pair.draft.node.metrics.target_resumes._value.get() == 1


def test_the_memory_budget_is_on_by_default(target_model):
    verifier = build_verifier(TargetConfig(model="tiny"), target_model)
    try:
        budget = verifier.sessions.budget_bytes
        assert budget > 0
        from services.memory import available_memory_bytes

        assert budget <= available_memory_bytes()
    finally:
        verifier.stop()


def test_one_budget_covers_session_kv_and_the_prefix_cache(target_model):
    """Sessions of different prompts under a budget for about two: the prefix cache's copies count
    too, so sessions + prefix cache stay within it after every open."""
    prompt = target_model.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    one = one_session_bytes(target_model, prompt)
    budget = int(2.2 * one)
    verifier = build_verifier(TargetConfig(model="tiny", kv_cache_budget_mb=budget / (1 << 20)), target_model)
    try:
        for i in range(4):
            open_session(verifier, prompt[: len(prompt) - i])
            held = sum(verifier.backend.session_bytes(s) for s in verifier.sessions.snapshot())
            assert held + verifier.backend.shared_cache_bytes() <= budget
        assert len(verifier.backend.prefix_cache) < 4  # the prefix cache gave way too
    finally:
        verifier.stop()


def test_a_full_target_refuses_before_paying_the_prefill(target_model):
    """A session mid-round cannot be evicted: with no room left the next OpenSession gets
    RESOURCE_EXHAUSTED and no prefill runs; a prompt larger than the whole budget is refused the
    same way, and so is a session past `max_sessions` (with a retry hint: when the oldest expires)."""
    prompt = target_model.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    one = one_session_bytes(target_model, prompt)
    config = TargetConfig(model="tiny", prefix_cache_mb=0, kv_cache_budget_mb=1.5 * one / (1 << 20))
    verifier = build_verifier(config, target_model)
    prefills = []
    original = verifier.backend.prefill
    verifier.backend.prefill = lambda session: prefills.append(session) or original(session)
    try:
        busy = verifier.sessions.get(open_session(verifier, prompt).session_id)
        with busy.lock:  # a round in flight on it
            with pytest.raises(ResourceExhausted) as err:
                open_session(verifier, prompt)
        assert len(prefills) == 1 and "memory budget" in str(err.value)
        with pytest.raises(ResourceExhausted):
            open_session(verifier, list(range(5, 300)))
        assert len(prefills) == 1
        open_session(verifier, prompt)  # once idle, the older session gives way
        assert len(prefills) == 2 and len(verifier.sessions) == 1
        verifier.sessions.max_sessions = 1
        with pytest.raises(ResourceExhausted) as err:
            open_session(verifier, prompt)
        assert len(prefills) == 2 and 0 < err.value.retry_after_s <= config.session_ttl_s
    finally:
        verifier.stop()


def test_q_support_per_node_is_bounded(fuzz_verifier):
    """A q with more entries than any draft keeps is refused before the target loops over it."""
    opened = open_session(
        fuzz_verifier, [5, 6, 7], strategy="probabilistic", sampling=target_pb2.SamplingParams(temperature=1.0)
    )
    size = MAX_Q_SUPPORT + 1
    tree = CandidateTree([-1], [9], [SparseProbs([9] + [i % 300 for i in range(size - 1)], [1.0 / size] * size)])
    with pytest.raises(InvalidArgument, match="limit"):
        verify(fuzz_verifier, opened.session_id, 0, tree)
    fuzz_verifier.close_session(opened.session_id)
