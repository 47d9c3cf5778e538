"""TLS, mutual TLS, API keys and session ownership on real gRPC servers (certificates made here)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from draft_node.config import DraftConfig
from draft_node.server import start_draft
from services.candidate_tree import CandidateTree
from services.model_loading import load_model
from services.rpc.specwire.v1 import draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc
from services.security import auth_metadata, channel_credentials
from target_node.config import TargetConfig
from target_node.server import start_target
from tests.helpers import collect, target_only_greedy


def issue(name: str, issuer: tuple | None, tmp: Path, server: bool = False) -> tuple:
    """A certificate for `name` signed by `issuer` (a CA when None); writes name.pem / name.key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer or (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    (tmp / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pki")
    ca = issue("ca", None, tmp)
    issue("localhost", ca, tmp, server=True)
    issue("alice", ca, tmp)
    issue("bob", ca, tmp)
    rogue_ca = issue("rogue-ca", None, tmp)
    issue("mallory", rogue_ca, tmp)
    (tmp / "keys").write_text("# clients\nkey-alice-0123456789\nkey-bob-9876543210\n")
    return tmp


def target_config(model_id: str, **overrides) -> TargetConfig:
    return TargetConfig(model=model_id, port=0, metrics_port=-1, workers=4, **overrides)


@pytest.fixture(scope="module")
def secured_target(target_model, pki):
    """mTLS (certificates from `ca`) and API keys."""
    running = start_target(
        target_config(
            target_model.model_id,
            tls_cert=pki / "localhost.pem",
            tls_key=pki / "localhost.key",
            tls_client_ca=pki / "ca.pem",
            api_keys_file=pki / "keys",
        ),
        target_model,
    )
    yield running
    running.stop(0)


def stub_for(port: int, pki: Path, client: str | None) -> target_pb2_grpc.TargetServiceStub:
    creds = channel_credentials(
        pki / "ca.pem",
        pki / f"{client}.pem" if client else None,
        pki / f"{client}.key" if client else None,
    )
    return target_pb2_grpc.TargetServiceStub(grpc.secure_channel(f"localhost:{port}", creds))


def open_request(verifier, prompt) -> target_pb2.OpenSessionRequest:
    return target_pb2.OpenSessionRequest(prompt_token_ids=prompt, tokenizer_fingerprint=verifier.fingerprint)


def test_config_refuses_half_a_tls_setup(pki):
    with pytest.raises(ValueError, match="go together"):
        TargetConfig(model="m", tls_cert=pki / "localhost.pem")
    with pytest.raises(ValueError, match="mutual TLS"):
        TargetConfig(model="m", tls_client_ca=pki / "ca.pem")


def test_tls_only_server_talks_tls(target_model, pki):
    running = start_target(
        target_config(target_model.model_id, tls_cert=pki / "localhost.pem", tls_key=pki / "localhost.key"),
        target_model,
    )
    try:
        info = stub_for(running.port, pki, None).Info(target_pb2.InfoRequest(), timeout=10)
        assert info.vocab_size == running.node.vocab_size
        plain = target_pb2_grpc.TargetServiceStub(grpc.insecure_channel(f"127.0.0.1:{running.port}"))
        with pytest.raises(grpc.RpcError) as err:
            plain.Info(target_pb2.InfoRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(0)


@pytest.mark.parametrize("client", [None, "mallory"], ids=["no-cert", "cert-from-another-ca"])
def test_mtls_refuses_clients_without_a_trusted_certificate(secured_target, pki, client):
    stub = stub_for(secured_target.port, pki, client)
    with pytest.raises(grpc.RpcError) as err:
        stub.Info(target_pb2.InfoRequest(), timeout=5, metadata=auth_metadata("key-alice-0123456789"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no call is made


@pytest.mark.parametrize("key", [None, "wrong", "key-alice-012345678"], ids=["missing", "wrong", "prefix"])
def test_calls_without_a_valid_key_are_unauthenticated_and_touch_nothing(secured_target, pki, key, caplog):
    verifier = secured_target.node
    alice = stub_for(secured_target.port, pki, "alice")
    good = auth_metadata("key-alice-0123456789")
    opened = alice.OpenSession(open_request(verifier, [5, 6, 7]), metadata=good, timeout=30)
    sessions = len(verifier.sessions)
    caplog.set_level(logging.DEBUG)
    calls = [
        lambda m: alice.Info(target_pb2.InfoRequest(), metadata=m, timeout=5),
        lambda m: alice.OpenSession(open_request(verifier, [1, 2]), metadata=m, timeout=5),
        lambda m: alice.CloseSession(
            target_pb2.CloseSessionRequest(session_id=opened.session_id), metadata=m, timeout=5
        ),
        lambda m: list(
            alice.VerifyStream(iter([target_pb2.VerifyRequest(session_id=opened.session_id)]), metadata=m)
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call(auth_metadata(key))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == "missing or invalid API key"
    assert len(verifier.sessions) == sessions
    tree = CandidateTree.from_sequences([[1, 2]]).to_proto()
    alice.Verify(
        target_pb2.VerifyRequest(session_id=opened.session_id, round_id=0, tree=tree),
        metadata=good,
        timeout=30,
    )
    assert alice.CloseSession(
        target_pb2.CloseSessionRequest(session_id=opened.session_id), metadata=good
    ).closed
    if key:
        assert key not in caplog.text
    # health probes carry no key and still work
    health = health_pb2_grpc.HealthStub(
        grpc.secure_channel(
            f"localhost:{secured_target.port}",
            channel_credentials(pki / "ca.pem", pki / "bob.pem", pki / "bob.key"),
        )
    )
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )


@pytest.mark.parametrize(
    "other_cert, other_key",
    [("bob", "key-bob-9876543210"), ("alice", "key-bob-9876543210")],
    ids=["bob", "alice-cert-bob-key"],
)
def test_one_caller_cannot_use_another_callers_session(secured_target, pki, other_cert, other_key):
    verifier = secured_target.node
    alice, alice_key = stub_for(secured_target.port, pki, "alice"), auth_metadata("key-alice-0123456789")
    other, other_meta = stub_for(secured_target.port, pki, other_cert), auth_metadata(other_key)
    opened = alice.OpenSession(open_request(verifier, [5, 6, 7]), metadata=alice_key, timeout=30)
    tree = CandidateTree.from_sequences([[1, 2]]).to_proto()
    request = target_pb2.VerifyRequest(session_id=opened.session_id, round_id=0, tree=tree)
    for call in (
        lambda: other.Verify(request, metadata=other_meta, timeout=30),
        lambda: list(other.VerifyStream(iter([request]), metadata=other_meta, timeout=30)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    closed = other.CloseSession(
        target_pb2.CloseSessionRequest(session_id=opened.session_id), metadata=other_meta
    )
    assert not closed.closed
    reply = alice.Verify(request, metadata=alice_key, timeout=30)  # untouched: still at round 0
    assert reply.round_id == 0
    assert alice.CloseSession(
        target_pb2.CloseSessionRequest(session_id=opened.session_id), metadata=alice_key
    ).closed


def test_draft_reaches_a_secured_target_and_output_is_unchanged(tiny, target_model, secured_target, pki):
    draft = start_draft(
        DraftConfig(
            model=tiny.draft_noisy,
            port=0,
            metrics_port=-1,
            http_port=0,
            workers=4,
            target=f"localhost:{secured_target.port}",
            target_api_key="key-bob-9876543210",
            target_tls_ca=pki / "ca.pem",
            target_tls_cert=pki / "bob.pem",
            target_tls_key=pki / "bob.key",
            tls_cert=pki / "localhost.pem",  # the draft's own DraftService over TLS with keys too
            tls_key=pki / "localhost.key",
            api_keys_file=pki / "keys",
        ),
        load_model(tiny.draft_noisy),
    )
    try:
        stub = draft_pb2_grpc.DraftServiceStub(
            grpc.secure_channel(f"localhost:{draft.port}", channel_credentials(pki / "ca.pem"))
        )
        prompt = "def add(a, b):"
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, prompt=prompt, max_tokens=4)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        chunks = list(
            stub.Generate(
                draft_pb2.GenerateRequest(prompt=prompt, max_tokens=24),
                metadata=auth_metadata("key-alice-0123456789"),
            )
        )
        tokens = [t for c in chunks for t in c.token_ids]
        # the HTTP API is served over TLS with the node's certificate: Bearer keys never travel in clear
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{draft.http_port}/health", timeout=10)
        http = httpx.Client(base_url=f"https://localhost:{draft.http_port}", verify=str(pki / "ca.pem"), timeout=120)
        auth = {"Authorization": "Bearer key-bob-9876543210"}
        model = http.get("/v1/models", headers=auth).json()["data"][0]["id"]
        url, body = "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0}
        assert http.post(url, json=body).status_code == 401
        assert http.post(url, json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        reply = http.post(url, json=body, headers=auth)
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["text"] == target_model.tokenizer.decode(tokens)
        assert http.get("/health").status_code == 200  # probes need no key
        expected = target_only_greedy(target_model, target_model.tokenizer.encode(prompt), 24)
        assert tokens == expected[: len(tokens)] and len(tokens) == min(24, len(expected))
    finally:
        draft.stop(0)


def test_internal_errors_say_nothing_of_their_cause(tiny, pair_factory, caplog):
    """An unexpected failure reaches callers as INTERNAL / HTTP 5xx with a generic message; its
    text (which may hold paths, tensors or prompts) stays in the node's log."""
    pair = pair_factory(tiny.draft_noisy)
    verifier = pair.target.node

    def broken(session, tree):
        raise RuntimeError("secret detail of a bug")

    verifier.backend.verify = broken
    opened = pair.target_stub.OpenSession(open_request(verifier, [5, 6, 7]))
    tree = CandidateTree.from_sequences([[1]]).to_proto()
    with pytest.raises(grpc.RpcError) as err:
        pair.target_stub.Verify(target_pb2.VerifyRequest(session_id=opened.session_id, round_id=0, tree=tree))
    assert err.value.code() == grpc.StatusCode.INTERNAL and "secret" not in err.value.details()
    reply = httpx.post(
        f"http://127.0.0.1:{pair.draft.http_port}/v1/completions",
        json={"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert reply.status_code >= 500 and "secret" not in reply.text
    assert "secret detail of a bug" in caplog.text


def test_health_does_not_echo_the_error(tiny):
    """/health of a draft whose target is unreachable: 503 and a fixed message."""
    draft = start_draft(
        DraftConfig(model=tiny.draft_noisy, port=0, metrics_port=-1, http_port=0, target="127.0.0.1:1"),
        load_model(tiny.draft_noisy),
    )
    try:
        reply = httpx.get(f"http://127.0.0.1:{draft.http_port}/health", timeout=30)
        assert reply.status_code == 503
        assert reply.json()["error"]["message"] == "target not available"
    finally:
        draft.stop(0)
