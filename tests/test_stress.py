"""Many sessions at once under every way a session can end mid-flight: concurrent generations
(some cancelled), direct verify rounds racing CloseSession, TTL expiry and LRU eviction under a
tiny KV budget. No call may fail with INTERNAL/UNKNOWN, every finished generation is the target's
greedy output, and no live session ever has a KV cache longer or shorter than its context."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from services.candidate_tree import CandidateTree
from services.rpc.specwire.v1 import draft_pb2, target_pb2
from target_node.build import build_verifier
from target_node.config import TargetConfig
from tests.conftest import start_pair
from tests.helpers import target_only_greedy

PROMPTS = ["def add(a, b):", "Natalia sold clips", "for i in range(10):", "The quick brown fox"]
CLEAN_FAILURES = {  # a generation or round may fail like this under churn, never INTERNAL
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAVAILABLE,
}


def kv_matches_context(verifier) -> list[str]:
    """Live sessions whose KV cache length differs from their committed context (taken under each
    session's lock, so no round is half done)."""
    wrong = []
    for session in verifier.sessions.snapshot():
        with session.lock:
            if not session.closed and session.cache.get_seq_length() != session.context_length:
                wrong.append(session.session_id)
    return wrong


@pytest.mark.slow
def test_concurrent_rounds_closes_expiry_eviction_and_cancels(tiny, target_model):
    expected = {
        p: target_only_greedy(target_model, target_model.tokenizer.encode(p), 24) for p in PROMPTS
    }
    config = TargetConfig(
        model="tiny", kv_cache_budget_mb=0.5, session_ttl_s=0.4, max_sessions=12
    )
    verifier = build_verifier(config, target_model)
    pair = start_pair(target_model, tiny.draft_noisy, target_verifier=verifier, pipeline=True)
    verifier.sessions.start_reaper()
    errors: list[str] = []
    finished = [0]
    stop_at = time.monotonic() + 8

    def generations(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            prompt = rng.choice(PROMPTS)
            request = draft_pb2.GenerateRequest(
                prompt=prompt, max_tokens=24, num_speculative_tokens=rng.randint(1, 4)
            )
            call = pair.draft_stub.Generate(request)
            tokens = []
            try:
                for i, chunk in enumerate(call):
                    tokens += chunk.token_ids
                    if rng.random() < 0.1 and i:
                        call.cancel()  # the client walks away mid-stream
                        break
                else:
                    if tokens != expected[prompt]:
                        errors.append(f"{prompt!r}: {tokens} != {expected[prompt]}")
                    finished[0] += 1
            except grpc.RpcError as exc:
                if exc.code() not in CLEAN_FAILURES:
                    errors.append(f"generation: {exc.code()} {exc.details()}")

    def direct_rounds(seed: int) -> None:
        """Rounds straight on the target while another thread closes the same session."""
        rng = random.Random(seed)
        prompt = target_model.tokenizer.encode(rng.choice(PROMPTS))
        while time.monotonic() < stop_at:
            try:
                opened = pair.target_stub.OpenSession(
                    target_pb2.OpenSessionRequest(prompt_token_ids=prompt, tokenizer_fingerprint=verifier.fingerprint)
                )
                closer = threading.Timer(
                    rng.uniform(0, 0.02),
                    lambda sid=opened.session_id: pair.target_stub.CloseSession(
                        target_pb2.CloseSessionRequest(session_id=sid)
                    ),
                )
                closer.start()
                for round_id in range(4):
                    tree = CandidateTree.from_sequences([[rng.randrange(50) for _ in range(2)]])
                    pair.target_stub.Verify(
                        target_pb2.VerifyRequest(session_id=opened.session_id, round_id=round_id, tree=tree.to_proto())
                    )
                closer.join()
            except grpc.RpcError as exc:
                if exc.code() not in CLEAN_FAILURES:
                    errors.append(f"direct: {exc.code()} {exc.details()}")

    def watch_kv() -> None:
        while time.monotonic() < stop_at:
            if wrong := kv_matches_context(verifier):
                errors.append(f"KV length differs from the context in {wrong}")
            time.sleep(0.05)

    threads = [threading.Thread(target=generations, args=(i,), name=f"generations-{i}") for i in range(4)]
    threads += [threading.Thread(target=direct_rounds, args=(100 + i,), name=f"direct-{i}") for i in range(2)]
    threads.append(threading.Thread(target=watch_kv, name="watch-kv"))
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        stuck = [thread.name for thread in threads if thread.is_alive()]
        assert not stuck, f"still running 60 s after the run ended (a deadlock?): {stuck}"
        assert not errors, errors[:5]
        assert finished[0] >= 5, "too few generations finished to mean anything"
        removed = verifier.metrics.sessions_removed
        assert removed.labels("evicted")._value.get() > 0  # the budget really churned sessions
        assert removed.labels("closed")._value.get() > 0
        deadline = time.monotonic() + 5  # leftovers of cancelled streams close or expire
        while len(verifier.sessions) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(verifier.sessions) == 0
    finally:
        pair.draft.stop(0)
        pair.target.stop(0)
