"""gRPC TargetService on grpc.aio: a thin adapter from RPCs to the Verifier; sessions belong to their caller.

A VerifyStream waiting for its draft's next round holds no thread (it awaits on the server's loop);
work that blocks (a prefill, a round on the backend) runs on the thread pool. Rounds in flight are
bounded: past `max_queued_rounds` a round is refused with RESOURCE_EXHAUSTED and a retry hint
before it takes a thread. A stream that sends nothing for `stream_idle_timeout_s` is ended (status
OK); its session stays, and the draft opens a new stream for its next round.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from services.errors import ResourceExhausted, grpc_errors
from services.rpc.specwire.v1 import target_pb2, target_pb2_grpc
from services.security import caller_identity
from target_node.verifier import Verifier

T = TypeVar("T")


class RoundGate:
    """Counts the rounds in flight (on the server's loop: no lock needed) and refuses those past the
    bound, with a hint of when the queue will have drained by one batch."""

    def __init__(self, max_queued: int, max_batch: int) -> None:
        self.max_queued, self.max_batch = max_queued, max_batch
        self.in_flight = 0
        self.round_s = 0.1  # EWMA of a round's wall time: the retry hint's unit

    def enter(self) -> float:
        if self.in_flight >= self.max_queued:
            batches = math.ceil(self.in_flight / self.max_batch)
            raise ResourceExhausted(
                f"the target has {self.in_flight} verify rounds in flight (limit {self.max_queued}); retry later",
                retry_after_s=round(self.round_s * batches, 3),
            )
        self.in_flight += 1
        return time.perf_counter()

    def leave(self, started: float) -> None:
        self.in_flight -= 1
        self.round_s += 0.1 * (time.perf_counter() - started - self.round_s)


class TargetServicer(target_pb2_grpc.TargetServiceServicer):
    def __init__(self, verifier: Verifier, blocking_threads: int) -> None:
        """Limits come from the verifier's config (a test may hand in a verifier built with its own)."""
        self.verifier = verifier
        config = verifier.config
        self.rounds = RoundGate(config.max_queued_rounds, config.max_batch_size)
        self.idle_timeout_s = config.stream_idle_timeout_s
        # every admitted round gets a thread at once (so rounds batch), plus room for prefills and closes
        self.pool = ThreadPoolExecutor(config.max_queued_rounds + blocking_threads, thread_name_prefix="target-call")

    async def blocking(self, call: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, call, *args)

    async def round(self, request: target_pb2.VerifyRequest, caller: str) -> target_pb2.VerifyResponse:
        started = self.rounds.enter()
        try:
            return await self.blocking(self.verifier.verify, request, caller)
        finally:
            self.rounds.leave(started)

    @grpc_errors
    async def Info(self, request: target_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> target_pb2.InfoResponse:
        return self.verifier.info()

    @grpc_errors
    async def OpenSession(
        self, request: target_pb2.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> target_pb2.OpenSessionResponse:
        return await self.blocking(self.verifier.open_session, request, caller_identity(context))

    @grpc_errors
    async def Verify(
        self, request: target_pb2.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> target_pb2.VerifyResponse:
        return await self.round(request, caller_identity(context))

    @grpc_errors
    async def VerifyStream(
        self, request_iterator: AsyncIterator[target_pb2.VerifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[target_pb2.VerifyResponse]:
        caller = caller_identity(context)
        requests = aiter(request_iterator)
        while True:
            try:
                request = await asyncio.wait_for(anext(requests), self.idle_timeout_s)
            except (StopAsyncIteration, TimeoutError):  # the draft is done, or idle: end the stream
                return
            yield await self.round(request, caller)

    @grpc_errors
    async def CloseSession(
        self, request: target_pb2.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> target_pb2.CloseSessionResponse:
        closed = await self.blocking(self.verifier.close_session, request.session_id, caller_identity(context))
        return target_pb2.CloseSessionResponse(closed=closed)

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
