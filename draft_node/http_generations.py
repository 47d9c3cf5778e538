"""Generations served over HTTP: each runs its blocking iterator on a worker thread of a bounded
set, and the event loop reads its items as an async iterator.

A request beyond the bound is refused at once (ResourceExhausted, HTTP 429) instead of starting one
more thread. A reader that goes away (a client that disconnected) closes its stream: the worker
stops after the item in progress and closes the iterator on its own thread, which ends the
generation and frees its target session at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from services.errors import ResourceExhausted

T = TypeVar("T")
_END = object()  # the worker's iterator is exhausted


class GenerationStream(Generic[T]):
    """The items of one worker's iterator, in order; an exception it raised is raised here."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue()
        self._gone = threading.Event()

    def __aiter__(self) -> GenerationStream[T]:
        return self

    async def __anext__(self) -> T:
        item, error = await self._queue.get()
        if error is not None:
            raise error
        if item is _END:
            raise StopAsyncIteration
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the worker after the item in progress (idempotent)."""
        self._gone.set()

    def _put(self, item: object, error: BaseException | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is already closed
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (item, error))

    def _pump(self, produce: Callable[[], Iterator[T]], release: Callable[[], None]) -> None:
        try:
            iterator = produce()
            try:
                for item in iterator:
                    if self._gone.is_set():
                        break
                    self._put(item)
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()  # on the thread that ran it
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which reports it
            self._put(None, exc)
        else:
            self._put(_END)
        finally:
            release()


class GenerationThreads:
    """At most `limit` generations at once, each on its own daemon thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def start(self, produce: Callable[[], Iterator[T]]) -> GenerationStream[T]:
        """Run `produce()` and iterate it on a new worker thread (call from the event loop); raise
        ResourceExhausted when `limit` generations are running already."""
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(f"this node is serving {self.limit} HTTP generations already; retry later")
        stream: GenerationStream[T] = GenerationStream()
        try:
            threading.Thread(
                target=stream._pump, args=(produce, self._slots.release), name="http-generation", daemon=True
            ).start()
        except BaseException:
            self._slots.release()
            raise
        return stream
