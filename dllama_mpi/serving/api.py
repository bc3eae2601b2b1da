"""The OpenAI-compatible HTTP API of `python -m dllama_mpi serve`: the app and the server it runs on.

`make_app(backend)` builds the FastAPI app: POST /v1/chat/completions and /v1/completions
(protocol.py: the requests and the error shape; responses.py: the answers, plain JSON or
server-sent events), GET /v1/models, /slots, /health and /metrics, and the chat page at / (its
files in static/). Before routing, every request passes the gate: the API key, shutdown and
loading refusals, the queue's limit (429 before the body is read), the body's size and time
limits. Server runs it on uvicorn with limits on slow and many connections.

A handler tokenizes the prompt (in a worker thread: a long prompt must not stall /health),
checks its fit in the context and submits a GenRequest (dllama_mpi.serving.request) to the
backend, the scheduler on rank 0's main thread. A chat with tools also gets the reader of the
template's tool-call format, and a forced call its grammar (tool_calls.py).

The backend is duck-typed: `model_id`, `max_seq_len`, `tokenizer` and `grammars` (constraints.Grammars; both None
until loaded),
`ready` (a threading.Event), `metrics` (dllama_mpi.serving.metrics.Metrics), `submit(req)`
(thread-safe), `refusal()` (a request.Refused when the queue is full, else None), `slots_state()`
for /slots (thread-safe, the scheduler's snapshot) and optionally `slot_count()` for /health.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import InputError
from . import templates, tool_calls
from .constraints import Constraint, Grammar
from .protocol import ApiError, ChatRequest, CommonRequest, CompletionRequest, error, error_body, validation_error
from .request import GenRequest, check_prompt_length, check_prompt_text
from .responses import ChatShape, TextShape, answer, refused
from .tool_calls import CallReader

_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/slots", "/health", "/metrics", "/", "/static"}
_GENERATING = {"/v1/chat/completions", "/v1/completions"}  # the endpoints whose requests wait for a slot
_OPEN = {"/health", "/", "/static"}  # what needs no API key: the probe, and the chat page, which asks for the key
STATIC = Path(__file__).with_name("static")  # the chat page's files, served under /static
HEADER_TIMEOUT_S = 10.0  # a connection's request line and headers must arrive within this (then it is closed)
BODY_TIMEOUT_S = 30.0  # and its body within this once the headers are in (else 408)
MAX_CONNECTIONS = 256  # open connections at most; one more is answered 503 and closed


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
                    body, refusal = None, error(408, f"the request body did not arrive within {self.body_timeout_s:g} s "
                                                      f"({said}{received[0]} arrived); send the whole body at once")
                if body is not None:
                    if scope["path"].startswith("/v1/"):
                        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
                    await self.app(scope, _replay(body, receive), counted)
                    return
                refusal = refusal or error(413, f"the request body is over the limit of {self.max_body_bytes} bytes")
            await refusal(scope, receive, counted)
        finally:
            self.backend.metrics.request(_endpoint(scope["path"]), status)

    def _refusal(self, scope: Scope) -> Response | None:
        path = scope["path"]
        if self.api_key is not None and _endpoint(path) not in _OPEN:
            given = Headers(scope=scope).get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return error(
                    401, "missing or wrong API key: send the header `Authorization: Bearer <key>`", code="invalid_api_key"
                )
        if path.startswith("/v1/"):
            if self.state.shutting_down:
                return error(503, "the server is shutting down")
            if not self.backend.ready.is_set():
                return error(503, "the model is still loading: try again once GET /health answers 200", code="model_loading")
            if path in _GENERATING and (full := self.backend.refusal()) is not None:
                return refused(full)
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


def _endpoint(path: str) -> str:
    """A request's endpoint as /metrics counts it: the page's files as one, a path served by none as "other"."""
    if path.startswith("/static/"):
        path = "/static"
    return path if path in _ENDPOINTS else "other"


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

# the chat page and its files: nothing from elsewhere, not framed by another site (clickjacking), types as sent
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
                 "X-Content-Type-Options": "nosniff"}


class _PageFiles(StaticFiles):
    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(_PAGE_HEADERS)
        return response



def make_app(backend: Any, *, api_key: str | None = None, max_body_bytes: int = 2**20,
             body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The API over `backend` (see the module's docstring). With `api_key`, every endpoint but /health and the chat
    page's files wants `Authorization: Bearer <api_key>`."""
    app = FastAPI(title="dllama_mpi", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.shutting_down = False
    created = int(time.time())
    app.add_middleware(_Gate, backend=backend, api_key=api_key, max_body_bytes=max_body_bytes,
                       body_timeout_s=body_timeout_s, state=app.state)
    app.add_exception_handler(ApiError, lambda _, e: error(e.status, e.message, e.param, e.code))
    app.add_exception_handler(RequestValidationError, lambda _, e: validation_error(e))
    app.add_exception_handler(HTTPException, lambda _, e: error(e.status_code, str(e.detail)))
    app.add_exception_handler(Exception, lambda _, e: error(500, f"internal error ({type(e).__name__}); see the server's log"))

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

    async def prediction_ids(body: CommonRequest) -> tuple[int, ...]:
        """The predicted output's tokens (plain text: no BOS, special-token text kept as text)."""
        if body.prediction is None:
            return ()
        ids = await run_in_threadpool(backend.tokenizer.encode, body.prediction.text(), bos=False, special=False)
        return tuple(ids[: backend.max_seq_len])  # no answer is longer

    async def compiled(param: str, grammar: Callable[[], Grammar]) -> Constraint:
        """grammar() compiled for one answer (in a worker thread: a big schema takes a while); what
        llguidance or the request's shape refuses is a 400 naming `param`."""
        try:
            return await run_in_threadpool(lambda: backend.grammars.compile(grammar()))
        except InputError as e:
            raise ApiError(400, str(e), param) from e

    async def constraint(body: CommonRequest) -> Constraint | None:
        """The request's response_format, compiled; None for plain text."""
        form = body.response_format
        return None if form is None or form.type == "text" else await compiled("response_format", form.grammar)

    async def tool_use(body: ChatRequest) -> tuple[CallReader | None, Constraint | None]:
        """What reads the answer's tool calls in the template's format (None: it may make none), and for tool_choice
        "required" or a named tool the grammar that makes the answer calls, compiled (in a worker thread)."""
        mode = body.tool_mode()
        if mode == "none":
            return None, None
        try:
            fmt = tool_calls.format_of(backend.tokenizer.chat_template)
        except InputError as e:
            raise ApiError(400, str(e), "tools") from e
        reader = CallReader(fmt, frozenset(tool.function.name for tool in body.tools))
        if mode == "auto":
            return reader, None
        return reader, await compiled("tools", lambda: fmt.grammar(body.forced_tools(), bool(body.parallel_tool_calls)))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        check_model(body.model)
        messages = [m.model_dump() for m in body.messages]
        tools = body.tool_dicts() if body.tool_mode() != "none" else None  # "none": the template shows none
        ids = await tokenized("messages", templates.prompt_ids, backend.tokenizer, messages, True, backend.max_seq_len,
                              tools, remedy="shorten the conversation")
        calls, forced = await tool_use(body)
        req = GenRequest(
            prompt_ids=ids,
            max_tokens=body.max_completion_tokens or body.max_tokens,
            sampling=body.sampling(),
            stop=body.stops(),
            stop_ids=body.stop_ids(),
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            prediction=await prediction_ids(body),
            constraint=forced if forced is not None else await constraint(body),  # protocol.py allows only one
        )
        return await answer(request, backend, body, req, ChatShape(bool(body.logprobs), calls))

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
            prediction=await prediction_ids(body),
            constraint=await constraint(body),
        )
        return await answer(request, backend, body, req, TextShape(body.logprobs is not None))

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

    @app.get("/slots")
    async def slots() -> dict:
        if not backend.ready.is_set():
            raise ApiError(503, "the model is still loading: try again once GET /health answers 200", code="model_loading")
        return backend.slots_state()

    @app.get("/metrics")
    async def metrics() -> Response:
        content, content_type = backend.metrics.render()
        return Response(content, media_type=content_type)

    # the chat page: it talks to /v1/chat/completions as any client does, and loads nothing from elsewhere
    app.mount("/static", _PageFiles(directory=STATIC), name="static")

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)

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
        body = json.dumps(error_body(status, message)).encode()
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
        # and the client's delayed ACK held back every keep-alive response
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
