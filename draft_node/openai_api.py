"""OpenAI-compatible HTTP API on the draft node: /v1/completions, /v1/chat/completions (SSE
streaming), /v1/models, /health, and the playground page at /. Requests are served by the same
DraftEngine as gRPC Generate. Streamed chunks carry a `specwire` field (ignored by standard
clients): each token's provenance, text and target logprob, and the round that produced it."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, BaseModel, Field, StrictInt

from draft_node.engine import DraftEngine
from draft_node.http_generations import GenerationStream, GenerationThreads
from services.errors import INTERNAL_DETAILS, InvalidArgument, NotFound, SpecwireError, rpc_status
from services.limits import MAX_CANDIDATES, MAX_HTTP_STREAMS, MAX_SPECULATIVE_TOKENS
from services.rpc.specwire.v1 import draft_pb2
from services.security import UNAUTHENTICATED_DETAILS, key_is_valid, presented_key

log = logging.getLogger(__name__)
T = TypeVar("T")

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
    prompt: Text | list[Text] | list[StrictInt] | list[list[StrictInt]]  # text, or token ids


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


class ClientGone(Exception):
    """The HTTP client disconnected before its response was ready."""


async def until_disconnect(request: Request) -> None:
    """Return when the client disconnects (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def next_unless_gone(stream: GenerationStream[T], gone: asyncio.Future) -> T:
    """The stream's next item, or ClientGone if the client disconnects first."""
    item = asyncio.ensure_future(anext(stream))
    await asyncio.wait({item, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not item.done():
        item.cancel()
        raise ClientGone
    return item.result()


INTERNAL_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def stream_error(exc: SpecwireError | grpc.RpcError) -> tuple[int, str, str]:
    """HTTP status, message and error type of a failure (a response, or an event mid-stream). An
    internal error says only that: its text (exception detail) stays in the log."""
    if isinstance(exc, SpecwireError):
        if exc.code in INTERNAL_CODES:
            log.error("internal error: %s", exc)
            return 500, INTERNAL_DETAILS, "internal_error"
        return HTTP_STATUS.get(exc.code, 500), str(exc), "invalid_request_error"
    code, details = rpc_status(exc)
    if code in INTERNAL_CODES:
        log.error("target error %s: %s", code.name, details)
        details = INTERNAL_DETAILS
    return HTTP_STATUS.get(code, 502), f"target: {details}", "upstream_error"


def single_prompt(prompt: str | list[str] | list[int] | list[list[int]]) -> str | list[int]:
    """The one prompt of a completion request: text, or token ids (a list of ints, or a list
    holding one such list, as OpenAI accepts)."""
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(item, int) for item in prompt):
        return prompt  # type: ignore[return-value]
    if len(prompt) != 1:
        raise InvalidArgument("prompt: exactly one prompt per request is supported")
    return prompt[0]  # type: ignore[return-value]


def completion_body(collected: list[draft_pb2.GenerateChunk], chat: bool, model: str, prompt_tokens: int) -> dict:
    """A whole (non-streamed) completion, shaped as OpenAI's API returns it."""
    text = "".join(c.text for c in collected)
    completion_tokens = sum(len(c.token_ids) for c in collected)
    finish = collected[-1].finish_reason or "length"
    choice = (
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        if chat
        else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    )
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chunk_choice(chunk: draft_pb2.GenerateChunk, chat: bool) -> dict:
    finish = chunk.finish_reason or None
    if chat:
        return {"index": 0, "delta": {"content": chunk.text}, "finish_reason": finish}
    return {"index": 0, "text": chunk.text, "finish_reason": finish, "logprobs": None}


class Completions:
    """The two completion endpoints over one draft engine: at most `max_generations` at once (more
    get HTTP 429), each stopped when its client goes away."""

    def __init__(self, engine: DraftEngine, served_model_name: str, max_generations: int) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self.generations = GenerationThreads(max_generations)

    def model_name(self) -> str:
        """Named after the target's model; waits (as a generation does) for a target still connecting."""
        wait_s = min(10.0, self.engine.config.target_timeout_s)
        return self.served_model_name or self.engine.target_info(wait_s=wait_s).model_id

    def token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    async def respond(self, body: SamplingFields, encode: Callable[[], list[int]], chat: bool, request: Request) -> Any:
        shown: dict[str, Any] = {}  # set on the worker before its first chunk

        def produce() -> Iterator[draft_pb2.GenerateChunk]:
            shown["model"] = self.model_name()
            if body.model not in (None, shown["model"]):
                raise NotFound(f"model {body.model!r} does not exist; this server serves {shown['model']!r}")
            prompt_ids = encode()
            shown["prompt_tokens"] = len(prompt_ids)
            yield from self.engine.generate(body.generate_request(), prompt_ids)

        stream = self.generations.start(produce)
        gone = asyncio.ensure_future(until_disconnect(request))
        handed_over = False  # to the SSE response, which closes the stream itself
        try:
            first = await next_unless_gone(stream, gone)  # validation errors surface here, before any response
            if body.stream:
                handed_over = True
                return StreamingResponse(self.events(first, stream, chat, shown), media_type="text/event-stream")
            collected = [first]
            while True:
                try:
                    collected.append(await next_unless_gone(stream, gone))
                except StopAsyncIteration:
                    break
        except ClientGone:
            return Response(status_code=499)  # nobody to answer; the generation has stopped
        finally:
            gone.cancel()
            if not handed_over:
                stream.close()
        return completion_body(collected, chat, shown["model"], shown["prompt_tokens"])

    async def events(
        self, first: draft_pb2.GenerateChunk, stream: GenerationStream, chat: bool, shown: dict[str, Any]
    ) -> AsyncIterator[str]:
        """The SSE stream: chunks, then `[DONE]`; a failure after the 200 is an error event (as OpenAI
        sends it) followed by `[DONE]`. A client that goes away stops the generation."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": shown["model"]}  # fmt: skip
        try:
            if chat:
                delta = {"role": "assistant", "content": ""}
                yield _sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            chunk = first
            while True:
                yield _sse({**head, "choices": [chunk_choice(chunk, chat)], "specwire": chunk_extension(chunk, self.token_text)})
                try:
                    chunk = await anext(stream)
                except StopAsyncIteration:
                    break
        except (SpecwireError, grpc.RpcError) as exc:
            status, message, kind_name = stream_error(exc)
            yield _sse({"error": {"message": message, "type": kind_name, "code": status}})
        except Exception:
            log.exception("generation failed mid-stream")
            yield _sse({"error": {"message": INTERNAL_DETAILS, "type": "internal_error", "code": 500}})
        finally:
            stream.close()  # a client that went away stops the generation and frees its session
        yield _sse("[DONE]")

    async def completion(self, body: CompletionRequest, request: Request) -> Any:
        prompt = single_prompt(body.prompt)
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgument("prompt is empty")
            encode = lambda: self.engine.encode_prompt(draft_pb2.GenerateRequest(prompt=prompt))  # noqa: E731
        else:
            encode = lambda: self.engine.token_prompt(prompt)  # noqa: E731
        return await self.respond(body, encode, False, request)

    async def chat_completion(self, body: ChatCompletionRequest, request: Request) -> Any:
        messages = [m.model_dump() for m in body.messages]
        return await self.respond(body, lambda: self.engine.encode_chat(messages), True, request)


def add_api_key_check(app: FastAPI, api_keys: Sequence[bytes]) -> None:
    @app.middleware("http")
    async def require_api_key(request: Request, call_next: Callable) -> Any:
        if api_keys and request.url.path.startswith("/v1/"):
            key = presented_key([(name, value) for name, value in request.headers.items()])
            if not key_is_valid(key, api_keys):
                return error_response(401, UNAUTHENTICATED_DETAILS, "authentication_error")
        return await call_next(request)


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's JSON error body: 4xx with the reason, 5xx with a generic message
    (details in the log)."""

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

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error serving %s", request.url.path, exc_info=exc)
        return error_response(500, INTERNAL_DETAILS, "internal_error")


def add_pages(app: FastAPI, engine: DraftEngine, model_name: Callable[[], str]) -> None:
    """The playground page, /health and /v1/models."""

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
            log.warning("health: target not available: %s", exc)
            return error_response(503, "target not available", "unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name(), "object": "model", "created": 0, "owned_by": "specwire"}],
        }


def create_app(
    engine: DraftEngine,
    served_model_name: str = "",
    api_keys: Sequence[bytes] = (),
    max_generations: int = MAX_HTTP_STREAMS,
) -> FastAPI:
    """The API app; the model is named `served_model_name`, or else after the target's model.
    With `api_keys`, every /v1 call needs `Authorization: Bearer <key>` (as OpenAI clients send).
    At most `max_generations` completions (streamed or not) run at once; more get HTTP 429."""
    app = FastAPI(title="specwire draft node", docs_url=None, redoc_url=None)
    completions = Completions(engine, served_model_name, max_generations)
    add_api_key_check(app, api_keys)
    add_error_handlers(app)
    add_pages(app, engine, completions.model_name)
    app.post("/v1/completions")(completions.completion)
    app.post("/v1/chat/completions")(completions.chat_completion)
    return app


class HttpServer:
    """uvicorn on a background thread (port 0: a free one); HTTPS with a certificate and its key."""

    def __init__(
        self, app: FastAPI, host: str, port: int, tls_cert: Path | None = None, tls_key: Path | None = None
    ) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level="warning",
                lifespan="off",
                ssl_certfile=tls_cert,
                ssl_keyfile=tls_key,
            )
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
