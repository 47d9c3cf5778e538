"""Build a gRPC server with health checking and reflection, shared by both nodes.

The draft node serves on a thread pool (its calls are short or stream a generation it computes).
The target serves with grpc.aio on a loop thread of its own: a VerifyStream waiting for its draft's
next round holds no thread, so open streams never make Info, OpenSession or health wait; only
work that blocks (a prefill, a round on the backend) runs on threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from services.config import NodeConfig
from services.metrics import AioGrpcMetricsInterceptor, GrpcMetricsInterceptor, serve_metrics
from services.security import AioApiKeyInterceptor, ApiKeyInterceptor, read_api_keys, server_credentials

MAX_MESSAGE_BYTES = 64 << 20
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
NodeT = TypeVar("NodeT")
Registration = tuple[Callable[[Any, Any], None], Any, str]  # (add_fn, servicer, full service name)


class Stoppable(Protocol):
    def stop(self, grace_s: float) -> Any: ...  # noqa: ANN401 - returns something with .wait()


@dataclass
class RunningServer(Generic[NodeT]):
    """A started node: its gRPC server, bound port, a drain switch and the engine it serves."""

    server: Stoppable
    port: int
    drain: Callable[[], None]  # health reports NOT_SERVING from now on
    node: NodeT
    cleanup: Callable[[], None]
    metrics_port: int | None = None  # where /metrics is served (None: off)
    http_port: int | None = None  # the OpenAI-compatible API (draft node; None: off)

    def stop(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING, let in-flight calls finish for up to `grace_s`, then clean up."""
        self.drain()
        self.server.stop(grace_s).wait()
        self.cleanup()


def _add_services(server: Any, registrations: Sequence[Registration], host: str, port: int,  # noqa: ANN401
                  credentials: grpc.ServerCredentials | None, health_servicer: Any) -> tuple[int, list[str]]:  # noqa: ANN401
    """Register the services, health and reflection; bind. Returns the port and the service names."""
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = []
    for add_fn, servicer, name in registrations:
        add_fn(servicer, server)
        names.append(name)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    return bound, names


def build_server(
    registrations: Sequence[Registration],
    host: str,
    port: int,
    workers: int,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A thread-pool server; every service starts SERVING (the caller flips health when it drains)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), interceptors=list(interceptors), options=SERVER_OPTIONS
    )
    health_servicer = health.HealthServicer()
    bound, names = _add_services(server, registrations, host, port, credentials, health_servicer)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


class LoopServer:
    """A grpc.aio server on an asyncio loop of its own thread, driven from synchronous code."""

    def __init__(
        self,
        registrations: Sequence[Registration],
        host: str,
        port: int,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()

        async def start() -> tuple[grpc.aio.Server, Any, int]:  # noqa: ANN401
            server = grpc.aio.server(interceptors=list(interceptors), options=SERVER_OPTIONS)
            health_servicer = health.aio.HealthServicer()
            bound, names = _add_services(server, registrations, host, port, credentials, health_servicer)
            for name in ["", *names]:
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            await server.start()
            return server, health_servicer, bound

        try:
            self._server, self._health, self.port = self.run(start())
        except BaseException:
            self._close_loop()
            raise

    def run(self, coroutine: Any) -> Any:  # noqa: ANN401
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def drain(self) -> None:
        self.run(self._health.enter_graceful_shutdown())

    def stop(self, grace_s: float) -> threading.Event:
        """Stop accepting calls, give in-flight ones `grace_s`, then end the loop; the event is set
        once all of it is done."""
        self.run(self._server.stop(grace_s))
        self._close_loop()
        done = threading.Event()
        done.set()
        return done

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def start_node(
    registrations: Sequence[Registration],
    config: NodeConfig,
    node: NodeT,
    cleanup: Callable[[], None],
    registry: CollectorRegistry,
    asynchronous: bool = False,
) -> RunningServer[NodeT]:
    """Build and start a node's gRPC server (per-method metrics, optional TLS and API keys) and its
    /metrics endpoint. `asynchronous`: a grpc.aio server (servicers with coroutine methods)."""
    keys = read_api_keys(config.api_keys_file) if config.api_keys_file is not None else None
    credentials = (
        server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca) if config.tls_cert else None
    )
    if asynchronous:
        aio_interceptors: list[grpc.aio.ServerInterceptor] = [AioGrpcMetricsInterceptor(registry)]
        if keys is not None:
            aio_interceptors.append(AioApiKeyInterceptor(keys))
        loop_server = LoopServer(registrations, config.host, config.port, aio_interceptors, credentials)
        server, port, drain = loop_server, loop_server.port, loop_server.drain
    else:
        interceptors: list[grpc.ServerInterceptor] = [GrpcMetricsInterceptor(registry)]  # counts rejections too
        if keys is not None:
            interceptors.append(ApiKeyInterceptor(keys))
        server, port, health_servicer = build_server(
            registrations, config.host, config.port, config.workers, interceptors, credentials
        )
        server.start()
        drain = health_servicer.enter_graceful_shutdown
    metrics_port = (
        serve_metrics(registry, config.host, config.metrics_port) if config.metrics_port >= 0 else None
    )
    return RunningServer(server, port, drain, node, cleanup, metrics_port)
