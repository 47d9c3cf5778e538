"""Fuzzing both APIs of a running pair with hypothesis: sampling at and past its extremes, stop lists
at and past their bounds, prompts as text or token ids, strategies, K and N, and tries with q
supports around the bound. Whatever arrives: no HTTP 5xx, no gRPC INTERNAL or UNKNOWN, every SSE
stream ends with [DONE], and afterwards both nodes are healthy and still give the greedy text."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.candidate_tree import CandidateTree
from services.limits import MAX_Q_SUPPORT, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from services.rpc.specwire.v1 import draft_pb2, target_pb2
from tests.helpers import target_only_greedy

FAILURES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

temperatures = st.sampled_from([0.0, 1e-39, 1e-6, 1e-5, 0.3, 1.0, 2.0, 100.0, 101.0, -1.0, float("nan")])
top_ps = st.sampled_from([1.0, 0.5, 1e-9, 0.0, 1.5])
top_ks = st.sampled_from([0, 1, 3, 2**31 - 1])
strategies = st.sampled_from(["", "deterministic", "probabilistic", "gumbel", "threshold", "typical", "topk", "nope"])
stop_strings = st.lists(
    st.one_of(
        st.text(max_size=4),
        st.integers(MAX_STOP_STRING_CHARS - 1, MAX_STOP_STRING_CHARS + 1).map(lambda n: "a" * n),
        st.just("\U0001f600" * 3),
    ),
    max_size=MAX_STOP_STRINGS + 2,
)


def stops_out_of_bounds(stop: list[str]) -> bool:
    return len(stop) > MAX_STOP_STRINGS or any(len(text) > MAX_STOP_STRING_CHARS for text in stop)


def token_prompts(vocab: int):
    ids = st.lists(st.integers(-2, vocab + 2), min_size=0, max_size=6)
    return st.one_of(ids, ids.map(lambda x: [x]), st.lists(ids, min_size=2, max_size=2))


@pytest.fixture
def pair(tiny, pair_factory):
    return pair_factory(tiny.draft_noisy)


def assert_healthy(pair, target_model) -> None:
    for port in (pair.target.port, pair.draft.port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    prompt = "def add(a, b):"
    chunks = pair.draft_stub.Generate(draft_pb2.GenerateRequest(prompt=prompt, max_tokens=8), timeout=60)
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == target_only_greedy(target_model, target_model.tokenizer.encode(prompt), 8)
    assert len(pair.target.node.sessions) == 0


def test_http_fuzz(pair, target_model):
    http = httpx.Client(base_url=f"http://127.0.0.1:{pair.draft.http_port}", timeout=60)
    vocab = len(target_model.tokenizer)

    @FUZZ
    @example({"prompt": [5, 6, 7], "max_tokens": 2})  # token ids
    @example({"prompt": "hi", "max_tokens": 2, "stop": ["x"] * (MAX_STOP_STRINGS + 1)})
    @example({"prompt": "hi", "max_tokens": 2, "temperature": 1e-39, "stream": True, "strategy": "probabilistic"})
    @given(
        st.fixed_dictionaries(
            {"prompt": st.one_of(st.text(max_size=12), token_prompts(vocab)), "max_tokens": st.integers(1, 4)},
            optional={
                "temperature": temperatures.filter(lambda t: t == t),  # JSON has no NaN
                "top_p": top_ps, "top_k": top_ks, "seed": st.integers(0, 2**63 - 1), "stop": stop_strings,
                "strategy": strategies, "num_speculative_tokens": st.integers(0, 33),
                "num_candidates": st.integers(0, 17), "stream": st.booleans(),
            },  # fmt: skip
        )
    )
    def check(body):
        raw = json.dumps(body)
        with http.stream("POST", "/v1/completions", content=raw, headers={"content-type": "application/json"}) as response:
            response.read()
        assert response.status_code < 500, (body, response.text)
        if stops_out_of_bounds(body.get("stop", [])):
            assert response.status_code == 400, (body, response.text)
        if response.status_code >= 400:
            message = response.json()["error"]["message"]
            assert message, body
            prompt = body["prompt"]
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
                assert not message.startswith("prompt"), (body, message)  # token ids are a prompt
        elif body.get("stream"):
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", body
            assert not any('"error"' in event for event in events), (body, events)
        ok.append(response.status_code == 200)

    ok: list[bool] = []
    check()
    assert sum(ok) >= 2, "the valid explicit examples were refused"  # ids and a tiny temperature
    assert_healthy(pair, target_model)


def test_grpc_generate_fuzz(pair, target_model):
    @FUZZ
    @example("hi", 2, 1e-39, 1.0, 0, [], "probabilistic", 3, 1)
    @example("hi", 2, 0.0, 1.0, 0, ["y" * (MAX_STOP_STRING_CHARS + 1)], "", 3, 1)
    @given(
        prompt=st.text(max_size=12),
        max_tokens=st.integers(1, 4),
        temperature=temperatures,
        top_p=top_ps,
        top_k=top_ks,
        stop=stop_strings,
        strategy=strategies,
        k=st.integers(0, 33),
        n=st.integers(0, 17),
    )
    def check(prompt, max_tokens, temperature, top_p, top_k, stop, strategy, k, n):
        request = draft_pb2.GenerateRequest(
            prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop,
            strategy=strategy, num_speculative_tokens=k, num_candidates=n, seed=7,
        )  # fmt: skip
        try:
            list(pair.draft_stub.Generate(request, timeout=60))
        except grpc.RpcError as exc:
            assert exc.code() not in FAILURES, (request, exc.details())
        else:
            assert not stops_out_of_bounds(stop), request
            ok.append(True)

    ok: list[bool] = []
    check()
    assert len(ok) >= 1, "the valid explicit example was refused"
    assert_healthy(pair, target_model)


def sparse_q(draw, vocab: int, token: int) -> target_pb2.SparseDistribution:
    size = draw(st.sampled_from([1, 2, 5, MAX_Q_SUPPORT - 1, MAX_Q_SUPPORT, MAX_Q_SUPPORT + 1, 4 * MAX_Q_SUPPORT]))
    ids = [token] + [draw(st.integers(0, vocab + 1)) if i < 4 else i % vocab for i in range(1, size)]
    probs = [1.0 / size] * size if draw(st.booleans()) else [draw(st.floats(-1, 2)) for _ in range(min(size, 4))]
    return target_pb2.SparseDistribution(token_ids=ids, probs=probs)


def test_grpc_verify_fuzz_with_q_supports(pair, target_model):
    info = pair.target_stub.Info(target_pb2.InfoRequest())
    vocab = info.vocab_size

    @FUZZ
    @given(st.data())
    def check(data):
        sampling = target_pb2.SamplingParams(temperature=data.draw(temperatures.filter(lambda t: 0 <= t <= 100)), seed=3)
        strategy = data.draw(st.sampled_from(["probabilistic", "gumbel", "threshold"]))
        opened = pair.target_stub.OpenSession(
            target_pb2.OpenSessionRequest(
                prompt_token_ids=[5, 6, 7], tokenizer_fingerprint=info.tokenizer_fingerprint, strategy=strategy,
                sampling=sampling,
            )
        )  # fmt: skip
        try:  # hypothesis may end an example at any draw: the session is closed whatever happens
            size = data.draw(st.integers(0, 6))
            tree = CandidateTree(
                [data.draw(st.integers(-1, i - 1)) for i in range(size)],
                [data.draw(st.integers(0, vocab - 1)) for _ in range(size)],
            ).to_proto()
            if size and data.draw(st.booleans()):
                tree.draft_probs.extend(sparse_q(data.draw, vocab, token) for token in tree.token_ids)
            request = target_pb2.VerifyRequest(session_id=opened.session_id, round_id=0, tree=tree)
            oversized = any(len(q.token_ids) > MAX_Q_SUPPORT for q in tree.draft_probs)
            try:
                pair.target_stub.Verify(request, timeout=60)
                assert not oversized, "an oversized q was taken"
                ok.append(True)
            except grpc.RpcError as exc:
                assert exc.code() not in FAILURES, exc.details()
                assert not oversized or f"the limit is {MAX_Q_SUPPORT}" in exc.details(), exc.details()
        finally:
            pair.target_stub.CloseSession(target_pb2.CloseSessionRequest(session_id=opened.session_id))

    ok: list[bool] = []
    check()
    assert len(ok) >= 5, "too few rounds were valid to mean anything"
    assert_healthy(pair, target_model)
