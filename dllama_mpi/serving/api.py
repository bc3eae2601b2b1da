"""The OpenAI-compatible HTTP API of `python -m dllama_mpi serve`.

`make_app(backend)` builds the FastAPI app: POST /v1/chat/completions and /v1/completions
(plain JSON or server-sent events), GET /v1/models, /health and /metrics. Requests are
pydantic models, as in vLLM and llama-cpp-python; every error, whatever raised it, is
answered in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

A handler tokenizes the prompt (in a worker thread: a long prompt must not stall /health),
submits a GenRequest (dllama_mpi.serving.request) to the backend, the scheduler on rank 0's main
thread, and receives its events on the event loop through an asyncio queue. A client that
leaves before the end has its request cancelled, which frees its slot.

The backend is duck-typed: `model_id`, `max_seq_len`, `tokenizer` (None until loaded),
`ready` (a threading.Event), `metrics` (dllama_mpi.serving.metrics.Metrics), `submit(req)`
(thread-safe) and optionally `slot_count()` for /health.

Setting `app.state.shutting_down = True` (Server.refuse_new does) makes the /v1 endpoints
refuse new requests (503) and /health answer 503, while requests already submitted run on.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, ValidatorFunctionWrapHandler, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import InputError
from . import templates
from .request import Failed, Finished, GenRequest, Piece, Sampling, TokenLogprob, check_prompt_length, check_prompt_text

_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
_POLL_S = 0.1  # how often a handler checks whether its client has left, while tokens come and while they don't
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 1000  # OpenAI's count; a length that bounds a request's stop-matching work
HEADER_TIMEOUT_S = 10.0  # a connection's request line and headers must arrive within this (then it is closed)
BODY_TIMEOUT_S = 30.0  # and its body within this once the headers are in (else 408)
MAX_CONNECTIONS = 256  # open connections at most; one more is answered 503 and closed
_MIN_LOGPROB = -9999.0  # JSON has no -Infinity: a token the sampler excluded shows this (as vLLM does)


# ---------------------------------------------------------------- errors


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "authentication_error" if status == 401 else "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message, param, code), status_code=status)


class ApiError(Exception):
    """An answer in OpenAI's error shape, raised from anywhere in a handler."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 made a 400 that names the field: `temperature: Input should be a valid number ...`, param "temperature"."""
    problems, params = [], []
    for err in exc.errors():
        loc = err["loc"][1:]
        if err["type"] == "json_invalid":
            return _error(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])} (character {loc[0]})")
        if not loc:
            return _error(400, "the request body must be a JSON object")
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        if f"{param}: {msg}" not in problems:
            problems.append(f"{param}: {msg}")
            params.append(param)
    return _error(400, "; ".join(problems[:3]), params[0])


# ---------------------------------------------------------------- requests

_Stop = Annotated[str, Field(min_length=1)]


def _utf8(text: str) -> str:
    """JSON may carry lone surrogates ("\\udc80"), which are not text: refuse them here rather
    than fail in a tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"is not valid UTF-8 text (a lone surrogate at character {e.start})") from None
    return text


class _StreamOptions(BaseModel):
    include_usage: bool | None = False


class _Common(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored (clients send many); a field that would change the
    output but isn't implemented is refused rather than silently ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1, as OpenAI
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: list[_Stop] | None = None  # a string is taken as a list of one
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # refused when given (tools and structured output are not implemented): answering without
    # them would look like success
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    response_format: dict | None = None
    best_of: int | None = None
    ignore_eos: bool | None = False  # not OpenAI's (llama.cpp's server and vLLM take it): run on to max_tokens past EOS

    @field_validator("stop", mode="before")
    @classmethod
    def _listed(cls, stop: Any) -> Any:
        """A string as a list of one; the limits checked before any other work on the strings."""
        stop = [stop] if isinstance(stop, str) else stop
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(stop)} stop strings were given; at most {MAX_STOP_STRINGS}: drop some")
        for i, s in enumerate(stop if isinstance(stop, list) else ()):
            if isinstance(s, str) and len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop string {i + 1} of {len(stop)} is {len(s)} characters; each may have at most "
                                 f"{MAX_STOP_CHARS}: shorten it")
        return stop

    @field_validator("stop")
    @classmethod
    def _stop_text(cls, stop: list[str] | None) -> list[str] | None:
        return stop and [_utf8(s) for s in stop]

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n > 1:
            raise ValueError("n > 1 is not supported: send one request per choice")
        return n

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias", "tools", "tool_choice", "functions",
                     "function_call")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value and value != "none":
            raise ValueError(f"{info.field_name} is not supported (leave it out)")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict | None) -> dict | None:
        if value and value.get("type", "text") != "text":
            raise ValueError(f"response_format {value.get('type')!r} is not supported; only text")
        return value

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, value: int | None) -> int | None:
        if value is not None and value > 1:
            raise ValueError("best_of > 1 is not supported")
        return value

    def sampling(self) -> Sampling:
        return Sampling(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
        )

    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def stop_ids(self) -> tuple[int, ...] | None:
        """No end-of-generation tokens with ignore_eos; else None, the model's."""
        return () if self.ignore_eos else None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    role: str
    content: str | list[_TextPart]

    @field_validator("content", mode="wrap")
    @classmethod
    def _text(cls, content: Any, handler: ValidatorFunctionWrapHandler) -> str | list[_TextPart]:
        """One message for what pydantic reports per member of the union."""
        try:
            content = handler(content)
        except ValidationError:
            raise ValueError('must be a string or a list of text parts {"type": "text", "text": "..."}') from None
        for text in [content] if isinstance(content, str) else [part.text for part in content]:
            _utf8(text)
        return content


class ChatRequest(_Common):
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the end of the context
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]  # a list of token ids is taken as it is (no BOS added)
    max_tokens: int | None = Field(16, ge=1)  # 16 as OpenAI; null: up to the end of the context
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_prompt(cls, prompt: Any, handler: ValidatorFunctionWrapHandler) -> str | list[int] | list[str]:
        try:
            prompt = handler(prompt)
        except ValidationError:
            raise ValueError("must be a string, a list of one string or a list of token ids") from None
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) and len(prompt) != 1:
            raise ValueError(f"a list of prompts must hold exactly one (batches are not supported), got {len(prompt)}")
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
            _utf8(prompt if isinstance(prompt, str) else prompt[0])
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool | None) -> bool | None:
        if echo:
            raise ValueError("echo is not supported")
        return echo


# ---------------------------------------------------------------- events


class _EventChannel:
    """A submitted GenRequest whose events, emitted on the scheduler's thread, come out on the event loop."""

    def __init__(self, backend: Any, req: GenRequest) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.req = req
        self.ended = False  # Finished or Failed came out

        def emit(event: object) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: the server stopped, nobody is waiting for this
                pass

        req.emit = emit
        backend.submit(req)

    def abandon(self) -> None:
        """Nobody will read the rest: unless the request has ended, cancel it, so that the scheduler frees its slot."""
        if not self.ended:
            self.req.cancelled.set()

    async def events(self, request: Request) -> AsyncIterator[object]:
        """Piece..., then Finished or Failed. If the client leaves first (or the consumer stops early), the request is
        abandoned and the events end."""
        get: asyncio.Future | None = None
        checked = time.monotonic()
        try:
            while not self.ended:
                get = get or asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({get}, timeout=_POLL_S)
                # by the clock, not only when no event came: tokens arrive every few ms, and a non-streamed
                # answer writes nothing that could fail before the end
                if time.monotonic() - checked >= _POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if not done:
                    continue
                event, get = get.result(), None
                self.ended = isinstance(event, Finished | Failed)
                yield event
        finally:
            if get is not None:
                get.cancel()
            self.abandon()


class _TokenTexts:
    """Tokens as logprobs show them: a token's bytes after the token before it (the prompt's last for the first),
    decoded leniently since a token may hold part of a character."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.prev = prompt_ids[-1]

    def _bytes(self, token: int) -> bytes:
        # ids past the tokenizer (a model's vocabulary padded to a round size) have no text
        return self.tokenizer.decode(self.prev, token) if 0 <= token < self.tokenizer.vocab_size else b""

    def step(self, piece: Piece) -> list[tuple[str, float, bytes]] | None:
        """[(text, logprob, bytes)] of the chosen token then its alternatives, or None without logprobs."""
        lp: TokenLogprob | None = piece.logprob
        rows = None
        if lp is not None:
            rows = []
            for token, logprob in ((lp.token, lp.logprob), *lp.top):
                raw = self._bytes(token)
                rows.append((raw.decode("utf-8", errors="replace"), max(logprob, _MIN_LOGPROB), raw))
        self.prev = piece.token
        return rows


class _ChatShape:
    """chat.completion objects: a message, or deltas in chunks; logprobs as {"content": [...]}."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def __init__(self, logprobs: bool) -> None:
        self.wants_logprobs = logprobs

    @staticmethod
    def entry(rows: list[tuple[str, float, bytes]]) -> dict:
        (text, logprob, raw), top = rows[0], rows[1:]
        return {
            "token": text,
            "logprob": logprob,
            "bytes": list(raw),
            "top_logprobs": [{"token": t, "logprob": p, "bytes": list(b)} for t, p, b in top],
        }

    def logprobs(self, entries: list[dict]) -> dict | None:
        return {"content": entries, "refusal": None} if self.wants_logprobs else None

    def choice(self, text: str, entries: list[dict], reason: str) -> dict:
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": self.logprobs(entries), "finish_reason": reason}

    def opening(self) -> list[dict]:
        return [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]

    def chunk(self, text: str, entries: list[dict], reason: str | None) -> dict:
        delta = {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": self.logprobs(entries) if entries else None, "finish_reason": reason}


class _TextShape:
    """text_completion objects, in one piece or in chunks; logprobs in the legacy columns (tokens, token_logprobs,
    top_logprobs, text_offset: offsets into the generated text)."""

    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"

    def __init__(self, logprobs: bool) -> None:
        self.wants_logprobs = logprobs
        self.offset = 0

    def entry(self, rows: list[tuple[str, float, bytes]]) -> dict:
        (text, logprob, _), top = rows[0], rows[1:]
        entry = {"token": text, "logprob": logprob, "top": {t: p for t, p, _ in top}, "offset": self.offset}
        self.offset += len(text)
        return entry

    def logprobs(self, entries: list[dict]) -> dict | None:
        if not self.wants_logprobs:
            return None
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [e["top"] for e in entries],
            "text_offset": [e["offset"] for e in entries],
        }

    def choice(self, text: str, entries: list[dict], reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": self.logprobs(entries), "finish_reason": reason}

    def opening(self) -> list[dict]:
        return []

    def chunk(self, text: str, entries: list[dict], reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": self.logprobs(entries) if entries else None, "finish_reason": reason}


def _usage(fin: Finished) -> dict:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": fin.cached_tokens},
    }


class _EventStream(StreamingResponse):
    """Server-sent events of a request, which is abandoned whichever way the response ends: a client that leaves while a
    chunk is being sent, or before the first, leaves the events' generator suspended or unstarted, never to cancel."""

    def __init__(self, channel: _EventChannel, chunks: AsyncIterator[str]) -> None:
        super().__init__(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.channel = channel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.channel.abandon()


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def _answer(request: Request, backend: Any, body: _Common, req: GenRequest, shape: _ChatShape | _TextShape) -> Response:
    """Submit `req`; answer with one object, or with server-sent chunks when the client asked for a stream."""
    texts = _TokenTexts(backend.tokenizer, req.prompt_ids)
    channel = _EventChannel(backend, req)
    head = {"id": shape.id_prefix + uuid.uuid4().hex, "created": int(time.time()), "model": backend.model_id}
    if body.stream:
        return _EventStream(channel, _chunks(request, channel, texts, shape, head, body.include_usage()))
    pieces, entries = [], []
    async for event in channel.events(request):
        if isinstance(event, Piece):
            pieces.append(event.text)
            if (rows := texts.step(event)) is not None:
                entries.append(shape.entry(rows))
        elif isinstance(event, Finished):
            choice = shape.choice("".join(pieces) + event.text, entries, event.reason)
            return JSONResponse({**head, "object": shape.object, "choices": [choice], "usage": _usage(event)})
        else:
            raise ApiError(503, event.message)
    return Response(status_code=499)  # the client left: nobody reads this ("client closed request", as nginx logs it)


async def _chunks(
    request: Request, channel: _EventChannel, texts: _TokenTexts, shape: _ChatShape | _TextShape, head: dict, include_usage: bool
) -> AsyncIterator[str]:
    """The stream: an opening chunk (chat), a chunk per token with text or logprobs, any held-back text, a last chunk with
    the finish reason, the usage chunk when asked, [DONE]. A failure ends it with an error event instead."""
    head = {**head, "object": shape.chunk_object}
    extra = {"usage": None} if include_usage else {}
    if opening := shape.opening():
        yield _sse({**head, "choices": opening, **extra})
    async for event in channel.events(request):
        if isinstance(event, Piece):
            rows = texts.step(event)
            if event.text or rows is not None:
                entries = [shape.entry(rows)] if rows is not None else []
                yield _sse({**head, "choices": [shape.chunk(event.text, entries, None)], **extra})
        elif isinstance(event, Finished):
            if event.text:
                yield _sse({**head, "choices": [shape.chunk(event.text, [], None)], **extra})
            yield _sse({**head, "choices": [shape.chunk("", [], event.reason)], **extra})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(event)})
            yield _sse("[DONE]")
        else:
            yield _sse(_error_body(503, event.message))


# ---------------------------------------------------------------- the gate


class _Gate:
    """What every HTTP request passes before routing, as pure ASGI so that it covers unknown routes and bodies sent
    in chunks too: the count for /metrics, the API key, shutdown and loading refusals, and the body's size and time
    limits (the body is read here, up to the limit, and handed on). A /v1 body is JSON whatever its Content-Type says
    (`curl -d` sends a form's type, some clients none), as llama.cpp's server reads it."""

    def __init__(self, app: ASGIApp, *, backend: Any, api_key: str | None, max_body_bytes: int, body_timeout_s: float,
                 state: Any) -> None:
        self.app, self.backend, self.api_key, self.state = app, backend, api_key, state
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts: an exception escaped

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None:
                received = [0]  # bytes of the body so far, for the message when it is late
                try:
                    body = await asyncio.wait_for(self._body(scope, receive, received), self.body_timeout_s)
                except TimeoutError:
                    length = Headers(scope=scope).get("content-length")
                    said = f"Content-Length said {length} bytes, " if length else ""
                    body, refusal = None, _error(408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                                                      f"({said}{received[0]} arrived); send the whole body at once")
                if body is not None:
                    if scope["path"].startswith("/v1/"):
                        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
                    await self.app(scope, _replay(body, receive), counted)
                    return
                refusal = refusal or _error(413, f"the request body is over the limit of {self.max_body_bytes} bytes")
            await refusal(scope, receive, counted)
        finally:
            path = scope["path"]
            self.backend.metrics.request(path if path in _ENDPOINTS else "other", status)

    def _refusal(self, scope: Scope) -> Response | None:
        path = scope["path"]
        if self.api_key is not None and path != "/health":
            given = Headers(scope=scope).get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return _error(
                    401, "missing or wrong API key: send the header `Authorization: Bearer <key>`", code="invalid_api_key"
                )
        if path.startswith("/v1/"):
            if self.state.shutting_down:
                return _error(503, "the server is shutting down")
            if not self.backend.ready.is_set():
                return _error(503, "the model is still loading: try again once GET /health answers 200", code="model_loading")
        return None

    async def _body(self, scope: Scope, receive: Receive, received: list[int]) -> bytes | None:
        """The whole body, or None past the limit: a Content-Length over it is refused unread, a body sent in chunks
        as soon as it passes it. `received[0]` counts the bytes as they come."""
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: the handler will find out
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            received[0] = size
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands over the body already read, then the client's later messages (its disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


# ---------------------------------------------------------------- the app


def make_app(backend: Any, *, api_key: str | None = None, max_body_bytes: int = 2**20,
             body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The API over `backend` (see the module's docstring). With `api_key`, every endpoint but /health wants
    `Authorization: Bearer <api_key>`."""
    app = FastAPI(title="dllama_mpi", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.shutting_down = False
    created = int(time.time())
    app.add_middleware(_Gate, backend=backend, api_key=api_key, max_body_bytes=max_body_bytes,
                       body_timeout_s=body_timeout_s, state=app.state)
    app.add_exception_handler(ApiError, lambda _, e: _error(e.status, e.message, e.param, e.code))
    app.add_exception_handler(RequestValidationError, lambda _, e: _validation_error(e))
    app.add_exception_handler(HTTPException, lambda _, e: _error(e.status_code, str(e.detail)))
    app.add_exception_handler(Exception, lambda _, e: _error(500, f"internal error ({type(e).__name__}); see the server's log"))

    def check_model(model: str | None) -> None:
        if model is not None and model != backend.model_id:
            raise ApiError(
                400, f"model {model!r} is not served here: this server serves {backend.model_id!r}", "model", "model_not_found"
            )

    def checked(param: str, ids: list[int], remedy: str) -> list[int]:
        try:
            check_prompt_length(len(ids), backend.max_seq_len, remedy)
        except InputError as e:
            raise ApiError(400, str(e), param) from e
        return ids

    async def tokenized(param: str, tokenize: Callable[..., list[int]], *args: Any, remedy: str) -> list[int]:
        """`tokenize(*args)` run in a worker thread (the event loop keeps answering), its InputError a 400."""
        try:
            return checked(param, await run_in_threadpool(tokenize, *args), remedy)
        except InputError as e:
            raise ApiError(400, str(e), param) from e

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        check_model(body.model)
        messages = [m.model_dump() for m in body.messages]
        ids = await tokenized("messages", templates.prompt_ids, backend.tokenizer, messages, True, backend.max_seq_len,
                              remedy="shorten the conversation")
        req = GenRequest(
            prompt_ids=ids,
            max_tokens=body.max_completion_tokens or body.max_tokens,
            sampling=body.sampling(),
            stop=body.stops(),
            stop_ids=body.stop_ids(),
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        )
        return await _answer(request, backend, body, req, _ChatShape(bool(body.logprobs)))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        tokenizer = backend.tokenizer
        if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], str)):
            text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]

            def encode() -> list[int]:
                check_prompt_text(tokenizer, text, backend.max_seq_len, "shorten it")
                # special-token text in a plain prompt is read as those tokens, by every kind of
                # tokenizer (as llama.cpp's server and Hugging Face's tokenizers do)
                return tokenizer.encode(text, bos=True, special=True)

            ids = await tokenized("prompt", encode, remedy="shorten it")
        else:
            bad = [t for t in body.prompt if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})", "prompt")
            ids = checked("prompt", body.prompt, "shorten it")
        req = GenRequest(
            prompt_ids=ids,
            max_tokens=body.max_tokens,
            sampling=body.sampling(),
            stop=body.stops(),
            stop_ids=body.stop_ids(),
            logprobs=body.logprobs,
        )
        return await _answer(request, backend, body, req, _TextShape(body.logprobs is not None))

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": backend.model_id,
            "object": "model",
            "created": created,
            "owned_by": "dllama_mpi",
            "max_model_len": backend.max_seq_len,
        }
        return {"object": "list", "data": [card]}

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' and uptime checkers' probe
    async def health() -> JSONResponse:
        if app.state.shutting_down:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        if not backend.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        slots = getattr(backend, "slot_count", None)
        return JSONResponse({"status": "ok", **({"slots": slots()} if slots else {})})

    @app.get("/metrics")
    async def metrics() -> Response:
        content, content_type = backend.metrics.render()
        return Response(content, media_type=content_type)

    return app


class _Connection(H11Protocol):
    """uvicorn's HTTP/1.1 connection with the two limits it lacks against slow or many clients (uvicorn times out only
    idle keep-alive connections, and its limit_concurrency answers plain text): a request's line and headers must
    arrive within `header_timeout_s` of the connection opening or of its last response (one that trickles them in, as
    slowloris does, is answered 408 and closed), and a connection beyond `max_connections` open is answered 503 in
    OpenAI's shape and closed."""

    header_timeout_s = HEADER_TIMEOUT_S
    max_connections = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_due: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            self._refuse(503, "Service Unavailable", f"the server has {self.max_connections} connections open, its "
                         "limit; try again shortly")
        else:
            self._await_headers()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self._headers_due is not None:  # a request's headers came in
            self._headers_due.cancel()
            self._headers_due = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete:
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
        self._headers_due = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        self._headers_due = None
        self._refuse(408, "Request Timeout", f"the request's headers did not arrive within {self.header_timeout_s:g} s")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        if self.transport.is_closing():
            return
        body = json.dumps(_error_body(status, message)).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason.encode(), len(body), body))
        self.transport.close()


class Server:
    """uvicorn serving `app` on a thread of its own, since rank 0's main thread runs the scheduler. Off the main thread
    uvicorn installs no signal handlers (Server.capture_signals checks), so SIGTERM stays the serve command's."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *,
                 header_timeout_s: float = HEADER_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS,
                 **options: Any) -> None:
        """`options` go to uvicorn.Config; log_level "warning" and timeout_graceful_shutdown 5 s unless given there.
        Connections are _Connection's, with these limits."""
        self.app, self.host, self._port = app, host, port
        limits = {"header_timeout_s": header_timeout_s, "max_connections": max_connections}
        options = {"log_level": "warning", "timeout_graceful_shutdown": 5,
                   "http": type("Connection", (_Connection,), limits), **options}
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Listen, then serve on a new thread; return once serving. The socket is bound here so that a taken port
        raises OSError to the caller (uvicorn binding it would log the error and end its thread)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET  # as uvicorn chooses
        # IPPROTO_TCP named, not 0 as socket.create_server leaves it: asyncio sets TCP_NODELAY
        # only on connections of a socket whose proto says TCP; without it, Nagle's algorithm
        # and the client's delayed ACK held every keep-alive response for 40 ms (measured)
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((self.host, self._port))
            self._socket.listen(2048)
        except OSError:
            self._socket.close()
            self._socket = None
            raise
        self._thread = threading.Thread(target=self._server.run, args=([self._socket],), name="http-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (see its log)")
            time.sleep(0.01)

    @property
    def port(self) -> int:
        """The port listened on (the one chosen for port 0)."""
        return self._socket.getsockname()[1]

    def refuse_new(self) -> None:
        """From now on the /v1 endpoints answer 503 "the server is shutting down"; submitted requests run on."""
        self.app.state.shutting_down = True

    def stop(self) -> None:
        """Stop listening, let open responses end (for timeout_graceful_shutdown at most) and join; also after a failed
        start."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
        if self._socket is not None:
            self._socket.close()
