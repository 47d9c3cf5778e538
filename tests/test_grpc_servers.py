"""Both servers over real gRPC on 127.0.0.1: status codes, health, reflection, tokenizer check."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from draft_node.config import DraftConfig
from draft_node.server import start_draft
from services.errors import FailedPrecondition
from services.rpc.specwire.v1 import draft_pb2, draft_pb2_grpc, target_pb2
from target_node.config import TargetConfig
from target_node.server import start_target
from tests.helpers import collect


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            list(result)
    return info.value


def test_target_info_and_session_lifecycle(target_model, pair_factory, tiny):
    pair = pair_factory(tiny.draft_noisy)
    info = pair.target_stub.Info(target_pb2.InfoRequest())
    assert info.strategies == ["deterministic", "gumbel", "probabilistic", "threshold", "topk", "typical"]
    assert info.lossy_strategies == ["threshold", "topk", "typical"]
    assert info.vocab_size == target_model.model.config.vocab_size
    assert info.limits.max_tree_nodes == 64
    prompt = target_model.tokenizer.encode("def add")
    opened = pair.target_stub.OpenSession(
        target_pb2.OpenSessionRequest(
            prompt_token_ids=prompt, tokenizer_fingerprint=info.tokenizer_fingerprint
        )
    )
    assert opened.context_length == len(prompt)
    result = pair.target_stub.Verify(
        target_pb2.VerifyRequest(
            session_id=opened.session_id,
            round_id=0,
            tree=target_pb2.CandidateTree(parents=[-1], token_ids=[opened.first_token_id]),
        )
    )
    assert result.context_length == len(prompt) + 1 + len(result.accepted_token_ids)
    assert pair.target_stub.CloseSession(target_pb2.CloseSessionRequest(session_id=opened.session_id)).closed
    assert not pair.target_stub.CloseSession(
        target_pb2.CloseSessionRequest(session_id=opened.session_id)
    ).closed
    err = rpc_error(
        pair.target_stub.Verify, target_pb2.VerifyRequest(session_id=opened.session_id, round_id=1)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_verify_stream_rounds_and_errors(target_model, pair_factory, tiny):
    pair = pair_factory(tiny.draft_noisy)
    info = pair.target_stub.Info(target_pb2.InfoRequest())
    opened = pair.target_stub.OpenSession(
        target_pb2.OpenSessionRequest(
            prompt_token_ids=target_model.tokenizer.encode("x = 1"),
            tokenizer_fingerprint=info.tokenizer_fingerprint,
        )
    )
    requests = [target_pb2.VerifyRequest(session_id=opened.session_id, round_id=r) for r in range(3)]
    responses = list(pair.target_stub.VerifyStream(iter(requests)))
    assert [r.round_id for r in responses] == [0, 1, 2]
    bad = [
        target_pb2.VerifyRequest(
            session_id=opened.session_id,
            round_id=3,
            tree=target_pb2.CandidateTree(parents=[5], token_ids=[1]),
        )
    ]
    err = rpc_error(pair.target_stub.VerifyStream, iter(bad))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parent 5" in err.details()


def test_generate_bad_parameters_are_invalid_argument(pair_factory, tiny):
    pair = pair_factory(tiny.draft_noisy, max_tokens=50, max_tokens_limit=100)
    for request, fragment in [
        (draft_pb2.GenerateRequest(prompt=""), "prompt is empty"),
        (draft_pb2.GenerateRequest(prompt="hi", max_tokens=101), "above the limit 100"),
        (draft_pb2.GenerateRequest(prompt="hi", num_speculative_tokens=99), "num_speculative_tokens"),
    ]:
        err = rpc_error(pair.draft_stub.Generate, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, fragment
        assert fragment in err.details()
    tokens, _ = collect(pair.draft_stub, prompt="still serving", max_tokens=5)
    assert len(tokens) == 5


def test_mismatched_tokenizer_is_refused_at_start(target_model, tiny):
    """A draft whose tokenizer differs from the target's never starts serving (nor reports healthy)."""
    target = start_target(TargetConfig(model="tiny", port=0, metrics_port=-1), target_model)
    try:
        config = DraftConfig(
            model=tiny.other_tokenizer, port=0, metrics_port=-1, http_port=-1, target=f"127.0.0.1:{target.port}"
        )
        with pytest.raises(FailedPrecondition, match="different tokenizers"):
            start_draft(config)
    finally:
        target.stop(0)


def test_draft_starts_before_its_target(tiny, target_model):
    """A target that is not up yet is no reason to refuse: the first request, once it is up, works."""
    from specwire.local_pair import free_port

    port = free_port()
    config = DraftConfig(model=tiny.draft_noisy, port=0, metrics_port=-1, http_port=-1, target=f"127.0.0.1:{port}")
    draft = start_draft(config)
    target = start_target(TargetConfig(model="tiny", port=port, metrics_port=-1), target_model)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{draft.port}") as channel:
            tokens, _ = collect(draft_pb2_grpc.DraftServiceStub(channel), prompt="def add", max_tokens=6)
        assert len(tokens) == 6
    finally:
        draft.stop(0)
        target.stop(0)


@pytest.mark.slow
def test_a_target_that_comes_up_half_a_minute_late_is_found_within_seconds(target_model):
    """gRPC's default reconnect backoff had grown past 10 s by then: the draft's first requests
    failed for a minute although the target was up (docker compose, first start)."""
    import time

    from draft_node.target_client import TargetClient
    from specwire.local_pair import free_port

    port = free_port()
    client = TargetClient(f"127.0.0.1:{port}", unary_timeout_s=2)
    try:
        with pytest.raises(grpc.RpcError):
            client.info()
        time.sleep(30)
        target = start_target(TargetConfig(model="tiny", port=port, metrics_port=-1), target_model)
        try:
            assert client.info(wait_s=4).model_id
        finally:
            target.stop(0)
    finally:
        client.close()


@pytest.mark.parametrize("node", ["target", "draft"])
def test_health_and_reflection(pair_factory, tiny, node):
    pair = pair_factory(tiny.draft_noisy)
    port = getattr(pair, node).port
    service = {"target": "specwire.v1.TargetService", "draft": "specwire.v1.DraftService"}[node]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", service):
            status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(
            reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        names = {s.name for s in reply.list_services_response.service}
        assert {service, "grpc.health.v1.Health"} <= names


def test_cancelled_generation_frees_its_target_session(pair_factory, tiny):
    import time

    pair = pair_factory(tiny.draft_noisy)
    call = pair.draft_stub.Generate(draft_pb2.GenerateRequest(prompt="def add(a, b):", max_tokens=400))
    next(call)  # the first chunk: the session is open on the target
    call.cancel()
    registry = pair.draft.node.metrics.registry
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        len(pair.target.node.sessions)
        or not registry.get_sample_value("specwire_draft_requests_total", {"status": "cancelled"})
    ):
        time.sleep(0.05)
    assert len(pair.target.node.sessions) == 0
    assert registry.get_sample_value("specwire_draft_requests_total", {"status": "cancelled"}) == 1
    tokens, _ = collect(pair.draft_stub, prompt="still serving", max_tokens=5)
    assert len(tokens) == 5


def test_per_position_counters_exist_at_zero_before_any_round(pair_factory, tiny):
    """Prometheus' rate() misses the first increment of a series born at 1: the dashboards'
    acceptance-by-position panel stayed empty after a short generation (found by tests/test_compose.py)."""
    pair = pair_factory(tiny.draft_noisy)
    registry = pair.draft.node.metrics.registry
    k = pair.draft.node.config.num_speculative_tokens
    for position in range(1, k + 1):
        for name in ("drafted", "accepted"):
            sample = f"specwire_draft_{name}_tokens_by_position_total"
            assert registry.get_sample_value(sample, {"position": str(position)}) == 0
