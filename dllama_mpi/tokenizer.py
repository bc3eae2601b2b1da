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
"""

from __future__ import annotations

import codecs
import itertools
import re
import string
import struct
from collections.abc import Iterable, Iterator, Sequence
from os import PathLike
from pathlib import Path

import h5py
import numpy as np

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
        # Python floats: the merge loop compares them in tight C-level max()/index().
        self._score_list: list[float] = self.scores.tolist()
        self._decoded = [self._piece_output(p) for p in self.pieces]
        # run.c strips the space first and then checks for a byte piece.
        self._decoded_after_bos = [self._piece_output(p[1:] if p[:1] == b" " else p) for p in self.pieces]

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def _validate(self) -> None:
        n = self.vocab_size
        if n < NUM_RESERVED:
            raise ValueError(
                f"tokenizer vocab_size must be >= {NUM_RESERVED} (<unk>, BOS, EOS, 256 byte pieces), got {n}"
            )
        if self.scores.shape != (n,):
            raise ValueError(f"expected {n} scores (one per piece), got shape {self.scores.shape}")
        for name, value in (("bos_id", self.bos_id), ("eos_id", self.eos_id)):
            if not 0 <= value < n:
                raise ValueError(f"{name}={value} is outside the vocabulary [0, {n})")
        for b in range(256):
            expected = b"<0x%02X>" % b
            found = self.pieces[b + BYTE_FALLBACK_OFFSET]
            if found != expected:
                raise ValueError(
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
        if len(data) < 4:
            raise ValueError(f"{path}: expected a 4-byte max_token_length header, file has {len(data)} bytes")
        (max_len,) = struct.unpack_from("<i", data, 0)
        if max_len <= 0:
            raise ValueError(f"{path}: expected a positive max_token_length, found {max_len}")
        pieces: list[bytes] = []
        scores: list[float] = []
        off = 4
        while (vocab_size is None and off < len(data)) or (vocab_size is not None and len(pieces) < vocab_size):
            i = len(pieces)
            if off + 8 > len(data):
                raise ValueError(
                    f"{path}: truncated at token {i}: expected an 8-byte (score, length) header at offset {off}, "
                    f"only {len(data) - off} bytes left"
                )
            score, length = struct.unpack_from("<fi", data, off)
            off += 8
            if not 0 <= length <= max_len:
                raise ValueError(f"{path}: token {i} has length {length}, expected 0..{max_len} (max_token_length)")
            if off + length > len(data):
                raise ValueError(
                    f"{path}: truncated at token {i}: expected {length} piece bytes at offset {off}, "
                    f"only {len(data) - off} bytes left"
                )
            pieces.append(data[off : off + length])
            scores.append(score)
            off += length
        if off != len(data):
            raise ValueError(
                f"{path}: expected {vocab_size} tokens ending at byte {off}, but the file has {len(data) - off} "
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
        offsets = np.zeros(self.vocab_size + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(p) for p in self.pieces])
        group.attrs["type"] = HDF5_TYPE
        group.attrs["bos_id"] = self.bos_id
        group.attrs["eos_id"] = self.eos_id
        group.attrs["add_dummy_prefix"] = self.add_dummy_prefix
        group.attrs["vocab_size"] = self.vocab_size
        group.create_dataset("piece_bytes", data=np.frombuffer(b"".join(self.pieces), dtype=np.uint8))
        group.create_dataset("piece_offsets", data=offsets)
        group.create_dataset("scores", data=self.scores.astype(np.float32))

    @classmethod
    def read_hdf5(cls, group: h5py.Group) -> Tokenizer:
        where = f"tokenizer group {group.name!r}"
        kind = group.attrs.get("type")
        if isinstance(kind, bytes):
            kind = kind.decode("utf-8", "replace")
        if kind != HDF5_TYPE:
            raise ValueError(f"{where}: expected attribute type={HDF5_TYPE!r}, found {kind!r}")
        for name in _HDF5_ATTRS:
            if name not in group.attrs:
                raise ValueError(f"{where}: missing attribute {name!r}")
        for name in _HDF5_DATASETS:
            if not isinstance(group.get(name), h5py.Dataset):
                raise ValueError(f"{where}: missing dataset {name!r} (expected {', '.join(_HDF5_DATASETS)})")
        n = int(group.attrs["vocab_size"])
        blob = np.asarray(group["piece_bytes"][()])
        offsets = np.asarray(group["piece_offsets"][()])
        scores = np.asarray(group["scores"][()])
        if blob.ndim != 1 or blob.dtype != np.uint8:
            raise ValueError(f"{where}: piece_bytes must be 1-D uint8, found {blob.dtype} with shape {blob.shape}")
        if offsets.shape != (n + 1,) or not np.issubdtype(offsets.dtype, np.integer):
            raise ValueError(
                f"{where}: piece_offsets must be integer with shape ({n + 1},), "
                f"found {offsets.dtype} with shape {offsets.shape}"
            )
        if scores.shape != (n,):
            raise ValueError(f"{where}: scores must have shape ({n},), found {scores.shape}")
        if offsets[0] != 0 or offsets[-1] != blob.size:
            raise ValueError(
                f"{where}: piece_offsets must start at 0 and end at len(piece_bytes)={blob.size}, "
                f"found {int(offsets[0])}..{int(offsets[-1])}"
            )
        if np.any(np.diff(offsets) < 0):
            bad = int(np.argmax(np.diff(offsets) < 0))
            raise ValueError(
                f"{where}: piece_offsets must be non-decreasing, found {int(offsets[bad])} then "
                f"{int(offsets[bad + 1])} at index {bad}"
            )
        raw = blob.tobytes()
        pieces = [raw[offsets[i] : offsets[i + 1]] for i in range(n)]
        return cls(
            pieces,
            scores.astype(np.float32),
            bos_id=int(group.attrs["bos_id"]),
            eos_id=int(group.attrs["eos_id"]),
            add_dummy_prefix=bool(group.attrs["add_dummy_prefix"]),
        )

    # ------------------------------------------------------------ encode/decode

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
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
        self._merge(ids)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def _pair(self, left: int, right: int) -> tuple[float, int]:
        """(score, merged id) of an adjacent pair; byte-fallback tokens never merge."""
        if left < NUM_RESERVED or right < NUM_RESERVED:
            return -np.inf, -1
        tid = self._piece_to_id.get(self.pieces[left] + self.pieces[right])
        return (-np.inf, -1) if tid is None else (self._score_list[tid], tid)

    def _merge(self, ids: list[int]) -> None:
        """In-place run.c merge loop; pair scores are cached so each merge rescans only its neighbours."""
        pairs = [self._pair(a, b) for a, b in zip(ids, ids[1:])]
        pair_scores = [s for s, _ in pairs]
        pair_ids = [t for _, t in pairs]
        while pair_scores:
            best = max(pair_scores)
            if best == -np.inf:
                break
            i = pair_scores.index(best)  # leftmost maximum, like run.c's strict '>'
            ids[i] = pair_ids[i]
            del ids[i + 1], pair_scores[i], pair_ids[i]
            for j in (i - 1, i):
                if 0 <= j < len(pair_scores):
                    pair_scores[j], pair_ids[j] = self._pair(ids[j], ids[j + 1])

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
