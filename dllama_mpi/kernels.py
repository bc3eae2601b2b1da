"""numba kernels for one rank's share of a layer. Each has a plain-numpy twin in reference.py.

Determinism: every output element is produced by one sequential loop whose order depends
only on the input length, never on the thread count or the rank's slice, so a split never
changes a result bit. prange only distributes whole output rows/heads.

Q80 vectors are (nb, 34) uint8 blocks (quant.Q80 viewed as bytes): two bytes of fp16
scale, then 32 int8. Q40 weights are held as f32 scales (rows, nb) and packed nibbles
(rows, nb, 16) uint8, converted from quant.Q40 at load.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import threads  # noqa: F401  (the thread policy, before any kernel runs)

BLOCK = 32
_FAST = {"reassoc", "contract", "nsz"}
_opts = {"cache": True, "fastmath": _FAST, "nogil": True}


@njit(**_opts)
def f16_bits_to_f32(h):
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
def f32_to_f16_bits(x):
    """Round-to-nearest-even fp16 encoding of a finite non-negative float32 (a scale)."""
    ax = np.float64(x)
    if ax < 6.103515625e-05:  # below 2**-14: subnormal; m == 1024 encodes the smallest normal
        return np.uint16(np.rint(ax * 16777216.0))
    m, e = math.frexp(ax)  # ax = m * 2**e, m in [0.5, 1)
    mant = np.int64(np.rint(m * 2048.0))  # in [1024, 2048]; 2048 carries into the exponent
    bits = ((e + 14) << 10) + (mant - 1024)
    return np.uint16(min(bits, 0x7C00))


@njit(**_opts)
def quantize_q80(x, out):
    """x: (n,) f32 -> out: (n // 32, 34) uint8 Q80 blocks."""
    for b in range(x.shape[0] // BLOCK):
        amax = np.float32(0.0)
        for j in range(BLOCK):
            amax = max(amax, abs(x[b * BLOCK + j]))
        d = np.float32(amax / np.float32(127.0))
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        bits = f32_to_f16_bits(d)
        out[b, 0] = bits & 0xFF
        out[b, 1] = bits >> 8
        for j in range(BLOCK):
            v = np.float64(np.float32(x[b * BLOCK + j] * inv))
            q = math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)
            out[b, 2 + j] = np.uint8(np.int64(q) & 0xFF)


@njit(**_opts)
def q80_scales(blocks, d):
    """Decode each block's fp16 scale into d: (nb,) f32."""
    for b in range(blocks.shape[0]):
        d[b] = f16_bits_to_f32(np.uint16(blocks[b, 0]) | (np.uint16(blocks[b, 1]) << 8))


@njit(**_opts)
def dequantize_q80(blocks, d, out):
    """Q80 blocks with decoded scales d -> out: (nb * 32,) f32."""
    q = blocks.view(np.int8)
    for b in range(blocks.shape[0]):
        for j in range(BLOCK):
            out[b * BLOCK + j] = np.float32(q[b, 2 + j]) * d[b]


@njit(parallel=True, **_opts)
def matvec_f32(w, x, out):
    """out[r] = w[r, :] . x   (w: (rows, n) f32)."""
    n = x.shape[0]
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for c in range(n):
            acc += w[r, c] * x[c]
        out[r] = acc


@njit(parallel=True, **_opts)
def matvec_q40_q80(wd, wqs, xblocks, xd, out):
    """out[r] = sum_b wd[r, b] * xd[b] * sum_j (q_w - 8) * q_x
    wd: (rows, nb) f32, wqs: (rows, nb, 16) u8, xblocks: (nb, 34) u8 Q80, xd: (nb,) f32."""
    xq = xblocks.view(np.int8)
    nb = wd.shape[1]
    for r in prange(wd.shape[0]):
        acc = np.float32(0.0)
        for b in range(nb):
            isum = np.int32(0)
            for j in range(BLOCK // 2):
                packed = np.int32(wqs[r, b, j])
                isum += ((packed & 0xF) - 8) * np.int32(xq[b, 2 + j])
                isum += ((packed >> 4) - 8) * np.int32(xq[b, 2 + 16 + j])
            acc += np.float32(isum) * (wd[r, b] * xd[b])
        out[r] = acc


@njit(parallel=True, **_opts)
def matvec_q40_f32(wd, wqs, x, out):
    """out[r] = sum_b wd[r, b] * sum_j (q_w - 8) * x_j   (Q40 weights, f32 input)."""
    nb = wd.shape[1]
    for r in prange(wd.shape[0]):
        acc = np.float32(0.0)
        for b in range(nb):
            bsum = np.float32(0.0)
            for j in range(BLOCK // 2):
                packed = np.int32(wqs[r, b, j])
                bsum += np.float32((packed & 0xF) - 8) * x[b * BLOCK + j]
                bsum += np.float32((packed >> 4) - 8) * x[b * BLOCK + 16 + j]
            acc += bsum * wd[r, b]
        out[r] = acc


@njit(**_opts)
def dequantize_q40_row(d, qs, out):
    """One Q40 row (d: (nb,) f32, qs: (nb, 16) u8) -> out: (nb * 32,) f32."""
    for b in range(d.shape[0]):
        for j in range(BLOCK // 2):
            packed = np.int32(qs[b, j])
            out[b * BLOCK + j] = np.float32((packed & 0xF) - 8) * d[b]
            out[b * BLOCK + 16 + j] = np.float32((packed >> 4) - 8) * d[b]


# numba has no float16 on the CPU: f16 weights stay 2 bytes as their bits, looked up here
F16_TABLE = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(parallel=True, **_opts)
def matvec_f16(w, table, x, out):
    """out[r] = w[r, :] . x   (w: (rows, n) u16 fp16 bits, table: F16_TABLE)."""
    n = x.shape[0]
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for c in range(n):
            acc += table[w[r, c]] * x[c]
        out[r] = acc


@njit(**_opts)
def f16_row(bits, table, out):
    for i in range(bits.shape[0]):
        out[i] = table[bits[i]]


@njit(parallel=True, **_opts)
def matvec_q80_q80(wd, wqs, xblocks, xd, out):
    """Q80 weights x Q80 input: wd: (rows, nb) f32, wqs: (rows, nb, 32) i8."""
    xq = xblocks.view(np.int8)
    nb = wd.shape[1]
    for r in prange(wd.shape[0]):
        acc = np.float32(0.0)
        for b in range(nb):
            isum = np.int32(0)
            for j in range(BLOCK):
                isum += np.int32(wqs[r, b, j]) * np.int32(xq[b, 2 + j])
            acc += np.float32(isum) * (wd[r, b] * xd[b])
        out[r] = acc


@njit(parallel=True, **_opts)
def matvec_q80_f32(wd, wqs, x, out):
    """Q80 weights x f32 input."""
    nb = wd.shape[1]
    for r in prange(wd.shape[0]):
        acc = np.float32(0.0)
        for b in range(nb):
            bsum = np.float32(0.0)
            for j in range(BLOCK):
                bsum += np.float32(wqs[r, b, j]) * x[b * BLOCK + j]
            acc += bsum * wd[r, b]
        out[r] = acc


@njit(**_opts)
def dequantize_q80_row(d, qs, out):
    """One Q80 weight row (d: (nb,) f32, qs: (nb, 32) i8) -> out: (nb * 32,) f32."""
    for b in range(d.shape[0]):
        for j in range(BLOCK):
            out[b * BLOCK + j] = np.float32(qs[b, j]) * d[b]


@njit(**_opts)
def rmsnorm_heads(vec, n_heads, head_dim, weight, eps):
    """In place, RMSNorm of each head of vec (n_heads * head_dim,) with weight (head_dim,)."""
    for h in range(n_heads):
        base = h * head_dim
        ss = np.float32(0.0)
        for i in range(head_dim):
            ss += vec[base + i] * vec[base + i]
        scale = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(head_dim) + np.float32(eps)))
        for i in range(head_dim):
            vec[base + i] = weight[i] * (scale * vec[base + i])


@njit(**_opts)
def rmsnorm(x, weight, eps, out):
    ss = np.float32(0.0)
    for i in range(x.shape[0]):
        ss += x[i] * x[i]
    scale = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(x.shape[0]) + np.float32(eps)))
    for i in range(x.shape[0]):
        out[i] = weight[i] * (scale * x[i])


@njit(**_opts)
def rope(vec, n_heads, head_dim, cos, sin):
    """Rotate interleaved pairs (vec[2i], vec[2i+1]) of each head by the position's angles.
    vec: (n_heads * head_dim,) f32; cos, sin: (head_dim // 2,) for this position."""
    for h in range(n_heads):
        base = h * head_dim
        for i in range(head_dim // 2):
            a = vec[base + 2 * i]
            b = vec[base + 2 * i + 1]
            vec[base + 2 * i] = a * cos[i] - b * sin[i]
            vec[base + 2 * i + 1] = a * sin[i] + b * cos[i]


@njit(parallel=True, **_opts)
def attention(q, k_cache, v_cache, kv_of_head, n_pos, scores, out):
    """Causal attention of each local query head over positions [0, n_pos).
    q: (n_local_heads, head_dim); k_cache, v_cache: (max_seq, n_local_kv, head_dim);
    kv_of_head: (n_local_heads,) local KV index; scores: (n_local_heads, max_seq) scratch;
    out: (n_local_heads, head_dim)."""
    head_dim = q.shape[1]
    inv_sqrt = np.float32(1.0 / math.sqrt(head_dim))
    for h in prange(q.shape[0]):
        kv = kv_of_head[h]
        top = np.float32(-np.inf)
        for t in range(n_pos):
            s = np.float32(0.0)
            for i in range(head_dim):
                s += q[h, i] * k_cache[t, kv, i]
            s *= inv_sqrt
            scores[h, t] = s
            top = max(top, s)
        total = np.float32(0.0)
        for t in range(n_pos):
            e = np.float32(math.exp(scores[h, t] - top))
            scores[h, t] = e
            total += e
        for i in range(head_dim):
            out[h, i] = 0.0
        for t in range(n_pos):
            p = scores[h, t] / total
            for i in range(head_dim):
                out[h, i] += p * v_cache[t, kv, i]


@njit(**_opts)
def silu_mul(h1, h3, out):
    """out = silu(h1) * h3."""
    for i in range(h1.shape[0]):
        a = h1[i]
        out[i] = a / (np.float32(1.0) + np.float32(math.exp(-a))) * h3[i]


@njit(cache=True, nogil=True)
def sample(logits, temperature, top_p, coin, probs, scratch):
    """Greedy when temperature == 0. Otherwise softmax(logits / temperature) in float64;
    the nucleus is every token whose probability reaches that of the smallest member of the
    top-p set; the token is where coin * (nucleus mass) falls in index order."""
    n = logits.shape[0]
    best = 0
    for i in range(1, n):
        if logits[i] > logits[best]:
            best = i
    if temperature == 0:
        return best
    top = np.float64(logits[best])
    total = 0.0
    for i in range(n):
        probs[i] = math.exp((np.float64(logits[i]) - top) / temperature)
        total += probs[i]
    for i in range(n):
        probs[i] /= total
    cut = 0.0
    if top_p < 1:
        scratch[:] = probs
        scratch.sort()
        cum = 0.0
        for i in range(n - 1, -1, -1):
            cum += scratch[i]
            if cum >= top_p:
                cut = scratch[i]
                break
    kept = 0.0
    for i in range(n):
        if probs[i] >= cut:
            kept += probs[i]
    target = coin * kept
    cdf = 0.0
    last = best
    for i in range(n):
        if probs[i] >= cut:
            cdf += probs[i]
            last = i
            if target < cdf:
                return i
    return last


def rope_table(freqs: np.ndarray, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, (n_pos, head_dim // 2) f32, of angle p * freqs[i] (spec.rope_freqs()).
    Computed in float64 once, so every rank and the reference share the same table."""
    angles = np.outer(np.arange(n_pos, dtype=np.float64), freqs)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel for the types the engine uses."""
    f32 = np.float32
    x = np.linspace(-1, 1, 64).astype(f32)
    blocks = np.zeros((2, 34), np.uint8)
    d = np.zeros(2, f32)
    out = np.zeros(64, f32)
    quantize_q80(x, blocks)
    q80_scales(blocks, d)
    dequantize_q80(blocks, d, out)
    matvec_f32(np.ones((3, 64), f32), x, out[:3])
    wd, wqs = np.ones((3, 2), f32), np.zeros((3, 2, 16), np.uint8)
    matvec_q40_q80(wd, wqs, blocks, d, out[:3])
    matvec_q40_f32(wd, wqs, x, out[:3])
    dequantize_q40_row(wd[0], wqs[0], out)
    w16 = np.zeros((3, 64), np.uint16)
    matvec_f16(w16, F16_TABLE, x, out[:3])
    f16_row(w16[0], F16_TABLE, out)
    q8 = np.zeros((3, 2, 32), np.int8)
    matvec_q80_q80(wd, q8, blocks, d, out[:3])
    matvec_q80_f32(wd, q8, x, out[:3])
    dequantize_q80_row(wd[0], q8[0], out)
    rmsnorm_heads(out, 2, 32, x[:32], 1e-5)
    rmsnorm(x, x, 1e-5, out)
    rope(out, 2, 32, x[:16], x[:16])
    cache = np.zeros((4, 1, 32), f32)
    attention(x.reshape(2, 32), cache, cache, np.zeros(2, np.int64), 2, np.zeros((2, 4), f32), out.reshape(2, 32))
    silu_mul(x, x, out)
    sample(x, 0.8, 0.9, 0.5, np.zeros(64), np.zeros(64))

