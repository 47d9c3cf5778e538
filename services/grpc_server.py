"""Build a gRPC server with health checking and reflection, shared by both nodes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from services.config import NodeConfig
from services.metrics import GrpcMetricsInterceptor, serve_metrics
from services.security import ApiKeyInterceptor, read_api_keys, server_credentials

MAX_MESSAGE_BYTES = 64 << 20
NodeT = TypeVar("NodeT")


@dataclass
class RunningServer(Generic[NodeT]):
    """A started node: its gRPC server, bound port, health servicer and the engine it serves."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    node: NodeT
    cleanup: Callable[[], None]
    metrics_port: int | None = None  # where /metrics is served (None: off)
    http_port: int | None = None  # the OpenAI-compatible API (draft node; None: off)

    def stop(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING, let in-flight calls finish for up to `grace_s`, then clean up."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        self.cleanup()


def build_server(
    registrations: Sequence[tuple[Callable[[Any, grpc.Server], None], Any, str]],
    host: str,
    port: int,
    workers: int,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Register (add_fn, servicer, full service name) triples; return server, bound port, health.

    Every service starts SERVING; the caller flips health to NOT_SERVING when it drains.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = []
    for add_fn, servicer, name in registrations:
        add_fn(servicer, server)
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        names.append(name)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    return server, bound, health_servicer


def start_node(
    registrations: Sequence[tuple[Callable[[Any, grpc.Server], None], Any, str]],
    config: NodeConfig,
    node: NodeT,
    cleanup: Callable[[], None],
    registry: CollectorRegistry,
) -> RunningServer[NodeT]:
    """Build and start a node's gRPC server (per-method metrics, optional TLS and API keys) and its
    /metrics endpoint."""
    interceptors: list[grpc.ServerInterceptor] = [GrpcMetricsInterceptor(registry)]  # counts rejections too
    if config.api_keys_file is not None:
        interceptors.append(ApiKeyInterceptor(read_api_keys(config.api_keys_file)))
    credentials = (
        server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls_cert else None
    )
    server, port, health_servicer = build_server(
        registrations, config.host, config.port, config.workers, interceptors, credentials
    )
    server.start()
    metrics_port = (
        serve_metrics(registry, config.host, config.metrics_port) if config.metrics_port >= 0 else None
    )
    return RunningServer(server, port, health_servicer, node, cleanup, metrics_port)
