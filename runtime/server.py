"""`unskill serve`: an OpenAI-compatible HTTP API over the batching engine, guarded by KSD.

    /v1/chat/completions, /v1/completions   (JSON, or SSE with "stream": true)
    /v1/models, /health

A refusal is finish_reason "content_filter" with the abstain message as content; every choice carries an
extra "unskill" object (abstained, skill, layer). Streams hold back their first tokens (ServeLimits.
hold_tokens) until the guard has passed them, so a refusal within them sends no partial answer.
Needs the `serve` extra (FastAPI + uvicorn); the rest of the runtime does not import this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import BatchEngine, EngineBusy
from .errors import UnskillError
from .generator import Event, GenerationParams
from .sampling import SamplingParams

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length",
                  "abstain": "content_filter", "error": "error"}


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 1 << 20       # request bodies above this get 413
    max_tokens: int = 1024              # the largest max_tokens a request may ask for
    default_max_tokens: int = 256       # when the request gives none (clipped to the context left)
    context: int | None = None          # prompt + max_tokens must fit; None: the model's context
    hold_tokens: int = 16               # streamed text waits until the guard passed this many tokens (-1: all)


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    return JSONResponse(error_body(message, kind, code), status_code=status)


# ---- request bodies (OpenAI's fields; unknown ones are ignored, as OpenAI-compatible servers do) ----
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False)   # None: greedy
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=0)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    n: int = Field(1, ge=1, le=1)


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[_TextPart]]

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    echo: bool = False


class _Gate:
    """Bearer-token check and body-size limit, before any JSON parsing (plain ASGI middleware)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return await error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                            "authentication_error", "invalid_api_key")(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await self._too_large(scope, receive, send)
        # The whole body is read here, whatever its framing (chunked bodies have no content-length), so the
        # limit and the UTF-8 check answer in OpenAI's error shape before FastAPI sees a byte.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        try:
            bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            return await error_response(400, f"the request body is not valid UTF-8 (byte {exc.start})")(
                scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()   # after the body: the disconnect a streaming response waits for
        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        await error_response(413, f"request body over {self.max_body_bytes} bytes")(scope, receive, send)


def build_app(engine: BatchEngine, model_name: str, api_key: str | None = None,
              limits: ServeLimits = ServeLimits()) -> FastAPI:
    generator = engine.generator
    context = min(limits.context or generator.model.manifest.max_context, generator.model.manifest.max_context)
    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="unskill", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):   # 404, 405, body errors: OpenAI's shape
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                              else "server_error")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(400, _validation_message(exc))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.load, **engine.counters}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "unskill"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [m.as_dict() for m in body.messages]
        return await _complete(request, body, messages, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            return error_response(400, "prompt: give one prompt (a string or a list of one)")
        return await _complete(request, body, prompts[0], chat=False)

    async def _complete(request: Request, body: _Sampling, prompt, chat: bool):
        if body.model is not None and body.model != model_name:
            return error_response(404, f"model {body.model!r} not found; this server serves {model_name!r}",
                                  code="model_not_found")
        try:
            params, ids = _params(body, prompt, chat)
        except UnskillError as exc:
            return error_response(400, str(exc))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)
        hold = limits.hold_tokens if body.stream else -1
        try:
            handle = engine.submit(prompt, params, on_event, hold, ids=ids)
        except EngineBusy as exc:
            return error_response(503, str(exc), "server_error", "busy")
        except UnskillError as exc:
            return error_response(400, str(exc))
        shape = _Shape(chat, model_name)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(handle, events, shape, include_usage), media_type="text/event-stream")
        event = await _wait_final(request, handle, events)
        if event is None:   # the client left; its row is gone
            return error_response(499, "client closed the request")
        if event.finish_reason == "error":
            return error_response(500, event.text, "server_error")
        return shape.whole(event)

    def _params(body: _Sampling, prompt, chat: bool) -> tuple[GenerationParams, list[int]]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise UnskillError("stop: at most 4 non-empty strings")
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > limits.max_tokens:
            raise UnskillError(f"max_tokens {asked} is over this server's limit of {limits.max_tokens}")
        sampling = SamplingParams(body.temperature or 0.0, body.top_k or 0,
                                  1.0 if body.top_p is None else body.top_p, body.seed)
        params = GenerationParams(asked or min(limits.default_max_tokens, limits.max_tokens), sampling, tuple(stops), chat)
        ids = generator.encode([prompt], params)[0]
        if len(ids) >= context:
            raise UnskillError(f"the prompt has {len(ids)} tokens; this server's context is {context}")
        if asked is not None and len(ids) + asked > context:
            raise UnskillError(f"prompt ({len(ids)} tokens) + max_tokens ({asked}) is over this server's "
                               f"context of {context} tokens")
        params.max_new_tokens = min(params.max_new_tokens, context - len(ids))
        return params, ids

    return _Gate(app, api_key, limits.max_body_bytes)


async def _wait_final(request: Request, handle, events: asyncio.Queue) -> Event | None:
    """Collects a request's events into one; None if the client disconnected first (its row is dropped)."""
    text = ""
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                handle.cancel()
                return None
            continue
        text += event.text
        if event.finish_reason is not None:
            event.text = text
            return event


async def _sse(handle, events: asyncio.Queue, shape: "_Shape", include_usage: bool):
    try:
        first = True
        while True:
            event = await events.get()
            if event.finish_reason == "error":
                yield f"data: {json.dumps(error_body(event.text, 'server_error'))}\n\n"
                return
            if event.text or first:
                yield f"data: {json.dumps(shape.chunk(event.text, None, first))}\n\n"
                first = False
            if event.finish_reason is not None:
                yield f"data: {json.dumps(shape.chunk('', event, False))}\n\n"
                if include_usage:
                    yield f"data: {json.dumps(shape.usage_chunk(event))}\n\n"
                yield "data: [DONE]\n\n"
                return
    finally:   # the client went away (or the stream ended): free the row's slot
        handle.cancel()


class _Shape:
    """OpenAI's response objects for one request (chat or text completion)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model, self.created = chat, model, int(time.time())
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]

    @staticmethod
    def _extra(event: Event) -> dict:
        return {"abstained": event.abstained, "skill": event.skill, "layer": event.layer, "rule": event.rule}

    @staticmethod
    def _usage(event: Event) -> dict:
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}

    def _head(self, suffix: str = "") -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + suffix, "created": self.created, "model": self.model}

    def whole(self, event: Event) -> dict:
        choice = {"index": 0, "finish_reason": FINISH_REASONS[event.finish_reason], "unskill": self._extra(event)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": event.text}
        else:
            choice.update(text=event.text, logprobs=None)
        return {**self._head(), "choices": [choice], "usage": self._usage(event)}

    def chunk(self, text: str, final: Event | None, first: bool) -> dict:
        choice = {"index": 0, "finish_reason": FINISH_REASONS[final.finish_reason] if final else None}
        if final is not None:
            choice["unskill"] = self._extra(final)
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        else:
            choice.update(text=text, logprobs=None)
        return {**self._head(".chunk" if self.chat else ""), "choices": [choice]}

    def usage_chunk(self, event: Event) -> dict:
        return {**self._head(".chunk" if self.chat else ""), "choices": [], "usage": self._usage(event)}


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Starts uvicorn on a background thread (tests, benchmarks, embedding); returns (server, port)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise UnskillError(f"could not start the server on {host}:{port}")
        time.sleep(0.05)
    return server, server.servers[0].sockets[0].getsockname()[1]
