"""Block formats, declared once, and their plain-numpy (reference) codecs.

Both formats match llama.cpp's:
  Q40 (block_q4_0): fp16 scale d + 16 bytes; element j is the low nibble of byte j,
      element j + 16 its high nibble; value = (q - 8) * d.
  Q80 (block_q8_0): fp16 scale d + 32 int8; value = q * d.
The converter, the loader, the kernels (through `as_bytes`) and the tests all use these
definitions. numba has no float16 on the CPU, so kernels read the scale from the two
leading bytes of each block (see kernels.f16_bits_to_f32).
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
Q40 = np.dtype([("d", "<f2"), ("qs", "u1", (BLOCK // 2,))])  # 18 bytes / 32 values
Q80 = np.dtype([("d", "<f2"), ("qs", "i1", (BLOCK,))])  # 34 bytes / 32 values

WEIGHT_TYPES = ("f32", "q40")
BUFFER_TYPES = ("f32", "q80")


def storage_type(weight_type: str, cols: int) -> str:
    """The type a weight matrix is stored in: q40 needs whole blocks along each row,
    so a matrix whose row length is not a multiple of 32 (stories260K's w2, 172 wide)
    stays f32. The one place this decision is made."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    return "q40" if weight_type == "q40" and cols % BLOCK == 0 else "f32"


def row_bytes(tensor_type: str, cols: int) -> int:
    """Bytes of one stored row of `cols` values."""
    if tensor_type == "f32":
        return 4 * cols
    if tensor_type == "q40":
        return (cols // BLOCK) * Q40.itemsize
    raise ValueError(f"unknown tensor type {tensor_type!r}")


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
    xb = np.asarray(x, dtype=np.float32).reshape(*x.shape[:-1], -1, BLOCK)
    d = (np.abs(xb).max(axis=-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    v = (xb * inv[..., None]).astype(np.float64)
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)
    out = np.empty(xb.shape[:-1], dtype=Q80)
    out["d"] = d.astype(np.float16)
    out["qs"] = q.astype(np.int8)
    return out


def dequantize_q80(blocks: np.ndarray) -> np.ndarray:
    """(..., nb) Q80 -> (..., nb * 32) float32."""
    x = blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[..., None]
    return x.reshape(*blocks.shape[:-1], -1)


def as_bytes(blocks: np.ndarray) -> np.ndarray:
    """A structured block array viewed as raw bytes (..., nb, itemsize), the form
    kernels and MPI take."""
    return blocks.view(np.uint8).reshape(*blocks.shape, blocks.dtype.itemsize)
