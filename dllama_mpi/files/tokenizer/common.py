"""What the tokenizer kinds share: GGUF's token types, byte pieces, the cut at special tokens, and
the decoder that turns a token stream into text."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable

BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback piece: the byte it stands for
SPACE = "\u2581"  # sentencepiece's escaped space

# GGUF token types (llama.cpp ``llama_token_type``).
TOKEN_UNDEFINED, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(7)


def unique(ids: Iterable[int | None]) -> tuple[int, ...]:
    """The ids in order, each once, leaving out None and negative ones (none)."""
    out: list[int] = []
    for i in ids:
        if i is not None and int(i) >= 0 and int(i) not in out:
            out.append(int(i))
    return tuple(out)


def alternatives(texts: list[str]) -> re.Pattern[str] | None:
    """A regex matching any of `texts` (longest first, so a token is not matched by its prefix), one group
    around the whole; None for no texts."""
    if not texts:
        return None
    alts = sorted(set(texts), key=lambda t: (-len(t), t))
    return re.compile("(" + "|".join(map(re.escape, alts)) + ")")


def split_at(text: str, spans: Iterable[tuple[int, int, int]]) -> list[tuple[str, int | None]]:
    """``text`` cut at the ``(start, end, token id)`` spans (in order, disjoint): ``(span text, id)``
    for each, ``(text, None)`` between them, no empty pieces."""
    out: list[tuple[str, int | None]] = []
    pos = 0
    for start, end, token_id in spans:
        if start > pos:
            out.append((text[pos:start], None))
        out.append((text[start:end], token_id))
        pos = end
    if pos < len(text):
        out.append((text[pos:], None))
    return out


class StreamDecoder:
    """Turns a token stream into text, holding back incomplete UTF-8 sequences (`tokenizer`: any kind,
    through its ``decode(prev, token) -> bytes`` and ``vocab_size``)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, prev_token: int, token: int) -> str:
        if not 0 <= token < self._tokenizer.vocab_size:
            return ""  # a model's padding rows beyond the tokenizer (vocab_size rounded up) have no text
        return self._utf8.decode(self._tokenizer.decode(prev_token, token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
