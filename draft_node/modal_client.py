"""The target client interface over a deployed Modal class (`--target modal://app/Class`).

Same methods and errors as the gRPC TargetClient, so ResumableSession's retries apply: Modal's
transient failures surface as UNAVAILABLE (retried with jittered backoff), target errors keep
their status code (and a full container's retry hint). Each verify also sends the session's
committed tokens, because Modal may run the call on a container that does not hold the session;
the target then rebuilds it and answers with the new session id, which this client adopts. Every
call also names the generation (its first session id), so a container replaces its own older
session of it instead of keeping one orphan per re-route until the TTL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import grpc

from draft_node.target_transport import first_round_advice
from services.candidate_tree import CandidateTree
from services.errors import RemoteCallError, SpecwireError
from services.rpc.specwire.v1 import target_pb2

MethodCaller = Callable[..., Any]  # (method name, *args) -> result


def parse_modal_url(url: str) -> tuple[str, str]:
    """modal://app-name/ClassName -> (app-name, ClassName)."""
    parsed = urlparse(url)
    app, cls = parsed.netloc, parsed.path.strip("/")
    if parsed.scheme != "modal" or not app or not cls or "/" in cls:
        raise ValueError(f"expected modal://<app>/<Class>, got {url!r}")
    return app, cls


def remote_caller(app: str, cls: str) -> MethodCaller:
    """Calls methods of the deployed class (looked up lazily, on the first call)."""
    import modal

    target = modal.Cls.from_name(app, cls)()
    return lambda method, *args: getattr(target, method).remote(*args)


def transient_errors() -> tuple[type[BaseException], ...]:
    try:
        from modal import exception
    except ImportError:
        return ()
    return (
        exception.ConnectionError,
        exception.TimeoutError,
        exception.InternalFailure,
        exception.InternalError,
        exception.ServiceError,
    )


class ModalTargetSession:
    def __init__(
        self, client: ModalTargetClient, opened: target_pb2.OpenSessionResponse, resume: target_pb2.OpenSessionRequest
    ) -> None:
        self.session_id = opened.session_id
        self.first_token_id = opened.first_token_id
        self.advised_draft_tokens = first_round_advice(opened)
        self._lineage = opened.session_id  # names this generation on every container it reaches
        self._client = client
        self._round = 0
        self._resume = resume  # prompt + committed tokens, the pending token apart
        self._resume.resume_pending_token_id = opened.first_token_id

    def verify(self, tree: CandidateTree) -> target_pb2.VerifyResponse:
        request = target_pb2.VerifyRequest(session_id=self.session_id, round_id=self._round, tree=tree.to_proto())
        raw = self._client.call(
            "verify", request.SerializeToString(), self._resume.SerializeToString(), self._lineage
        )
        response = target_pb2.VerifyResponse.FromString(raw)
        self.session_id = response.session_id  # a rebuilt session has a new id and restarts at round 0
        self._round = response.round_id + 1
        self._resume.prompt_token_ids.extend([self._resume.resume_pending_token_id, *response.accepted_token_ids])
        self._resume.resume_pending_token_id = response.next_token_id
        return response

    def close(self) -> None:
        try:
            self._client.call("close_session", self.session_id, self._lineage)
        except grpc.RpcError:
            pass  # best effort: the target's TTL frees it otherwise


class ModalTargetClient:
    def __init__(self, url: str, caller: MethodCaller | None = None) -> None:
        self.address = url
        self._caller = caller or remote_caller(*parse_modal_url(url))
        self._transient = transient_errors()

    def call(self, method: str, *args: Any) -> Any:  # noqa: ANN401 - protobuf bytes or bool
        try:
            return self._caller(method, *args)
        except SpecwireError as exc:
            raise RemoteCallError(exc.code, str(exc), getattr(exc, "retry_after_s", None)) from exc
        except self._transient as exc:
            raise RemoteCallError(grpc.StatusCode.UNAVAILABLE, f"modal: {exc}") from exc

    def info(self, wait_s: float | None = None) -> target_pb2.InfoResponse:
        return target_pb2.InfoResponse.FromString(self.call("info"))

    def open_session(self, request: target_pb2.OpenSessionRequest) -> ModalTargetSession:
        opened = target_pb2.OpenSessionResponse.FromString(self.call("open_session", request.SerializeToString()))
        resume = target_pb2.OpenSessionRequest()
        resume.CopyFrom(request)
        return ModalTargetSession(self, opened, resume)

    def close(self) -> None:
        """Nothing held locally: Modal manages the connection."""

