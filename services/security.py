"""Transport security for both nodes: TLS / mutual TLS credentials, API keys, caller identity.

API keys travel in the `authorization: Bearer <key>` metadata (or `x-api-key`), are compared in
constant time, and are never logged; a caller is identified by a digest of its key, or by its
client-certificate common name under mTLS, so sessions can be bound to whoever opened them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

UNAUTHENTICATED_DETAILS = "missing or invalid API key"
OPEN_METHODS = ("/grpc.health.v1.Health/",)  # probes (compose, Kubernetes) carry no metadata


def read_api_keys(path: Path | None) -> list[bytes]:
    """One key per line; blank lines and '#' comments are skipped."""
    if path is None:
        return []
    keys = [line.strip() for line in path.read_text().splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"API key file {path} holds no keys")
    return [k.encode() for k in keys]


def presented_key(metadata: Sequence[tuple[str, Any]] | None) -> bytes | None:
    for name, value in metadata or ():
        value = value.encode() if isinstance(value, str) else value
        if name == "authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip()
        if name == "x-api-key":
            return value.strip()
    return None


def key_is_valid(key: bytes | None, keys: Sequence[bytes]) -> bool:
    """Constant time in the key's content: every configured key is compared."""
    valid = False
    for candidate in keys:
        valid |= hmac.compare_digest(key or b"", candidate)
    return valid and key is not None


def caller_identity(context: grpc.ServicerContext) -> str:
    """Who is calling: a digest of the API key, else the mTLS client's common name, else anonymous."""
    key = presented_key(context.invocation_metadata())
    if key is not None:
        return "key:" + hashlib.sha256(key).hexdigest()[:24]
    names = context.auth_context().get("x509_common_name") or []
    if names:
        return "cert:" + names[0].decode(errors="replace")
    return "anonymous"


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Reject calls without a valid key with UNAUTHENTICATED before any servicer code runs."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        self.keys = list(keys)

    def admits(self, details: grpc.HandlerCallDetails) -> bool:
        return details.method.startswith(OPEN_METHODS) or key_is_valid(
            presented_key(details.invocation_metadata), self.keys
        )

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or self.admits(details):
            return handler

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)

        return _replace_behaviour(handler, deny)


class AioApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """The same check for a grpc.aio server."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        self.check = ApiKeyInterceptor(keys)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None or self.check.admits(details):
            return handler

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await deny(request, context)
            yield  # an async generator, as a streaming behaviour is (the metrics interceptor iterates it)

        streaming = handler.unary_stream or handler.stream_stream
        return _replace_behaviour(handler, deny_stream if streaming else deny)


def _replace_behaviour(handler: grpc.RpcMethodHandler, behaviour: Callable) -> Any:
    kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
    return handler._replace(**{kind: behaviour})


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS with the server's certificate; with `client_ca`, clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    """Trust `ca` for the server; `cert`/`key` are the client certificate for mutual TLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()
