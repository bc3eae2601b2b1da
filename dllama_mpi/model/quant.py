"""The weight types, one record each (WEIGHTS: WeightType, at the end), their block formats
and plain-numpy (reference) codecs, and the activations' 8-bit forms (ACTIVATIONS).

A record says, as ggml's type traits do, everything that differs between types: the stored
element and its values, the numpy decoder and encoder, the kernel layout (Layout: what the
x86 code generation reads too), its kernels and numpy twins by name (Kernels), the activation
form its products take, the type a row that is not whole elements falls back to, and the
converter's names (ggml's, distributed-llama's code). Every other module reads the records;
adding a type is one record plus its codecs and kernels.

The formats match llama.cpp's:
  Q40 (block_q4_0): fp16 scale d + 16 bytes; element j is the low nibble of byte j,
      element j + 16 its high nibble; value = (q - 8) * d.
  Q50 (block_q5_0, weights only, read from GGUF files): fp16 scale d, 4 bytes qh (a
      little-endian u32 whose bit j is element j's 5th bit), 16 bytes qs as Q40's nibbles;
      value = ((nibble | high bit << 4) - 16) * d (see q50_codes).
  Q80 (block_q8_0): fp16 scale d + 32 int8; value = q * d.
  Q4K (block_q4_K, weights only, read from GGUF files): 256 values in 8 sub-blocks of 32;
      fp16 d and dmin, 12 bytes of 6-bit sub-block scales sc_j and mins m_j, 128 bytes of
      nibbles (chunk c of 64 values: byte 32 c + l holds sub-block 2c's element l low and
      sub-block 2c + 1's element l high); value = (d * sc_j) * q - (dmin * m_j).
  Q5K (block_q5_K, weights only, read from GGUF files): Q4K's with 5-bit codes q in 0..31: fp16
      d and dmin, Q4K's 12 bytes of scales and mins, 32 bytes qh (bit j of qh[l] is sub-block j's
      element l's 5th bit), then Q4K's 128 bytes of nibbles (see q5k_codes); value as Q4K's.
  Q6K (block_q6_K, weights only, read from GGUF files): 256 values, 6-bit codes q in 0..63
      as 128 bytes of low nibbles and 64 of high bit pairs (see q6k_codes), 16 int8 scales
      sc_j (one per 16 values), fp16 d; value = (d * sc_j) * (q - 32).
  Q8K (block_q8_K less its bsums, activations only: what k-quant weights multiply, as in
      llama.cpp): 256 int8 codes and an f32 scale d; value = q * d.
The converter, the loader, the kernels (through `as_bytes`) and the tests all use these
definitions; a record's name is what model files store, so the names never change.
numba has no float16 on the CPU, so kernels read the scale from the two leading bytes of each
block (see kernels.qmatmul.f16_bits_to_f32).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BLOCK = 32
GROUP = 16  # blocks per lane group of the quantized products (qmatmul); rows are padded to it
Q40 = np.dtype([("d", "<f2"), ("qs", "u1", (BLOCK // 2,))])  # 18 bytes / 32 values
Q50 = np.dtype([("d", "<f2"), ("qh", "u1", (4,)), ("qs", "u1", (BLOCK // 2,))])  # 22 bytes / 32 values
Q80 = np.dtype([("d", "<f2"), ("qs", "i1", (BLOCK,))])  # 34 bytes / 32 values

QK = 256  # values per k-quant super-block
Q4K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (QK // 2,))])  # 144 B / 256
Q5K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qh", "u1", (QK // 8,)),
                ("qs", "u1", (QK // 2,))])  # 176 B / 256
Q6K = np.dtype([("ql", "u1", (QK // 2,)), ("qh", "u1", (QK // 4,)), ("scales", "i1", (QK // 16,)), ("d", "<f2")])  # 210 B
Q8K = np.dtype([("d", "<f4"), ("qs", "i1", (QK,))])  # 260 B / 256

@dataclass(frozen=True)
class Layout:
    """A quantized type as the kernels hold it (qmatmul's layouts): per lane group of GROUP blocks
    of 32 values, its codes qs and its scales d, and what the x86 tiles' code generation reads."""

    code_bytes: int  # qs bytes per lane group
    scale_bytes: int  # d bytes per lane group
    packed: tuple[str, str]  # the dtypes of qs and d: how numba's typing of a tile tells the type (one pair a type)
    nibbles: bool  # 4-bit codes (quad k: elements 4k..4k+3 low, 16+4k..16+4k+3 high), else an int8 code a byte
    offset: int = 0  # taken from every code (Q40's 8, Q50's 16, Q6K's 32)
    high_bits: int = 0  # bits of each code above its nibble, packed after the nibbles (Q50's and Q5K's 1, Q6K's 2)
    super_scales: bool = False  # 8-bit scales times their super-block's fp16 d (k-quants), else an fp16 d a block
    signed_scales: bool = False  # those 8-bit scales are int8, else unsigned 6-bit
    half_scales: bool = False  # a scale per 16 values (Q6K), else per block
    min_term: bool = False  # value s * q - m: a 6-bit min a block after the scales, an fp16 dmin per super-block (Q4K, Q5K)


@dataclass(frozen=True)
class Kernels:
    """A type's kernels and numpy twins by name, "module.function" under dllama_mpi.kernels
    (kernels.resolve): that package imports numba, this module does not."""

    rows_f32: str  # the product with f32 activations (float weights' only one)
    rows_8bit: str | None = None  # the product with its 8-bit activation form
    pack: str | None = None  # stored rows -> as the kernels hold them: (qs, d), or f16's bits; None: as stored
    row: str | None = None  # one row as held -> f32 (an embedding lookup); None: the values themselves
    twins: tuple[str, str] | None = None  # the products' numpy twins, bit for bit: 8-bit, f32 activations


@dataclass(frozen=True)
class WeightType:
    """One weight type, as llama.cpp's type traits: how it is stored, held, made, read and multiplied."""

    name: str  # as stored in model files (a dataset's "type" attribute, weight_type, tensor_types)
    dtype: np.dtype  # element of a stored row: a value or a block
    block_values: int  # values per element
    kernels: Kernels
    decode: Callable[[np.ndarray], np.ndarray]  # stored -> f32 values (the numpy dequantizer)
    encode: Callable[[np.ndarray], np.ndarray] | None = None  # dense float -> stored; None: kept from GGUF files only
    layout: Layout | None = None  # None: float values, held as stored
    activation: str | None = None  # with q80 buffers, the 8-bit form of the activations it multiplies (ACTIVATIONS)
    fallback: str | None = None  # the type of a matrix whose rows are not whole elements
    gguf: str | None = None  # ggml's name of the same type: the converter keeps it bit-exact
    widens: tuple[str, ...] = ()  # ggml types the converter widens to this one losslessly
    dllama_code: int | None = None  # distributed-llama's float type code
    format_version: int = 1  # the first model-file format version that may hold it (docs/model-format.md)

    @property
    def quantized(self) -> bool:
        return self.layout is not None

    @property
    def bits(self) -> float:
        """Stored bits per value."""
        return 8 * self.dtype.itemsize / self.block_values


@dataclass(frozen=True)
class ActivationType:
    """An 8-bit form of the activations, which quantized products take with q80 buffers."""

    name: str
    dtype: np.dtype  # a block
    block_values: int  # values per block: one scale
    quantize: Callable[[np.ndarray], np.ndarray]  # (..., n) f32 -> blocks: the numpy twin
    pack: str | None  # kernel packing (T, n) f32 into the products' codes (qmatmul); None: from the Q80 blocks that travel
    gguf: str  # ggml's name of the same blocks (the vec_dot_type of the weight types that take it)


def weight_type(name: str) -> WeightType:
    """The record of type `name`; ValueError for a name no record has."""
    try:
        return WEIGHTS[name]
    except KeyError:
        raise ValueError(f"unknown tensor type {name!r}; types are {WEIGHT_TYPES}") from None


def storage_type(weight_type: str, cols: int) -> str:
    """The type a weight matrix is stored in: rows must be whole elements of the type, so a
    matrix whose rows are not takes the type's fallback (q40, q50 and q80: f32, as stories260K's
    w2, 172 wide; the k-quants: q80, never from a GGUF, whose rows are whole super-blocks). The one
    place this decision is made."""
    if weight_type not in WEIGHTS:
        raise ValueError(f"weight type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    while cols % WEIGHTS[weight_type].block_values:
        weight_type = WEIGHTS[weight_type].fallback
    return weight_type


def row_bytes(tensor_type: str, cols: int) -> int:
    """Bytes of one stored row of `cols` values."""
    return stored_dtype(tensor_type).itemsize * stored_cols(tensor_type, cols)


def resident_row_bytes(tensor_type: str, cols: int) -> int:
    """Bytes of one row as the kernels hold it in memory: a quantized row is padded with zero
    blocks to a multiple of GROUP blocks (qmatmul's lane groups), each group its layout's codes
    and scales (Q4K: 148 bytes per 256 values against the file's 144, its 6-bit scales and mins a
    byte each, Q5K: 180 against 176; Q50 and Q6K: the file's 22 per 32 and 210 per 256)."""
    layout = weight_type(tensor_type).layout
    if layout is None:
        return row_bytes(tensor_type, cols)
    return (layout.code_bytes + layout.scale_bytes) * (-(-(cols // BLOCK) // GROUP))


def stored_dtype(tensor_type: str) -> np.dtype:
    """The element dtype of a stored row: a value (f32, f16) or a block."""
    return weight_type(tensor_type).dtype


def stored_cols(tensor_type: str, cols: int) -> int:
    """Elements per stored row: values, blocks of 32 (Q40, Q50, Q80), super-blocks of 256 (Q4K, Q5K, Q6K)."""
    return cols // weight_type(tensor_type).block_values


def type_of(array: np.ndarray) -> str:
    """The tensor type of a stored array (inverse of stored_dtype)."""
    for name, t in WEIGHTS.items():
        if array.dtype == t.dtype:
            return name
    raise ValueError(f"no tensor type stores dtype {array.dtype}")


def block_type(dtype: np.dtype) -> WeightType | None:
    """The quantized type whose blocks are `dtype`; None for any other dtype (float values)."""
    return next((t for t in WEIGHTS.values() if t.quantized and t.dtype == dtype), None)


def gguf_type(name: str) -> WeightType | None:
    """Our type of ggml's type `name` ("Q4_0"), kept bit-exact; None where we have none."""
    return next((t for t in WEIGHTS.values() if t.gguf == name), None)


def packed_type(qs_dtype: str, d_dtype: str) -> WeightType:
    """The quantized type whose kernel layout holds codes and scales of these dtypes (Layout.packed)."""
    return next(t for t in WEIGHTS.values() if t.layout is not None and t.layout.packed == (qs_dtype, d_dtype))


def encode(dense: np.ndarray, tensor_type: str) -> np.ndarray:
    """(rows, cols) float -> stored form of `tensor_type`."""
    t = weight_type(tensor_type)
    if t.encode is None:
        raise ValueError(f"{tensor_type} is kept from GGUF files as stored, never made by quantizing")
    return t.encode(dense)


def decode(stored: np.ndarray) -> np.ndarray:
    """Stored form of any type -> float32 values."""
    return WEIGHTS[type_of(stored)].decode(stored)


def convert(stored: np.ndarray, tensor_type: str) -> np.ndarray:
    """Re-express a stored tensor in `tensor_type`; blocks already of that type are kept
    bit-exact (a GGUF Q4_0 tensor becomes Q40 unchanged)."""
    if type_of(stored) == tensor_type:
        return stored
    return encode(decode(stored), tensor_type)


def _values(dtype: np.dtype) -> Callable[[np.ndarray], np.ndarray]:
    return lambda dense: np.asarray(dense, dtype=dtype)


def _float32(stored: np.ndarray) -> np.ndarray:
    return stored.astype(np.float32)


def quantize_q40(x: np.ndarray) -> np.ndarray:
    """(rows, cols) float -> (rows, cols // 32) Q40, as llama.cpp's quantize_row_q4_0_ref."""
    rows, cols = x.shape
    assert cols % BLOCK == 0, cols
    xb = np.ascontiguousarray(x, dtype=np.float32).reshape(rows, cols // BLOCK, BLOCK)
    # the signed value of largest magnitude maps to -8
    idx = np.abs(xb).argmax(axis=2)[..., None]
    vmax = np.take_along_axis(xb, idx, axis=2)[..., 0]
    d = (vmax / np.float32(-8)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.minimum(15, (xb * inv[..., None] + np.float32(8.5)).astype(np.int8)).astype(np.uint8)
    out = np.empty((rows, cols // BLOCK), dtype=Q40)
    out["d"] = d.astype(np.float16)
    out["qs"] = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)
    return out


def dequantize_q40(blocks: np.ndarray) -> np.ndarray:
    """(rows, nb) Q40 -> (rows, nb * 32) float32."""
    qs = blocks["qs"]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32) - 8
    x = q * blocks["d"].astype(np.float32)[..., None]
    return x.reshape(*blocks.shape[:-1], -1)


def q50_codes(blocks: np.ndarray) -> np.ndarray:
    """(..., nb) Q50 -> (..., nb, 32) uint8 codes 0..31 in value order: element j's nibble
    (Q40's: low nibble of qs[j], j + 16 the high one) with bit j of the little-endian u32 qh
    above it, as llama.cpp's dequantize_row_q5_0."""
    qs = blocks["qs"]
    high = np.unpackbits(blocks["qh"], axis=-1, bitorder="little")  # (..., nb, 32): bit j of the u32
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1) | (high << 4)


def dequantize_q50(blocks: np.ndarray) -> np.ndarray:
    """(..., nb) Q50 -> (..., nb * 32) float32: (q - 16) * d, as llama.cpp."""
    q = q50_codes(blocks).astype(np.float32) - 16
    return (q * blocks["d"].astype(np.float32)[..., None]).reshape(*blocks.shape[:-1], -1)


def quantize_q80(x: np.ndarray) -> np.ndarray:
    """(..., n) float32 -> (..., n // 32) Q80, as llama.cpp's quantize_row_q8_0_ref
    (scale from the f32 amax, values rounded half away from zero)."""
    xb = np.asarray(x, dtype=np.float32).reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)  # also 0 rows
    d = (np.abs(xb).max(axis=-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    v = (xb * inv[..., None]).astype(np.float64)
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)
    out = np.empty(xb.shape[:-1], dtype=Q80)
    out["d"] = d.astype(np.float16)
    out["qs"] = q.astype(np.int8)
    return out


def quantize_q80_activations(x: np.ndarray) -> np.ndarray:
    """(..., n) float32 -> (..., n // 32) Q80, as llama.cpp's x86 quantize_row_q8_0 quantizes the
    activations of its Q4_0/Q8_0 products (quantize_q80 is what llama-quantize writes): the
    same fp16 scale, values x * (127 / amax) in f32 rounded half to even (a block whose amax is
    below ~4e-37, so that 127 / amax overflows, gets codes 0: its fp16 scale is 0)."""
    xb = np.asarray(x, dtype=np.float32).reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax = np.abs(xb).max(axis=-1)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    inv[np.isinf(inv)] = 0
    out = np.empty(xb.shape[:-1], dtype=Q80)
    with np.errstate(over="ignore"):
        out["d"] = (amax / np.float32(127)).astype(np.float32).astype(np.float16)
    out["qs"] = np.rint(xb * inv[..., None]).astype(np.int8)
    return out


def quantize_q8k(x: np.ndarray) -> np.ndarray:
    """(..., n) float32 -> (..., n // 256) Q8K, as llama.cpp's quantize_row_q8_K_ref: the first
    value of largest magnitude, m, becomes -127 (iscale = -127 / m in f32), every value x the
    nearest integer to iscale * x (f32 product, ties to even) capped at 127, d = 1 / iscale."""
    xb = np.asarray(x, dtype=np.float32).reshape(*x.shape[:-1], x.shape[-1] // QK, QK)
    m = np.take_along_axis(xb, np.abs(xb).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(m != 0, np.float32(-127) / m, np.float32(0)).astype(np.float32)
        d = np.where(m != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    out = np.empty(xb.shape[:-1], dtype=Q8K)
    out["d"] = d
    out["qs"] = np.minimum(np.rint(xb * iscale[..., None]), 127).astype(np.int8)
    return out


def dequantize_q80(blocks: np.ndarray) -> np.ndarray:
    """(..., nb) Q80 -> (..., nb * 32) float32."""
    x = blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[..., None]
    return x.reshape(*blocks.shape[:-1], -1)


def q4k_scales_mins(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., nb) Q4K or Q5K -> the 6-bit sub-block scales and mins, each (..., nb, 8) int64, unpacked
    as llama.cpp's get_scale_min_k4."""
    q = blocks["scales"].astype(np.int64)  # (..., nb, 12)
    sc = np.concatenate([q[..., 0:4] & 63, (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)], axis=-1)
    m = np.concatenate([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], axis=-1)
    return sc, m


def q4k_codes(blocks: np.ndarray) -> np.ndarray:
    """(..., nb) Q4K (or Q5K) -> (..., nb, 8, 32) uint8 nibble codes, by sub-block and element."""
    qs = blocks["qs"].reshape(*blocks.shape, 4, 32)  # chunks of 64 values
    return np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*blocks.shape, 8, 32)


def q5k_codes(blocks: np.ndarray) -> np.ndarray:
    """(..., nb) Q5K -> (..., nb, 8, 32) uint8 codes 0..31, by sub-block and element: Q4K's nibble
    with bit j of qh[l] above sub-block j's element l, as llama.cpp's dequantize_row_q5_K."""
    high = (blocks["qh"][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # (..., nb, 8, 32)
    return q4k_codes(blocks) | (high << 4)


def q4k_sub_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., nb) Q4K or Q5K -> f32 (..., nb * 8) per 32-value sub-block: scale d * sc_j and min
    dmin * m_j, each exact in f32 (an fp16 times a 6-bit integer)."""
    sc, m = q4k_scales_mins(blocks)
    d, dmin = blocks["d"].astype(np.float32)[..., None], blocks["dmin"].astype(np.float32)[..., None]
    shape = (*blocks.shape[:-1], blocks.shape[-1] * 8)
    return (d * sc.astype(np.float32)).reshape(shape), (dmin * m.astype(np.float32)).reshape(shape)


def dequantize_q4k(blocks: np.ndarray) -> np.ndarray:
    """(..., nb) Q4K -> (..., nb * 256) float32, as llama.cpp's dequantize_row_q4_K:
    (d * sc) * q - dmin * m in f32."""
    scale, low = q4k_sub_scales(blocks)
    codes = q4k_codes(blocks).reshape(*scale.shape, 32).astype(np.float32)
    return (scale[..., None] * codes - low[..., None]).reshape(*blocks.shape[:-1], -1)


def dequantize_q5k(blocks: np.ndarray) -> np.ndarray:
    """(..., nb) Q5K -> (..., nb * 256) float32, as llama.cpp's dequantize_row_q5_K: Q4K's
    (d * sc) * q - dmin * m in f32, of the 5-bit codes."""
    scale, low = q4k_sub_scales(blocks)
    codes = q5k_codes(blocks).reshape(*scale.shape, 32).astype(np.float32)
    return (scale[..., None] * codes - low[..., None]).reshape(*blocks.shape[:-1], -1)


def q6k_codes(blocks: np.ndarray) -> np.ndarray:
    """(..., nb) Q6K -> (..., nb, 256) uint8 codes 0..63 in value order, as llama.cpp's
    dequantize_row_q6_K: per half of 128 values, ql's 64 bytes and qh's 32; value 32 i + l
    (i < 4, l < 32) is nibble i // 2 of ql[32 (i % 2) + l] with bits 2i, 2i + 1 of qh[l] above it."""
    ql = blocks["ql"].reshape(*blocks.shape, 2, 2, 32)  # (half, i % 2, l)
    qh = blocks["qh"].reshape(*blocks.shape, 2, 1, 32)
    quarters = [((ql[..., i % 2, :] >> (4 * (i // 2))) & 15) | (((qh[..., 0, :] >> (2 * i)) & 3) << 4) for i in range(4)]
    return np.stack(quarters, axis=-2).reshape(*blocks.shape, QK)


def q6k_scales(blocks: np.ndarray) -> np.ndarray:
    """(..., nb) Q6K -> f32 (..., nb * 16) per 16 values: d * sc_j, exact in f32 (an fp16
    times an int8)."""
    d = blocks["d"].astype(np.float32)[..., None]
    return (d * blocks["scales"].astype(np.float32)).reshape(*blocks.shape[:-1], blocks.shape[-1] * 16)


def dequantize_q6k(blocks: np.ndarray) -> np.ndarray:
    """(..., nb) Q6K -> (..., nb * 256) float32: (d * sc_j) * (q - 32) in f32, as llama.cpp."""
    scale = q6k_scales(blocks)
    codes = q6k_codes(blocks).reshape(*scale.shape, 16).astype(np.float32) - 32
    return (scale[..., None] * codes).reshape(*blocks.shape[:-1], -1)


def as_bytes(blocks: np.ndarray) -> np.ndarray:
    """A structured block array viewed as raw bytes (..., nb, itemsize), the form
    kernels and MPI take."""
    return blocks.view(np.uint8).reshape(*blocks.shape, blocks.dtype.itemsize)


# --- the registry: one record a type ------------------------------------------------------

F32_TYPE = WeightType("f32", np.dtype(np.float32), 1, Kernels(rows_f32="vector.f32_rows"), decode=_float32,
                      encode=_values(np.dtype(np.float32)), gguf="F32", widens=("BF16",), dllama_code=0)
F16_TYPE = WeightType("f16", np.dtype(np.float16), 1,
                      Kernels(rows_f32="vector.f16_rows", pack="vector.f16_bits", row="vector.f16_row"), decode=_float32,
                      encode=_values(np.dtype(np.float16)), gguf="F16", dllama_code=1)
_Q_KERNELS = dict(rows_8bit="qmatmul.q_q80_rows", rows_f32="qmatmul.q_f32_rows", pack="qmatmul.pack_weights",
                  row="qmatmul.dequantize_row", twins=("reference.matvec_q_q80_exact", "reference.matvec_q_f32_exact"))
Q40_TYPE = WeightType("q40", Q40, BLOCK, Kernels(**_Q_KERNELS), decode=dequantize_q40, encode=quantize_q40,
                      layout=Layout(256, 2 * GROUP, ("uint8", "uint16"), nibbles=True, offset=8),
                      activation="q80", fallback="f32", gguf="Q4_0", dllama_code=2)
Q80_TYPE = WeightType("q80", Q80, BLOCK, Kernels(**_Q_KERNELS), decode=dequantize_q80, encode=quantize_q80,
                      layout=Layout(512, 2 * GROUP, ("int8", "uint16"), nibbles=False),
                      activation="q80", fallback="f32", gguf="Q8_0", dllama_code=3)
# the k-quants: kept from a GGUF's Q4_K / Q5_K / Q6_K, never made by quantizing
_KMIN_KERNELS = dict(rows_8bit="qmatmul.k_q80_rows", rows_f32="qmatmul.k_f32_rows", row="qmatmul.dequantize_row_kmin",
                     twins=("reference.matvec_kmin_q8_exact", "reference.matvec_kmin_f32_exact"))  # Q4K's and Q5K's
Q4K_TYPE = WeightType("q4k", Q4K, QK, Kernels(**_KMIN_KERNELS, pack="qmatmul.pack_q4k"), decode=dequantize_q4k,
                      # 256 bytes of nibbles; 16 scales, 16 mins, 2 super-blocks' fp16 d and dmin
                      layout=Layout(256, 2 * GROUP + 8, ("uint8", "uint8"), nibbles=True, super_scales=True, min_term=True),
                      activation="q8k", fallback="q80", gguf="Q4_K", format_version=2)
Q5K_TYPE = WeightType("q5k", Q5K, QK, Kernels(**_KMIN_KERNELS, pack="qmatmul.pack_q5k"), decode=dequantize_q5k,
                      # Q4K's nibbles and d bytes, then 64 bytes of the codes' 5th bits as Q50's; the codes as int8
                      # (raw bytes to the kernels): the dtype that tells Q5K from Q4K
                      layout=Layout(320, 2 * GROUP + 8, ("int8", "uint8"), nibbles=True, high_bits=1, super_scales=True,
                                    min_term=True),
                      activation="q8k", fallback="q80", gguf="Q5_K", format_version=2)
Q6K_TYPE = WeightType("q6k", Q6K, QK, Kernels(rows_8bit="qmatmul.k_q80_rows", rows_f32="qmatmul.k_f32_rows",
                                              pack="qmatmul.pack_q6k", row="qmatmul.dequantize_row_q6k",
                                              twins=("reference.matvec_q6k_q8_exact", "reference.matvec_q6k_f32_exact")),
                      decode=dequantize_q6k,
                      # 256 bytes of nibbles and 128 of high bit pairs; 2 x 16 int8 scales, 2 super-blocks' fp16 d
                      layout=Layout(384, 2 * GROUP + 4, ("uint8", "int8"), nibbles=True, offset=32, high_bits=2,
                                    super_scales=True, signed_scales=True, half_scales=True),
                      activation="q8k", fallback="q80", gguf="Q6_K", format_version=2)
# kept from a GGUF's Q5_0 (a Q4_K_M file's matrices whose rows are not whole super-blocks), never made by quantizing
Q50_TYPE = WeightType("q50", Q50, BLOCK, Kernels(**{**_Q_KERNELS, "pack": "qmatmul.pack_q50"}), decode=dequantize_q50,
                      # 256 bytes of nibbles as Q40's, 64 of their high bits (see qmatmul); 16 fp16 d as int16 bits
                      layout=Layout(320, 2 * GROUP, ("uint8", "int16"), nibbles=True, offset=16, high_bits=1),
                      activation="q80", fallback="f32", gguf="Q5_0", format_version=2)
WEIGHTS = {t.name: t for t in (F32_TYPE, F16_TYPE, Q40_TYPE, Q80_TYPE, Q4K_TYPE, Q5K_TYPE, Q6K_TYPE, Q50_TYPE)}

# with q80 buffers, what each quantized weight type's products take: the k-quants Q8K (one f32
# scale per 256 values), as llama.cpp does, the others Q80
Q80_ACTIVATIONS = ActivationType("q80", Q80, BLOCK, quantize_q80_activations, pack=None, gguf="Q8_0")
Q8K_ACTIVATIONS = ActivationType("q8k", Q8K, QK, quantize_q8k, pack="qmatmul.pack_q8k", gguf="Q8_K")  # less ggml's bsums
ACTIVATIONS = {a.name: a for a in (Q80_ACTIVATIONS, Q8K_ACTIVATIONS)}

# views of the registry
WEIGHT_TYPES = tuple(WEIGHTS)
K_QUANTS = tuple(t.name for t in WEIGHTS.values() if t.block_values == QK)  # llama.cpp's k-quants: super-blocks of 256
QUANTIZABLE = tuple(t.name for t in WEIGHTS.values() if t.encode is not None)  # what --weights can make from any source
ACTIVATION_TYPE = {t.name: t.activation for t in WEIGHTS.values() if t.activation is not None}
BUFFER_TYPES = (F32_TYPE.name, Q80_ACTIVATIONS.name)  # activations between products: f32, or Q80 blocks


# --- the KV cache's types (--kv-type) ---------------------------------------------------------


@dataclass(frozen=True)
class KVType:
    """How the KV cache holds one head's key (or value) row of head_dim values at a position:
    codes of `code_dtype`, and for a scaled type one fp16 scale (its bits, u16) per block of
    `block(head_dim)` values; value = code * scale. The kernels' encoders and decoders are in
    kernels.vector (kv_encode, kv_decode), chosen by code_dtype; `encode` and `decode` are their
    numpy twins."""

    name: str
    code_dtype: np.dtype
    scaled: bool
    encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # (..., head_dim) f32 -> codes, scale bits
    decode: Callable[[np.ndarray, np.ndarray], np.ndarray]  # codes, scale bits -> (..., head_dim) f32

    def block(self, head_dim: int) -> int:
        """Values per scale: 32 as Q8_0 where head_dim allows; else the largest power of two
        dividing head_dim (stories260K's heads are 8 wide), so a block never spans two heads
        and a split never changes a code."""
        return math.gcd(head_dim, BLOCK) if self.scaled else head_dim

    def scales_per_row(self, head_dim: int) -> int:
        return head_dim // self.block(head_dim) if self.scaled else 0

    def row_bytes(self, head_dim: int) -> int:
        """Bytes of one head's key (or value) at one position."""
        return head_dim * self.code_dtype.itemsize + 2 * self.scales_per_row(head_dim)


def _no_scales(x: np.ndarray) -> np.ndarray:
    return np.zeros((*x.shape[:-1], 0), np.uint16)


def encode_kv_q80(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., head_dim) f32 -> int8 codes (..., head_dim) and fp16 scale bits (..., head_dim /
    block), each block as llama.cpp's x86 quantize_row_q8_0 (what its q8_0 KV cache stores;
    quantize_q80_activations) quantizes 32 values, at KV_Q80.block(head_dim) values."""
    x = np.asarray(x, np.float32)
    block = KV_Q80.block(x.shape[-1])
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = np.abs(xb).max(axis=-1)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        d = (amax / np.float32(127)).astype(np.float32).astype(np.float16)
    inv[np.isinf(inv)] = 0
    codes = np.rint(xb * inv[..., None]).astype(np.int8).reshape(x.shape)
    return codes, d.view(np.uint16)


def decode_kv_q80(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    block = codes.shape[-1] // scales.shape[-1]
    d = scales.view(np.float16).astype(np.float32)
    qb = codes.reshape(*codes.shape[:-1], scales.shape[-1], block).astype(np.float32)
    return (qb * d[..., None]).reshape(codes.shape)


KV_F32 = KVType("f32", np.dtype(np.float32), False, lambda x: (np.asarray(x, np.float32).copy(), _no_scales(x)),
                lambda codes, scales: codes.astype(np.float32))
KV_F16 = KVType("f16", np.dtype(np.uint16), False,  # fp16 bits, rounded to nearest even as numpy rounds
                lambda x: (np.asarray(x, np.float32).astype(np.float16).view(np.uint16), _no_scales(x)),
                lambda codes, scales: codes.view(np.float16).astype(np.float32))
KV_Q80 = KVType("q8_0", np.dtype(np.int8), True, encode_kv_q80, decode_kv_q80)
KV_TYPES = {t.name: t for t in (KV_F32, KV_F16, KV_Q80)}
DEFAULT_KV_TYPE = KV_F16.name  # as llama.cpp: half the memory and the attention reads of f32
