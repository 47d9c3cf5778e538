"""Errors with a gRPC status code, and the decorator that turns them into aborts.

Node code raises these (never grpc-specific calls), so engines stay testable without gRPC and
every bad input reaches the client as a precise status instead of UNKNOWN.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


class SpecwireError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(SpecwireError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SpecwireError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(SpecwireError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(SpecwireError):
    """Out of sessions or memory for now; `retry_after_s` hints when room is likely (it travels as
    gRPC's `grpc-retry-pushback-ms` trailing metadata, and through Modal with the exception)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple:  # keep the hint when pickled (Modal returns exceptions so)
        return type(self), (str(self), self.retry_after_s)


class Unavailable(SpecwireError):
    code = grpc.StatusCode.UNAVAILABLE


class OutOfRange(SpecwireError):
    code = grpc.StatusCode.OUT_OF_RANGE


class RemoteCallError(grpc.RpcError):
    """A failed call over a non-gRPC transport (Modal), shaped like a gRPC error so callers handle
    both alike."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details
        self.retry_after_s = retry_after_s

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


F = TypeVar("F", bound=Callable[..., Any])


def rpc_status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """Code and details of a failed call (sync calls and grpc.aio errors alike)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    return code, details


INTERNAL_DETAILS = "internal error (details are in the node's log)"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRPC's own name for a server's retry hint


def retry_hint_s(exc: grpc.RpcError) -> float | None:
    """Seconds the server asked the caller to wait before retrying, if it said."""
    if isinstance(exc, RemoteCallError):
        return exc.retry_after_s
    trailing = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
    for key, value in trailing or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None


def _status(context: Any, exc: Exception) -> tuple[grpc.StatusCode, str]:  # noqa: ANN401 - sync or aio context
    """The status a servicer error ends its call with (the retry hint goes to trailing metadata)."""
    if isinstance(exc, ResourceExhausted) and exc.retry_after_s is not None:
        context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(round(exc.retry_after_s * 1000))),))
    if isinstance(exc, SpecwireError) and exc.code != grpc.StatusCode.INTERNAL:
        return exc.code, str(exc)
    if isinstance(exc, grpc.RpcError):  # an upstream call failed: keep its code
        code, details = rpc_status(exc)
        return code, f"upstream: {details}"
    log.error("internal error", exc_info=exc)  # the detail stays here: callers get a generic message
    return grpc.StatusCode.INTERNAL, INTERNAL_DETAILS


def grpc_errors(method: F) -> F:
    """Map SpecwireError (and unexpected exceptions) of a servicer method to a gRPC status: plain and
    generator methods (thread-pool servers), coroutine and async-generator methods (grpc.aio)."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def async_stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for response in method(self, request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                if not context.done():
                    await context.abort(*_status(context, exc))

        return async_stream_wrapper  # type: ignore[return-value]

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def async_unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await method(self, request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                await context.abort(*_status(context, exc))

        return async_unary_wrapper  # type: ignore[return-value]

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                if not context.is_active():  # the client cancelled or went away: nobody to tell
                    return
                context.abort(*_status(context, exc))

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    def unary_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            context.abort(*_status(context, exc))

    return unary_wrapper  # type: ignore[return-value]
