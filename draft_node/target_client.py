"""gRPC client for the target node: one session per generation, rounds over one verify stream."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc

from services.candidate_tree import CandidateTree
from services.grpc_server import MAX_MESSAGE_BYTES
from services.rpc.specwire.v1 import target_pb2, target_pb2_grpc


class TargetSession:
    """An open target session; `verify` sends one round and waits for its answer."""

    def __init__(
        self,
        stub: target_pb2_grpc.TargetServiceStub,
        opened: target_pb2.OpenSessionResponse,
        unary_timeout_s: float,
        stream_timeout_s: float,
    ) -> None:
        self.session_id = opened.session_id
        self.first_token_id = opened.first_token_id
        self._stub = stub
        self._unary_timeout_s = unary_timeout_s
        self._round = 0
        self._requests: queue.Queue[target_pb2.VerifyRequest | None] = queue.Queue()
        self._responses: Iterator[target_pb2.VerifyResponse] = stub.VerifyStream(
            iter(self._requests.get, None), timeout=stream_timeout_s
        )

    def verify(self, tree: CandidateTree) -> target_pb2.VerifyResponse:
        self._requests.put(
            target_pb2.VerifyRequest(session_id=self.session_id, round_id=self._round, tree=tree.to_proto())
        )
        self._round += 1
        return next(self._responses)

    def close(self) -> None:
        """End the stream and free the target's KV cache (best effort: the TTL is the fallback)."""
        self._requests.put(None)
        try:
            self._stub.CloseSession(
                target_pb2.CloseSessionRequest(session_id=self.session_id), timeout=self._unary_timeout_s
            )
        except grpc.RpcError:
            pass


class TargetClient:
    def __init__(
        self, address: str, unary_timeout_s: float = 120.0, stream_timeout_s: float = 3600.0
    ) -> None:
        self.address = address
        self.unary_timeout_s = unary_timeout_s
        self.stream_timeout_s = stream_timeout_s
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.stub = target_pb2_grpc.TargetServiceStub(self.channel)

    def info(self, wait_s: float | None = None) -> target_pb2.InfoResponse:
        """Target info; with `wait_s`, wait that long for the target to come up."""
        return self.stub.Info(
            target_pb2.InfoRequest(),
            timeout=wait_s or self.unary_timeout_s,
            wait_for_ready=wait_s is not None,
        )

    def open_session(
        self,
        prompt_token_ids: list[int],
        tokenizer_fingerprint: str,
        strategy: str = "",
        sampling: target_pb2.SamplingParams | None = None,
    ) -> TargetSession:
        opened = self.stub.OpenSession(
            target_pb2.OpenSessionRequest(
                prompt_token_ids=prompt_token_ids,
                tokenizer_fingerprint=tokenizer_fingerprint,
                strategy=strategy,
                sampling=sampling or target_pb2.SamplingParams(),
            ),
            timeout=self.unary_timeout_s,
        )
        return TargetSession(self.stub, opened, self.unary_timeout_s, self.stream_timeout_s)

    def close(self) -> None:
        self.channel.close()
