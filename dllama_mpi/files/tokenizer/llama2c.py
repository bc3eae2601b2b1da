"""llama2.c-style sentencepiece "score BPE" tokenizer.

Mirrors ``build_tokenizer`` / ``encode`` / ``decode`` of Karpathy's llama2.c
``run.c``.  Conventions (fixed by llama2.c's vocabulary):

* id 0 = ``<unk>``, id 1 = BOS, id 2 = EOS;
* ids 3..258 are the byte-fallback pieces ``<0x00>`` .. ``<0xFF>`` (id = byte + 3);
* encoding prepends a dummy space to non-empty text (sentencepiece
  ``add_dummy_prefix``), looks up every UTF-8 codepoint as a piece (falling back
  to its bytes), then repeatedly merges the adjacent pair whose concatenation is
  a piece with the highest score (leftmost pair on ties);
* decoding strips the leading space of a piece that follows BOS and turns
  ``<0xXX>`` pieces into the raw byte.

llama2.c ``tokenizer.bin`` format (little-endian)::

    int32 max_token_length
    vocab_size times: float32 score, int32 length, `length` bytes of piece
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import h5py
import numpy as np

from ...errors import InputError
from .common import BYTE_PIECE, StreamDecoder

BYTE_FALLBACK_OFFSET = 3
NUM_RESERVED = BYTE_FALLBACK_OFFSET + 256  # <unk>, BOS, EOS and the 256 byte pieces

class Tokenizer:
    """Score-BPE tokenizer over a vocabulary of byte-string pieces."""

    chat_template: str | None = None
    add_bos: bool = True
    _longest_piece: int | None = None  # bytes; found on first use (min_tokens)

    def __init__(
        self,
        pieces: Sequence[bytes],
        scores: np.ndarray | Sequence[float],
        bos_id: int = 1,
        eos_id: int = 2,
        add_dummy_prefix: bool = True,
    ) -> None:
        self.pieces: list[bytes] = [bytes(p) for p in pieces]
        self.scores: np.ndarray = np.asarray(scores, dtype=np.float32).reshape(-1)
        self.bos_id = int(bos_id)
        self.eos_id = int(eos_id)
        self.add_dummy_prefix = bool(add_dummy_prefix)
        self._validate()
        # Reserved ids are never produced from text: matching a literal "<0x41>"
        # to the byte token would decode to "A" and break the round trip.
        self._piece_to_id: dict[bytes, int] = {}
        for i in range(NUM_RESERVED, self.vocab_size):
            self._piece_to_id.setdefault(self.pieces[i], i)
        # Python floats: the merge heap compares them without numpy scalar overhead.
        self._score_list: list[float] = self.scores.tolist()
        self._decoded = [self._piece_output(p) for p in self.pieces]
        # run.c strips the space first and then checks for a byte piece.
        self._decoded_after_bos = [self._piece_output(p[1:] if p[:1] == b" " else p) for p in self.pieces]

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text, bos=False)), known without encoding it: a token
        covers at most as many bytes of the text as its piece has (SpmTokenizer's pieces
        spell a space as a 3-byte U+2581), so a prompt far beyond the context is refused
        without the merge work."""
        if self._longest_piece is None:
            self._longest_piece = max(1, max(map(len, self.pieces)))
        return -(-len(text.encode("utf-8", "surrogatepass")) // self._longest_piece)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: EOS, and BOS, which llama2.c models emit between
        stories (llama2.c's own sampler loop stops there)."""
        return (self.eos_id, self.bos_id)

    def _validate(self) -> None:
        n = self.vocab_size
        if n < NUM_RESERVED:
            raise InputError(
                f"tokenizer vocab_size must be >= {NUM_RESERVED} (<unk>, BOS, EOS, 256 byte pieces), got {n}"
            )
        if self.scores.shape != (n,):
            raise InputError(f"expected {n} scores (one per piece), got shape {self.scores.shape}")
        for name, value in (("bos_id", self.bos_id), ("eos_id", self.eos_id)):
            if not 0 <= value < n:
                raise InputError(f"{name}={value} is outside the vocabulary [0, {n})")
        for b in range(256):
            expected = b"<0x%02X>" % b
            found = self.pieces[b + BYTE_FALLBACK_OFFSET]
            if found != expected:
                raise InputError(
                    f"byte-fallback piece for id {b + BYTE_FALLBACK_OFFSET} must be {expected!r}, found {found!r}"
                )

    @staticmethod
    def _piece_output(piece: bytes) -> bytes:
        m = BYTE_PIECE.fullmatch(piece)
        return bytes([int(m.group(1), 16)]) if m else piece

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_llama2c(cls, path: str | PathLike[str], vocab_size: int | None = None) -> Tokenizer:
        """Read a llama2.c ``tokenizer.bin``; ``vocab_size=None`` reads until EOF."""
        data = Path(path).read_bytes()
        bad = f"{path} is not a llama2.c tokenizer.bin, or is damaged"
        if len(data) < 4:
            raise InputError(f"{bad}: expected a 4-byte max_token_length header, file has {len(data)} bytes")
        (max_len,) = struct.unpack_from("<i", data, 0)
        if max_len <= 0:
            raise InputError(f"{bad}: expected a positive max_token_length, found {max_len}")
        pieces: list[bytes] = []
        scores: list[float] = []
        off = 4
        while (vocab_size is None and off < len(data)) or (vocab_size is not None and len(pieces) < vocab_size):
            i = len(pieces)
            if off + 8 > len(data):
                raise InputError(
                    f"{bad}: truncated at token {i}: expected an 8-byte (score, length) header at offset {off}, "
                    f"only {len(data) - off} bytes left"
                )
            score, length = struct.unpack_from("<fi", data, off)
            off += 8
            if not 0 <= length <= max_len:
                raise InputError(f"{bad}: token {i} has length {length}, expected 0..{max_len} (max_token_length)")
            if off + length > len(data):
                raise InputError(
                    f"{bad}: truncated at token {i}: expected {length} piece bytes at offset {off}, "
                    f"only {len(data) - off} bytes left"
                )
            pieces.append(data[off : off + length])
            scores.append(score)
            off += length
        if off != len(data):
            raise InputError(
                f"{bad}: expected {vocab_size} tokens ending at byte {off}, but the file has {len(data) - off} "
                "trailing bytes (wrong vocab_size?)"
            )
        return cls(pieces, np.array(scores, dtype=np.float32))

    @classmethod
    def synthetic(cls, vocab_size: int) -> Tokenizer:
        """Deterministic llama2.c-shaped vocabulary for demo models with meaningless weights."""
        from .synthetic import synthetic_vocabulary

        return cls(*synthetic_vocabulary(vocab_size))

    # -------------------------------------------------------------------- HDF5

    def write_hdf5(self, group: h5py.Group) -> None:
        """This tokenizer as a model file's group (hdf5.py: the layout of each kind)."""
        from .hdf5 import write

        write(self, group)

    # ------------------------------------------------------------ encode/decode

    def encode(self, text: str, bos: bool = True, eos: bool = False, special: bool = False) -> list[int]:
        """``special`` is accepted for the shared interface: a llama2.c vocabulary has no
        special-token texts."""
        if self.add_dummy_prefix and text:
            text = " " + text
        ids: list[int] = []
        for ch in text:
            piece = ch.encode("utf-8")
            tid = self._piece_to_id.get(piece)
            if tid is None:
                ids.extend(b + BYTE_FALLBACK_OFFSET for b in piece)
            else:
                ids.append(tid)
        ids = self._merge(ids)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def token_text(self, token_id: int) -> str:
        """A token as the vocabulary spells it (what a chat template's ``bos_token`` is)."""
        return self.pieces[token_id].decode("utf-8", "replace")

    def split_special(self, text: str) -> list[tuple[str, int | None]]:
        """``text`` cut at the special tokens that ``encode(..., special=True)`` would read in it:
        ``(matched text, id)`` for each, ``(text, None)`` for the text between (no empty pieces).
        A llama2.c vocabulary has none."""
        return [(text, None)] if text else []

    def _merge(self, ids: list[int]) -> list[int]:
        """run.c's merge loop in O(n log n): repeatedly merge the adjacent pair with the highest score,
        leftmost on ties; byte-fallback tokens never merge.

        Candidate pairs wait in a heap keyed (-score, left symbol's position): positions keep the
        text's order, so the heap's top is the pair run.c's rescan would pick. Merged symbols live
        at their left position in a linked list; a dropped one reads -1. An entry holds both ids
        it was made from and is stale once either changed (a symbol only grows, so an id never
        comes back)."""
        n = len(ids)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int, int, int]] = []
        push = self._push_pair
        for i in range(n - 1):
            push(heap, ids, i, i + 1)
        while heap:
            _, left, right, a, b, merged = heapq.heappop(heap)
            if ids[left] != a or ids[right] != b:
                continue  # stale: a side was merged since
            ids[left], ids[right] = merged, -1
            after = nxt[left] = nxt[right]
            if after < n:
                prv[after] = left
                push(heap, ids, left, after)
            if prv[left] >= 0:
                push(heap, ids, prv[left], left)
        return [t for t in ids if t >= 0]

    def _push_pair(self, heap: list, ids: list[int], left: int, right: int) -> None:
        """Queue the pair at (left, right) if its concatenation is a piece with a usable score."""
        a, b = ids[left], ids[right]
        if a < NUM_RESERVED or b < NUM_RESERVED:
            return
        merged = self._piece_to_id.get(self.pieces[a] + self.pieces[b])
        if merged is not None:
            score = self._score_list[merged]
            if score > -np.inf:  # run.c stops at the best score -inf: such a pair never merges
                heapq.heappush(heap, (-score, left, right, a, b, merged))

    def decode(self, prev_token: int, token: int) -> bytes:
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
        return self._decoded_after_bos[token] if prev_token == self.bos_id else self._decoded[token]

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)
