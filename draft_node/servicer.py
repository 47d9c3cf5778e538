"""gRPC DraftService: streams the DraftEngine's chunks."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from draft_node.engine import DraftEngine
from services.errors import grpc_errors
from services.rpc.specwire.v1 import draft_pb2, draft_pb2_grpc


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, engine: DraftEngine) -> None:
        self.engine = engine

    @grpc_errors
    def Generate(
        self, request: draft_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[draft_pb2.GenerateChunk]:
        for chunk in self.engine.generate(request):
            if not context.is_active():  # client went away: stop drafting, free the target session
                return
            yield chunk
