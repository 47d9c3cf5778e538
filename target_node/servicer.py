"""gRPC TargetService: a thin adapter from RPCs to the Verifier; sessions belong to their caller."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from services.errors import grpc_errors
from services.rpc.specwire.v1 import target_pb2, target_pb2_grpc
from services.security import caller_identity
from target_node.verifier import Verifier


class TargetServicer(target_pb2_grpc.TargetServiceServicer):
    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    @grpc_errors
    def Info(self, request: target_pb2.InfoRequest, context: grpc.ServicerContext) -> target_pb2.InfoResponse:
        return self.verifier.info()

    @grpc_errors
    def OpenSession(
        self, request: target_pb2.OpenSessionRequest, context: grpc.ServicerContext
    ) -> target_pb2.OpenSessionResponse:
        return self.verifier.open_session(request, caller_identity(context))

    @grpc_errors
    def Verify(
        self, request: target_pb2.VerifyRequest, context: grpc.ServicerContext
    ) -> target_pb2.VerifyResponse:
        return self.verifier.verify(request, caller_identity(context))

    @grpc_errors
    def VerifyStream(
        self, request_iterator: Iterator[target_pb2.VerifyRequest], context: grpc.ServicerContext
    ) -> Iterator[target_pb2.VerifyResponse]:
        caller = caller_identity(context)
        for request in request_iterator:
            yield self.verifier.verify(request, caller)

    @grpc_errors
    def CloseSession(
        self, request: target_pb2.CloseSessionRequest, context: grpc.ServicerContext
    ) -> target_pb2.CloseSessionResponse:
        return target_pb2.CloseSessionResponse(
            closed=self.verifier.close_session(request.session_id, caller_identity(context))
        )
