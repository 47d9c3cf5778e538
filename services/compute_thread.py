"""One long-lived thread for all of a model's torch work in a node process.

torch's OpenMP runtime (libgomp) keeps a pool of worker threads for every thread that has started
a parallel region, for as long as that thread lives. Once a process holds more OpenMP threads
than CPUs, idle workers stop spinning after ~100 spins and sleep, so every parallel region pays a
futex wake-up. A forward of many small layers pays it a few hundred times: on the 2-core machine
a 0.5B int8 draft step took 28 ms when gRPC worker threads took turns running it, 20 ms from one
thread. Every forward (and every large op around it) therefore runs here, so the process keeps
`torch.get_num_threads()` OpenMP threads and they spin between regions. It also serialises the
model's forwards, which compete for the same cores anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class ComputeThread:
    def __init__(self, name: str = "compute") -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._ident = self._executor.submit(threading.get_ident).result()

    def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """`fn(*args, **kwargs)` on the compute thread, blocking until it returns (or raises);
        called from the compute thread itself, it runs at once."""
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        return self._executor.submit(fn, *args, **kwargs).result()

    def stop(self) -> None:
        """Let queued work finish and end the thread."""
        self._executor.shutdown(wait=True)
