"""Continuous batching for a GGUF decoder: one compute thread runs forward after forward, and each
forward takes the next rows of every job waiting (a verify tree, a chunk of a prompt, one step of
a draft chain), so the weights are read once for all of them. A job that needs more forwards (a
long prompt, a chain) stays for the next one; a job that arrives while a forward runs joins the
next, without waiting for a batch to fill.

Everything a job does with its logits (a strategy's decision, KV compaction, drawing a draft
token) runs on the same thread, inside the loop: a round is one hop. The thread is also the only
one that runs torch work for the decoder (see services/compute_thread.py for why).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, Protocol, TypeVar

import torch

from services.errors import Unavailable
from services.gguf_decoder import GGUFDecoder, Rows
from services.round_forecast import RoundForecast

log = logging.getLogger(__name__)
R = TypeVar("R")


class ForwardJob(Protocol[R]):
    """A forward leaves a sequence's buffer as it was if it fails, so only `take` changes state."""

    result: R
    batch_size: int  # jobs in the forward that served its last rows (set by the loop)
    session_key: Hashable | None  # a session whose next job follows this one's answer (a verify
    # round's), so a forward may wait for it; None: nothing follows

    def next_rows(self) -> Rows:
        """The rows this job adds to the next forward (no side effects: it may not be run)."""
        ...

    def take(self, logits: torch.Tensor) -> bool:
        """Use the logits of those rows; True when the job is done (`result` set). On an error it
        leaves the job's state consistent and raises: the job fails, the others go on."""
        ...


class ForwardLoop(Generic[R]):
    def __init__(
        self, build_decoder: Callable[[], GGUFDecoder], name: str, max_rows: int = 512, max_jobs: int = 64
    ) -> None:
        """`build_decoder` runs on the loop's thread (its weight repacking is torch work too, and a
        second thread with OpenMP workers would make every later parallel region pay a wake-up:
        11 ms of a 0.5B draft step on 2 cores). `max_rows`: rows one forward takes (a long prompt
        is split into chunks of at most this); `max_jobs`: jobs one forward takes."""
        self.max_rows = max_rows
        self.max_jobs = max_jobs
        self.forecast = RoundForecast()
        self._arrivals: queue.Queue[tuple[ForwardJob, Future] | Callable[[], None] | None] = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self.decoder: GGUFDecoder = self.call(build_decoder)

    def run(self, job: ForwardJob[R]) -> R:
        """Run `job` to completion (blocking) and return its result."""
        future: Future = Future()
        if self._stopped.is_set():
            raise Unavailable("the node is shutting down")
        if job.session_key is not None:
            self.forecast.arrived(job.session_key, time.monotonic())  # now, not when a forward ends
        self._arrivals.put((job, future))
        return future.result()

    def call(self, fn: Callable[[], R]) -> R:
        """`fn()` on the compute thread between forwards (model set-up, cache copies)."""
        if threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()

        def task() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

        self._arrivals.put(task)
        return future.result()

    def forget(self, session_key: Hashable) -> None:
        """The session is closed: no forward waits for its rounds any more."""
        self.forecast.forget(session_key)

    def stop(self) -> None:
        """Finish the forward in flight; jobs not done fail with UNAVAILABLE."""
        self._stopped.set()
        self._arrivals.put(None)
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        active: list[tuple[ForwardJob, Future]] = []
        while True:
            try:
                item = self._arrivals.get(block=not active)
            except queue.Empty:
                item = False  # nothing new: keep going with the active jobs
            while item is not False:
                if not self._admit(item, active):
                    return
                try:
                    item = self._arrivals.get_nowait()
                except queue.Empty:
                    item = False
            if not self._wait_for_returning(active):
                return
            active = self._forward(active)

    def _admit(self, item: tuple[ForwardJob, Future] | Callable[[], None] | None, active: list) -> bool:
        """Take one arrival (a job, a call, or the stop sign); False when the loop must end."""
        if item is None:
            self._fail(active, Unavailable("the node is shutting down"))
            self._drain()
            return False
        if callable(item):
            item()
        else:
            active.append(item)
        return True

    def _wait_for_returning(self, active: list[tuple[ForwardJob, Future]]) -> bool:
        """Before a forward, take the rounds of sessions due back within the wait (see
        services/round_forecast.py); False when the loop must end."""
        present = [job.session_key for job, _ in active]
        deadline = self.forecast.wait_until(time.monotonic(), present)
        while deadline is not None and (left := deadline - time.monotonic()) > 0:
            try:
                item = self._arrivals.get(timeout=left)
            except queue.Empty:
                return True
            if not self._admit(item, active):
                return False
            present = [job.session_key for job, _ in active]
            if self.forecast.wait_until(time.monotonic(), present) is None:
                return True
        return True

    def _forward(self, active: list[tuple[ForwardJob, Future]]) -> list[tuple[ForwardJob, Future]]:
        """One forward over the next rows of the first jobs that fit; returns the jobs still active."""
        batch, rows, budget = [], [], self.max_rows
        for job, future in active[: self.max_jobs]:
            try:
                job_rows = job.next_rows()
            except BaseException as exc:  # noqa: BLE001 - the job's own error
                future.set_exception(exc)
                continue
            if batch and len(job_rows.token_ids) > budget:
                continue
            batch.append((job, future))
            rows.append(job_rows)
            budget -= len(job_rows.token_ids)
        finished = {id(f) for _, f in active if f.done()}
        if batch:
            start = time.monotonic()
            try:
                logits = self.decoder.forward(rows)
            except BaseException as exc:  # noqa: BLE001
                self._after_failed_forward(batch, exc)
            else:
                if all(job.session_key is not None for job, _ in batch):
                    self.forecast.timed_forward(time.monotonic() - start)
                for (job, future), job_logits in zip(batch, logits, strict=True):
                    job.batch_size = len(batch)
                    try:
                        if job.take(job_logits):
                            future.set_result(job.result)
                    except BaseException as exc:  # noqa: BLE001 - the job's own error
                        future.set_exception(exc)
                answered = time.monotonic()
                for job, future in batch:
                    if job.session_key is not None and future.done():
                        self.forecast.answered(job.session_key, answered)
        return [(job, future) for job, future in active if not future.done() and id(future) not in finished]

    def _after_failed_forward(self, batch: list[tuple[ForwardJob, Future]], exc: BaseException) -> None:
        """Alone, a job fails with the error; with others, each is retried alone."""
        if len(batch) == 1:
            batch[0][1].set_exception(exc)
            return
        log.warning("a forward of %d jobs failed (%s); running them one by one", len(batch), exc)
        for job, future in batch:
            try:
                logits = self.decoder.forward([job.next_rows()])[0]
                if job.take(logits):
                    future.set_result(job.result)
            except BaseException as alone:  # noqa: BLE001
                future.set_exception(alone)

    def _fail(self, active: list[tuple[ForwardJob, Future]], exc: BaseException) -> None:
        for _, future in active:
            if not future.done():
                future.set_exception(exc)

    def _drain(self) -> None:
        while True:
            try:
                item = self._arrivals.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple) and not item[1].done():
                item[1].set_exception(Unavailable("the node is shutting down"))
