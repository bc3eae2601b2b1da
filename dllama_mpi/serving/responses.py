"""The answers of the OpenAI-compatible API: a submitted request's events, emitted on the
scheduler's thread, brought onto the event loop and shaped into one chat.completion or
text_completion object, or into server-sent chunks; logprobs in each endpoint's shape. A client
that leaves before the end has its request cancelled, which frees its slot. A stream starts with
the request's first event, so that a request that never ran (Refused: 429, or Failed: 503) gets
that status, as a non-streamed one does."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from .protocol import CommonRequest, error, error_body
from .request import Failed, Finished, GenRequest, Piece, Refused, TokenLogprob
from .tool_calls import CallReader, ToolCall

_POLL_S = 0.1  # how often a handler checks whether its client has left, while tokens come and while they don't
_MIN_LOGPROB = -9999.0  # JSON has no -Infinity: a token the sampler excluded shows this (as vLLM does)


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


class ChatShape:
    """chat.completion objects: a message, or deltas in chunks; logprobs as {"content": [...]}. With a CallReader, an
    answer that is tool calls becomes the message's tool_calls (content: the text before them, or null) and finishes
    with "tool_calls"; streamed, text that may begin a call is held back, and each call comes whole in a delta of its
    own once the answer has ended."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def __init__(self, logprobs: bool, calls: CallReader | None = None) -> None:
        self.wants_logprobs = logprobs
        self.calls = calls

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
        if self.calls is not None and (calls := self.calls.finish(text)[1]):
            content = self.calls.shown
            message = {"role": "assistant", "content": content if content.strip() else None,
                       "tool_calls": [_call_dict(call) for call in calls]}
            reason = "tool_calls"
        return {"index": 0, "message": message, "logprobs": self.logprobs(entries), "finish_reason": reason}

    def opening(self) -> list[dict]:
        return [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]

    def shown(self, text: str) -> str:
        """Of a piece's text, what a chunk may show now."""
        return text if self.calls is None else self.calls.feed(text)

    def chunk(self, text: str, entries: list[dict], reason: str | None) -> dict:
        delta = {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": self.logprobs(entries) if entries else None, "finish_reason": reason}

    def closing(self, text: str, reason: str) -> list[dict]:
        """The last chunks' choices, after the held-back `text`: its content, any calls, the finish reason."""
        rest, calls = (text, []) if self.calls is None else self.calls.finish(text)
        deltas = [{"tool_calls": [{"index": i, **_call_dict(call)}]} for i, call in enumerate(calls)]
        return ([self.chunk(rest, [], None)] * bool(rest)
                + [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None} for delta in deltas]
                + [self.chunk("", [], "tool_calls" if calls else reason)])


def _call_dict(call: ToolCall) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


class TextShape:
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

    @staticmethod
    def shown(text: str) -> str:
        return text

    def chunk(self, text: str, entries: list[dict], reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": self.logprobs(entries) if entries else None, "finish_reason": reason}

    def closing(self, text: str, reason: str) -> list[dict]:
        return [self.chunk(text, [], None)] * bool(text) + [self.chunk("", [], reason)]


def _usage(fin: Finished) -> dict:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": fin.cached_tokens},
        # speculation's drafts, in the fields OpenAI gives its predicted outputs: those the model kept
        # (and are part of the completion) and those it rejected (never shown, not counted in it)
        "completion_tokens_details": {"accepted_prediction_tokens": fin.accepted,
                                      "rejected_prediction_tokens": fin.drafted - fin.accepted},
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


def refused(event: Refused) -> JSONResponse:
    """429 in OpenAI's shape for a rate limit, with Retry-After."""
    response = error(429, event.message, code="rate_limit_exceeded")
    response.headers["Retry-After"] = str(event.retry_after_s)
    return response


async def answer(request: Request, backend: Any, body: CommonRequest, req: GenRequest, shape: ChatShape | TextShape) -> Response:
    """Submit `req`; answer with one object, or with server-sent chunks when the client asked for a stream."""
    texts = _TokenTexts(backend.tokenizer, req.prompt_ids)
    head = {"id": shape.id_prefix + uuid.uuid4().hex, "created": int(time.time()), "model": backend.model_id}
    req.request_id = head["id"]
    channel = _EventChannel(backend, req)
    events = channel.events(request)
    if body.stream:
        first = await anext(events, None)
        if first is None:
            return Response(status_code=499)
        if isinstance(first, Failed):
            return _failed(first)
        return _EventStream(channel, _chunks(_prepend(first, events), texts, shape, head, body.include_usage()))
    pieces, entries = [], []
    async for event in events:
        if isinstance(event, Piece):
            pieces.append(event.text)
            if (rows := texts.step(event)) is not None:
                entries.append(shape.entry(rows))
        elif isinstance(event, Finished):
            choice = shape.choice("".join(pieces) + event.text, entries, event.reason)
            return JSONResponse({**head, "object": shape.object, "choices": [choice], "usage": _usage(event)})
        else:
            return _failed(event)
    return Response(status_code=499)  # the client left: nobody reads this ("client closed request", as nginx logs it)


def _failed(event: Failed) -> JSONResponse:
    return refused(event) if isinstance(event, Refused) else error(503, event.message)


async def _prepend(first: object, rest: AsyncIterator[object]) -> AsyncIterator[object]:
    yield first
    async for event in rest:
        yield event


async def _chunks(
    events: AsyncIterator[object], texts: _TokenTexts, shape: ChatShape | TextShape, head: dict, include_usage: bool
) -> AsyncIterator[str]:
    """The stream of `events` (the first already came): an opening chunk (chat), a chunk per token with text or
    logprobs, any held-back text (and tool calls), a last chunk with the finish reason, the usage chunk when asked,
    [DONE]. A failure ends it with an error event instead."""
    head = {**head, "object": shape.chunk_object}
    extra = {"usage": None} if include_usage else {}
    if opening := shape.opening():
        yield _sse({**head, "choices": opening, **extra})
    async for event in events:
        if isinstance(event, Piece):
            rows = texts.step(event)
            text = shape.shown(event.text)
            if text or rows is not None:
                entries = [shape.entry(rows)] if rows is not None else []
                yield _sse({**head, "choices": [shape.chunk(text, entries, None)], **extra})
        elif isinstance(event, Finished):
            for choice in shape.closing(event.text, event.reason):
                yield _sse({**head, "choices": [choice], **extra})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(event)})
            yield _sse("[DONE]")
        else:
            yield _sse(error_body(503, event.message))
