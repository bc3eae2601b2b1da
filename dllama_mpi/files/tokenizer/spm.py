"""Sentencepiece vocabularies as llama.cpp runs them (GGUF ``tokenizer.ggml.model == "llama"``):
its ``llm_tokenizer_spm`` encoding and its detokenizer."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from ...errors import InputError
from .common import (
    BYTE_PIECE,
    SPACE,
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_USER_DEFINED,
    alternatives,
    split_at,
    unique,
)
from .llama2c import Tokenizer

_UNK_OUTPUT = "\u2585".encode()  # llama.cpp prints unknown tokens as U+2585


class SpmTokenizer(Tokenizer):
    """Sentencepiece vocabulary (GGUF ``tokenizer.ggml.model == "llama"``), encoded like llama.cpp.

    Pieces are UTF-8 with ``"▁"`` for spaces.  Encoding (``llm_tokenizer_spm``):
    optional dummy prefix " ", spaces escaped to "▁", one symbol per codepoint,
    then repeatedly merge the adjacent pair whose concatenation is a token with
    the highest score (leftmost on ties); symbols that are not tokens become byte
    tokens (``<0xXX>``, located by text wherever they sit in the vocabulary).
    User-defined tokens are always matched as whole tokens; control tokens only
    with ``encode(..., special=True)``.
    """

    def __init__(
        self,
        pieces: Sequence[bytes | str],
        scores: np.ndarray | Sequence[float],
        token_types: np.ndarray | Sequence[int] | None = None,
        bos_id: int = 1,
        eos_id: int = 2,
        eos_ids: Sequence[int] | None = None,
        unk_id: int = 0,
        add_bos: bool = True,
        add_space_prefix: bool = True,
        chat_template: str | None = None,
    ) -> None:
        self.pieces = [p.encode("utf-8", "surrogateescape") if isinstance(p, str) else bytes(p) for p in pieces]
        n = len(self.pieces)
        self.scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        self.texts: list[str] = [p.decode("utf-8", "surrogateescape") for p in self.pieces]
        if token_types is None:
            token_types = [TOKEN_BYTE if BYTE_PIECE.fullmatch(p) else TOKEN_NORMAL for p in self.pieces]
        self.token_types = np.asarray(token_types, dtype=np.int32).reshape(-1)
        self.bos_id, self.eos_id, self.unk_id = int(bos_id), int(eos_id), int(unk_id)
        self.add_bos = bool(add_bos)
        self.add_space_prefix = self.add_dummy_prefix = bool(add_space_prefix)
        self.chat_template = chat_template or None
        if self.scores.shape != (n,):
            raise InputError(f"expected {n} scores (one per piece), got shape {self.scores.shape}")
        if self.token_types.shape != (n,):
            raise InputError(f"expected {n} token types (one per piece), got shape {self.token_types.shape}")
        for name, value in (("bos_id", self.bos_id), ("eos_id", self.eos_id), ("unk_id", self.unk_id)):
            if not 0 <= value < n:
                raise InputError(f"{name}={value} is outside the vocabulary [0, {n})")
        self._eos_ids = unique([self.eos_id, *(eos_ids or ())])
        # llama.cpp's token_to_id: every token, the last one wins on duplicate texts.
        self._text_to_id: dict[str, int] = {t: i for i, t in enumerate(self.texts)}
        self._score_list: list[float] = self.scores.tolist()
        self._byte_ids = [self._find_byte_token(b) for b in range(256)]
        types = self.token_types.tolist()
        self._user_defined = [t for t, k in zip(self.texts, types) if k == TOKEN_USER_DEFINED and t]
        self._specials = [t for t, k in zip(self.texts, types) if k in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED) and t]
        self._split_plain = alternatives(self._user_defined)
        self._split_special = alternatives(self._specials)
        self._decoded = [self._token_output(i, k) for i, k in enumerate(types)]
        # llama.cpp detokenize strips one leading space of the first piece (the dummy prefix).
        self._decoded_after_bos = [
            d[1:] if self.add_space_prefix and d[:1] == b" " else d for d in self._decoded
        ]

    def _find_byte_token(self, b: int) -> int:
        tid = self._text_to_id.get(f"<0x{b:02X}>")
        if tid is None:
            tid = self._text_to_id.get(chr(b)) if b < 0x80 else None
        return self.unk_id if tid is None else tid

    def _token_output(self, i: int, kind: int) -> bytes:
        if kind in (TOKEN_NORMAL, TOKEN_USER_DEFINED):
            return self.texts[i].replace(SPACE, " ").encode("utf-8", "surrogateescape")
        if kind == TOKEN_BYTE:
            return self._piece_output(self.pieces[i])
        if kind == TOKEN_UNKNOWN:
            return _UNK_OUTPUT
        return b""  # control, unused, undefined: not printed

    def token_text(self, token_id: int) -> str:
        return self.texts[token_id]

    def split_special(self, text: str) -> list[tuple[str, int | None]]:
        matches = self._split_special.finditer(text) if self._split_special is not None else ()
        return split_at(text, ((m.start(), m.end(), self._text_to_id[m.group()]) for m in matches))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    # ------------------------------------------------------------ encode/decode

    def encode(self, text: str, bos: bool = True, eos: bool = False, special: bool = False) -> list[int]:
        """``bos=True`` adds BOS when the vocabulary asks for it (``add_bos``)."""
        ids: list[int] = []
        if bos and self.add_bos:
            ids.append(self.bos_id)
        splitter = self._split_special if special else self._split_plain
        parts = splitter.split(text) if splitter is not None else [text]
        prev_special = True  # llama.cpp: prefix with a space at the start and after a special token
        for k, part in enumerate(parts):
            if k % 2:  # captured special-token text
                ids.append(self._text_to_id[part])
                prev_special = True
                continue
            if not part:
                continue
            if self.add_space_prefix and prev_special:
                part = " " + part
            self._encode_fragment(part.replace(" ", SPACE), ids)
            prev_special = False
        if eos:
            ids.append(self.eos_id)
        return ids

    def _encode_fragment(self, text: str, out: list[int]) -> None:
        """llama.cpp ``llm_tokenizer_spm_session::tokenize`` on one escaped fragment."""
        texts = list(text)
        n = len(texts)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        lookup, scores = self._text_to_id, self._score_list
        heap: list[tuple[float, int, int, str]] = []

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            merged = texts[left] + texts[right]
            tid = lookup.get(merged)
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, right, merged))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if not texts[left] or not texts[right] or texts[left] + texts[right] != merged:
                continue  # stale: one side merged since
            texts[left], texts[right] = merged, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        i = 0
        while i != -1:
            tid = lookup.get(texts[i])
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._byte_ids[b] for b in texts[i].encode("utf-8", "surrogatepass"))
            i = nxt[i]

