"""OpenAI-compatible HTTP API on the draft node: /v1/completions, /v1/chat/completions (SSE
streaming), /v1/models, /health, and the playground page at /. Requests are served by the same
DraftEngine as gRPC Generate. Streamed chunks carry a `specwire` field (ignored by standard
clients): each token's provenance, text and target logprob, and the round that produced it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, BaseModel, Field

from draft_node.engine import DraftEngine
from services.errors import InvalidArgument, NotFound, SpecwireError, rpc_status
from services.limits import MAX_CANDIDATES, MAX_SPECULATIVE_TOKENS
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


PLAYGROUND = Path(__file__).parent / "playground"  # the page served at / (plain HTML, CSS, JS modules)
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
    # specwire extensions (OpenAI clients send them with `extra_body`)
    num_speculative_tokens: int = Field(0, ge=0, le=MAX_SPECULATIVE_TOKENS)  # K; 0: the node's default
    num_candidates: int = Field(0, ge=0, le=MAX_CANDIDATES)  # N; 0: the node's default
    strategy: Text = Field("", max_length=64)  # empty: deterministic (greedy) / gumbel (sampling)
    target_only: bool = False  # draft nothing: the target alone, to compare

    def generate_request(self, **extra: Any) -> draft_pb2.GenerateRequest:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        request = draft_pb2.GenerateRequest(
            max_tokens=self.max_tokens or 0,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=stop,
            num_speculative_tokens=self.num_speculative_tokens,
            num_candidates=self.num_candidates,
            strategy=self.strategy,
            target_only=self.target_only,
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


SOURCE_NAMES = {
    draft_pb2.TOKEN_SOURCE_ACCEPTED: "accepted",
    draft_pb2.TOKEN_SOURCE_RECOVERED: "recovered",
    draft_pb2.TOKEN_SOURCE_BONUS: "bonus",
    draft_pb2.TOKEN_SOURCE_TARGET: "target",
}


def chunk_extension(chunk: draft_pb2.GenerateChunk, token_text: Callable[[int], str]) -> dict:
    """The `specwire` field of a streamed chunk (standard clients ignore it): each token with where
    it came from, its text and the target's logprob; and the round that produced it."""
    tokens = [
        {
            "id": token_id,
            "text": info.text,
            "source": SOURCE_NAMES.get(info.source, "unknown"),
            "logprob": info.target_logprob if info.HasField("target_logprob") else None,
        }
        for token_id, info in zip(chunk.token_ids, chunk.tokens, strict=False)
    ]
    extension: dict[str, Any] = {"tokens": tokens}
    if chunk.HasField("stats"):
        stats = chunk.stats
        extension["round"] = {
            "round": stats.round,
            "drafted": stats.drafted_tokens,
            "accepted": stats.accepted_tokens,
            "draft_s": stats.draft_seconds,
            "verify_s": stats.verify_seconds,
            "network_s": max(0.0, stats.round_seconds - stats.draft_seconds - stats.verify_seconds),
            "round_s": stats.round_seconds,
            "pipeline": stats.pipeline,
            "candidates": [
                {"tokens": [token_text(t) for t in c.token_ids], "accepted": c.accepted_length}
                for c in stats.candidates
            ],
        }
    return extension


async def stream_on_thread(iterator: Generator[str, None, None]) -> AsyncIterator[str]:
    """Drive a blocking iterator from a worker thread. When the client goes away (this generator is
    cancelled), the worker stops after the item in progress and closes the iterator itself, which
    ends the generation and frees its target session at once, not whenever it is garbage-collected."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    gone = threading.Event()

    def put(item: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is already closed
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def pump() -> None:
        try:
            for item in iterator:
                if gone.is_set():
                    break
                put(item)
        finally:
            iterator.close()  # on the thread that ran it
            put(None)

    threading.Thread(target=pump, name="sse-stream", daemon=True).start()
    try:
        while (item := await queue.get()) is not None:
            yield item
    finally:
        gone.set()


def stream_error(exc: SpecwireError | grpc.RpcError) -> tuple[int, str, str]:
    """HTTP status, message and error type of a failure (a response, or an event mid-stream)."""
    if isinstance(exc, SpecwireError):
        return HTTP_STATUS.get(exc.code, 500), str(exc), "invalid_request_error"
    code, details = rpc_status(exc)
    return HTTP_STATUS.get(code, 502), f"target: {details}", "upstream_error"


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
        return error_response(*stream_error(exc))

    @app.exception_handler(grpc.RpcError)
    async def upstream_error(request: Request, exc: grpc.RpcError) -> JSONResponse:
        return error_response(*stream_error(exc))

    @app.get("/", include_in_schema=False)
    def playground() -> FileResponse:
        """The playground page (no API key needed to load it; it asks for one and sends it)."""
        return FileResponse(PLAYGROUND / "index.html")

    app.mount("/playground", StaticFiles(directory=PLAYGROUND), name="playground")

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

    def token_text(token_id: int) -> str:
        return engine.tokenizer.decode([token_id])

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
            try:
                for chunk in itertools.chain([first], chunks):
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
                            "specwire": chunk_extension(chunk, token_text),
                        }
                    )
            except (SpecwireError, grpc.RpcError) as exc:  # after the 200: an error event, as OpenAI sends
                status, message, kind_name = stream_error(exc)
                yield _sse({"error": {"message": message, "type": kind_name, "code": status}})
                return
            finally:
                chunks.close()  # a client that went away stops the generation and frees its session
            yield _sse("[DONE]")

        return StreamingResponse(stream_on_thread(events()), media_type="text/event-stream")

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
