"""Prometheus plumbing shared by both nodes: a per-node registry, its /metrics HTTP server, and a
gRPC server interceptor recording every method's latency and status code."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int:
    """Expose `registry` at http://host:port/metrics; returns the bound port (port 0: a free one)."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_port


class GrpcMetricsInterceptor(grpc.ServerInterceptor):
    """specwire_grpc_server_handled_total / _seconds by service, method and status code."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["service", "method", "code"]
        self.handled = Counter(
            "specwire_grpc_server_handled_total",
            "gRPC calls completed, by status code",
            labels,
            registry=registry,
        )
        self.seconds = Histogram(
            "specwire_grpc_server_handling_seconds",
            "gRPC call duration (streams: until the last message)",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observer(self, method_path: str) -> Callable[[float, Any], None]:
        """What records one finished call of `method_path` ("/package.Service/Method")."""
        service, _, method = method_path.rpartition("/")
        service = service.lstrip("/")

        def observe(start: float, context: Any) -> None:  # noqa: ANN401 - sync or aio context
            code = context.code() if hasattr(context, "code") else None
            name = (code or grpc.StatusCode.OK).name
            self.handled.labels(service, method, name).inc()
            self.seconds.labels(service, method, name).observe(time.perf_counter() - start)

        return observe

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        observe = self.observer(details.method)

        def unary(behavior: Callable) -> Callable:
            def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                try:
                    return behavior(request, context)
                finally:
                    observe(start, context)

            return wrapper

        def streaming(behavior: Callable) -> Callable:
            def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                try:
                    yield from behavior(request, context)
                finally:
                    observe(start, context)

            return wrapper

        return wrap_handler(handler, unary, streaming)


class AioGrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """The same metrics for a grpc.aio server (coroutine and async-generator behaviours)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.metrics = GrpcMetricsInterceptor(registry)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        observe = self.metrics.observer(details.method)

        def unary(behavior: Callable) -> Callable:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                try:
                    return await behavior(request, context)
                finally:
                    observe(start, context)

            return wrapper

        def streaming(behavior: Callable) -> Callable:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    observe(start, context)

            return wrapper

        return wrap_handler(handler, unary, streaming)


def wrap_handler(handler: grpc.RpcMethodHandler, unary: Callable, streaming: Callable) -> Any:
    """The handler with its behaviour wrapped: `unary` for unary responses, `streaming` for streams."""
    if handler.unary_unary:
        return handler._replace(unary_unary=unary(handler.unary_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=streaming(handler.unary_stream))
    if handler.stream_unary:
        return handler._replace(stream_unary=unary(handler.stream_unary))
    return handler._replace(stream_stream=streaming(handler.stream_stream))
