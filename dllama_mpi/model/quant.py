"""Block formats, declared once, and their plain-numpy (reference) codecs.

The formats match llama.cpp's:
  Q40 (block_q4_0): fp16 scale d + 16 bytes; element j is the low nibble of byte j,
      element j + 16 its high nibble; value = (q - 8) * d.
  Q80 (block_q8_0): fp16 scale d + 32 int8; value = q * d.
  Q4K (block_q4_K, weights only, read from GGUF files): 256 values in 8 sub-blocks of 32;
      fp16 d and dmin, 12 bytes of 6-bit sub-block scales sc_j and mins m_j, 128 bytes of
      nibbles (chunk c of 64 values: byte 32 c + l holds sub-block 2c's element l low and
      sub-block 2c + 1's element l high); value = (d * sc_j) * q - (dmin * m_j).
  Q6K (block_q6_K, weights only, read from GGUF files): 256 values, 6-bit codes q in 0..63
      as 128 bytes of low nibbles and 64 of high bit pairs (see q6k_codes), 16 int8 scales
      sc_j (one per 16 values), fp16 d; value = (d * sc_j) * (q - 32).
  Q8K (block_q8_K less its bsums, activations only: what k-quant weights multiply, as in
      llama.cpp): 256 int8 codes and an f32 scale d; value = q * d.
The converter, the loader, the kernels (through `as_bytes`) and the tests all use these
definitions. numba has no float16 on the CPU, so kernels read the scale from the two
leading bytes of each block (see kernels.f16_bits_to_f32).
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
GROUP = 16  # blocks per lane group of the quantized products (qmatmul); rows are padded to it
Q40 = np.dtype([("d", "<f2"), ("qs", "u1", (BLOCK // 2,))])  # 18 bytes / 32 values
Q80 = np.dtype([("d", "<f2"), ("qs", "i1", (BLOCK,))])  # 34 bytes / 32 values

QK = 256  # values per k-quant super-block
Q4K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (QK // 2,))])  # 144 B / 256
Q6K = np.dtype([("ql", "u1", (QK // 2,)), ("qh", "u1", (QK // 4,)), ("scales", "i1", (QK // 16,)), ("d", "<f2")])  # 210 B
Q8K = np.dtype([("d", "<f4"), ("qs", "i1", (QK,))])  # 260 B / 256

# q4k, q6k: kept from a GGUF's Q4_K / Q6_K, never made by quantizing
WEIGHT_TYPES = ("f32", "f16", "q40", "q80", "q4k", "q6k")
K_QUANTS = ("q4k", "q6k")
# a lane group of 16 blocks of 32 as the kernels hold it (qmatmul's layouts), codes and scales apart.
# Q4K: 256 bytes of nibbles; 16 scales, 16 mins, 2 super-blocks' fp16 d and dmin. Q6K: 256 bytes of
# nibbles and 128 of high bit pairs; 2 x 16 int8 scales, 2 super-blocks' fp16 d
K_CODE_BYTES = {"q4k": 256, "q6k": 384}
K_SCALE_BYTES = {"q4k": 2 * GROUP + 8, "q6k": 2 * GROUP + 4}
QUANTIZABLE = ("f32", "f16", "q40", "q80")  # what the converter's --weights can make from any source
BUFFER_TYPES = ("f32", "q80")
# with q80 buffers, the 8-bit form of the activations each quantized weight type multiplies: the
# k-quants take Q8K (one f32 scale per 256 values), as llama.cpp does, the others Q80
ACTIVATION_TYPE = {"q40": "q80", "q80": "q80", "q4k": "q8k", "q6k": "q8k"}


def storage_type(weight_type: str, cols: int) -> str:
    """The type a weight matrix is stored in: q40 and q80 need whole blocks along each row,
    so a matrix whose row length is not a multiple of 32 (stories260K's w2, 172 wide)
    stays f32. The one place this decision is made."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    if weight_type in K_QUANTS and cols % QK:  # never from a GGUF (k-quant rows are whole super-blocks)
        weight_type = "q80"
    if weight_type in ("q40", "q80") and cols % BLOCK:
        return "f32"
    return weight_type


def row_bytes(tensor_type: str, cols: int) -> int:
    """Bytes of one stored row of `cols` values."""
    return stored_dtype(tensor_type).itemsize * stored_cols(tensor_type, cols)


def resident_row_bytes(tensor_type: str, cols: int) -> int:
    """Bytes of one row as the kernels hold it in memory: a quantized row is padded with
    zero blocks to a multiple of GROUP blocks (qmatmul's lane groups); a Q4K row is held as
    its nibbles, 6-bit scales and mins a byte each, fp16 d and dmin per super-block (148
    bytes per 256 against the file's 144; qmatmul.pack_q4k); a Q6K row as its codes' nibbles
    and high bit pairs, int8 scales and fp16 d: the file's 210 bytes per 256 (qmatmul.pack_q6k)."""
    if tensor_type in K_QUANTS:
        return (K_CODE_BYTES[tensor_type] + K_SCALE_BYTES[tensor_type]) * (-(-(cols // BLOCK) // GROUP))
    if tensor_type in ("q40", "q80"):
        blocks = stored_cols(tensor_type, cols)
        return stored_dtype(tensor_type).itemsize * (-(-blocks // GROUP) * GROUP)
    return row_bytes(tensor_type, cols)


def stored_dtype(tensor_type: str) -> np.dtype:
    """The element dtype of a stored row: a value (f32, f16) or a block (q40, q80)."""
    try:
        return {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "q40": Q40, "q80": Q80, "q4k": Q4K,
                "q6k": Q6K}[tensor_type]
    except KeyError:
        raise ValueError(f"unknown tensor type {tensor_type!r}") from None


def stored_cols(tensor_type: str, cols: int) -> int:
    """Elements per stored row: values, blocks of 32 for Q40/Q80, super-blocks of 256 for Q4K/Q6K."""
    if tensor_type in K_QUANTS:
        return cols // QK
    return cols // BLOCK if tensor_type in ("q40", "q80") else cols


def type_of(array: np.ndarray) -> str:
    """The tensor type of a stored array (inverse of stored_dtype)."""
    for name in WEIGHT_TYPES:
        if array.dtype == stored_dtype(name):
            return name
    raise ValueError(f"no tensor type stores dtype {array.dtype}")


def encode(dense: np.ndarray, tensor_type: str) -> np.ndarray:
    """(rows, cols) float -> stored form of `tensor_type`."""
    if tensor_type == "q40":
        return quantize_q40(dense)
    if tensor_type == "q80":
        return quantize_q80(np.asarray(dense, np.float32))
    if tensor_type in K_QUANTS:
        raise ValueError(f"{tensor_type} is kept from GGUF files as stored, never made by quantizing")
    return np.asarray(dense, dtype=stored_dtype(tensor_type))


def decode(stored: np.ndarray) -> np.ndarray:
    """Stored form of any type -> float32 values."""
    kind = type_of(stored)
    if kind == "q40":
        return dequantize_q40(stored)
    if kind == "q80":
        return dequantize_q80(stored)
    if kind == "q4k":
        return dequantize_q4k(stored)
    if kind == "q6k":
        return dequantize_q6k(stored)
    return stored.astype(np.float32)


def convert(stored: np.ndarray, tensor_type: str) -> np.ndarray:
    """Re-express a stored tensor in `tensor_type`; blocks already of that type are kept
    bit-exact (a GGUF Q4_0 tensor becomes Q40 unchanged)."""
    if type_of(stored) == tensor_type:
        return stored
    return encode(decode(stored), tensor_type)


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
    """(..., nb) Q4K -> the 6-bit sub-block scales and mins, each (..., nb, 8) int64, unpacked
    as llama.cpp's get_scale_min_k4."""
    q = blocks["scales"].astype(np.int64)  # (..., nb, 12)
    sc = np.concatenate([q[..., 0:4] & 63, (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)], axis=-1)
    m = np.concatenate([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], axis=-1)
    return sc, m


def q4k_codes(blocks: np.ndarray) -> np.ndarray:
    """(..., nb) Q4K -> (..., nb, 8, 32) uint8 nibble codes, by sub-block and element."""
    qs = blocks["qs"].reshape(*blocks.shape, 4, 32)  # chunks of 64 values
    return np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*blocks.shape, 8, 32)


def q4k_sub_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., nb) Q4K -> f32 (..., nb * 8) per 32-value sub-block: scale d * sc_j and min
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
