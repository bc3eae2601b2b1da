"""A generation request and what comes back from it: the contract between the clients (the
HTTP server's thread, the interactive chat, the one-shot CLI) and the scheduler, which runs
on rank 0's main thread and alone drives the engine.

A client builds a GenRequest from token ids (tokenizing and templating are the client's
work), submits it, and receives events through `emit`, called on the scheduler's thread:
zero or more Piece, then exactly one Finished or Failed (Refused, a Failed, when the request
never got a slot: the queue was full or its wait too long). `emit` must be quick and must not
raise (the HTTP side hands events to its event loop with call_soon_threadsafe).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    from .constraints import Constraint


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # this request's own generator; None: from the clock


@dataclass
class GenRequest:
    prompt_ids: list[int]  # BOS included when the model wants one; 1 <= len <= the context
    max_tokens: int | None  # new tokens at most; None: up to the end of the context
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()  # stop strings: never sent, not even a prefix of one
    stop_ids: tuple[int, ...] | None = None  # end-of-generation tokens; None: the model's
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k
    prediction: tuple[int, ...] = ()  # tokens the answer is expected to repeat (OpenAI's prediction): lookup drafts
    constraint: Constraint | None = None  # the grammar the answer must follow (constraints.py), token by token
    emit: Callable[[object], None] | None = None  # gets Piece..., then Finished or Failed; set before submitting
    cancelled: threading.Event = field(default_factory=threading.Event)  # set by the client: stop at the next step
    request_id: str = ""  # the client's name for it (the API's response id), shown by GET /slots


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token, logprob), most likely first


@dataclass(frozen=True)
class Piece:
    """One sampled token. `text` is what may be shown now: complete UTF-8, with any text that
    could still become a stop string held back (it may be empty; it may also carry text held
    back from earlier tokens)."""

    token: int
    text: str
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (a stop token or string) or "length" (max_tokens, or the end of the context)
    text: str  # the rest of the held-back text, sent before finishing ("" after a stop string)
    prompt_tokens: int
    cached_tokens: int  # of the prompt, taken from a slot's KV cache rather than computed
    completion_tokens: int
    first_token_s: float  # from submission to the first sampled token
    decode_s: float  # from the first sampled token to the last
    stop_token: int | None = None  # the end-of-generation token that ended it (sampled, counted, never shown)
    drafted: int = 0  # speculation: tokens drafted for it, of which `accepted` the model kept (and gave)
    accepted: int = 0
    steps: int = 0  # decoding steps with speculation (0: none)


@dataclass(frozen=True)
class Failed:
    message: str  # the server is shutting down, or the request was cancelled


@dataclass(frozen=True)
class Refused(Failed):
    """Not run, no token generated: the server is at capacity (its queue was full when the request
    came, or no slot freed within the queue timeout); the same request may succeed later."""

    retry_after_s: int = 1  # when trying again is worth it (HTTP's Retry-After)


def check_utf8(text: str, what: str, remedy: str) -> None:
    """InputError unless `text` is valid UTF-8, which every tokenizer takes: bytes that were not
    UTF-8 reach a str as lone surrogates (the command line, a terminal: Python's surrogateescape),
    and so may JSON's "\\udc80". `what` names the text, `remedy` says what to do."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        found = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        raise InputError(f"{what} is not valid UTF-8 ({found} at character {exc.start}); {remedy}") from None


def check_prompt_length(n_tokens: int, max_seq_len: int, remedy: str, context: str = "the context") -> None:
    """InputError unless a prompt of n_tokens runs in a context of max_seq_len tokens (a
    prompt that fills it still gets one token: the logits of its last position). `remedy`
    says how to make a long prompt fit; `context` names the context as the user set it."""
    if n_tokens > max_seq_len:
        raise InputError(f"the prompt is {n_tokens} tokens but {context} holds {max_seq_len}; {remedy}")
    if n_tokens == 0:
        raise InputError("the prompt is empty (no tokens); give at least one")


PREFIX_CHARS_PER_TOKEN = 8  # the prefix encoded first: this many characters per context token (text averages 3-5)


def check_prompt_text(tokenizer, text: str, max_seq_len: int, remedy: str, context: str = "the context") -> None:
    """InputError when `text` surely can't fit a context of max_seq_len tokens, found at a cost
    bounded by the context rather than by the text: encoding holds Python's lock (about 1 s a
    MiB in the tokenizers library, 3 s in ours), which the thread driving the ranks then waits
    out. First the tokenizer's lower bound from the text's size (no encoding); then, for a text
    longer than a context of ordinary tokens, its first part alone, cut at a space: more tokens
    there than the context and a margin for the cut (a token may not span it) is too many."""
    if (at_least := tokenizer.min_tokens(text)) > max_seq_len:
        raise InputError(f"the prompt is at least {at_least} tokens ({len(text.encode('utf-8', 'surrogatepass'))} "
                         f"bytes) but {context} holds {max_seq_len}; {remedy}")
    limit = max_seq_len + max_seq_len // 8 + 8
    end = PREFIX_CHARS_PER_TOKEN * limit
    if len(text) <= end:
        return
    space = text.rfind(" ", 0, end)
    end = space if space > end // 2 else end
    if (n := len(tokenizer.encode(text[:end], bos=False, special=True))) > limit:
        raise InputError(f"the prompt is over {max_seq_len} tokens (its first {end} characters alone are {n}) but "
                         f"{context} holds {max_seq_len}; {remedy}")
