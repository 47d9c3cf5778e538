"""The `specwire` command line as a user runs it: separate processes talking gRPC on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.model_loading import resolve_device

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "specwire.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_serving(port: int, process: subprocess.Popen, timeout_s: float = 300) -> None:
    """Until the node's health check says SERVING (a start can take a minute or more on a busy
    2-core CI machine: imports, model load, kernel calibration), or its process exits."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1]
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                time.sleep(0.3)
    raise TimeoutError(f"nothing serving on port {port}")


def scrape(port: int) -> dict[str, float]:
    """Samples of a /metrics page, keyed by name{labels} as exposed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def summary(stderr: str) -> dict[str, str]:
    line = [ln for ln in stderr.splitlines() if ln.startswith("tokens=")][-1]
    return dict(item.split("=", 1) for item in line.split())


def test_demo_runs_a_pair_on_loopback_then_serves_the_playground(tiny):
    http_port = free_port()
    demo = subprocess.Popen(
        [*CLI, "demo", "def add(a, b):", "--target-model", tiny.target, "--draft-model", tiny.draft_noisy,
         "--max-tokens", "12", "--raw", "-k", "3", "--http-port", str(http_port), "--serve"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    lines = []
    try:
        deadline = time.monotonic() + 120
        while not any(line.startswith("serving;") for line in lines) and time.monotonic() < deadline:
            lines.append(demo.stderr.readline())
        assert f"playground: http://127.0.0.1:{http_port}/\n" in lines, lines
        page = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=10).read().decode()
        assert "<title>specwire playground</title>" in page
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(60)
    assert demo.returncode == 0
    stats = summary("".join(lines))
    assert stats["tokens"] == "12" or stats["finish_reason"] == "stop"
    assert 0 < float(stats["acceptance_rate"]) <= 1  # the noisy draft agrees with the target often
    assert int(stats["rounds"]) >= 1
    verdict = next(line for line in lines if line.startswith("pair "))
    assert "tok/s, target alone" in verdict and "outputs identical" in verdict, verdict


def test_target_draft_generate_as_separate_processes(tiny):
    target_port, draft_port, target_metrics, draft_metrics = (free_port() for _ in range(4))
    target = subprocess.Popen(
        [
            *CLI,
            "target",
            "--model",
            tiny.target,
            "--port",
            str(target_port),
            "--metrics-port",
            str(target_metrics),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    draft = subprocess.Popen(
        [
            *CLI,
            "draft",
            "--model",
            tiny.draft_same,
            "--port",
            str(draft_port),
            "--target",
            f"127.0.0.1:{target_port}",
            "--num-speculative-tokens",
            "4",
            "--weights",
            "fp32",  # the very numbers of the target: every draft token is accepted
            "--metrics-port",
            str(draft_metrics),
            "--http-port",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(target_port, target)
        wait_serving(draft_port, draft)
        result = subprocess.run(
            [
                *CLI,
                "generate",
                "The quick brown fox",
                "--draft",
                f"127.0.0.1:{draft_port}",
                "--max-tokens",
                "20",
                "--raw",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        stats = summary(result.stderr)
        assert stats["acceptance_rate"] == "1.0"  # the draft is the target itself
        assert result.stdout.strip()
        draft_series = scrape(draft_metrics)
        target_series = scrape(target_metrics)
        device = str(resolve_device("auto"))  # where a node runs by default: the GPU when there is one
        assert any(
            k.startswith("specwire_target_backend_info{") and f'device="{device}' in k for k in target_series
        ), target_series
        rounds = draft_series["specwire_draft_rounds_total"]
        assert rounds > 0
        assert (
            draft_series["specwire_draft_accepted_tokens_total"]
            == draft_series["specwire_draft_drafted_tokens_total"]
        )
        assert target_series["specwire_target_verify_requests_total"] == rounds
        assert (
            target_series[
                'specwire_grpc_server_handled_total{code="OK",method="OpenSession",service="specwire.v1.TargetService"}'
            ]
            == 1
        )
    finally:
        for process in (draft, target):
            process.send_signal(signal.SIGTERM)
        for process in (draft, target):
            assert process.wait(timeout=30) == 0, process.stderr.read()


def test_health_check_does_not_import_torch():
    """Compose runs `specwire health` every few seconds beside the nodes: it must stay light."""
    code = (
        "import sys; from specwire import cli; "
        "assert cli.main(['health', '127.0.0.1:1', '--timeout', '0.2']) == 1; "
        "heavy = sorted({'torch', 'transformers'} & set(sys.modules)); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["target", "--model", "/no/such/model"], 1, "neither a HF model directory"),
        (["target", "--port", "not-a-port"], 2, "--port"),
        (["draft", "--num-speculative-tokens", "-3"], 2, "--num-speculative-tokens"),
    ],
)
def test_a_start_up_refusal_is_one_line_and_no_traceback(args, status, says):
    result = subprocess.run([*CLI, *args, "--metrics-port", "-1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == status, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1 and says in lines[0], result.stderr


def test_a_port_in_use_is_refused_in_one_line(tiny):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*CLI, "target", "--model", tiny.target, "--port", str(port), "--metrics-port", "-1"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in result.stderr and len(errors) == 1 and str(port) in errors[0], result.stderr


def test_a_draft_with_another_tokenizer_is_refused_in_one_line(tiny):
    from target_node.config import TargetConfig
    from target_node.server import start_target

    target = start_target(TargetConfig(model=tiny.target, port=0, metrics_port=-1))
    try:
        result = subprocess.run(
            [*CLI, "draft", "--model", tiny.other_tokenizer, "--target", f"127.0.0.1:{target.port}", "--port", "0",
             "--metrics-port", "-1", "--http-port", "-1"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        target.stop(0)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and "tokenizer" in errors[0], result.stderr
