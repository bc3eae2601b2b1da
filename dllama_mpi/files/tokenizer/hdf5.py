"""The tokenizer's group in a model file: the layout of each kind, written and read here.

``type="llama2c-score-bpe"`` (llama2c.Tokenizer)::

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

``type="llama-spm"`` (spm.SpmTokenizer): the layout above plus ``token_types`` (int32, GGUF
token types) and the attrs ``eos_ids``, ``unk_id``, ``add_bos``, ``add_space_prefix``,
``chat_template``.

``type="hf-tokenizers"`` (hf.HFTokenizer): attrs ``bos_id`` (-1: none), ``eos_id``, ``eos_ids``,
``add_bos``, ``chat_template`` ("" if none), ``vocab_size``; dataset ``tokenizer_json`` (uint8,
UTF-8 JSON).

Every dataset is written with a fletcher32 checksum; everything read is checked for presence,
type and shape before use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import h5py
import numpy as np

from ...errors import InputError
from ..attributes import attribute_text
from ..text import utf8
from .hf import HFTokenizer, from_json
from .llama2c import Tokenizer
from .spm import SpmTokenizer

LLAMA2C_TYPE = "llama2c-score-bpe"
SPM_TYPE = "llama-spm"
HF_TYPE = "hf-tokenizers"

_PIECE_DATASETS = ("piece_bytes", "piece_offsets", "scores")
_DTYPE_KINDS = {"integer": "iu", "numbers": "fiu"}  # numpy dtype.kind letters


def write(tokenizer: Tokenizer | SpmTokenizer | HFTokenizer, group: h5py.Group) -> None:
    if isinstance(tokenizer, SpmTokenizer):
        group.attrs["type"] = SPM_TYPE
        group.attrs["bos_id"] = tokenizer.bos_id
        group.attrs["eos_id"] = tokenizer.eos_id
        group.attrs["eos_ids"] = np.asarray(tokenizer.eos_ids, dtype=np.int64)
        group.attrs["unk_id"] = tokenizer.unk_id
        group.attrs["add_bos"] = tokenizer.add_bos
        group.attrs["add_space_prefix"] = tokenizer.add_space_prefix
        group.attrs["vocab_size"] = tokenizer.vocab_size
        group.attrs["chat_template"] = tokenizer.chat_template or ""
        _write_pieces(group, tokenizer.pieces, tokenizer.scores)
        _write_checked(group, "token_types", tokenizer.token_types.astype(np.int32))
    elif isinstance(tokenizer, Tokenizer):
        group.attrs["type"] = LLAMA2C_TYPE
        group.attrs["bos_id"] = tokenizer.bos_id
        group.attrs["eos_id"] = tokenizer.eos_id
        group.attrs["add_dummy_prefix"] = tokenizer.add_dummy_prefix
        group.attrs["vocab_size"] = tokenizer.vocab_size
        _write_pieces(group, tokenizer.pieces, tokenizer.scores)
    else:
        group.attrs["type"] = HF_TYPE
        group.attrs["bos_id"] = -1 if tokenizer.bos_id is None else tokenizer.bos_id
        group.attrs["eos_id"] = -1 if tokenizer.eos_id is None else tokenizer.eos_id
        group.attrs["eos_ids"] = np.asarray(tokenizer.eos_ids, dtype=np.int64)
        group.attrs["add_bos"] = tokenizer.add_bos
        group.attrs["chat_template"] = tokenizer.chat_template or ""
        group.attrs["vocab_size"] = tokenizer.vocab_size
        blob = tokenizer.tokenizer.to_str().encode("utf-8")
        _write_checked(group, "tokenizer_json", np.frombuffer(blob, dtype=np.uint8))


def load_tokenizer(group: h5py.Group, expected: str | None = None) -> Tokenizer | SpmTokenizer | HFTokenizer:
    """Read any tokenizer group written by ``write``, dispatching on its ``type`` attribute; `expected`
    names the type the caller asked for, in the message for a type that is none of these."""
    where = f"tokenizer group {group.name!r}"
    kind = _attr_str(group, "type", where)
    reader = _READERS.get(kind)
    if reader is None and expected is not None:
        raise InputError(f"{where}: expected attribute type={expected!r}, found {kind!r}")
    if reader is None:
        raise InputError(f"{where}: unknown type={kind!r} (known: {', '.join(sorted(_READERS))})")
    return reader(group, where)


def _read_llama2c(group: h5py.Group, where: str) -> Tokenizer:
    _require_attrs(group, ("bos_id", "eos_id", "add_dummy_prefix", "vocab_size"), where)
    pieces, scores = _read_pieces(group, _attr_size(group, "vocab_size", where), where)
    return Tokenizer(
        pieces,
        scores,
        bos_id=_attr_int(group, "bos_id", where),
        eos_id=_attr_int(group, "eos_id", where),
        add_dummy_prefix=_attr_bool(group, "add_dummy_prefix", where),
    )


def _read_spm(group: h5py.Group, where: str) -> SpmTokenizer:
    _require_attrs(group, ("bos_id", "eos_id", "eos_ids", "unk_id", "add_bos", "add_space_prefix", "vocab_size"), where)
    n = _attr_size(group, "vocab_size", where)
    pieces, scores = _read_pieces(group, n, where)
    return SpmTokenizer(
        pieces, scores, _dataset(group, "token_types", (n,), "integer", where),
        bos_id=_attr_int(group, "bos_id", where), eos_id=_attr_int(group, "eos_id", where),
        eos_ids=_attr_ids(group, "eos_ids", where),
        unk_id=_attr_int(group, "unk_id", where),
        add_bos=_attr_bool(group, "add_bos", where), add_space_prefix=_attr_bool(group, "add_space_prefix", where),
        chat_template=_attr_str(group, "chat_template", where) or None,
    )


def _read_hf(group: h5py.Group, where: str) -> HFTokenizer:
    _require_attrs(group, ("bos_id", "eos_ids", "add_bos"), where)
    ds = group.get("tokenizer_json")
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype != np.uint8:
        raise InputError(f"{where}: expected a 1-D uint8 dataset 'tokenizer_json' (UTF-8 JSON)")
    return HFTokenizer(
        from_json(np.asarray(ds[()]).tobytes(), f"{where}: tokenizer_json"),
        bos_id=_attr_int(group, "bos_id", where),
        eos_ids=_attr_ids(group, "eos_ids", where),
        add_bos=_attr_bool(group, "add_bos", where),
        chat_template=_attr_str(group, "chat_template", where) or None,
        eos_id=_attr_int(group, "eos_id", where) if "eos_id" in group.attrs else None,
    )


_READERS = {LLAMA2C_TYPE: _read_llama2c, SPM_TYPE: _read_spm, HF_TYPE: _read_hf}


def _attr_str(group: h5py.Group, name: str, where: str) -> str | None:
    """A string attribute, None if absent; read as every attribute is (attribute_text), with
    the reason when it is not text."""
    value = group.attrs.get(name)
    text = attribute_text(value)
    if value is None or text is not None:
        return text
    if isinstance(value, bytes):
        utf8(value, f"{where}: attribute {name!r}")  # raises, naming the byte that is not UTF-8
    raise InputError(f"{where}: attribute {name!r} must be a string, found {_describe(value)}")


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


def _require_attrs(group: h5py.Group, names: Iterable[str], where: str) -> None:
    for name in names:
        if name not in group.attrs:
            raise InputError(f"{where}: missing attribute {name!r}")


def _dataset(group: h5py.Group, name: str, shape: tuple[int, ...], kind: str, where: str) -> np.ndarray:
    """The contents of dataset `name`, its shape and dtype (`kind`: "integer" or "numbers") checked
    before anything is read."""
    ds = group.get(name)
    if not isinstance(ds, h5py.Dataset):
        raise InputError(f"{where}: missing dataset {name!r}")
    if ds.shape != shape or ds.dtype.kind not in _DTYPE_KINDS[kind]:
        raise InputError(f"{where}: {name} must be {kind} with shape {shape}, found {ds.dtype} with shape {ds.shape}")
    return np.asarray(ds[()])


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
    for name in _PIECE_DATASETS:
        if not isinstance(group.get(name), h5py.Dataset):
            raise InputError(f"{where}: missing dataset {name!r} (expected {', '.join(_PIECE_DATASETS)})")
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
