"""grpc.aio client for the target node: one session per generation, its rounds over ONE
bidirectional VerifyStream.

The client owns an asyncio loop on a background thread; the blocking methods below are what the
(threaded) draft engine calls, each one a coroutine run on that loop. Errors arrive as
grpc.aio.AioRpcError, a grpc.RpcError with code() and details().
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from draft_node.config import DraftConfig
from draft_node.target_transport import first_round_advice
from services.candidate_tree import CandidateTree
from services.errors import RemoteCallError
from services.grpc_server import MAX_MESSAGE_BYTES
from services.rpc.specwire.v1 import target_pb2, target_pb2_grpc
from services.security import auth_metadata, channel_credentials

T = TypeVar("T")
RECONNECT_BACKOFF_MAX_MS = 1000


class TargetSession:
    """An open target session; `verify` sends one round on the stream and waits for its answer.

    A stream that ended (the target closes one idle for long, a refused round ends it with its
    status) is replaced by a new one on the same connection at the next round; the session and its
    round counter live on, since a round counts only once answered."""

    def __init__(self, client: TargetClient, opened: target_pb2.OpenSessionResponse) -> None:
        self.session_id = opened.session_id
        self.first_token_id = opened.first_token_id
        self.advised_draft_tokens = first_round_advice(opened)
        self._client = client
        self._round = 0
        self._stream: grpc.aio.StreamStreamCall | None = None

    def verify(self, tree: CandidateTree) -> target_pb2.VerifyResponse:
        request = target_pb2.VerifyRequest(
            session_id=self.session_id, round_id=self._round, tree=tree.to_proto()
        )
        response = self._client.run(lambda: self._round_trip(request))
        self._round += 1
        return response

    async def _round_trip(self, request: target_pb2.VerifyRequest) -> target_pb2.VerifyResponse:
        """One round on the stream, under the per-round deadline (the stream's own deadline covers
        the whole generation): a round past it cancels the stream with DEADLINE_EXCEEDED. A stream
        the target had ended without an error (idle) is replaced once and the round sent again:
        the target answers every round it read, so this one was never run."""
        timeout = self._client.round_timeout_s
        for attempt in range(2):
            if self._stream is None or self._stream.done():
                self._stream = await self._client._open_stream()
            try:
                await asyncio.wait_for(self._stream.write(request), timeout)
                response = await asyncio.wait_for(self._stream.read(), timeout)
            except TimeoutError:
                self._stream.cancel()
                raise RemoteCallError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"verify round {request.round_id} took longer than {timeout}s"
                ) from None
            except asyncio.InvalidStateError:  # written after the target ended the stream (status OK)
                response = grpc.aio.EOF
            if response is not grpc.aio.EOF:
                return response
            if attempt == 0 and await self._stream.code() == grpc.StatusCode.OK:
                continue
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                "the target closed the verify stream",
            )
        raise AssertionError("unreachable")

    def close(self) -> None:
        """End the stream and free the target's KV cache (best effort: the TTL is the fallback)."""
        self._client.run(self._close)

    async def _close(self) -> None:
        if self._stream is not None:
            try:
                await self._stream.done_writing()
            except (grpc.RpcError, asyncio.InvalidStateError):
                pass
            self._stream.cancel()
        try:
            await self._client.stub.CloseSession(
                target_pb2.CloseSessionRequest(session_id=self.session_id),
                timeout=self._client.unary_timeout_s,
                metadata=self._client.metadata,
            )
        except grpc.RpcError:
            pass


class TargetClient:
    def __init__(
        self,
        address: str,
        unary_timeout_s: float = 120.0,
        stream_timeout_s: float = 3600.0,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        server_name: str = "",
        round_timeout_s: float = 120.0,
    ) -> None:
        self.address = address
        self.unary_timeout_s = unary_timeout_s
        self.stream_timeout_s = stream_timeout_s
        self.round_timeout_s = round_timeout_s
        self.credentials = credentials
        self.metadata = auth_metadata(api_key)
        self.server_name = server_name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="target-client", daemon=True)
        self._thread.start()
        self.channel, self.stub = self.run(self._connect)

    @classmethod
    def from_config(cls, config: DraftConfig) -> TargetClient:
        credentials = None
        if config.target_tls_ca is not None:
            credentials = channel_credentials(config.target_tls_ca, config.target_tls_cert, config.target_tls_key)
        return cls(
            config.target.removeprefix("grpc://"),
            config.target_timeout_s,
            config.generation_timeout_s,
            credentials,
            config.target_api_key.get_secret_value() if config.target_api_key else None,
            config.target_tls_server_name,
            config.target_round_timeout_s,
        )

    async def _connect(self) -> tuple[grpc.aio.Channel, target_pb2_grpc.TargetServiceStub]:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC's own reconnect backoff grows to 120 s: a target that comes up after the draft
            # (a first start dequantizing its weights) went unnoticed for minutes and every request
            # failed meanwhile (found by tests/test_compose.py). Probe at least once a second instead.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        if self.credentials is not None:
            channel = grpc.aio.secure_channel(self.address, self.credentials, options=options)
        else:
            channel = grpc.aio.insecure_channel(self.address, options=options)
        return channel, target_pb2_grpc.TargetServiceStub(channel)

    def run(self, make: Callable[[], Awaitable[T]]) -> T:
        """Create an awaitable ON the client's loop (aio calls bind to it), await it there, return its result."""

        async def on_loop() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result()

    async def _open_stream(self) -> grpc.aio.StreamStreamCall:
        return self.stub.VerifyStream(timeout=self.stream_timeout_s, metadata=self.metadata)

    def info(self, wait_s: float | None = None) -> target_pb2.InfoResponse:
        """Target info; with `wait_s`, wait that long for the target to come up."""
        return self.run(
            lambda: self.stub.Info(
                target_pb2.InfoRequest(),
                timeout=wait_s or self.unary_timeout_s,
                wait_for_ready=wait_s is not None,
                metadata=self.metadata,
            )
        )

    def open_session(self, request: target_pb2.OpenSessionRequest) -> TargetSession:
        opened = self.run(
            lambda: self.stub.OpenSession(request, timeout=self.unary_timeout_s, metadata=self.metadata)
        )
        return TargetSession(self, opened)

    def close(self) -> None:
        self.run(self.channel.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
