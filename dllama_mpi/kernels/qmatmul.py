"""Quantized matrix products, out (T, rows) = x (T, cols) @ w.T on a rank's rows, with
Q40, Q50, Q80, Q4K, Q5K or Q6K weights and 8-bit (Q80 or Q8K) or f32 activations; their
layouts; the instruction set.

One arithmetic, whatever computes it. For a row and a token, per block b (32 values) the
integer dot product of the codes, isum_b, is exact. Blocks are taken in lane groups of 16
(a row's block count is padded with zero blocks to a multiple of 16): lane l sums, in
group order, p_b = f32(isum_b) * (d_w_b * d_x_b) for its blocks b = 16 g + l, with
separate f32 multiplies and adds (no fused multiply-add, no reassociation); the 16 lane
sums are then added as a fixed tree (16 -> 8 -> 4 -> 2 -> 1, lane i with lane i + half).
The SIMD paths (below) compute exactly this, and so does the portable fallback, so the
result is the same bits on every path, thread count and split (the numpy twins:
reference.matvec_q_q80_exact, matvec_q_f32_exact). With f32 activations (portable code on
every CPU), isum_b is instead the f32 sum of the block's 32 products in element order, then
the same lanes and tree (the codes taken less their offset: Q40's q - 8, Q50's q - 16 with
q in 0..31, its 5th bit above the nibble). Q4K weights (sub-blocks of 32 with a scale s_b
and a min m_b, value s_b * q - m_b, q in 0..15) take the same integer sums of their unsigned codes and
p_b = f32(isum_b) * (s_b * d_x_b) - f32(xsum_b) * (m_b * d_x_b), the min folded through
the sum of the activation codes (with f32 activations: the block's f32 sum of q * x in
element order times s_b, minus the f32 sum of x in element order times m_b); Q5K weights the
same, of their codes q in 0..31 (the 5th bit above the nibble, as Q50's). Q6K weights
(codes q in 0..63, a scale per 16 values: s_lo for elements 0..15 of block b, s_hi for
16..31, each an fp16 d times an int8, exact in f32) take the exact integer sums of
(q - 32) * x over each half, i_lo and i_hi, and p_b = f32(i_lo) * (s_lo * d_x_b) +
f32(i_hi) * (s_hi * d_x_b) (with f32 activations: each half's f32 sum of f32(q - 32) * x in
element order, then sum_lo * s_lo + sum_hi * s_hi).

Instruction set, chosen at import from the host's CPU features (llvmlite reports them);
DLLAMA_ISA=avx512vnni|avx2|portable picks a lesser one (tests run every path the host has):
  avx512vnni: vpdpbusd on 512-bit vectors, 16 blocks (one lane group) per instruction;
  avx2: vpmaddubsw + vpmaddwd on 256-bit vectors, a lane group as two halves;
  portable: plain numba loops (any CPU numba runs on: ARM, older x86).
The x86 paths are LLVM IR emitted through numba intrinsics (`_tile`); everything that calls
them lives in this module, so numba's cache, which tracks a function's own file, is
rebuilt whenever the IR changes.

Layouts (made at load by `pack_weights`, per token by `pack_q80` / `pack_f32`), G lane
groups per row, element e of block b = 16 g + l at [g, e // 4, l, e % 4] ("quad" e // 4):
  Q40 weights: qs (rows, G * 256) u8: quad k (k < 4) of every block holds the nibble
      pairs of elements 4k..4k+3 (low) and 16+4k..16+4k+3 (high); d (rows, 16 G) u16, the
      fp16 scales as stored in the file (18 bytes per 32 weights, as llama.cpp).
  Q50 weights: qs (rows, G * 320) u8: the codes' low nibbles as Q40's quads, then 64
      bytes of their 5th bits: byte [256 + 4 l + i] holds at bit 2 k + h that of element
      16 h + 4 k + i, so one load of the 64 (or of a half's 32) lines up lane for lane with
      every quad k's nibble bytes (made by `pack_q50`); d (rows, 16 G) i16, the fp16 scales'
      bits (f16_bits_to_f32 takes them sign-extended): the file's 22 bytes per 32 weights.
  Q80 weights: qs (rows, G * 512) i8, 8 quads; d as above.
  Q4K weights: qs as Q40's, of each 32-value sub-block's codes (made by `pack_q4k`); d
      (rows, 40 G) u8: per lane group the 16 sub-blocks' 6-bit scales, their 6-bit mins,
      then the fp16 d of the group's two super-blocks and their fp16 dmin (8 bytes); the
      kernels take s_b = d * sc_b and m_b = dmin * m_b in f32 (exact): 18.5 bytes per 32
      weights against the file's 18.
  Q5K weights: qs (rows, G * 320) i8 (raw bytes: the dtype tells Q5K from Q4K): Q4K's 256
      bytes of nibbles, then 64 of the codes' 5th bits as Q50's (made by `pack_q5k`); d as
      Q4K's: 22.5 bytes per 32 weights against the file's 22.
  Q6K weights: qs (rows, G * 384) u8: the codes' low nibbles as Q40's quads, then 128
      bytes of their high bit pairs: byte [256 + 64 (k // 2) + 4 l + i] holds, at bits
      2 (2 (k % 2) + h), those of element 16 h + 4 k + i (the nibbles of quad k's byte);
      d (rows, 36 G) i8: per lane group the 16 blocks' first-half scales, their second-half
      scales, then the fp16 d of the group's two super-blocks (4 bytes): the file's 210
      bytes per 256 weights.
  8-bit activations: xq (T, G * 512) i8, xsum (T, 16 G) i32 (the sum of a block's codes:
      it folds Q40's -8, Q50's -16 and the unsigned offset of vpdpbusd out of the inner loop),
      xd (T, 16 G) f32, the block's scale d_x: its Q80 scale, or its Q8K super-block's (the
      form k-quant weights take, as in llama.cpp: `pack_q8k`); activation codes lie in
      [-127, 127] (our quantizers' range). Everything above that says Q80 activations holds
      for Q8K ones: a product reads the same layout.
  f32 activations: xt (T, G * 512) f32, in the same order.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from ..errors import UsageError
from ..model import quant
from ..model.quant import BLOCK, GROUP

CHUNKS = 64  # row chunks per parallel product, each with its own scratch lanes
ISAS = ("avx512vnni", "avx2", "portable")  # best first


def host_isas() -> tuple[str, ...]:
    """The instruction sets this host can run, best first."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    have = {name for name, on in features.items() if on}
    usable = []
    if {"avx512f", "avx512bw", "avx512vnni"} <= have:
        usable.append("avx512vnni")
    if {"avx2", "f16c"} <= have:
        usable.append("avx2")
    return (*usable, "portable")


def _choose_isa() -> str:
    wanted = os.environ.get("DLLAMA_ISA", "").strip()
    usable = host_isas()
    if not wanted:
        return usable[0]
    if wanted not in ISAS:
        raise UsageError(f"DLLAMA_ISA must be one of {', '.join(ISAS)}; got {wanted!r}: unset it to use the best "
                         f"this CPU has ({usable[0]})")
    if wanted not in usable:
        raise UsageError(f"DLLAMA_ISA={wanted} needs CPU features this machine lacks; it can run "
                         f"{', '.join(usable)}: pick one of those or unset DLLAMA_ISA")
    if wanted != usable[0]:
        # compile everything as for a machine that has no more than `wanted`, so LLVM adds
        # no better instructions of its own (on AVX-512 it rewrites nibble shifts into GFNI
        # and madd + add into vpdpwssd), and numba's cache, keyed by CPU name and features,
        # keeps these kernels apart from the native ones
        numba.config.CPU_NAME, numba.config.CPU_FEATURES = {"avx2": "haswell", "portable": "x86-64"}[wanted], ""
    return wanted


ISA = _choose_isa()

_opts = {"cache": True, "nogil": True}  # no fastmath: every float operation as written

# --- packing --------------------------------------------------------------------------


def groups(nb: int) -> int:
    """Lane groups of a row of nb blocks."""
    return -(-nb // GROUP)


def pack_weights(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored Q40/Q80 blocks (rows, nb) -> (qs, d) in the kernel layout (a copy)."""
    rows, nb = stored.shape
    g = groups(nb)
    codes = stored["qs"]  # (rows, nb, 16) u8 or (rows, nb, 32) i8
    quads = codes.shape[2] // 4
    padded = codes
    if nb % GROUP:
        padded = np.zeros((rows, g * GROUP, codes.shape[2]), codes.dtype)
        padded[:, :nb] = codes
    qs = padded.reshape(rows, g, GROUP, quads, 4).transpose(0, 1, 3, 2, 4).reshape(rows, g * GROUP * quads * 4)
    d = np.zeros((rows, g * GROUP), np.uint16)
    d[:, :nb] = stored["d"].view(np.uint16)
    return np.ascontiguousarray(qs), d


PACK_ROWS = 256  # rows of k-quants unpacked at a time: the unpacked codes and scales of a few MB, not a whole matrix
Q4K_SCALES = quant.Q4K_TYPE.layout.scale_bytes  # bytes of a Q4K lane group's d: 16 6-bit scales, 16 mins, 2 fp16 d, 2 fp16 dmin
Q6K_SCALES = quant.Q6K_TYPE.layout.scale_bytes  # bytes of a Q6K lane group's d: 2 x 16 int8 scales, 2 fp16 d
Q50_CODES = quant.Q50_TYPE.layout.code_bytes  # bytes of a Q50 lane group's qs: 256 of nibbles, 64 of their 5th bits
Q5K_CODES = quant.Q5K_TYPE.layout.code_bytes  # bytes of a Q5K lane group's qs: Q50's


def _low_quads(codes: np.ndarray, g: int) -> np.ndarray:
    """Codes (n, blocks, 32) u8 -> their low nibbles in Q40's quads, (n, g, 256) u8; the blocks
    past the codes' (padding) zero."""
    n, nb = codes.shape[:2]
    as_q40 = np.zeros((n, g * GROUP), quant.Q40)
    as_q40["qs"][:, :nb] = (codes[..., :16] & 15) | ((codes[..., 16:] & 15) << 4)
    return pack_weights(as_q40)[0].reshape(n, g, 256)


def _fifth_bits(codes: np.ndarray, g: int) -> np.ndarray:
    """Codes (n, blocks, 32) u8 0..31 -> their 5th bits as Q50's and Q5K's layouts hold them,
    (n, g, 64) u8: byte 4 l + i, bit 2 k + h, that of block l's element 16 h + 4 k + i."""
    n, nb = codes.shape[:2]
    high = np.zeros((n, g * GROUP, BLOCK), np.uint8)  # padding blocks: 0
    high[:, :nb] = codes >> 4
    high = high.reshape(n, g, GROUP, 2, 4, 4)  # (lane, h, k, i): element 16 h + 4 k + i
    bits = np.zeros((n, g, GROUP, 4), np.uint8)  # (lane, i)
    for h in range(2):
        for k in range(4):
            bits |= high[:, :, :, h, k, :] << np.uint8(2 * k + h)
    return bits.reshape(n, g, 64)


def pack_q50(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored Q50 blocks (rows, nb) -> (qs, d) in the kernel layout (see above), a block of
    rows at a time."""
    rows, nb = stored.shape
    g = groups(nb)
    qs = np.empty((rows, g, Q50_CODES), np.uint8)
    d = np.zeros((rows, g * GROUP), np.int16)
    d[:, :nb] = stored["d"].view(np.int16)
    for a in range(0, rows, PACK_ROWS):
        codes = quant.q50_codes(stored[a : a + PACK_ROWS])  # (rows, nb, 32)
        qs[a : a + len(codes), :, :256] = _low_quads(codes, g)
        qs[a : a + len(codes), :, 256:] = _fifth_bits(codes, g)
    return qs.reshape(rows, g * Q50_CODES), d


def _pack_kmin(stored: np.ndarray, five: bool) -> tuple[np.ndarray, np.ndarray]:
    """Stored Q4K or (five) Q5K super-blocks (rows, nb) -> (qs u8, d) in the kernel layout (see
    above), a block of rows at a time."""
    rows, nb = stored.shape
    n_sub = nb * (quant.QK // BLOCK)
    g = groups(n_sub)
    code_bytes = Q5K_CODES if five else 256
    qs = np.empty((rows, g, code_bytes), np.uint8)
    d = np.zeros((rows, g, Q4K_SCALES), np.uint8)
    for a in range(0, rows, PACK_ROWS):
        part = stored[a : a + PACK_ROWS]
        n = len(part)
        codes = (quant.q5k_codes if five else quant.q4k_codes)(part).reshape(n, n_sub, BLOCK)  # (rows, sub-blocks, 32)
        qs[a : a + n, :, :256] = _low_quads(codes, g)
        if five:
            qs[a : a + n, :, 256:] = _fifth_bits(codes, g)
        for at, values in zip((0, GROUP), quant.q4k_scales_mins(part)):  # (rows, nb, 8) each
            padded = np.zeros((n, g * GROUP), np.uint8)
            padded[:, :n_sub] = values.reshape(n, n_sub)
            d[a : a + n, :, at : at + GROUP] = padded.reshape(n, g, GROUP)
        for at, field in ((2 * GROUP, "d"), (2 * GROUP + 4, "dmin")):
            per_super = np.zeros((n, 2 * g), np.float16)
            per_super[:, :nb] = part[field]
            d[a : a + n, :, at : at + 4] = per_super.reshape(n, g, 2).view(np.uint8).reshape(n, g, 4)
    return qs.reshape(rows, g * code_bytes), d.reshape(rows, g * Q4K_SCALES)


def pack_q4k(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored Q4K super-blocks (rows, nb) -> (qs, d) in the kernel layout (see above)."""
    return _pack_kmin(stored, five=False)


def pack_q5k(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored Q5K super-blocks (rows, nb) -> (qs, d) in the kernel layout (see above)."""
    qs, d = _pack_kmin(stored, five=True)
    return qs.view(np.int8), d


def pack_q6k(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored Q6K super-blocks (rows, nb) -> (qs, d) in the kernel layout (see above), a block
    of rows at a time."""
    rows, nb = stored.shape
    n_sub = nb * (quant.QK // BLOCK)
    g = groups(n_sub)
    qs = np.empty((rows, g, 384), np.uint8)
    d = np.zeros((rows, g, Q6K_SCALES), np.uint8)
    for a in range(0, rows, PACK_ROWS):
        part = stored[a : a + PACK_ROWS]
        n = len(part)
        codes = np.zeros((n, g * GROUP, BLOCK), np.uint8)  # padding blocks: code 0, scale 0
        codes[:, :n_sub] = quant.q6k_codes(part).reshape(n, n_sub, BLOCK)
        qs[a : a + n, :, :256] = _low_quads(codes, g)
        high = (codes >> 4).reshape(n, g, GROUP, 2, 2, 2, 4)  # (lane, h, k // 2, k % 2, i): element 16 h + 4 k + i
        pairs = np.zeros((n, g, 2, GROUP, 4), np.uint8)  # (k // 2, lane, i)
        for h in range(2):
            for odd in range(2):
                pairs |= high[:, :, :, h, :, odd, :].transpose(0, 1, 3, 2, 4) << np.uint8(2 * (2 * odd + h))
        qs[a : a + n, :, 256:] = pairs.reshape(n, g, 128)
        scales = np.zeros((n, g * GROUP, 2), np.int8)
        scales[:, :n_sub] = part["scales"].reshape(n, n_sub, 2)
        d[a : a + n, :, : 2 * GROUP] = scales.reshape(n, g, GROUP, 2).transpose(0, 1, 3, 2).reshape(n, g, 2 * GROUP).view(np.uint8)
        super_d = np.zeros((n, 2 * g), np.float16)
        super_d[:, :nb] = part["d"]
        d[a : a + n, :, 2 * GROUP :] = super_d.reshape(n, g, 2).view(np.uint8).reshape(n, g, 4)
    return qs.reshape(rows, g * 384), d.reshape(rows, g * Q6K_SCALES).view(np.int8)


@njit(**_opts)
def f16_bits_to_f32(h):
    """fp16 bits -> f32 (exact)."""
    h = np.int32(h)
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exp == 0:
        val = mant * 5.960464477539063e-08  # 2**-24
    elif exp == 31:
        val = np.inf if mant == 0 else np.nan
    else:
        val = (1024 + mant) * 2.0 ** (exp - 25)
    return np.float32(-val if h & 0x8000 else val)


@njit(**_opts)
def pack_q80(blocks, xq, xsum, xd):
    """Q80 blocks (T, nb, 34) u8 -> xq (T, G * 512) i8, xsum (T, 16 G) i32, xd (T, 16 G) f32.
    Padding blocks are left as they are (zero: the buffers are allocated zeroed and only
    ever hold this width)."""
    q = blocks.view(np.int8)
    for t in range(blocks.shape[0]):
        for b in range(blocks.shape[1]):
            g, lane = b // GROUP, b % GROUP
            xd[t, b] = f16_bits_to_f32(np.uint16(blocks[t, b, 0]) | (np.uint16(blocks[t, b, 1]) << 8))
            total = np.int32(0)
            for e in range(BLOCK):
                v = q[t, b, 2 + e]
                xq[t, g * 512 + (e // 4) * 64 + lane * 4 + e % 4] = v
                total += np.int32(v)
            xsum[t, b] = total


@njit(**_opts)
def pack_q8k(x, xq, xsum, xd):
    """x (T, n) f32, n whole 256-value super-blocks -> Q8K codes (llama.cpp's
    quantize_row_q8_K_ref; the twin: quant.quantize_q8k) in the layout of pack_q80's: xq, xsum
    as there, xd the super-block's f32 d at each of its 8 blocks."""
    per_super = quant.QK // BLOCK
    for t in range(x.shape[0]):
        for s in range(x.shape[1] // quant.QK):
            amax, m = np.float32(0), np.float32(0)
            for j in range(quant.QK):  # the first value of largest magnitude
                v = x[t, s * quant.QK + j]
                if abs(v) > amax:
                    amax, m = abs(v), v
            iscale = np.float32(-127.0) / m if amax != 0 else np.float32(0)
            d = np.float32(1.0) / iscale if amax != 0 else np.float32(0)
            for b in range(s * per_super, (s + 1) * per_super):
                g, lane = b // GROUP, b % GROUP
                total = np.int32(0)
                for e in range(BLOCK):
                    q = min(np.int32(np.rint(iscale * x[t, b * BLOCK + e])), np.int32(127))
                    xq[t, g * 512 + (e // 4) * 64 + lane * 4 + e % 4] = q
                    total += q
                xsum[t, b] = total
                xd[t, b] = d


@njit(**_opts)
def pack_f32(x, xt):
    """x (T, nb * 32) f32 -> xt (T, G * 512) f32."""
    for t in range(x.shape[0]):
        for b in range(x.shape[1] // BLOCK):
            g, lane = b // GROUP, b % GROUP
            for e in range(BLOCK):
                xt[t, g * 512 + (e // 4) * 64 + lane * 4 + e % 4] = x[t, b * BLOCK + e]


@njit(**_opts)
def _code_bytes(wq, wd):
    """Code bytes a block of packed Q40, Q50 or Q80 weights (rows or one row): 16, 20 or 32,
    which tells the types apart (every type has an fp16 d a block)."""
    return wq.shape[-1] // max(wd.shape[-1], 1)


@njit(**_opts)
def _q_code(w, width, lane, e):
    """The code less its offset (Q40's 8, Q50's 16) of element e of block `lane` of a packed
    Q40, Q50 or Q80 lane group w, `width` code bytes a block."""
    if width == 32:
        return np.int32(w[(e // 4) * 64 + lane * 4 + e % 4])
    k, i, h = (e % 16) // 4, e % 4, e // 16
    nibble = (np.int32(w[k * 64 + lane * 4 + i]) >> (4 * h)) & 15
    if width == 16:
        return nibble - 8
    return (nibble | (((np.int32(w[256 + lane * 4 + i]) >> (2 * k + h)) & 1) << 4)) - 16


@njit(**_opts)
def dequantize_row(wq, wd, nb, out):
    """One packed Q40, Q50 or Q80 weight row -> out (nb * 32,) f32."""
    width = _code_bytes(wq, wd)
    for b in range(nb):
        g, lane = b // GROUP, b % GROUP
        d = f16_bits_to_f32(wd[b])
        w = wq[g * GROUP * width : (g + 1) * GROUP * width]
        for e in range(BLOCK):
            out[b * BLOCK + e] = np.float32(_q_code(w, width, lane, e)) * d


@njit(**_opts)
def _f16_at(sd, o):
    """The fp16 at bytes o, o + 1 of a packed k-quant group's d bytes sd (u8 or i8), as f32."""
    return f16_bits_to_f32(np.uint16((np.int32(sd[o]) & 255) | ((np.int32(sd[o + 1]) & 255) << 8)))


@njit(**_opts)
def _kmin_scale_min(sd, lane):
    """Sub-block `lane`'s scale d * sc and min dmin * m (f32, exact) from a packed Q4K or Q5K group's d bytes."""
    at = 2 * (lane // 8)  # the fp16 of the lane's super-block: the group's first or second
    return (_f16_at(sd, 2 * GROUP + at) * np.float32(sd[lane]),
            _f16_at(sd, 2 * GROUP + 4 + at) * np.float32(sd[GROUP + lane]))


@njit(**_opts)
def _kmin_code(w, k, lane, i, half, five):
    """Code of element 16 half + 4 k + i of a packed Q4K lane group w (0..15), or with `five` of a
    Q5K one (0..31: its 5th bit, as Q50's, above the nibble). The masks read u8 or i8 bytes alike."""
    code = (np.int32(w[k * 64 + lane * 4 + i]) >> (4 * half)) & 15
    if five:
        code |= ((np.int32(w[256 + lane * 4 + i]) >> (2 * k + half)) & 1) << 4
    return code


@njit(**_opts)
def _kmin_codes(wq, wd):
    """(Q5K?, code bytes per lane group) of packed Q4K or Q5K weights (rows or one row), told
    apart by their widths: d bytes are Q4K_SCALES a group for both."""
    five = wq.shape[-1] * Q4K_SCALES == wd.shape[-1] * Q5K_CODES
    return five, (Q5K_CODES if five else 256)


@njit(**_opts)
def dequantize_row_kmin(wq, wd, nb, out):
    """One packed Q4K or Q5K weight row -> out (nb * 32,) f32: s_b * q - m_b."""
    five, w_bytes = _kmin_codes(wq, wd)
    for b in range(nb):
        g, lane = b // GROUP, b % GROUP
        scale, low = _kmin_scale_min(wd[g * Q4K_SCALES : (g + 1) * Q4K_SCALES], lane)
        w = wq[g * w_bytes : (g + 1) * w_bytes]
        for e in range(BLOCK):
            out[b * BLOCK + e] = scale * np.float32(_kmin_code(w, (e % 16) // 4, lane, e % 4, e // 16, five)) - low


@njit(**_opts)
def _q6k_code(w, k, lane, i, half):
    """Code q (0..63) of element 16 half + 4 k + i of a packed Q6K lane group w (384 bytes)."""
    byte = np.int32(w[k * 64 + lane * 4 + i])
    pairs = np.int32(w[256 + (k // 2) * 64 + lane * 4 + i])
    nibble = byte & 15 if half == 0 else byte >> 4
    return nibble | (((pairs >> (2 * (2 * (k % 2) + half))) & 3) << 4)


@njit(**_opts)
def dequantize_row_q6k(wq, wd, nb, out):
    """One packed Q6K weight row -> out (nb * 32,) f32: (d * sc) * (q - 32)."""
    for b in range(nb):
        g, lane = b // GROUP, b % GROUP
        w, sd = wq[g * 384 : (g + 1) * 384], wd[g * Q6K_SCALES : (g + 1) * Q6K_SCALES]
        d = _f16_at(sd, 2 * GROUP + 2 * (lane // 8))
        for e in range(BLOCK):
            half = e // 16
            scale = d * np.float32(sd[half * GROUP + lane])
            out[b * BLOCK + e] = scale * np.float32(_q6k_code(w, (e % 16) // 4, lane, e % 4, half) - 32)


# --- the portable path ----------------------------------------------------------------


@njit(**_opts)
def _lane_tree(acc):
    """The fixed 16 -> 1 sum of the lanes (acc is overwritten)."""
    half = GROUP // 2
    while half > 0:
        for i in range(half):
            acc[i] = acc[i] + acc[i + half]
        half //= 2
    return acc[0]


@njit(**_opts)
def _q_q80_portable(r0, r1, c, wq, wd, xq, xsum, xd, lanes_i, lanes_f, out):
    """Q40, Q50 or Q80 weights x Q80 activations (portable)."""
    width = _code_bytes(wq, wd)
    offset = 8 if width == 16 else 16  # of the nibble types' codes
    isum, acc = lanes_i[c], lanes_f[c]
    for r in range(r0, r1):
        for t in range(xq.shape[0]):
            acc[:] = 0
            for g in range(wd.shape[1] // GROUP):
                x = xq[t, g * 512 : (g + 1) * 512]
                w = wq[r, g * GROUP * width : (g + 1) * GROUP * width]
                if width != 32:  # unsigned nibble codes, the offset through the sum of the activation codes
                    for lane in range(GROUP):
                        isum[lane] = -offset * xsum[t, g * GROUP + lane]
                    for k in range(4):
                        for lane in range(GROUP):
                            s = np.int32(0)
                            for i in range(4):
                                o = k * 64 + lane * 4 + i
                                byte = np.int32(w[o])
                                lo, hi = byte & 15, byte >> 4
                                if width == 20:  # Q50: their 5th bits are bits 2k, 2k + 1 of the lane's byte i
                                    high = np.int32(w[256 + lane * 4 + i]) >> (2 * k)
                                    lo, hi = lo | ((high & 1) << 4), hi | ((high & 2) << 3)
                                s += lo * np.int32(x[o]) + hi * np.int32(x[256 + o])
                            isum[lane] += s
                else:
                    for lane in range(GROUP):
                        isum[lane] = 0
                    for j in range(8):
                        for lane in range(GROUP):
                            s = np.int32(0)
                            for i in range(4):
                                o = j * 64 + lane * 4 + i
                                s += np.int32(w[o]) * np.int32(x[o])
                            isum[lane] += s
                for lane in range(GROUP):
                    b = g * GROUP + lane
                    acc[lane] = acc[lane] + np.float32(isum[lane]) * (f16_bits_to_f32(wd[r, b]) * xd[t, b])
            out[t, r] = _lane_tree(acc)


@njit(**_opts)
def _kmin_q80_block(w, sd, x, xsum_b, dx, lane, five):
    """Block `lane` of a packed Q4K (or, five, Q5K) lane group (codes w, d bytes sd) times its
    8-bit activations (x the group's 512 codes; xsum_b, dx the block's): its term p_b."""
    isum = np.int32(0)
    for k in range(4):
        for i in range(4):
            o = k * 64 + lane * 4 + i
            isum += _kmin_code(w, k, lane, i, 0, five) * np.int32(x[o]) + _kmin_code(w, k, lane, i, 1, five) * np.int32(x[256 + o])
    scale, low = _kmin_scale_min(sd, lane)
    return np.float32(isum) * (scale * dx) - np.float32(xsum_b) * (low * dx)


@njit(**_opts)
def _q6k_q80_block(w, sd, x, xsum_b, dx, lane):
    """The same for a packed Q6K lane group."""
    lo, hi = np.int32(0), np.int32(0)
    for k in range(4):
        for i in range(4):
            o = k * 64 + lane * 4 + i
            lo += (_q6k_code(w, k, lane, i, 0) - 32) * np.int32(x[o])
            hi += (_q6k_code(w, k, lane, i, 1) - 32) * np.int32(x[256 + o])
    d = _f16_at(sd, 2 * GROUP + 2 * (lane // 8))
    return np.float32(lo) * ((d * np.float32(sd[lane])) * dx) + np.float32(hi) * ((d * np.float32(sd[GROUP + lane])) * dx)


@njit(**_opts)
def _kmin_f32_block(w, sd, x, lane, five):
    """Block `lane` of a packed Q4K (or, five, Q5K) lane group times f32 activations (x the group's 512)."""
    s = np.float32(0)
    xs = np.float32(0)
    for e in range(BLOCK):
        o = (e // 4) * 64 + lane * 4 + e % 4
        s = s + np.float32(_kmin_code(w, (e % 16) // 4, lane, e % 4, e // 16, five)) * x[o]
        xs = xs + x[o]
    scale, low = _kmin_scale_min(sd, lane)
    return s * scale - xs * low


@njit(**_opts)
def _q6k_f32_block(w, sd, x, lane):
    """The same for a packed Q6K lane group."""
    lo, hi = np.float32(0), np.float32(0)
    for e in range(BLOCK):
        v = np.float32(_q6k_code(w, (e % 16) // 4, lane, e % 4, e // 16) - 32) * x[(e // 4) * 64 + lane * 4 + e % 4]
        if e < 16:
            lo = lo + v
        else:
            hi = hi + v
    d = _f16_at(sd, 2 * GROUP + 2 * (lane // 8))
    return lo * (d * np.float32(sd[lane])) + hi * (d * np.float32(sd[GROUP + lane]))


@njit(**_opts)
def _k_layout(wq, wd):
    """(Q6K?, Q5K?, bytes of codes and of d per lane group) of packed k-quant weights: Q4K, Q5K
    and Q6K are told apart by their widths."""
    if wd.shape[1] * 384 == wq.shape[1] * Q6K_SCALES:
        return True, False, 384, Q6K_SCALES
    five, w_bytes = _kmin_codes(wq, wd)
    return False, five, w_bytes, Q4K_SCALES


@njit(**_opts)
def _k_q80_portable(r0, r1, c, wq, wd, xq, xsum, xd, lanes_i, lanes_f, out):
    """Q4K, Q5K or Q6K weights x 8-bit activations (portable)."""
    q6k, five, w_bytes, d_bytes = _k_layout(wq, wd)
    acc = lanes_f[c]
    for r in range(r0, r1):
        for t in range(xq.shape[0]):
            acc[:] = 0
            for g in range(wq.shape[1] // w_bytes):
                x = xq[t, g * 512 : (g + 1) * 512]
                w, sd = wq[r, g * w_bytes : (g + 1) * w_bytes], wd[r, g * d_bytes : (g + 1) * d_bytes]
                for lane in range(GROUP):
                    b = g * GROUP + lane
                    if q6k:
                        p = _q6k_q80_block(w, sd, x, xsum[t, b], xd[t, b], lane)
                    else:
                        p = _kmin_q80_block(w, sd, x, xsum[t, b], xd[t, b], lane, five)
                    acc[lane] = acc[lane] + p
            out[t, r] = _lane_tree(acc)


@njit(**_opts)
def _k_f32_rows(r0, r1, c, wq, wd, xt, lanes_i, lanes_f, out):
    """Q4K, Q5K or Q6K weights x f32 activations (every instruction set: plain loops)."""
    q6k, five, w_bytes, d_bytes = _k_layout(wq, wd)
    acc = lanes_f[c]
    for r in range(r0, r1):
        for t in range(xt.shape[0]):
            acc[:] = 0
            for g in range(wq.shape[1] // w_bytes):
                x = xt[t, g * 512 : (g + 1) * 512]
                w, sd = wq[r, g * w_bytes : (g + 1) * w_bytes], wd[r, g * d_bytes : (g + 1) * d_bytes]
                for lane in range(GROUP):
                    p = _q6k_f32_block(w, sd, x, lane) if q6k else _kmin_f32_block(w, sd, x, lane, five)
                    acc[lane] = acc[lane] + p
            out[t, r] = _lane_tree(acc)


@njit(**_opts)
def _q_f32_rows(r0, r1, c, wq, wd, xt, lanes_i, lanes_f, out):
    """Q40, Q50 or Q80 weights x f32 activations (every instruction set: plain loops)."""
    width = _code_bytes(wq, wd)
    acc = lanes_f[c]
    for r in range(r0, r1):
        for t in range(xt.shape[0]):
            acc[:] = 0
            for g in range(wd.shape[1] // GROUP):
                x = xt[t, g * 512 : (g + 1) * 512]
                w = wq[r, g * GROUP * width : (g + 1) * GROUP * width]
                for lane in range(GROUP):
                    s = np.float32(0)
                    for e in range(BLOCK):
                        s = s + np.float32(_q_code(w, width, lane, e)) * x[(e // 4) * 64 + lane * 4 + e % 4]
                    acc[lane] = acc[lane] + s * f16_bits_to_f32(wd[r, g * GROUP + lane])
            out[t, r] = _lane_tree(acc)


# --- the x86 paths: LLVM IR through numba intrinsics ------------------------------------

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


def _vec(elem, n):
    return ir.VectorType(elem, n)


def _splat(elem, n, value):
    return ir.Constant(_vec(elem, n), [value] * n)


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _load(builder, base, offset, vtype):
    """Unaligned vector load at byte `offset` (an IR i64) from pointer `base`."""
    ptr = builder.gep(base, [offset], source_etype=_I8)
    return builder.load(ptr, typ=vtype, align=1)


def _halves(builder, v, n):
    """v (2n lanes) -> (lanes [0, n), lanes [n, 2n))."""
    lo = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n))))
    hi = builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n, 2 * n))))
    return lo, hi


CHAINS = 2  # vpdpbusd accumulators per token: one chain of 8 dependent ones ran at 2/3 of the speed


def _bit_to(builder, v, bit, to, width):
    """Bit `bit` of each byte of v (<width x i8>) moved to bit `to`, every other bit cleared."""
    if bit < to:
        v = builder.shl(v, _splat(_I8, width, to - bit))
    elif bit > to:
        v = builder.lshr(v, _splat(_I8, width, bit - to))
    return builder.and_(v, _splat(_I8, width, 1 << to))


def _int_sums(builder, layout, isa, w_at, x_at, seed_at):
    """The exact per-block integer sums of one lane group for one token, as vectors of
    int32 lanes: one <16 x i32> (avx512vnni) or two <8 x i32> halves (avx2), of a type whose
    codes are nibbles (Q50's and Q5K's with a 5th bit) or bytes (quant.Layout: Q40, Q50, Q80, Q4K, Q5K).
    w_at(offset, vtype) / x_at(offset, vtype) load weight / activation bytes of the group;
    seed_at(offset, vtype) loads xsum lanes (int32)."""
    # (byte offset within a quad, bytes): a lane is 4 code bytes and one int32 xsum, so the
    # same offset addresses both
    parts = [(0, 64)] if isa == "avx512vnni" else [(0, 32), (32, 32)]
    sums = []
    for h, width in parts:
        lanes = width // 4
        if layout.nibbles and layout.offset:  # the offset through the sum of the activation codes
            acc = builder.mul(seed_at(h, _vec(_I32, lanes)), _splat(_I32, lanes, -layout.offset))
            quads = [(k, k * 64, (4 + k) * 64) for k in range(4)]
        elif layout.nibbles:  # unsigned codes (Q4K's and Q5K's min is applied in f32: see _tile)
            acc = ir.Constant(_vec(_I32, lanes), None)
            quads = [(k, k * 64, (4 + k) * 64) for k in range(4)]
        else:
            acc = (builder.mul(seed_at(h, _vec(_I32, lanes)), _splat(_I32, lanes, -128)) if isa == "avx512vnni"
                   else ir.Constant(_vec(_I32, lanes), None))
            quads = [(j, j * 64, None) for j in range(8)]
        nibbles = layout.nibbles
        if layout.high_bits == 1:  # Q50's and Q5K's 5th bits: a byte per lane and i, lined up with every quad's nibble bytes
            fifth = w_at(256 + h, _vec(_I8, width))
        if isa == "avx2" and nibbles:
            # |two products| <= 2 * largest code * 128: one int16 sum holds 8 of Q40's (codes to 15) or
            # 4 of Q50's and Q5K's (to 31), so they take two
            per_s16 = 32767 // (2 * ((16 << layout.high_bits) - 1) * 128)
            s16s = [ir.Constant(_vec(_I16, 16), None)] * -(-2 * len(quads) // per_s16)
            n_pairs = 0
        chains = [acc] + [ir.Constant(_vec(_I32, lanes), None)] * (CHAINS - 1)
        for k, x_lo, x_hi in quads:
            wv = w_at(k * 64 + h, _vec(_I8, width))
            if nibbles:
                codes = [builder.and_(wv, _splat(_I8, width, 15)), builder.lshr(wv, _splat(_I8, width, 4))]
                if layout.high_bits == 1:  # element 16 half + 4 k + i's 5th bit is bit 2 k + half
                    codes = [builder.or_(code, _bit_to(builder, fifth, 2 * k + half, 4, width))
                             for half, code in enumerate(codes)]
                pairs = list(zip(codes, (x_at(x_lo + h, _vec(_I8, width)), x_at(x_hi + h, _vec(_I8, width)))))
            else:
                xv = x_at(x_lo + h, _vec(_I8, width))
                if isa == "avx512vnni":  # w + 128 as the unsigned side; -128 * xsum seeded above
                    pairs = [(builder.xor(wv, _splat(_I8, width, -128)), xv)]
                else:  # |w| unsigned, x carries w's sign: each product fits int16
                    absw = _call(builder, f"llvm.abs.v{width}i8", _vec(_I8, width), [wv, ir.Constant(ir.IntType(1), 0)])
                    pairs = [(absw, _call(builder, "llvm.x86.avx2.psign.b", _vec(_I8, width), [xv, wv]))]
            for u, s in pairs:
                if isa == "avx512vnni":  # several accumulators: independent dependency chains
                    chains[0] = _call(builder, "llvm.x86.avx512.vpdpbusd.512", _vec(_I32, 16), [chains[0], u, s])
                    chains.append(chains.pop(0))
                elif nibbles:
                    at = n_pairs % len(s16s)
                    s16s[at] = builder.add(s16s[at], _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [u, s]))
                    n_pairs += 1
                else:
                    pair = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [u, s])
                    acc = builder.add(acc, _call(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [pair, _splat(_I16, 16, 1)]))
        if isa == "avx512vnni":  # integer sums: exact in any grouping
            acc = chains[0]
            for chain in chains[1:]:
                acc = builder.add(acc, chain)
        if isa == "avx2" and nibbles:
            for s16 in s16s:
                acc = builder.add(acc, _call(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [s16, _splat(_I16, 16, 1)]))
        sums.append(acc)
    return sums


def _super_scaled(builder, d_row, base, codes_at, d_at, signed, halves):
    """A k-quant lane group's f32 scales (or mins): the 16 8-bit codes at byte base + codes_at
    of d_row, each times the fp16 at base + d_at (lanes 0..7, the group's first super-block)
    or base + d_at + 2 (lanes 8..15); one <16 x float>, or two <8 x float> halves (avx2)."""
    i64 = ir.IntType(64)
    pair = builder.fpext(_load(builder, d_row, builder.add(base, ir.Constant(i64, d_at)), _vec(ir.HalfType(), 2)),
                         _vec(_F32, 2))
    per_lane = builder.shuffle_vector(pair, pair, ir.Constant(_vec(_I32, GROUP), [0] * 8 + [1] * 8))
    codes = _load(builder, d_row, builder.add(base, ir.Constant(i64, codes_at)), _vec(_I8, GROUP))
    as_float = (builder.sitofp if signed else builder.uitofp)(codes, _vec(_F32, GROUP))
    scales = builder.fmul(per_lane, as_float)
    return [scales] if halves == 1 else list(_halves(builder, scales, GROUP // 2))


def _q6k_int_sums(builder, layout, isa, w_at, x_at, seed_at):
    """Q6K's exact integer sums of one lane group for one token: per part (one <16 x i32>
    on avx512vnni, two <8 x i32> halves on avx2) the pair (i_lo, i_hi), the sums of
    (q - 32) * x over each block's elements 0..15 and 16..31. The codes are rebuilt from their
    nibbles and high bit pairs; the -32 comes through the sum of the low half's activation
    codes (and xsum less it for the high half)."""
    parts = [(0, 64)] if isa == "avx512vnni" else [(0, 32), (32, 32)]
    out = []
    for h, width in parts:
        lanes = width // 4
        i32v, i8v = _vec(_I32, lanes), _vec(_I8, width)
        zero = ir.Constant(i32v, None)
        pairs_at = [w_at(256 + j * 64 + h, i8v) for j in range(2)]
        sums = [zero, zero, zero]  # a_lo, a_hi (unsigned codes times x), the low half's sum of x
        if isa == "avx2":
            xs16 = ir.Constant(_vec(_I16, 16), None)
        for k in range(4):
            wv = w_at(k * 64 + h, i8v)
            operands = []
            for half, nibble in ((0, builder.and_(wv, _splat(_I8, width, 15))), (1, builder.lshr(wv, _splat(_I8, width, 4)))):
                shift = 2 * (2 * (k % 2) + half)  # the high bit pair's place, moved to bits 4 and 5
                moved = pairs_at[k // 2]
                if shift < 4:
                    moved = builder.shl(moved, _splat(_I8, width, 4 - shift))
                elif shift > 4:
                    moved = builder.lshr(moved, _splat(_I8, width, shift - 4))
                code = builder.or_(nibble, builder.and_(moved, _splat(_I8, width, 0x30)))
                operands.append((code, x_at((4 * half + k) * 64 + h, i8v)))
            operands.append((_splat(_I8, width, 1), operands[0][1]))
            for which, (u, x) in enumerate(operands):
                if isa == "avx512vnni":
                    sums[which] = _call(builder, "llvm.x86.avx512.vpdpbusd.512", _vec(_I32, 16), [sums[which], u, x])
                elif which < 2:  # |two products| <= 2 * 63 * 127: one pmaddubsw fits int16, two may not
                    pair = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [u, x])
                    sums[which] = builder.add(sums[which], _call(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8),
                                                                 [pair, _splat(_I16, 16, 1)]))
                else:  # sums of two activation codes: 4 of them fit int16
                    xs16 = builder.add(xs16, _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [u, x]))
        a_lo, a_hi, xs_lo = sums
        if isa == "avx2":
            xs_lo = _call(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [xs16, _splat(_I16, 16, 1)])
        xs_hi = builder.sub(seed_at(h, i32v), xs_lo)
        offset = _splat(_I32, lanes, layout.offset)
        out.append((builder.sub(a_lo, builder.mul(xs_lo, offset)), builder.sub(a_hi, builder.mul(xs_hi, offset))))
    return out


def _tile(n_tok: int):
    """An intrinsic tile(wq, wd, r, xq, xsum, xd, t0, out): out[t0 + t, r] for t < n_tok,
    row r of packed weights times 8-bit activations, on ISA; the weight type is the one whose
    layout packs wq's and wd's dtypes (quant.Layout.packed), its code generation its layout's."""
    isa = ISA
    halves = 1 if isa == "avx512vnni" else 2
    lanes = GROUP // halves

    @intrinsic
    def tile(typingctx, wq, wd, r, xq, xsum, xd, t0, out):
        layout = quant.packed_type(str(wq.dtype), str(wd.dtype)).layout

        def codegen(context, builder, sig, args):
            arys = [context.make_array(ty)(context, builder, a) if isinstance(ty, types.Array) else None
                    for ty, a in zip(sig.args, args)]
            wq_a, wd_a, xq_a, xsum_a, xd_a, out_a = (arys[i] for i in (0, 1, 3, 4, 5, 7))
            row, first = args[2], args[6]
            i64 = ir.IntType(64)
            zero = ir.Constant(i64, 0)

            def at(i, ary, inds):
                return cgutils.get_item_pointer(context, builder, sig.args[i], ary, inds, wraparound=False)

            def tok(t):
                return builder.add(first, ir.Constant(i64, t))

            w_row, d_row = at(0, wq_a, [row, zero]), at(1, wd_a, [row, zero])
            x_rows = [at(3, xq_a, [tok(t), zero]) for t in range(n_tok)]
            s_rows = [at(4, xsum_a, [tok(t), zero]) for t in range(n_tok)]
            d_rows = [at(5, xd_a, [tok(t), zero]) for t in range(n_tok)]
            w_group = layout.code_bytes
            n_groups = builder.udiv(cgutils.unpack_tuple(builder, wq_a.shape)[1], ir.Constant(i64, w_group))
            fvec = _vec(_F32, lanes)
            accs = [[cgutils.alloca_once(builder, fvec) for _ in range(halves)] for _ in range(n_tok)]
            for per_tok in accs:
                for acc in per_tok:
                    builder.store(ir.Constant(fvec, None), acc)
            with cgutils.for_range(builder, n_groups) as loop:
                g = loop.index
                w_base = builder.mul(g, ir.Constant(i64, w_group))
                x_base = builder.mul(g, ir.Constant(i64, 512))
                s_base = builder.mul(g, ir.Constant(i64, GROUP * 4))  # int32 / f32 lanes
                h_base = builder.mul(g, ir.Constant(i64, GROUP * 2))  # fp16 scales
                if layout.super_scales:  # 8-bit codes times their super-block's fp16 d (or dmin)
                    k_base = builder.mul(g, ir.Constant(i64, layout.scale_bytes))

                    def scaled(codes_at, d_at):
                        return _super_scaled(builder, d_row, k_base, codes_at, d_at, layout.signed_scales, halves)

                    if layout.min_term:  # scales, then mins, then the fp16 d and dmin
                        w_scales, w_mins = scaled(0, 2 * GROUP), scaled(GROUP, 2 * GROUP + 4)
                    else:  # the two halves' scales, then the fp16 d
                        w_scales, w_scales_hi = scaled(0, 2 * GROUP), scaled(GROUP, 2 * GROUP)
                else:
                    w_scales = [builder.fpext(_load(builder, d_row, builder.add(h_base, ir.Constant(i64, h * lanes * 2)),
                                                    _vec(ir.HalfType(), lanes)), fvec) for h in range(halves)]

                def w_at(off, vtype):
                    return _load(builder, w_row, builder.add(w_base, ir.Constant(i64, off)), vtype)

                for t in range(n_tok):
                    def x_at(off, vtype, t=t):
                        return _load(builder, x_rows[t], builder.add(x_base, ir.Constant(i64, off)), vtype)

                    def seed_at(off, vtype, t=t):
                        return _load(builder, s_rows[t], builder.add(s_base, ir.Constant(i64, off)), vtype)

                    if layout.half_scales:  # a pair of sums a block, one a scale (Q6K)
                        sums = _q6k_int_sums(builder, layout, isa, w_at, x_at, seed_at)
                    else:
                        sums = _int_sums(builder, layout, isa, w_at, x_at, seed_at)
                    for h in range(halves):
                        x_scale = _load(builder, d_rows[t], builder.add(s_base, ir.Constant(i64, h * lanes * 4)), fvec)
                        if layout.half_scales:
                            lo, hi = sums[h]
                            p = builder.fadd(builder.fmul(builder.sitofp(lo, fvec), builder.fmul(w_scales[h], x_scale)),
                                             builder.fmul(builder.sitofp(hi, fvec), builder.fmul(w_scales_hi[h], x_scale)))
                        else:
                            p = builder.fmul(builder.sitofp(sums[h], fvec), builder.fmul(w_scales[h], x_scale))
                        if layout.min_term:
                            xs = seed_at(h * lanes * 4, _vec(_I32, lanes))
                            p = builder.fsub(p, builder.fmul(builder.sitofp(xs, fvec), builder.fmul(w_mins[h], x_scale)))
                        builder.store(builder.fadd(builder.load(accs[t][h]), p), accs[t][h])
            for t in range(n_tok):
                v = builder.load(accs[t][0])
                if halves == 2:
                    v = builder.fadd(v, builder.load(accs[t][1]))
                n = lanes
                while n > 1:  # lane i + lane i + n / 2: the fixed tree
                    lo, hi = _halves(builder, v, n // 2)
                    v, n = builder.fadd(lo, hi), n // 2
                builder.store(builder.extract_element(v, ir.Constant(ir.IntType(32), 0)), at(7, out_a, [tok(t), row]))
            return context.get_dummy_value()

        return types.void(wq, wd, r, xq, xsum, xd, t0, out), codegen

    return tile


if ISA != "portable":
    _tile4, _tile3, _tile2, _tile1 = (_tile(n) for n in (4, 3, 2, 1))


ROW_BLOCK = 32  # rows whose weights stay in L2 while every token tile passes over them


@njit(**_opts)
def _q_q80_tiled(r0, r1, c, wq, wd, xq, xsum, xd, lanes_i, lanes_f, out):
    """Quantized weights (every type: the tile's code generation reads its layout) x 8-bit
    activations on an x86 ISA. Tiles of 4 tokens (each weight vector unpacked once per tile,
    the tile's activations in L1) pass over blocks of ROW_BLOCK rows (in L2), then the rest
    of the tokens."""
    n_tok = xq.shape[0]
    for b0 in range(r0, r1, ROW_BLOCK):
        b1 = min(b0 + ROW_BLOCK, r1)
        t = 0
        while t + 4 <= n_tok:
            for r in range(b0, b1):
                _tile4(wq, wd, r, xq, xsum, xd, t, out)
            t += 4
        left = n_tok - t
        for r in range(b0, b1):
            if left == 3:
                _tile3(wq, wd, r, xq, xsum, xd, t, out)
            elif left == 2:
                _tile2(wq, wd, r, xq, xsum, xd, t, out)
            elif left == 1:
                _tile1(wq, wd, r, xq, xsum, xd, t, out)


q_q80_rows = _q_q80_portable if ISA == "portable" else _q_q80_tiled
q_f32_rows = _q_f32_rows
k_q80_rows = _k_q80_portable if ISA == "portable" else _q_q80_tiled  # the tiles take every weight kind
k_f32_rows = _k_f32_rows


@njit(parallel=True, cache=True, nogil=True)
def matmul_q_q80(wq, wd, xq, xsum, xd, lanes_i, lanes_f, out):
    chunks = min(wq.shape[0], CHUNKS)
    for c in prange(chunks):
        q_q80_rows(c * wq.shape[0] // chunks, (c + 1) * wq.shape[0] // chunks, c, wq, wd, xq, xsum, xd,
                   lanes_i, lanes_f, out)


@njit(parallel=True, cache=True, nogil=True)
def matmul_q_f32(wq, wd, xt, lanes_i, lanes_f, out):
    chunks = min(wq.shape[0], CHUNKS)
    for c in prange(chunks):
        q_f32_rows(c * wq.shape[0] // chunks, (c + 1) * wq.shape[0] // chunks, c, wq, wd, xt, lanes_i, lanes_f, out)


@njit(parallel=True, cache=True, nogil=True)
def matmul_k_q80(wq, wd, xq, xsum, xd, lanes_i, lanes_f, out):
    chunks = min(wq.shape[0], CHUNKS)
    for c in prange(chunks):
        k_q80_rows(c * wq.shape[0] // chunks, (c + 1) * wq.shape[0] // chunks, c, wq, wd, xq, xsum, xd,
                   lanes_i, lanes_f, out)


@njit(parallel=True, cache=True, nogil=True)
def matmul_k_f32(wq, wd, xt, lanes_i, lanes_f, out):
    chunks = min(wq.shape[0], CHUNKS)
    for c in prange(chunks):
        k_f32_rows(c * wq.shape[0] // chunks, (c + 1) * wq.shape[0] // chunks, c, wq, wd, xt, lanes_i, lanes_f, out)


# the parallel driver of each rows kernel (the weight types' records name their rows kernels: quant.Kernels)
PARALLEL = {q_q80_rows: matmul_q_q80, q_f32_rows: matmul_q_f32, k_f32_rows: matmul_k_f32}
if k_q80_rows is not q_q80_rows:  # portable: the k-quants have their own; the x86 tiles take every weight kind
    PARALLEL[k_q80_rows] = matmul_k_q80


# --- a mixture of experts' products: every chosen expert in one parallel region -----------------
# Expert e's weights are rows [e P, (e + 1) P) of one matrix stacking every expert's rows (P per
# expert); its tokens are rows [starts[e], starts[e + 1]) of the inputs and outputs (the routing's
# order, vector.route). Tasks are (expert, row chunk) pairs, each with scratch lanes of its own
# (lanes_i/f: max(experts, CHUNKS) rows); each computes its rows with the serial rows kernel, so a
# result is the same bits as the expert's product alone.


@njit(**_opts)
def expert_chunks(n_used, per_expert):
    """Row chunks per chosen expert: enough tasks for the threads when few experts are chosen."""
    return max(1, min(per_expert, CHUNKS // n_used))


@njit(parallel=True, cache=True, nogil=True)
def experts_q_q80(used, starts, per_expert, wq, wd, xq, xsum, xd, lanes_i, lanes_f, out):
    chunks = expert_chunks(used.shape[0], per_expert)
    for task in prange(used.shape[0] * chunks):
        e, c = used[task // chunks], task % chunks
        a, b, w0 = starts[e], starts[e + 1], e * per_expert
        q_q80_rows(c * per_expert // chunks, (c + 1) * per_expert // chunks, task, wq[w0 : w0 + per_expert],
                   wd[w0 : w0 + per_expert], xq[a:b], xsum[a:b], xd[a:b], lanes_i, lanes_f, out[a:b])


@njit(parallel=True, cache=True, nogil=True)
def experts_k_q80(used, starts, per_expert, wq, wd, xq, xsum, xd, lanes_i, lanes_f, out):
    chunks = expert_chunks(used.shape[0], per_expert)
    for task in prange(used.shape[0] * chunks):
        e, c = used[task // chunks], task % chunks
        a, b, w0 = starts[e], starts[e + 1], e * per_expert
        k_q80_rows(c * per_expert // chunks, (c + 1) * per_expert // chunks, task, wq[w0 : w0 + per_expert],
                   wd[w0 : w0 + per_expert], xq[a:b], xsum[a:b], xd[a:b], lanes_i, lanes_f, out[a:b])


@njit(parallel=True, cache=True, nogil=True)
def experts_q_f32(used, starts, per_expert, wq, wd, xt, lanes_i, lanes_f, out):
    chunks = expert_chunks(used.shape[0], per_expert)
    for task in prange(used.shape[0] * chunks):
        e, c = used[task // chunks], task % chunks
        a, b, w0 = starts[e], starts[e + 1], e * per_expert
        q_f32_rows(c * per_expert // chunks, (c + 1) * per_expert // chunks, task, wq[w0 : w0 + per_expert],
                   wd[w0 : w0 + per_expert], xt[a:b], lanes_i, lanes_f, out[a:b])


@njit(parallel=True, cache=True, nogil=True)
def experts_k_f32(used, starts, per_expert, wq, wd, xt, lanes_i, lanes_f, out):
    chunks = expert_chunks(used.shape[0], per_expert)
    for task in prange(used.shape[0] * chunks):
        e, c = used[task // chunks], task % chunks
        a, b, w0 = starts[e], starts[e + 1], e * per_expert
        k_f32_rows(c * per_expert // chunks, (c + 1) * per_expert // chunks, task, wq[w0 : w0 + per_expert],
                   wd[w0 : w0 + per_expert], xt[a:b], lanes_i, lanes_f, out[a:b])


# the experts' driver of each rows kernel
EXPERTS = {q_q80_rows: experts_q_q80, q_f32_rows: experts_q_f32, k_f32_rows: experts_k_f32}
if k_q80_rows is not q_q80_rows:
    EXPERTS[k_q80_rows] = experts_k_q80
