"""Micro-batching: requests that arrive while a batch runs are run together by one call of
`run_batch`. A batch waits (up to `max_wait_s`) for requests already being submitted and, while
fewer than `expected()` callers (the live sessions that may send one) are in it, for them; one
session verifying alone pays no wait. If a batch fails,
each request is retried alone, so no request fails because of another one."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

from services.errors import Unavailable

log = logging.getLogger(__name__)
JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")


class MicroBatcher(Generic[JobT, ResultT]):
    def __init__(
        self,
        run_batch: Callable[[list[JobT]], list[ResultT]],
        max_batch_size: int,
        max_wait_s: float,
        on_retry_alone: Callable[[JobT], None] = lambda job: None,
        name: str = "batcher",
        on_start: Callable[[], None] = lambda: None,
        expected: Callable[[], int] = lambda: 1,
    ) -> None:
        """`on_start` runs on the worker thread before any batch (an engine that must live on the
        thread that drives it); its exception is raised here."""
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_retry_alone = on_retry_alone  # undo what a failed batch may have done to a job
        self.expected = expected
        self._jobs: queue.Queue[tuple[JobT, Future] | None] = queue.Queue()
        self._stopped = threading.Event()
        self._arriving = 0  # jobs submitted and not yet taken into a batch
        self._lock = threading.Lock()
        started: Future = Future()
        self._worker = threading.Thread(target=self._loop, args=(on_start, started), name=name, daemon=True)
        self._worker.start()
        started.result()

    def submit(self, job: JobT) -> tuple[ResultT, int]:
        """Blocking: the job's result and the size of the batch it ran in."""
        future: Future = Future()
        with self._lock:
            self._arriving += 1
        self._jobs.put((job, future))
        if self._stopped.is_set():
            self._fail_queued()  # the worker may be gone: nobody else would answer this job
        return future.result()

    def stop(self) -> None:
        """Finish the batch in flight; jobs still queued, or submitted later, fail with UNAVAILABLE."""
        self._stopped.set()
        self._jobs.put(None)
        self._worker.join(timeout=30)
        self._fail_queued()

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return
            if item is not None and not item[1].done():
                item[1].set_exception(Unavailable("the node is shutting down"))

    def _loop(self, on_start: Callable[[], None], started: Future) -> None:
        try:
            on_start()
        except BaseException as exc:  # noqa: BLE001 - reported to the constructor
            started.set_exception(exc)
            return
        started.set_result(None)
        while not self._stopped.is_set() and (first := self._take()) is not None:
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch_size and (self._arriving > 0 or len(batch) < self.expected()):
                try:
                    item = self._take(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._jobs.put(None)
                    break
                batch.append(item)
            self._run(batch)

    def _take(self, timeout: float | None = None) -> tuple[JobT, Future] | None:
        item = self._jobs.get(timeout=timeout)
        if item is not None:
            with self._lock:
                self._arriving -= 1
        return item

    def _run(self, batch: list[tuple[JobT, Future]]) -> None:
        try:
            results = self.run_batch([job for job, _ in batch])
        except BaseException as exc:  # noqa: BLE001 - a failure goes back to the request(s)
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            log.warning("batch of %d failed (%s); running them one by one", len(batch), exc)
            for item in batch:
                self.on_retry_alone(item[0])
                self._run([item])
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result((result, len(batch)))
