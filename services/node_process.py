"""Run one node as a process: parse its configuration, start it, serve until SIGINT/SIGTERM.

Shared by `specwire target|draft` and `python -m target_node|draft_node`. A start-up refusal (a
bad flag value, a port in use, a draft whose tokenizer differs from its target's) prints one line
and exits non-zero; `--log-level debug` adds the traceback.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from pydantic import ValidationError

from services.config import NodeConfig

log = logging.getLogger(__name__)
C = TypeVar("C", bound=NodeConfig)


class Running(Protocol):
    def stop(self) -> None: ...


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve_until_signal(stop: Callable[[], None]) -> None:
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    stop()


def port_in_use(host: str, port: int) -> str | None:
    """Why the gRPC port cannot be bound (checked before minutes of model loading), or None."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def run_node(prog: str, config_type: type[C], start: Callable[[C], Running], argv: Sequence[str]) -> int:
    """Exit status: 0 after a clean stop, 1 when the node could not start (2: bad flags, argparse's)."""
    try:
        config = config_type.from_cli(list(argv), prog)
    except ValidationError as exc:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        print(f"{prog}: error: {problems}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    if (busy := port_in_use(config.host, config.port)) is not None:
        print(f"{prog}: error: cannot listen on {config.host}:{config.port}: {busy}", file=sys.stderr)
        return 1
    try:
        running = start(config)
    except Exception as exc:  # noqa: BLE001 - any refusal: one line for the user, the traceback in debug
        log.debug("start-up failed", exc_info=True)
        print(f"{prog}: error: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    serve_until_signal(running.stop)
    return 0
