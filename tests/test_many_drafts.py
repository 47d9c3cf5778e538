"""One target, many drafts: admission bounds, idle streams, health under 64 open streams."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from draft_node.target_client import TargetClient
from services.candidate_tree import CandidateTree
from services.errors import ResourceExhausted, retry_hint_s
from services.rpc.specwire.v1 import target_pb2, target_pb2_grpc
from target_node.config import TargetConfig
from target_node.server import start_target
from target_node.servicer import RoundGate
from tests.helpers import collect, target_only_greedy

PROMPTS = ["def add(a, b):", "The quick brown fox", "import numpy as np\n", "class Stack:", "SELECT * FROM"]


def test_round_gate_refuses_past_its_bound_and_not_before():
    gate = RoundGate(max_queued=3, max_batch=2)
    started = [gate.enter() for _ in range(3)]
    with pytest.raises(ResourceExhausted) as refused:
        gate.enter()
    assert refused.value.retry_after_s == pytest.approx(2 * 0.1)  # two batches of the 3 in flight, 0.1 s each
    gate.leave(started.pop())
    started.append(gate.enter())  # room again
    assert gate.in_flight == 3


@pytest.fixture
def serve(target_model):
    running = []

    def start(**overrides):
        config = TargetConfig(model=target_model.model_id, port=0, metrics_port=-1, workers=4, **overrides)
        running.append(start_target(config, target_model))
        return running[-1]

    yield start
    for server in running:
        server.stop(0)


def test_a_stream_idle_past_the_timeout_ends_and_the_next_round_opens_a_new_one(target_model, serve):
    target = serve(stream_idle_timeout_s=0.5)
    client = TargetClient(f"127.0.0.1:{target.port}")
    prompt = target_model.tokenizer.encode(PROMPTS[0])
    expected = target_only_greedy(target_model, prompt, 3)
    try:
        info = client.info()
        session = client.open_session(
            target_pb2.OpenSessionRequest(prompt_token_ids=prompt, tokenizer_fingerprint=info.tokenizer_fingerprint)
        )
        tokens = [session.first_token_id]
        tokens.append(session.verify(CandidateTree.from_sequences([])).next_token_id)
        first_stream = session._stream
        time.sleep(1.5)
        assert first_stream.done()  # the target ended it...
        assert target.node.sessions.get(session.session_id)  # ...and kept the session
        tokens.append(session.verify(CandidateTree.from_sequences([])).next_token_id)
        assert session._stream is not first_stream and not session._stream.done()  # a new stream
        assert tokens == expected[:3]
        session.close()
    finally:
        client.close()


def test_a_refused_round_is_retried_after_the_hint_and_the_output_is_identical(tiny, target_model, pair_factory):
    """One round in flight allowed: four concurrent generations get rounds refused, retry after the
    target's hint on a new stream, and all end identical to the target alone."""
    from target_node.build import build_verifier

    verifier = build_verifier(TargetConfig(model="tiny", max_queued_rounds=1), target_model)
    pair = pair_factory(tiny.draft_noisy, target_verifier=verifier)
    slow = verifier.verify

    def verify_slowly(request, *owner):  # rounds take long enough to overlap
        time.sleep(0.05)
        return slow(request, *owner)

    verifier.verify = verify_slowly
    prompts = PROMPTS[:4]
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda p: collect(pair.draft_stub, prompt=p, max_tokens=16)[0], prompts))
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == target_only_greedy(target_model, target_model.tokenizer.encode(prompt), 16)
    refused = verifier.metrics.registry.get_sample_value(
        "specwire_grpc_server_handled_total",
        {"service": "specwire.v1.TargetService", "method": "VerifyStream", "code": "RESOURCE_EXHAUSTED"},
    )
    assert refused and refused > 0


def test_64_streams_health_answers_within_a_second_and_admission_is_exact(target_model, serve):
    """64 drafts at once against a target holding 48 sessions and 16 rounds in flight: sessions
    past 48 are refused (and not one before), rounds past 16 are refused with a hint and succeed
    when retried after it, health answers within 1 s throughout, and every admitted generation
    ends identical to the target alone."""
    target = serve(max_sessions=48, max_queued_rounds=16, max_batch_size=16)
    address = f"127.0.0.1:{target.port}"
    channel = grpc.insecure_channel(address)
    stub = target_pb2_grpc.TargetServiceStub(channel)
    fingerprint = stub.Info(target_pb2.InfoRequest()).tokenizer_fingerprint
    prompts = [target_model.tokenizer.encode(PROMPTS[i % len(PROMPTS)] + " " * (i // 5)) for i in range(64)]
    steps = 8
    references = {i: target_only_greedy(target_model, prompts[i], steps * 4) for i in range(64)}

    health_latency: list[float] = []
    stop = threading.Event()

    def probe_health() -> None:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
        while not stop.is_set():
            start = time.perf_counter()
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            health_latency.append(time.perf_counter() - start)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            time.sleep(0.05)

    def open_one(i: int):
        try:
            return stub.OpenSession(
                target_pb2.OpenSessionRequest(prompt_token_ids=prompts[i], tokenizer_fingerprint=fingerprint)
            )
        except grpc.RpcError as exc:
            return exc

    client = TargetClient(address)
    prober = threading.Thread(target=probe_health)
    prober.start()
    try:
        with ThreadPoolExecutor(64) as pool:
            opened = list(pool.map(open_one, range(64)))
        admitted = {i: o for i, o in enumerate(opened) if isinstance(o, target_pb2.OpenSessionResponse)}
        refused = [o for o in opened if isinstance(o, grpc.RpcError)]
        assert len(admitted) == 48 and len(refused) == 16
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_hint_s(e) for e in refused)

        def generate(i: int) -> tuple[list[int], int]:
            """A draft whose guesses are right, then wrong: the reference with one token changed."""
            from draft_node.target_client import TargetSession

            session = TargetSession(client, admitted[i])
            tokens, retries, rng = [admitted[i].first_token_id], 0, random.Random(i)
            while len(tokens) < steps * 2:
                guess = references[i][len(tokens) : len(tokens) + 3]
                if guess and rng.random() < 0.5:
                    guess[-1] = (guess[-1] + 1) % target_model.model.config.vocab_size
                while True:
                    try:
                        response = session.verify(CandidateTree.from_sequences([guess] if guess else []))
                        break
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                        retries += 1
                        time.sleep(retry_hint_s(exc) or 0.05)
                tokens += [*response.accepted_token_ids, response.next_token_id]
            session.close()
            return tokens, retries

        idle = [stub.VerifyStream(iter(())) for _ in range(16)]  # 48 busy + 16 idle streams
        with ThreadPoolExecutor(48) as pool:
            results = dict(zip(admitted, pool.map(generate, admitted), strict=True))
        for call in idle:
            call.cancel()
    finally:
        stop.set()
        prober.join()
        client.close()
    for i, (tokens, _) in results.items():
        n = min(len(tokens), len(references[i]))
        assert tokens[:n] == references[i][:n], i
    assert sum(retries for _, retries in results.values()) > 0  # the round bound was reached
    assert max(health_latency) < 1.0 and len(health_latency) > 10
