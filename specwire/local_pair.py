"""A target and a draft node as two processes on this machine, started by the CLI as users run them.

`specwire demo` (`make run`) and the benchmark client use this, so the figures they print come
from the shipped deployment: two `specwire` processes talking gRPC over loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.channels import is_serving


@dataclass
class LocalPair:
    target: str  # host:port of the target's gRPC server
    draft: str  # host:port of the draft's gRPC server
    http_port: int | None  # the draft's OpenAI-compatible API (None: off)
    logs: Path  # target.log and draft.log
    pids: dict[str, int]  # "target" / "draft" -> process id
    metrics_ports: dict[str, int]  # "target" / "draft" -> Prometheus port (empty: metrics off)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _wait_serving(address: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"node at {address} exited with {process.returncode}:\n{_tail(log)}")
        if is_serving(address, 1.0):
            return
        time.sleep(0.5)
    raise TimeoutError(f"node at {address} not serving after {timeout_s:.0f}s:\n{_tail(log)}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()  # SIGTERM: the node drains and stops
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def local_pair(
    target_args: Sequence[str] = (),
    draft_args: Sequence[str] = (),
    http: bool = False,
    env: dict[str, str] | None = None,
    start_timeout_s: float = 900.0,
    logs: Path | None = None,
    metrics: bool = False,
    http_port: int | None = None,
    prefixes: dict[str, Sequence[str]] | None = None,
    draft_target: Callable[[int], str] | None = None,
) -> Iterator[LocalPair]:
    """Start `specwire target` and `specwire draft` (extra flags as given) on free loopback ports,
    wait until both report SERVING, and stop both on exit. Node logs go to `logs` (a temp dir).
    With `http`, the draft serves its HTTP API (the playground page) on `http_port` (None: a free one).
    `prefixes` puts a command before a node's python ("target" / "draft", e.g. `taskset -c 0` to pin
    it to a core); `draft_target` turns the target's port into the address the draft dials (e.g. a
    relay in front of the target; default the target itself on loopback)."""
    logs = logs or Path(tempfile.mkdtemp(prefix="specwire-pair-"))
    logs.mkdir(parents=True, exist_ok=True)
    target_port, draft_port = free_port(), free_port()
    http_port = (http_port or free_port()) if http else None
    metrics_ports = {"target": free_port(), "draft": free_port()} if metrics else {}
    cli = [sys.executable, "-m", "specwire"]
    prefixes = prefixes or {}
    target_address = draft_target(target_port) if draft_target else f"127.0.0.1:{target_port}"
    commands = {
        "target": [
            *prefixes.get("target", ()),
            *cli, "target", "--port", str(target_port), "--metrics-port", str(metrics_ports.get("target", -1)),
            *target_args,
        ],
        "draft": [
            *prefixes.get("draft", ()),
            *cli, "draft", "--port", str(draft_port), "--metrics-port", str(metrics_ports.get("draft", -1)),
            "--http-port", str(http_port if http else -1),
            "--target", target_address, *draft_args,
        ],
    }  # fmt: skip
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():
            with (logs / f"{name}.log").open("w") as log:
                processes[name] = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
                )
        for name, port in (("target", target_port), ("draft", draft_port)):
            _wait_serving(f"127.0.0.1:{port}", processes[name], logs / f"{name}.log", start_timeout_s)
        yield LocalPair(
            f"127.0.0.1:{target_port}",
            f"127.0.0.1:{draft_port}",
            http_port,
            logs,
            {name: process.pid for name, process in processes.items()},
            metrics_ports,
        )
    finally:
        for process in processes.values():
            _stop(process)
