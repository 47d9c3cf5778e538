"""OpenAI-compatible HTTP API on the draft node: /v1/completions, /v1/chat/completions (SSE
streaming), /v1/models, /health. Requests are served by the same DraftEngine as gRPC Generate."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, Literal

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, Field

from draft_node.engine import DraftEngine
from services.errors import InvalidArgument, NotFound, SpecwireError, rpc_status
from services.rpc.specwire.v1 import draft_pb2
from services.security import UNAUTHENTICATED_DETAILS, key_is_valid, presented_key

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1  # the protobuf fields these numbers travel in


def _utf8(text: str) -> str:
    """JSON can carry lone surrogates ("\\ud800") that no tokenizer or protobuf string takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode (a lone surrogate at index {exc.start})") from exc
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class SamplingFields(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)  # the node's own limit is checked after
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=INT32_MAX)  # extension (vLLM accepts it too); 0 = off
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=INT64_MAX)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)  # one choice per request

    def generate_request(self, **extra: Any) -> draft_pb2.GenerateRequest:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        request = draft_pb2.GenerateRequest(
            max_tokens=self.max_tokens or 0,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=stop,
            **extra,
        )
        if self.seed is not None:
            request.seed = self.seed
        return request


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(
    engine: DraftEngine, served_model_name: str = "", api_keys: Sequence[bytes] = ()
) -> FastAPI:
    """The API app; the model is named `served_model_name`, or else after the target's model.
    With `api_keys`, every /v1 call needs `Authorization: Bearer <key>` (as OpenAI clients send)."""

    def model_name() -> str:
        return served_model_name or engine.target_info().model_id

    app = FastAPI(title="specwire draft node", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def require_api_key(request: Request, call_next: Callable) -> Any:
        if api_keys and request.url.path.startswith("/v1/"):
            key = presented_key([(name, value) for name, value in request.headers.items()])
            if not key_is_valid(key, api_keys):
                return error_response(401, UNAUTHENTICATED_DETAILS, "authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return error_response(400, f"{where}: {first['msg']}")

    @app.exception_handler(SpecwireError)
    async def specwire_error(request: Request, exc: SpecwireError) -> JSONResponse:
        return error_response(HTTP_STATUS.get(exc.code, 500), str(exc))

    @app.exception_handler(grpc.RpcError)
    async def upstream_error(request: Request, exc: grpc.RpcError) -> JSONResponse:
        code, details = rpc_status(exc)
        return error_response(HTTP_STATUS.get(code, 502), f"target: {details}", "upstream_error")

    @app.get("/health")
    def health() -> JSONResponse:
        try:
            engine.target_info()
        except (SpecwireError, grpc.RpcError) as exc:
            return error_response(503, f"target not available: {exc}", "unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name(), "object": "model", "created": 0, "owned_by": "specwire"}],
        }

    def respond(body: SamplingFields, prompt_ids: list[int], chat: bool) -> Any:
        if body.model not in (None, model_name()):
            raise NotFound(f"model {body.model!r} does not exist; this server serves {model_name()!r}")
        chunks = engine.generate(body.generate_request(), prompt_ids)
        first = next(chunks)  # validation errors surface here, before any response is sent
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        if not body.stream:
            collected = [first, *chunks]
            text = "".join(c.text for c in collected)
            completion_tokens = sum(len(c.token_ids) for c in collected)
            finish = collected[-1].finish_reason or "length"
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                if chat
                else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            )
            return {
                "id": rid,
                "object": kind,
                "created": created,
                "model": model_name(),
                "choices": [choice],
                "usage": {
                    "prompt_tokens": len(prompt_ids),
                    "completion_tokens": completion_tokens,
                    "total_tokens": len(prompt_ids) + completion_tokens,
                },
            }

        def events() -> Iterator[str]:
            kind_chunk = f"{kind}.chunk" if chat else kind
            if chat:
                yield _sse(
                    {
                        "id": rid,
                        "object": kind_chunk,
                        "created": created,
                        "model": model_name(),
                        "choices": [
                            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        ],
                    }
                )
            for chunk in (first, *chunks):
                finish = chunk.finish_reason or None
                choice = (
                    {"index": 0, "delta": {"content": chunk.text}, "finish_reason": finish}
                    if chat
                    else {"index": 0, "text": chunk.text, "finish_reason": finish, "logprobs": None}
                )
                yield _sse(
                    {
                        "id": rid,
                        "object": kind_chunk,
                        "created": created,
                        "model": model_name(),
                        "choices": [choice],
                    }
                )
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    def completions(body: CompletionRequest) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            return error_response(400, "prompt: exactly one prompt per request is supported")
        if not prompts[0]:
            raise InvalidArgument("prompt is empty")
        return respond(body, engine.encode_prompt(draft_pb2.GenerateRequest(prompt=prompts[0])), chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatCompletionRequest) -> Any:
        return respond(body, engine.encode_chat([m.model_dump() for m in body.messages]), chat=True)

    return app


class HttpServer:
    """uvicorn on a background thread (port 0: a free one)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, name="openai-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"HTTP server could not start on {host}:{port}")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
