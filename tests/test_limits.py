"""Limits that keep a node healthy: KV-memory budget with LRU eviction, a deadline on every verify
round, and property-based checks that no VerifyRequest can crash the verifier or corrupt a session."""

from __future__ import annotations

import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.candidate_tree import CandidateTree
from services.errors import NotFound, SpecwireError
from services.rpc.specwire.v1 import target_pb2
from target_node.backends import build_verifier
from target_node.config import TargetConfig
from tests.helpers import collect, target_only_greedy
from tests.test_verifier import open_session, verify

PROMPT = "def add(a, b):"


def session_bytes(verifier, session_id):
    return verifier.backend.session_bytes(verifier.sessions.get(session_id))


def test_lru_eviction_keeps_kv_memory_within_the_budget(target_model):
    probe = build_verifier(TargetConfig(model="tiny"), target_model)
    prompt = target_model.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    one = session_bytes(probe, open_session(probe, prompt).session_id)
    probe.stop()
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
    verifier = build_verifier(TargetConfig(model="tiny", kv_cache_budget_mb=0.008), target_model)
    pair = pair_factory(tiny.draft_noisy, target_verifier=verifier)
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
