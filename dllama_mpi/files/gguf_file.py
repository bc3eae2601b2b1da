"""A GGUF file (llama.cpp's format, versions 2 and 3, little-endian): its metadata read into
Python values, its tensors as numpy views of a memory map.

Not gguf-py's GGUFReader: that one makes a numpy view of every element of every metadata
array: a Python object per token and merge of a vocabulary (280,147 merges in Llama 3's),
twice per conversion; this walk reads each array once. gguf-py still supplies the tensor types
(GGMLQuantizationType, GGML_QUANT_SIZES) and dequantization.

Metadata is read by kind (`string`, `integer`, `number`, `boolean`, and arrays of them): a GGUF
file declares whatever type it likes, and a key holding another is refused with its name, the
kind expected and the type found.

Tensors come as GGUFReader hands them over: `shape` in GGUF's order (ne[0], the row length,
first), `data` in numpy's (rows, cols), F32/F16/F64 and integer types as their values,
every other type (quantized, BF16) as (rows, row bytes) uint8.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .text import utf8

MAGIC = b"GGUF"
# GGUFValueType: name and numpy dtype of each fixed-size value type (8 STRING, 9 ARRAY vary)
VALUE_TYPES = {0: ("UINT8", "<u1"), 1: ("INT8", "<i1"), 2: ("UINT16", "<u2"), 3: ("INT16", "<i2"),
               4: ("UINT32", "<u4"), 5: ("INT32", "<i4"), 6: ("FLOAT32", "<f4"), 7: ("BOOL", "<u1"),
               10: ("UINT64", "<u8"), 11: ("INT64", "<i8"), 12: ("FLOAT64", "<f8")}
STRING, ARRAY = 8, 9
# element types GGUFReader hands over as values; every other tensor type as bytes
ELEMENT_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}
MAX_DIMS = 4  # GGML_MAX_DIMS
# GGUF value types a metadata key of each kind may have; llama.cpp refuses others too
_INTEGERS = frozenset({"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64"})
KINDS = {
    "string": frozenset({"STRING"}),
    "integer": _INTEGERS,
    "number": _INTEGERS | {"FLOAT32", "FLOAT64"},
    "boolean": frozenset({"BOOL"}),
}


class GGUFError(InputError):
    """A file that is not a GGUF this reader can read (truncated, damaged, another format)."""


@dataclass(frozen=True)
class Field:
    """One metadata value: `types` as GGUFReader lists them (("UINT32",), ("STRING",),
    ("ARRAY", "INT32"); an empty array is ("ARRAY",)); `value` a Python int, float or bool,
    bytes for a string, a numpy array for a numeric array, a list of bytes for a string
    array (None for an array of arrays, which no key read here holds)."""

    types: tuple[str, ...]
    value: object


@dataclass(frozen=True)
class Tensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ne: the row length first
    data: np.ndarray


class GGUFFile:
    def __init__(self, path: str | Path):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        view, pos = memoryview(self._map), 0

        def fail(what: str) -> GGUFError:
            return GGUFError(f"{path} is not a readable GGUF file ({what})")

        def truncated() -> GGUFError:
            return GGUFError(f"{path} is truncated or damaged: its header runs past the end of the file ({size} "
                             "bytes); copy or download it again")

        def take(n: int) -> memoryview:
            nonlocal pos
            if pos + n > size:
                raise truncated()
            pos += n
            return view[pos - n : pos]

        def number(fmt: str) -> int:
            return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

        def string() -> bytes:
            return bytes(take(number("Q")))

        def strings(count: int) -> list[bytes]:  # the vocabulary's hot loop: no call per item
            nonlocal pos
            out, unpack = [], struct.Struct("<Q").unpack_from
            for _ in range(count):
                if pos + 8 > size:
                    raise truncated()
                n = unpack(view, pos)[0]
                if pos + 8 + n > size:
                    raise truncated()
                out.append(bytes(view[pos + 8 : pos + 8 + n]))
                pos += 8 + n
            return out

        def value(kind: int, depth: int = 0) -> tuple[tuple[str, ...], object]:
            if kind in VALUE_TYPES:
                name, dtype = VALUE_TYPES[kind]
                item = np.frombuffer(take(np.dtype(dtype).itemsize), dtype)[0].item()
                return (name,), bool(item) if name == "BOOL" else item
            if kind == STRING:
                return ("STRING",), string()
            if kind == ARRAY and depth < MAX_DIMS:
                item, count = number("I"), number("Q")
                if count == 0:
                    return ("ARRAY",), np.zeros(0)
                if item in VALUE_TYPES:
                    name, dtype = VALUE_TYPES[item]
                    return ("ARRAY", name), np.frombuffer(take(count * np.dtype(dtype).itemsize), dtype).copy()
                if count > (size - pos) // 8:  # a string or an array takes 8 bytes at least
                    raise truncated()
                if item == STRING:
                    return ("ARRAY", "STRING"), strings(count)
                inner = [value(item, depth + 1)[0] for _ in range(count)]
                return ("ARRAY", *inner[0]), None  # an array of arrays: read past, not kept
            raise fail(f"metadata value type {kind} is not one of GGUF's")

        if bytes(take(4)) != MAGIC:
            raise fail("it does not start with 'GGUF'")
        version = number("I")
        if version not in (2, 3):
            raise fail(f"version {version}; versions 2 and 3 are read, little-endian")
        n_tensors, n_kv = number("Q"), number("Q")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            raw_key = string()
            try:
                key = raw_key.decode("utf-8")
            except UnicodeDecodeError:
                raise fail(f"a metadata key is not UTF-8: {raw_key[:40]!r}") from None
            if key in self.fields:
                raise fail(f"metadata key {key!r} appears twice")
            self.fields[key] = Field(*value(number("I")))
        alignment = self.fields.get("general.alignment", Field(("UINT32",), 32))
        if alignment.types != ("UINT32",) or not 0 < alignment.value <= 1 << 20 or alignment.value & (alignment.value - 1):
            raise fail(f"general.alignment is {alignment.value!r}, expected a power of two")
        infos = []
        for _ in range(n_tensors):
            name = string().decode("utf-8", "replace")
            n_dims = number("I")
            if n_dims > MAX_DIMS:
                raise fail(f"tensor {name!r} has {n_dims} dimensions, at most {MAX_DIMS}")
            dims = tuple(number("Q") for _ in range(n_dims))
            kind, offset = number("I"), number("Q")
            if kind not in {t.value for t in GGMLQuantizationType}:
                raise fail(f"tensor {name!r} has type {kind}, not one of ggml's")
            infos.append((name, dims, GGMLQuantizationType(kind), offset))
        self.tensors: list[Tensor] = []
        if not infos:  # a vocabulary-only file: no data section, and no padding before it either
            return
        start = -(-pos // alignment.value) * alignment.value
        ends = []
        for name, dims, kind, offset in infos:
            block, block_bytes = GGML_QUANT_SIZES[kind]
            if not dims or max(dims) >= 1 << 40 or dims[0] % block or offset % alignment.value:
                raise fail(f"tensor {name!r} of shape {list(dims)} and type {kind.name} at offset {offset}: rows "
                           f"must be whole blocks of {block} and offsets multiples of {alignment.value}")
            ends.append(start + offset + math.prod(dims) // block * block_bytes)
        if max(ends) > size:
            raise GGUFError(f"{path} is truncated: its tensor data runs to byte {max(ends)} but the file has {size} "
                            f"bytes ({max(ends) - size} missing); copy or download it again")
        data = np.frombuffer(self._map, np.uint8)
        for (name, dims, kind, offset), end in zip(infos, ends):
            block, block_bytes = GGML_QUANT_SIZES[kind]
            raw = data[start + offset : end]
            rows = tuple(reversed(dims[1:]))
            if kind.name in ELEMENT_DTYPES:
                array = raw.view(ELEMENT_DTYPES[kind.name]).reshape(*rows, dims[0])
            else:
                array = raw.reshape(*rows, dims[0] // block * block_bytes)
            self.tensors.append(Tensor(name, kind, dims, array))

    def field(self, key: str, kind: str, array: bool | None = False) -> Field | None:
        """The metadata field `key` (None if absent), checked to hold a `kind` value (KINDS), an array
        of them (`array` True) or either (None: a per-layer value given once or per layer)."""
        f = self.fields.get(key)
        if f is None:
            return None
        types, allowed = list(f.types), KINDS[kind]
        scalar = len(types) == 1 and types[0] in allowed
        listed = types[:1] == ["ARRAY"] and (len(types) == 1 or (len(types) == 2 and types[1] in allowed))  # [] has no element type
        if not (listed if array else scalar if array is False else scalar or listed):
            one = ("an " if kind == "integer" else "a ") + kind
            expected = f"an array of {kind}s" if array else one if array is False else f"{one} or an array of {kind}s"
            raise InputError(f"GGUF metadata {key!r} must be {expected}, found type {'/'.join(types) or 'none'}")
        return f

    def string(self, key: str) -> str | None:
        f = self.field(key, "string")
        return None if f is None else utf8(f.value, f"GGUF metadata {key!r}")

    def scalar(self, key: str, kind: str, default=None) -> int | float | bool | None:
        """An integer, number or boolean as its Python value; `default` if absent."""
        f = self.field(key, kind)
        return default if f is None else f.value

    def strings(self, key: str, exact: bool = False) -> list[str] | None:
        """A string array; `exact`: refuse invalid UTF-8 (else kept as surrogate escapes, the bytes as they are)."""
        f = self.field(key, "string", array=True)
        if f is None:
            return None
        if exact:
            return [utf8(raw, f"GGUF metadata {key!r} item {k}") for k, raw in enumerate(f.value)]
        return [raw.decode("utf-8", "surrogateescape") for raw in f.value]

    def per_token(self, key: str, kind: str, n_tokens: int) -> np.ndarray | None:
        """A numeric array with one value per token of the vocabulary; None if absent."""
        f = self.field(key, kind, array=True)
        if f is None:
            return None
        if len(f.value) != n_tokens:
            raise InputError(f"GGUF metadata {key!r} has {len(f.value)} values for {n_tokens} tokens")
        return np.asarray(f.value)
