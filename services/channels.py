"""gRPC channels to a node and its health check, shared by the CLI, the draft's target client and
the benchmarks."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.security import channel_credentials


def open_channel(address: str, tls_ca: Path | None = None) -> grpc.Channel:
    """A blocking channel, over TLS when the CA to trust is given."""
    if tls_ca is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, channel_credentials(tls_ca))


def is_serving(address: str, timeout_s: float, tls_ca: Path | None = None) -> bool:
    """True when the gRPC health service at `address` reports SERVING."""
    with open_channel(address, tls_ca) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
