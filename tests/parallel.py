"""Run a test module's long, independent cases side by side in worker processes.

Such a case (thousands of seeded draws through pure-Python code, or a server pair bound by the GIL)
keeps one core busy; the suite runs on two-core machines. A module-scoped fixture computes every
case its module's selected items need, one per core, and each item still asserts on its own case:
the same draws, the same checks, about half the wall time. Each worker runs torch on one thread
(two processes with two threads each on two cores wait on each other in every small op).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

Call = tuple[Callable[..., Any], tuple[Hashable, ...]]


def selected_params(request: pytest.FixtureRequest, test: Callable[..., Any]) -> list[dict[str, Any]]:
    """The parameters of `test`'s items (in the requesting module) that this session runs, in
    order; one empty dict for an unparametrized test that runs."""
    return [
        item.callspec.params if hasattr(item, "callspec") else {}
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        and getattr(item, "originalname", None) == test.__name__
    ]


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_side_by_side(calls: Sequence[Call], workers: int | None = None) -> dict[Call, Any]:
    """{(function, args): function(*args)} for each call, in `workers` spawned processes (default:
    one per usable core, at most one per call); in this process where that is one. Functions must
    be module-level (the worker imports them); list the longest calls first."""
    calls = list(dict.fromkeys(calls))
    workers = min(len(calls), workers or len(os.sched_getaffinity(0)))
    if workers <= 1:
        return {call: call[0](*call[1]) for call in calls}
    context = multiprocessing.get_context("spawn")  # a fork would copy this process's threads' locks
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_torch_thread) as pool:
        futures = {call: pool.submit(call[0], *call[1]) for call in calls}
        return {call: future.result() for call, future in futures.items()}
