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

HDF5 layout written by :meth:`Tokenizer.write_hdf5` into a group (part of the
converted-model file format)::

    attrs:
      type              str    "llama2c-score-bpe"
      bos_id            int
      eos_id            int
      add_dummy_prefix  bool
      vocab_size        int
    datasets:
      piece_bytes       uint8   (total bytes,)      all pieces concatenated
      piece_offsets     int64   (vocab_size + 1,)   piece i = piece_bytes[off[i]:off[i+1]]
      scores            float32 (vocab_size,)

Other tokenizer kinds live in the same module and share the duck interface
``encode(text, bos=True, eos=False)``, ``decode(prev, tok) -> bytes``,
``stream()``, ``bos_id``, ``eos_id``, ``eos_ids``, ``vocab_size``,
``chat_template``, ``write_hdf5(group)`` and, for chat prompts,
``token_text(id)``, ``split_special(text)`` and ``encode(..., special=False)``:

* :class:`SpmTokenizer` -- sentencepiece vocabularies from GGUF
  (``tokenizer.ggml.model == "llama"``), encoded like llama.cpp's
  ``llm_tokenizer_spm``.  HDF5 type ``"llama-spm"``: the layout above plus
  ``token_types`` (int32, GGUF token types) and the attrs ``eos_ids``,
  ``unk_id``, ``add_bos``, ``add_space_prefix``, ``chat_template``.
* :class:`HFTokenizer` -- anything the HF ``tokenizers`` library runs: byte-level
  BPE from GGUF (``tokenizer.ggml.model == "gpt2"``, Llama 3 / Qwen2) and
  ``tokenizer.json`` model directories.  HDF5 type ``"hf-tokenizers"``: attrs
  ``bos_id`` (-1: none), ``eos_id``, ``eos_ids``, ``add_bos``, ``chat_template``
  ("" if none), ``vocab_size``; dataset ``tokenizer_json`` (uint8, UTF-8 JSON).

:func:`load_tokenizer` reads any of these groups; :func:`from_gguf` and
:func:`from_hf_dir` build them from a model source.
"""

from __future__ import annotations

import codecs
import copy
import functools
import heapq
import itertools
import json
import re
import string
import struct
from collections.abc import Iterable, Iterator, Sequence
from os import PathLike
from pathlib import Path

import h5py
import numpy as np

from ...errors import InputError

HDF5_TYPE = "llama2c-score-bpe"
BYTE_FALLBACK_OFFSET = 3
NUM_RESERVED = BYTE_FALLBACK_OFFSET + 256  # <unk>, BOS, EOS and the 256 byte pieces

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
_HDF5_ATTRS = ("bos_id", "eos_id", "add_dummy_prefix", "vocab_size")
_HDF5_DATASETS = ("piece_bytes", "piece_offsets", "scores")

_SYNTHETIC_WORDS = (
    "the", "once", "upon", "time", "there", "was", "little", "girl", "boy", "named",
    "she", "he", "it", "and", "to", "of", "in", "her", "his", "with", "they", "day",
    "big", "happy", "said", "play", "mom", "dad", "friend", "saw", "very", "had",
    "one", "were", "not", "on", "you", "is", "for", "that", "be", "at", "so", "but",
    "wanted", "went", "park", "tree", "ball", "dog", "cat", "sun", "fun", "love",
)


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
        m = _BYTE_PIECE.fullmatch(piece)
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
        if vocab_size < NUM_RESERVED:
            raise ValueError(f"synthetic tokenizer needs vocab_size >= {NUM_RESERVED}, got {vocab_size}")
        pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
        seen = set(pieces)
        pieces.extend(itertools.islice(_synthetic_pieces(seen), vocab_size - NUM_RESERVED))
        # Longer pieces score higher (earlier ones break ties), so merges grow
        # words left to right; reserved pieces get 0 like llama2.c's file.
        scores = np.zeros(vocab_size, dtype=np.float32)
        for i in range(NUM_RESERVED, vocab_size):
            scores[i] = len(pieces[i]) - i / vocab_size
        return cls(pieces, scores)

    # -------------------------------------------------------------------- HDF5

    def write_hdf5(self, group: h5py.Group) -> None:
        group.attrs["type"] = HDF5_TYPE
        group.attrs["bos_id"] = self.bos_id
        group.attrs["eos_id"] = self.eos_id
        group.attrs["add_dummy_prefix"] = self.add_dummy_prefix
        group.attrs["vocab_size"] = self.vocab_size
        _write_pieces(group, self.pieces, self.scores)

    @classmethod
    def read_hdf5(cls, group: h5py.Group) -> Tokenizer:
        where = f"tokenizer group {group.name!r}"
        kind = _attr_str(group, "type", where)
        if cls is Tokenizer and kind in _LOADERS and kind != HDF5_TYPE:
            return load_tokenizer(group)  # model files name their tokenizer kind
        if kind != HDF5_TYPE:
            raise InputError(f"{where}: expected attribute type={HDF5_TYPE!r}, found {kind!r}")
        _require_attrs(group, _HDF5_ATTRS, where)
        pieces, scores = _read_pieces(group, _attr_size(group, "vocab_size", where), where)
        return cls(
            pieces,
            scores,
            bos_id=_attr_int(group, "bos_id", where),
            eos_id=_attr_int(group, "eos_id", where),
            add_dummy_prefix=_attr_bool(group, "add_dummy_prefix", where),
        )

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


class StreamDecoder:
    """Turns a token stream into text, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, prev_token: int, token: int) -> str:
        if not 0 <= token < self._tokenizer.vocab_size:
            return ""  # a model's padding rows beyond the tokenizer (vocab_size rounded up) have no text
        return self._utf8.decode(self._tokenizer.decode(prev_token, token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _synthetic_pieces(seen: set[bytes]) -> Iterator[bytes]:
    """Unique filler pieces for :meth:`Tokenizer.synthetic`, in priority order, without end."""

    def fresh(candidates: Iterable[str]) -> Iterator[bytes]:
        for c in candidates:
            b = c.encode("utf-8")
            if b not in seen:
                seen.add(b)
                yield b

    letters = string.ascii_lowercase
    # A bare space is needed: the dummy prefix must be a mergeable piece, not a byte token.
    yield from fresh([" "])
    yield from fresh(" " + c for c in letters)
    yield from fresh(letters)
    # Every prefix of a word is a piece too, so left-to-right merges can reach the word.
    yield from fresh(" " + w[:k] for w in _SYNTHETIC_WORDS for k in range(1, len(w) + 1))
    for n in itertools.count(2):
        yield from fresh("".join(t) for t in itertools.product(letters, repeat=n))


# ===================================================================== shared helpers

SPM_HDF5_TYPE = "llama-spm"
HF_HDF5_TYPE = "hf-tokenizers"

# GGUF token types (llama.cpp ``llama_token_type``).
TOKEN_UNDEFINED, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(7)

_SPACE = "\u2581"  # sentencepiece's escaped space
_UNK_OUTPUT = "\u2585".encode()  # llama.cpp prints unknown tokens as U+2585

# Texts of tokens that end a turn, as llama.cpp recognises them (llama-vocab.cpp "EOG" tokens).
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|end|>", "<|endoftext|>",
    "<end_of_turn>", "<EOT>", "_<EOT>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<|return|>", "<|call|>",
})


def _attr_str(group: h5py.Group, name: str, where: str) -> str | None:
    """A string attribute, None if absent."""
    value = group.attrs.get(name)
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, bytes):
        value = _utf8(value, f"{where}: attribute {name!r}")
    if value is not None and not isinstance(value, str):
        raise InputError(f"{where}: attribute {name!r} must be a string, found {_describe(value)}")
    return value


def _attr_int(group: h5py.Group, name: str, where: str) -> int:
    value = group.attrs[name]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{where}: attribute {name!r} must be an integer, found {_describe(value)}")
    return int(value)


def _attr_size(group: h5py.Group, name: str, where: str) -> int:
    value = _attr_int(group, name, where)
    if value < 0:
        raise InputError(f"{where}: attribute {name!r} must be >= 0, found {value}")
    return value


def _attr_bool(group: h5py.Group, name: str, where: str) -> bool:
    value = group.attrs[name]
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{where}: attribute {name!r} must be a boolean, found {_describe(value)}")
    return bool(value)


def _attr_ids(group: h5py.Group, name: str, where: str) -> list[int]:
    """An integer attribute or 1-D array of them (token ids)."""
    value = np.asarray(group.attrs[name])
    if value.ndim > 1 or not np.issubdtype(value.dtype, np.integer):
        raise InputError(f"{where}: attribute {name!r} must be integer token ids, found {_describe(value)}")
    return [int(i) for i in np.atleast_1d(value)]


def _describe(value) -> str:
    """A short description of a wrongly typed value for messages (arrays may be large)."""
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _require_attrs(group: h5py.Group, names: Iterable[str], where: str) -> None:
    for name in names:
        if name not in group.attrs:
            raise InputError(f"{where}: missing attribute {name!r}")


_DTYPE_KINDS = {"integer": "iu", "numbers": "fiu"}  # numpy dtype.kind letters


def _dataset(group: h5py.Group, name: str, shape: tuple[int, ...], kind: str, where: str) -> np.ndarray:
    """The contents of dataset `name`, its shape and dtype (`kind`: "integer" or "numbers") checked
    before anything is read."""
    ds = group.get(name)
    if not isinstance(ds, h5py.Dataset):
        raise InputError(f"{where}: missing dataset {name!r}")
    if ds.shape != shape or ds.dtype.kind not in _DTYPE_KINDS[kind]:
        raise InputError(f"{where}: {name} must be {kind} with shape {shape}, found {ds.dtype} with shape {ds.shape}")
    return np.asarray(ds[()])


def _unique(ids: Iterable[int | None]) -> tuple[int, ...]:
    out: list[int] = []
    for i in ids:
        if i is not None and int(i) >= 0 and int(i) not in out:
            out.append(int(i))
    return tuple(out)


def _split_at(text: str, spans: Iterable[tuple[int, int, int]]) -> list[tuple[str, int | None]]:
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


def _eog_ids(texts: Sequence[str], types: Sequence[int] | None, first: Iterable[int | None]) -> tuple[int, ...]:
    """``first`` (eos, eot, ...) then every control/user-defined token whose text ends a turn."""
    extra = []
    for i, t in enumerate(texts):
        if t in _EOG_TEXTS and (types is None or types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)):
            extra.append(i)
    return _unique([*first, *extra])


def _write_pieces(group: h5py.Group, pieces: Sequence[bytes], scores: np.ndarray) -> None:
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in pieces])
    _write_checked(group, "piece_bytes", np.frombuffer(b"".join(pieces), dtype=np.uint8))
    _write_checked(group, "piece_offsets", offsets)
    _write_checked(group, "scores", np.asarray(scores, dtype=np.float32))


def _write_checked(group: h5py.Group, name: str, data: np.ndarray) -> None:
    """A dataset with a fletcher32 checksum, as the weights have: a flipped byte fails the read
    instead of changing the text (HDF5 checksums only chunked, non-empty data)."""
    group.create_dataset(name, data=data, fletcher32=data.size > 0, chunks=data.size > 0 or None)


def _read_pieces(group: h5py.Group, n: int, where: str) -> tuple[list[bytes], np.ndarray]:
    for name in _HDF5_DATASETS:
        if not isinstance(group.get(name), h5py.Dataset):
            raise InputError(f"{where}: missing dataset {name!r} (expected {', '.join(_HDF5_DATASETS)})")
    offsets = _dataset(group, "piece_offsets", (n + 1,), "integer", where)
    scores = _dataset(group, "scores", (n,), "numbers", where)
    if np.isnan(scores).any():  # -inf is a score (never merge); NaN would make merge order arbitrary
        raise InputError(f"{where}: scores must be numbers, found NaN at id {int(np.argmax(np.isnan(scores)))}")
    ds = group["piece_bytes"]
    if ds.ndim != 1 or ds.dtype != np.uint8:
        raise InputError(f"{where}: piece_bytes must be 1-D uint8, found {ds.dtype} with shape {ds.shape}")
    size = ds.shape[0]
    if offsets[0] != 0 or offsets[-1] != size:
        raise InputError(
            f"{where}: piece_offsets must start at 0 and end at len(piece_bytes)={size}, "
            f"found {int(offsets[0])}..{int(offsets[-1])}"
        )
    if np.any(np.diff(offsets) < 0):
        bad = int(np.argmax(np.diff(offsets) < 0))
        raise InputError(
            f"{where}: piece_offsets must be non-decreasing, found {int(offsets[bad])} then "
            f"{int(offsets[bad + 1])} at index {bad}"
        )
    raw = np.asarray(ds[()]).tobytes()
    return [raw[offsets[i] : offsets[i + 1]] for i in range(n)], scores.astype(np.float32)


# ============================================================ sentencepiece (GGUF "llama")


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
            token_types = [TOKEN_BYTE if _BYTE_PIECE.fullmatch(p) else TOKEN_NORMAL for p in self.pieces]
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
        self._eos_ids = _unique([self.eos_id, *(eos_ids or ())])
        # llama.cpp's token_to_id: every token, the last one wins on duplicate texts.
        self._text_to_id: dict[str, int] = {t: i for i, t in enumerate(self.texts)}
        self._score_list: list[float] = self.scores.tolist()
        self._byte_ids = [self._find_byte_token(b) for b in range(256)]
        types = self.token_types.tolist()
        self._user_defined = [t for t, k in zip(self.texts, types) if k == TOKEN_USER_DEFINED and t]
        self._specials = [t for t, k in zip(self.texts, types) if k in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED) and t]
        self._split_plain = self._splitter(self._user_defined)
        self._split_special = self._splitter(self._specials)
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
            return self.texts[i].replace(_SPACE, " ").encode("utf-8", "surrogateescape")
        if kind == TOKEN_BYTE:
            m = _BYTE_PIECE.fullmatch(self.pieces[i])
            return bytes([int(m.group(1), 16)]) if m else self.pieces[i]
        if kind == TOKEN_UNKNOWN:
            return _UNK_OUTPUT
        return b""  # control, unused, undefined: not printed

    @staticmethod
    def _splitter(texts: list[str]) -> re.Pattern[str] | None:
        if not texts:
            return None
        alts = sorted(set(texts), key=lambda t: (-len(t), t))
        return re.compile("(" + "|".join(map(re.escape, alts)) + ")")

    def _validate(self) -> None:  # the llama2.c id layout does not apply
        pass

    def token_text(self, token_id: int) -> str:
        return self.texts[token_id]

    def split_special(self, text: str) -> list[tuple[str, int | None]]:
        matches = self._split_special.finditer(text) if self._split_special is not None else ()
        return _split_at(text, ((m.start(), m.end(), self._text_to_id[m.group()]) for m in matches))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_gguf(cls, reader) -> SpmTokenizer:
        _require_gguf_vocab(reader, "llama", "sentencepiece")
        texts = _gguf_vocabulary(reader)
        n = len(texts)
        scores = _gguf_array(reader, "tokenizer.ggml.scores", "number", n)
        scores = np.zeros(n, np.float32) if scores is None else np.asarray(scores, np.float32)
        types = _gguf_array(reader, "tokenizer.ggml.token_type", "integer", n)
        types = np.full(n, TOKEN_NORMAL, np.int32) if types is None else np.asarray(types, np.int32)
        bos = _gguf_int(reader, "tokenizer.ggml.bos_token_id", 1)
        eos = _gguf_int(reader, "tokenizer.ggml.eos_token_id", 2)
        first = [eos, _gguf_int(reader, "tokenizer.ggml.eot_token_id", None),
                 _gguf_int(reader, "tokenizer.ggml.eom_token_id", None)]
        return cls(
            texts, scores, types,
            bos_id=bos, eos_id=eos,
            eos_ids=_eog_ids(texts, types.tolist(), first),
            unk_id=_gguf_int(reader, "tokenizer.ggml.unknown_token_id", 0),
            add_bos=_gguf_bool(reader, "tokenizer.ggml.add_bos_token", True),
            add_space_prefix=_gguf_bool(reader, "tokenizer.ggml.add_space_prefix", True),
            chat_template=_gguf_str(reader, "tokenizer.chat_template"),
        )

    # -------------------------------------------------------------------- HDF5

    def write_hdf5(self, group: h5py.Group) -> None:
        group.attrs["type"] = SPM_HDF5_TYPE
        group.attrs["bos_id"] = self.bos_id
        group.attrs["eos_id"] = self.eos_id
        group.attrs["eos_ids"] = np.asarray(self.eos_ids, dtype=np.int64)
        group.attrs["unk_id"] = self.unk_id
        group.attrs["add_bos"] = self.add_bos
        group.attrs["add_space_prefix"] = self.add_space_prefix
        group.attrs["vocab_size"] = self.vocab_size
        group.attrs["chat_template"] = self.chat_template or ""
        _write_pieces(group, self.pieces, self.scores)
        _write_checked(group, "token_types", self.token_types.astype(np.int32))

    @classmethod
    def read_hdf5(cls, group: h5py.Group) -> SpmTokenizer:
        where = f"tokenizer group {group.name!r}"
        kind = _attr_str(group, "type", where)
        if kind != SPM_HDF5_TYPE:
            raise InputError(f"{where}: expected attribute type={SPM_HDF5_TYPE!r}, found {kind!r}")
        _require_attrs(group, ("bos_id", "eos_id", "eos_ids", "unk_id", "add_bos", "add_space_prefix", "vocab_size"), where)
        n = _attr_size(group, "vocab_size", where)
        pieces, scores = _read_pieces(group, n, where)
        return cls(
            pieces, scores, _dataset(group, "token_types", (n,), "integer", where),
            bos_id=_attr_int(group, "bos_id", where), eos_id=_attr_int(group, "eos_id", where),
            eos_ids=_attr_ids(group, "eos_ids", where),
            unk_id=_attr_int(group, "unk_id", where),
            add_bos=_attr_bool(group, "add_bos", where), add_space_prefix=_attr_bool(group, "add_space_prefix", where),
            chat_template=_attr_str(group, "chat_template", where) or None,
        )

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
            self._encode_fragment(part.replace(" ", _SPACE), ids)
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

    def decode(self, prev_token: int, token: int) -> bytes:
        """Bytes of ``token``; after BOS the dummy-prefix space is stripped (llama.cpp detokenize)."""
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
        return self._decoded_after_bos[token] if prev_token == self.bos_id else self._decoded[token]


# ============================================================= HF tokenizers (BPE etc.)

# Pre-tokenizer regexes as in the models' HF tokenizer.json (llama.cpp llama-vocab.cpp quotes them).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# tokenizer.ggml.pre -> (regex, ignore_merges, NFC normalizer, default add_bos)
_BPE_PRE_TYPES: dict[str, tuple[str, bool, bool, bool]] = {
    "llama-bpe": (_LLAMA3_REGEX, True, False, True),
    "llama3": (_LLAMA3_REGEX, True, False, True),
    "llama-v3": (_LLAMA3_REGEX, True, False, True),
    "smaug-bpe": (_LLAMA3_REGEX, False, False, False),
    "dbrx": (_LLAMA3_REGEX, False, False, False),
    "qwen2": (_QWEN2_REGEX, False, True, False),
    "stablelm2": (_QWEN2_REGEX, False, False, False),
    "gpt-2": (_GPT2_REGEX, False, False, False),
    "gpt2": (_GPT2_REGEX, False, False, False),
}


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (what the ByteLevel pre-tokenizer maps bytes to)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class HFTokenizer:
    """A HF ``tokenizers.Tokenizer`` (exact HF behaviour) with model-level BOS/EOS/chat-template settings."""

    def __init__(
        self,
        tokenizer,
        bos_id: int | None = None,
        eos_ids: Sequence[int] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
        eos_id: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_id = None if bos_id is None or int(bos_id) < 0 else int(bos_id)
        self._eos_ids = _unique([eos_id, *eos_ids])
        self.eos_id = self._eos_ids[0] if self._eos_ids else None
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template = chat_template or None
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        for name, value in (("bos_id", self.bos_id), *(("eos id", e) for e in self._eos_ids)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise InputError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        self._decoded: list[bytes] | None = None
        self._decoded_after_bos: list[bytes] | None = None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_gguf(cls, reader) -> HFTokenizer:
        from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as _HFTokenizer

        _require_gguf_vocab(reader, "gpt2", "byte-level BPE")
        pre = _gguf_str(reader, "tokenizer.ggml.pre") or "default"
        if pre not in _BPE_PRE_TYPES:
            raise InputError(
                f"GGUF byte-level BPE pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(_BPE_PRE_TYPES))})"
            )
        regex, ignore_merges, nfc, default_add_bos = _BPE_PRE_TYPES[pre]
        texts = _gguf_vocabulary(reader, exact=True)  # the tokenizers library takes UTF-8 only
        types_arr = _gguf_array(reader, "tokenizer.ggml.token_type", "integer", len(texts))
        types = [TOKEN_NORMAL] * len(texts) if types_arr is None else [int(t) for t in types_arr]
        vocab = {t: i for i, t in enumerate(texts)}
        merges = _bpe_merges(_gguf_strings(reader, "tokenizer.ggml.merges", exact=True) or [], vocab)
        tok = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges,
                                      byte_fallback=False, fuse_unk=False))
        if nfc:
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False) for t, k in zip(texts, types)
                   if k == TOKEN_CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, k in zip(texts, types)
                if k == TOKEN_USER_DEFINED]
        if special:
            tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)
        bos = _gguf_int(reader, "tokenizer.ggml.bos_token_id", None)
        eos = _gguf_int(reader, "tokenizer.ggml.eos_token_id", None)
        first = [eos, _gguf_int(reader, "tokenizer.ggml.eot_token_id", None),
                 _gguf_int(reader, "tokenizer.ggml.eom_token_id", None)]
        return cls(
            tok,
            bos_id=bos,
            eos_ids=_eog_ids(texts, types, first),
            add_bos=_gguf_bool(reader, "tokenizer.ggml.add_bos_token", default_add_bos),
            chat_template=_gguf_str(reader, "tokenizer.chat_template"),
            eos_id=eos,
        )

    @classmethod
    def from_hf_dir(cls, path: str | PathLike[str]) -> HFTokenizer:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise InputError(f"{path}: no tokenizer.json (only HF 'fast' tokenizers are supported)")
        tok = _hf_tokenizer(tj.read_bytes(), str(tj))
        cfg = _read_json(path / "tokenizer_config.json")
        model_cfg = _read_json(path / "config.json")
        gen_cfg = _read_json(path / "generation_config.json")

        def token_id(value) -> list[int]:
            if value is None:
                return []
            if isinstance(value, list):
                return [i for v in value for i in token_id(v)]
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, bool):
                return []
            if isinstance(value, int):
                return [value]
            if isinstance(value, str):
                tid = tok.token_to_id(value)
                return [] if tid is None else [tid]
            return []

        bos_candidates = token_id(cfg.get("bos_token")) + token_id(gen_cfg.get("bos_token_id")) + \
            token_id(model_cfg.get("bos_token_id"))
        bos_id = bos_candidates[0] if bos_candidates else None
        eos_primary = token_id(cfg.get("eos_token"))
        eos_ids = eos_primary + token_id(gen_cfg.get("eos_token_id")) + token_id(model_cfg.get("eos_token_id"))
        if "add_bos_token" in cfg and isinstance(cfg["add_bos_token"], bool):
            add_bos = cfg["add_bos_token"]
        else:  # what the tokenizer.json post-processor does on its own
            add_bos = bos_id is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if not template and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if not template and (path / "chat_template.json").is_file():
            template = _read_json(path / "chat_template.json").get("chat_template")
        return cls(tok, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos,
                   chat_template=template if isinstance(template, str) else None,
                   eos_id=eos_primary[0] if eos_primary else None)

    # -------------------------------------------------------------------- HDF5

    def write_hdf5(self, group: h5py.Group) -> None:
        group.attrs["type"] = HF_HDF5_TYPE
        group.attrs["bos_id"] = -1 if self.bos_id is None else self.bos_id
        group.attrs["eos_id"] = -1 if self.eos_id is None else self.eos_id
        group.attrs["eos_ids"] = np.asarray(self.eos_ids, dtype=np.int64)
        group.attrs["add_bos"] = self.add_bos
        group.attrs["chat_template"] = self.chat_template or ""
        group.attrs["vocab_size"] = self.vocab_size
        blob = self.tokenizer.to_str().encode("utf-8")
        _write_checked(group, "tokenizer_json", np.frombuffer(blob, dtype=np.uint8))

    @classmethod
    def read_hdf5(cls, group: h5py.Group) -> HFTokenizer:
        where = f"tokenizer group {group.name!r}"
        kind = _attr_str(group, "type", where)
        if kind != HF_HDF5_TYPE:
            raise InputError(f"{where}: expected attribute type={HF_HDF5_TYPE!r}, found {kind!r}")
        _require_attrs(group, ("bos_id", "eos_ids", "add_bos"), where)
        ds = group.get("tokenizer_json")
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype != np.uint8:
            raise InputError(f"{where}: expected a 1-D uint8 dataset 'tokenizer_json' (UTF-8 JSON)")
        return cls(
            _hf_tokenizer(np.asarray(ds[()]).tobytes(), f"{where}: tokenizer_json"),
            bos_id=_attr_int(group, "bos_id", where),
            eos_ids=_attr_ids(group, "eos_ids", where),
            add_bos=_attr_bool(group, "add_bos", where),
            chat_template=_attr_str(group, "chat_template", where) or None,
            eos_id=_attr_int(group, "eos_id", where) if "eos_id" in group.attrs else None,
        )

    # ------------------------------------------------------------ encode/decode

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text, bos=False)), known without the BPE work (which
        holds Python's lock for about 1 s a MiB): the normalizer, which may shrink the text
        (NFC, Strip), runs first (a fast linear pass); then no token covers more bytes of it
        than the longest vocabulary entry stands for. 0 (no bound) where that does not hold."""
        if self._longest_entry is None:
            return 0
        normalizer = self.tokenizer.normalizer
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        return -(-len(text.encode("utf-8", "surrogatepass")) // self._longest_entry)

    @functools.cached_property
    def _longest_entry(self) -> int | None:
        """Bytes of text the longest vocabulary entry covers (min_tokens): a byte-level entry
        spells each byte as one character; any other entry, and an added token (matched
        whole in the text), covers its own UTF-8 bytes. None where a token may cover more: a
        vocabulary that can't spell every byte (its unknown token stands for any run of
        text) or a pre-tokenizer that drops text (whitespace splitters)."""
        def state(component) -> str:
            return "" if component is None else component.__getstate__().decode()

        decoder, pre = state(self.tokenizer.decoder), state(self.tokenizer.pre_tokenizer)
        bytelevel = bool(decoder) and _decoder_kind(json.loads(decoder))[0] == "bytelevel"
        every_byte = bytelevel or getattr(self.tokenizer.model, "byte_fallback", False)  # a BPE model's switch
        drops_text = any(f'"{kind}"' in pre for kind in ("Whitespace", "WhitespaceSplit", "BertPreTokenizer", "Removed"))
        if not every_byte or drops_text:
            return None
        byte_chars = _byte_decoder()
        added = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
        return max(1, max(len(t) if bytelevel and t not in added and all(c in byte_chars for c in t)
                          else len(t.encode("utf-8", "surrogatepass"))
                          for t in self.tokenizer.get_vocab(with_added_tokens=True)))

    def encode(self, text: str, bos: bool = True, eos: bool = False, special: bool = True) -> list[int]:
        """HF ``encode(text, add_special_tokens=False)``; ``bos=True`` adds BOS when the model asks for it.
        ``special=False`` reads special-token text as plain text (HF ``split_special_tokens=True``)."""
        tokenizer = self.tokenizer if special else self._plain_tokenizer
        ids = list(tokenizer.encode(text, add_special_tokens=False).ids)
        if bos and self.add_bos:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    @functools.cached_property
    def _plain_tokenizer(self):
        """A copy that reads special-token text as plain text: the library's switch is a property
        of the tokenizer, and flipping it on the shared one would race with other encodes."""
        plain = copy.deepcopy(self.tokenizer)
        plain.encode_special_tokens = True
        return plain

    @functools.cached_property
    def _specials(self) -> tuple[re.Pattern[str] | None, dict]:
        """The library's special added tokens: a regex of their texts (longest first, as its
        leftmost-longest matcher; kept free of groups, which would make `re` try every one of a
        few hundred alternatives at every character) and {text: (id, AddedToken)}."""
        added = {t.content: (i, t) for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        return SpmTokenizer._splitter(list(added)), added

    def _special_spans(self, text: str) -> Iterator[tuple[int, int, int]]:
        """(start, end, id) of the special tokens in ``text``, an ``lstrip``/``rstrip`` token's span
        taking the whitespace beside it, as the library does."""
        pattern, added = self._specials
        pos = 0
        for m in pattern.finditer(text) if pattern is not None else ():
            start, end = m.span()
            if start < pos:
                continue  # in whitespace an rstrip token took
            token_id, token = added[m.group()]
            while token.lstrip and start > pos and text[start - 1].isspace():
                start -= 1
            while token.rstrip and end < len(text) and text[end].isspace():
                end += 1
            pos = end
            yield start, end, token_id

    def token_text(self, token_id: int) -> str:
        """A token as the vocabulary spells it (what a chat template's ``bos_token`` is)."""
        return self.tokenizer.id_to_token(token_id)

    def split_special(self, text: str) -> list[tuple[str, int | None]]:
        """``text`` cut at the special tokens that ``encode(..., special=True)`` reads in it (added tokens
        marked special): ``(matched text, id)`` for each, ``(text, None)`` between them."""
        return _split_at(text, self._special_spans(text))

    def _build_decode_tables(self) -> None:
        spec = json.loads(self.tokenizer.to_str())
        kind, strip_first = _decoder_kind(spec.get("decoder"))
        added = self.tokenizer.get_added_tokens_decoder()
        byte_dec = _byte_decoder()
        id_to_piece: dict[int, str] = {i: p for p, i in self.tokenizer.get_vocab(with_added_tokens=False).items()}
        table: list[bytes] = []
        for i in range(self.vocab_size):
            at = added.get(i)
            if at is not None:
                table.append(b"" if at.special else at.content.encode("utf-8"))
                continue
            piece = id_to_piece.get(i)
            if piece is None:
                table.append(b"")
            elif kind == "bytelevel":
                if all(c in byte_dec for c in piece):
                    table.append(bytes(byte_dec[c] for c in piece))
                else:
                    table.append(piece.encode("utf-8"))
            elif kind == "spm":
                m = _BYTE_PIECE.fullmatch(piece.encode("utf-8"))
                table.append(bytes([int(m.group(1), 16)]) if m else piece.replace(_SPACE, " ").encode("utf-8"))
            else:
                table.append(self.tokenizer.decode([i], skip_special_tokens=True).encode("utf-8"))
        self._decoded = table
        self._decoded_after_bos = [d[1:] if strip_first and d[:1] == b" " else d for d in table]

    def decode(self, prev_token: int, token: int) -> bytes:
        """Raw bytes of ``token`` (byte-level pieces map back to bytes; special tokens print nothing)."""
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
        if self._decoded is None:
            self._build_decode_tables()
        if prev_token == self.bos_id and prev_token is not None:
            return self._decoded_after_bos[token]
        return self._decoded[token]

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


def _bpe_merges(lines: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """GGUF merges ("left right") as pairs, checked like the tokenizers library's BPE builder
    would (it panics instead): both sides and their concatenation are tokens."""
    merges = []
    for m in lines:
        left, sep, right = m.partition(" ")
        if not sep:
            raise InputError(f"GGUF merge {m!r} is not 'left right'")
        missing = [t for t in (left, right, left + right) if t not in vocab]
        if missing:
            raise InputError(f"GGUF merge {m!r} names {missing[0]!r}, which is not in the vocabulary")
        merges.append((left, right))
    return merges


def _decoder_kind(dec: dict | None) -> tuple[str, bool]:
    """("bytelevel" | "spm" | "other", strip a leading space after BOS) for a tokenizer.json decoder."""
    if not dec:
        return "other", False
    parts = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
    types = {p.get("type") for p in parts if isinstance(p, dict)}
    if "ByteLevel" in types:
        return "bytelevel", False
    if "Metaspace" in types:
        meta = next(p for p in parts if p.get("type") == "Metaspace")
        return "spm", meta.get("prepend_scheme", "always") != "never" and meta.get("add_prefix_space", True)
    if "ByteFallback" in types or any(p.get("type") == "Replace" and p.get("content") == " " for p in parts):
        return "spm", any(p.get("type") == "Strip" and p.get("start", 0) > 0 for p in parts)
    return "other", False


def _read_json(path: Path) -> dict:
    """A model directory's optional JSON settings file ({} if absent or not an object)."""
    if not path.is_file():
        return {}
    data = _parse_json(_utf8(path.read_bytes(), str(path)), str(path))
    return data if isinstance(data, dict) else {}


def _parse_json(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON ({exc})") from None


def _hf_tokenizer(raw: bytes, what: str):
    """A tokenizers.Tokenizer from tokenizer.json bytes, once they are known to be a JSON object with
    a model."""
    from tokenizers import Tokenizer as _HFTokenizer

    text = _utf8(raw, what)
    spec = _parse_json(text, what)
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise InputError(f"{what}: expected a tokenizer.json object with a 'model' object")
    try:
        return _HFTokenizer.from_str(text)
    except Exception as exc:  # a third-party parser that reports every bad input as a bare Exception
        raise InputError(f"{what}: the tokenizers library can't load it ({exc})") from None


# ===================================================================== GGUF access


# GGUF value types (gguf.GGUFValueType names) a key of each kind may have; llama.cpp refuses others too.
_GGUF_INTEGERS = frozenset({"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64"})
_GGUF_KINDS = {
    "string": frozenset({"STRING"}),
    "integer": _GGUF_INTEGERS,
    "number": _GGUF_INTEGERS | {"FLOAT32", "FLOAT64"},
    "boolean": frozenset({"BOOL"}),
}


def _gguf_field(reader, key: str, kind: str, array: bool = False):
    """The metadata field `key` (None if absent), checked to hold a `kind` value, or an array of
    them: a GGUF file declares whatever type it likes (gguf_file.Field)."""
    f = reader.fields.get(key)
    if f is None:
        return None
    types = list(f.types)
    allowed = _GGUF_KINDS[kind]
    if array:  # an empty array has no element type
        ok = types[:1] == ["ARRAY"] and (len(types) == 1 or (len(types) == 2 and types[1] in allowed))
    else:
        ok = len(types) == 1 and types[0] in allowed
    if not ok:
        expected = f"an array of {kind}s" if array else ("an " if kind == "integer" else "a ") + kind
        raise InputError(f"GGUF metadata {key!r} must be {expected}, found type {'/'.join(types) or 'none'}")
    return f


def _gguf_str(reader, key: str) -> str | None:
    f = _gguf_field(reader, key, "string")
    return None if f is None else _utf8(f.value, f"GGUF metadata {key!r}")


def _gguf_int(reader, key: str, default: int | None) -> int | None:
    f = _gguf_field(reader, key, "integer")
    return default if f is None else int(f.value)


def _gguf_bool(reader, key: str, default: bool) -> bool:
    f = _gguf_field(reader, key, "boolean")
    return default if f is None else bool(f.value)


def _gguf_strings(reader, key: str, exact: bool = False) -> list[str] | None:
    """A string array; `exact`: refuse invalid UTF-8 (else kept as surrogate escapes, the bytes as they are)."""
    f = _gguf_field(reader, key, "string", array=True)
    if f is None:
        return None
    if exact:
        return [_utf8(raw, f"GGUF metadata {key!r} item {k}") for k, raw in enumerate(f.value)]
    return [raw.decode("utf-8", "surrogateescape") for raw in f.value]


def _gguf_vocabulary(reader, exact: bool = False) -> list[str]:
    texts = _gguf_strings(reader, "tokenizer.ggml.tokens", exact)
    if texts is None:
        raise InputError("GGUF metadata lacks 'tokenizer.ggml.tokens' (the vocabulary)")
    return texts


def _gguf_array(reader, key: str, kind: str, length: int) -> np.ndarray | None:
    """A numeric array with one value per token (None if absent)."""
    f = _gguf_field(reader, key, kind, array=True)
    if f is None:
        return None
    if len(f.value) != length:
        raise InputError(f"GGUF metadata {key!r} has {len(f.value)} values for {length} tokens")
    return np.asarray(f.value)


# ===================================================================== entry points


def _require_gguf_vocab(reader, expected: str, description: str) -> None:
    model = _gguf_str(reader, "tokenizer.ggml.model")
    if model != expected:
        raise InputError(f"GGUF vocabulary type {model!r} is not {description} ({expected!r})")


def from_gguf(reader) -> SpmTokenizer | HFTokenizer:
    """Tokenizer of a GGUF file (``reader``: a ``gguf_file.GGUFFile`` opened on it)."""
    model = _gguf_str(reader, "tokenizer.ggml.model")
    if model == "llama":
        return SpmTokenizer.from_gguf(reader)
    if model == "gpt2":
        return HFTokenizer.from_gguf(reader)
    if model is None:
        raise InputError("GGUF file has no tokenizer (key 'tokenizer.ggml.model' is missing)")
    raise InputError(
        f"GGUF vocabulary type tokenizer.ggml.model={model!r} is not supported "
        "(supported: 'llama' sentencepiece, 'gpt2' byte-level BPE)"
    )


def from_hf_dir(path: str | PathLike[str]) -> HFTokenizer:
    """Tokenizer of a HF model directory (tokenizer.json + tokenizer_config/config/generation_config)."""
    return HFTokenizer.from_hf_dir(path)


_LOADERS = {
    HDF5_TYPE: Tokenizer.read_hdf5,
    SPM_HDF5_TYPE: SpmTokenizer.read_hdf5,
    HF_HDF5_TYPE: HFTokenizer.read_hdf5,
}


def load_tokenizer(group: h5py.Group) -> Tokenizer | SpmTokenizer | HFTokenizer:
    """Read any tokenizer group written by ``write_hdf5``, dispatching on its ``type`` attribute."""
    kind = _attr_str(group, "type", f"tokenizer group {group.name!r}")
    loader = _LOADERS.get(kind)
    if loader is None:
        raise InputError(
            f"tokenizer group {group.name!r}: unknown type={kind!r} (known: {', '.join(sorted(_LOADERS))})"
        )
    return loader(group)
