"""The Modal target (deploy/modal_app.py) offline: it imports, its GPU spec is as documented, and
its methods run with `.local()` behind the draft's modal:// transport, with output identical to
the gRPC target's, including when calls land on a container that does not hold the session."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import grpc
import pytest
from modal import exception as modal_exception

import draft_node.modal_client as modal_client
from draft_node.config import DraftConfig
from draft_node.modal_client import ModalTargetClient, parse_modal_url
from draft_node.server import start_draft
from services.candidate_tree import CandidateTree
from services.model_loading import load_model
from services.rpc.specwire.v1 import draft_pb2, draft_pb2_grpc, target_pb2
from tests.helpers import target_only_greedy

MODAL_APP = Path(__file__).parents[1] / "deploy" / "modal_app.py"


def import_modal_app(name: str = "modal_app"):
    spec = importlib.util.spec_from_file_location(name, MODAL_APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def modal_app():
    return import_modal_app()


def test_app_imports_offline_with_the_documented_gpu(modal_app, monkeypatch):
    assert modal_app.app.name == "specwire-target"
    spec = modal_app.Target._get_class_service_function()._spec_  # what `modal deploy` sends
    assert spec.gpus == "A100"
    assert set(spec.volumes) == {"/models"}
    monkeypatch.setenv("SPECWIRE_MODAL_GPU", "H100")
    assert import_modal_app("modal_app_h100").Target._get_class_service_function()._spec_.gpus == "H100"


def test_modal_urls():
    assert parse_modal_url("modal://specwire-target/Target") == ("specwire-target", "Target")
    for bad in ("modal://app", "grpc://a/B", "modal:///Target", "modal://a/B/C"):
        with pytest.raises(ValueError, match="modal://"):
            parse_modal_url(bad)


@pytest.fixture(scope="module")
def containers(modal_app, tiny):
    """Two containers of the class (separate instances, separate sessions), run locally."""
    return [modal_app.Target(model=tiny.target, kernels="torch", dtype="float32") for _ in range(2)]


def local_caller(containers, route):
    """Call the class's methods with .local(); `route` picks the container for each call."""
    return lambda method, *args: getattr(containers[next(route)], method).local(*args)


def generate_via_modal(tiny, monkeypatch, caller, prompt: str, max_tokens: int) -> list[int]:
    monkeypatch.setattr(modal_client, "remote_caller", lambda app, cls: caller)
    draft = start_draft(
        DraftConfig(
            model=tiny.draft_noisy,
            port=0,
            metrics_port=-1,
            http_port=-1,
            workers=4,
            target="modal://specwire-target/Target",
            retry_deadline_s=10,
        ),
        load_model(tiny.draft_noisy),
    )
    try:
        stub = draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(f"127.0.0.1:{draft.port}"))
        chunks = stub.Generate(draft_pb2.GenerateRequest(prompt=prompt, max_tokens=max_tokens))
        return [t for c in chunks for t in c.token_ids]
    finally:
        draft.stop(0)


def test_draft_over_modal_transport_matches_target_greedy(tiny, target_model, containers, monkeypatch):
    prompt = "def add(a, b):"
    tokens = generate_via_modal(tiny, monkeypatch, local_caller(containers, itertools.repeat(0)), prompt, 32)
    expected = target_only_greedy(target_model, target_model.tokenizer.encode(prompt), 32)
    assert tokens == expected


def test_calls_routed_to_other_containers_rebuild_the_session(tiny, target_model, containers, monkeypatch):
    prompt = "The quick brown fox"
    rebuilt_before = [
        c.verifier.metrics.session_rebuilds._value.get() for c in map(local_instance, containers)
    ]
    tokens = generate_via_modal(
        tiny, monkeypatch, local_caller(containers, itertools.cycle([0, 1])), prompt, 32
    )
    expected = target_only_greedy(target_model, target_model.tokenizer.encode(prompt), 32)
    assert tokens == expected
    rebuilt_after = [
        c.verifier.metrics.session_rebuilds._value.get() for c in map(local_instance, containers)
    ]
    assert sum(rebuilt_after) - sum(rebuilt_before) >= 2


def local_instance(container):
    """The user-class instance behind a local Modal object (after its first .local() call)."""
    container.info.local()
    return container._cached_user_cls_instance()


def test_modal_errors_keep_their_status_and_transient_ones_are_retried(containers):
    attempts = itertools.count()

    def flaky(method, *args):
        if method == "open_session" and next(attempts) < 2:
            raise modal_exception.ConnectionError("connection reset")
        return getattr(containers[0], method).local(*args)

    client = ModalTargetClient("modal://specwire-target/Target", caller=flaky)
    info = client.info()
    with pytest.raises(grpc.RpcError) as err:
        client.open_session(
            target_pb2.OpenSessionRequest(prompt_token_ids=[1, 2], tokenizer_fingerprint=info.tokenizer_fingerprint)
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    from draft_node.resumable_session import ResumableSession, RetryPolicy

    session = ResumableSession(
        client,
        [1, 2, 3],
        info.tokenizer_fingerprint,
        "",
        target_pb2.SamplingParams(),
        RetryPolicy(5, 0.01, 0.02),
    )
    assert session.first_token_id >= 0
    with pytest.raises(grpc.RpcError) as err:
        session.verify(CandidateTree([-1], [info.vocab_size]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    session.close()


def test_a_full_container_is_retried_with_backoff_honouring_its_hint(containers):
    """RESOURCE_EXHAUSTED (a container out of sessions or memory) is retried, waiting at least the
    hint the container gave, until the call goes through."""
    from draft_node.resumable_session import ResumableSession, RetryPolicy
    from services.errors import ResourceExhausted

    refusals = itertools.count()

    def full_at_first(method, *args):
        if method == "open_session" and next(refusals) < 2:
            raise ResourceExhausted("the target holds 64 sessions already; retry later", retry_after_s=0.5)
        return getattr(containers[0], method).local(*args)

    client = ModalTargetClient("modal://specwire-target/Target", caller=full_at_first)
    info = client.info()
    slept = []
    session = ResumableSession(
        client, [1, 2, 3], info.tokenizer_fingerprint, "", target_pb2.SamplingParams(), RetryPolicy(30, 0.01, 0.02, slept.append)
    )
    assert session.first_token_id >= 0
    assert len(slept) == 2 and min(slept) >= 0.5
    session.close()


def test_rerouted_calls_leave_no_orphan_sessions(tiny, containers, monkeypatch):
    """Calls that alternate between two containers rebuild the session each time; a container
    keeps at most one session of a generation (its latest), so after the generation at most one
    is left anywhere (the final close reaches one container; the TTL frees the other)."""
    instances = [local_instance(c) for c in containers]
    for instance in instances:
        instance.verifier.sessions.stop()  # start from empty stores
    generate_via_modal(tiny, monkeypatch, local_caller(containers, itertools.cycle([0, 1])), "The quick brown fox", 32)
    assert sum(len(instance.verifier.sessions) for instance in instances) <= 1
