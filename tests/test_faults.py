"""Target failures mid-generation: the draft resumes the session and the greedy output is unchanged."""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc
import pytest

from draft_node.config import DraftConfig
from draft_node.server import start_draft
from services.model_loading import load_model
from services.rpc.specwire.v1 import draft_pb2, draft_pb2_grpc
from tests.helpers import collect, forget_sessions_at, target_only_greedy
from tests.test_cli import free_port, wait_serving

PROMPT = "def add(a, b):"


def test_session_lost_on_the_target_is_resumed(tiny, target_model, pair_factory):
    pair = pair_factory(tiny.draft_noisy)
    forget_sessions_at(pair.target.node, {3, 7})
    tokens, _ = collect(pair.draft_stub, prompt=PROMPT, max_tokens=60, num_speculative_tokens=3)
    assert tokens == target_only_greedy(target_model, target_model.tokenizer.encode(PROMPT), 60)
    assert pair.draft.node.metrics.target_resumes._value.get() == 2


def start_target_process(model: str, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "specwire.cli",
            "target",
            "--model",
            model,
            "--port",
            str(port),
            "--metrics-port",
            "-1",
        ],
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_target_killed_and_restarted_mid_generation(tiny, target_model):
    port = free_port()
    target = start_target_process(tiny.target, port)
    draft = None
    try:
        wait_serving(port, target)
        draft = start_draft(
            DraftConfig(
                model=tiny.draft_noisy,
                port=0,
                metrics_port=-1,
                http_port=-1,
                target=f"127.0.0.1:{port}",
                retry_deadline_s=60,
            ),
            load_model(tiny.draft_noisy),
        )
        stub = draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(f"127.0.0.1:{draft.port}"))
        call = stub.Generate(
            draft_pb2.GenerateRequest(prompt=PROMPT, max_tokens=400, num_speculative_tokens=2)
        )
        tokens = list(next(call).token_ids)
        target.send_signal(signal.SIGKILL)  # no goodbye: sessions and the stream die with it
        target.wait(timeout=10)
        target = start_target_process(tiny.target, port)
        tokens += [t for chunk in call for t in chunk.token_ids]
        assert tokens == target_only_greedy(target_model, target_model.tokenizer.encode(PROMPT), 400)
        assert draft.node.metrics.target_resumes._value.get() >= 1
    finally:
        if draft is not None:
            draft.stop(0)
        target.kill()
        target.wait(timeout=10)
