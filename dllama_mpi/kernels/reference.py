"""Plain-numpy twins of the kernels, and a dense single-process forward pass.

Slow and obvious on purpose: tests compare the numba kernels and the distributed engine
against these on odd sizes.
"""

from __future__ import annotations

import numpy as np

from ..model import quant
from ..model.spec import ModelSpec
from ..parallel.plan import travels_q80
from . import resolve
from .vector import rope_table


def matvec_f32(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (w.astype(np.float64) @ x.astype(np.float64)).astype(np.float32)


def lane_sum(p: np.ndarray) -> np.ndarray:
    """The quantized products' float order (see qmatmul): p (..., nb) f32 per-block terms ->
    (...,): lane l sums blocks l, l + 16, ... in order, then the fixed 16 -> 1 tree."""
    nb = p.shape[-1]
    g = -(-nb // quant.GROUP)
    padded = np.zeros((*p.shape[:-1], g * quant.GROUP), np.float32)
    padded[..., :nb] = p
    acc = np.zeros((*p.shape[:-1], quant.GROUP), np.float32)
    for i in range(g):
        acc = acc + padded[..., i * quant.GROUP : (i + 1) * quant.GROUP]
    half = quant.GROUP // 2
    while half:
        acc = acc[..., :half] + acc[..., half : 2 * half]
        half //= 2
    return acc[..., 0]


def _codes(w_blocks: np.ndarray) -> np.ndarray:
    """(rows, nb) Q40/Q50/Q80 -> (rows, nb, 32) int64 codes less their offset (Q40's 8, Q50's 16)."""
    qs = w_blocks["qs"]
    layout = quant.WEIGHTS[quant.type_of(w_blocks)].layout
    if layout.high_bits == 1:  # Q50: a 5th bit above each nibble
        return quant.q50_codes(w_blocks).astype(np.int64) - layout.offset
    if layout.nibbles:
        return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int64) - layout.offset
    return qs.astype(np.int64)


def matvec_q_q80_exact(w_blocks: np.ndarray, x_blocks: np.ndarray) -> np.ndarray:
    """The twin of qmatmul's Q40/Q50/Q80 x Q80 product, bit for bit: w_blocks (rows, nb);
    x_blocks (T, nb) Q80 -> (T, rows) f32. Exact integer block sums, then f32 terms
    isum * (d_w * d_x) in lane order."""
    isum = np.einsum("rbe,tbe->trb", _codes(w_blocks), x_blocks["qs"].astype(np.int64))
    scale = w_blocks["d"].astype(np.float32)[None] * x_blocks["d"].astype(np.float32)[:, None, :]
    return lane_sum(isum.astype(np.float32) * scale)


def matvec_q_f32_exact(w_blocks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The twin of qmatmul's Q40/Q50/Q80 x f32 product, bit for bit: x (T, nb * 32) f32 ->
    (T, rows): each block's f32 sum of its 32 products in element order, times d_w."""
    codes = _codes(w_blocks).astype(np.float32)  # (rows, nb, 32)
    xb = np.asarray(x, np.float32).reshape(x.shape[0], 1, -1, quant.BLOCK)  # (T, 1, nb, 32)
    bsum = np.zeros((x.shape[0], *codes.shape[:2]), np.float32)
    for e in range(quant.BLOCK):
        bsum = bsum + codes[None, :, :, e] * xb[..., e]
    return lane_sum(bsum * w_blocks["d"].astype(np.float32)[None])


def _codes8(x_blocks: np.ndarray, n_sub: int) -> tuple[np.ndarray, np.ndarray]:
    """8-bit activations, Q80 (T, n_sub) or Q8K (T, n_sub / 8) blocks -> their codes
    (T, n_sub, 32) int64 and each 32-value block's scale (T, n_sub) f32 (a Q8K's, 8 times)."""
    xq = x_blocks["qs"].astype(np.int64).reshape(x_blocks.shape[0], n_sub, quant.BLOCK)
    values = next(a.block_values for a in quant.ACTIVATIONS.values() if a.dtype == x_blocks.dtype)  # per scale
    return xq, np.repeat(x_blocks["d"].astype(np.float32), values // quant.BLOCK, axis=1)


def _kmin_codes(w_blocks: np.ndarray) -> np.ndarray:
    """(rows, nb) Q4K or Q5K -> (rows, nb * 8, 32) int64 unsigned codes by 32-value sub-block
    (Q5K's with their 5th bit)."""
    five = quant.WEIGHTS[quant.type_of(w_blocks)].layout.high_bits == 1
    codes = quant.q5k_codes(w_blocks) if five else quant.q4k_codes(w_blocks)
    return codes.reshape(w_blocks.shape[0], w_blocks.shape[1] * 8, quant.BLOCK).astype(np.int64)


def matvec_kmin_q8_exact(w_blocks: np.ndarray, x_blocks: np.ndarray) -> np.ndarray:
    """The twin of qmatmul's Q4K or Q5K x 8-bit product, bit for bit: w_blocks (rows, nb) Q4K or
    Q5K; x_blocks (T, nb) Q8K or (T, nb * 8) Q80 -> (T, rows) f32. Per 32-value sub-block b: the
    exact integer sum of the unsigned codes times the activation codes, then
    f32(isum) * (s_b * d_x) - f32(xsum) * (m_b * d_x), d_x the block's activation scale."""
    n_sub = w_blocks.shape[1] * 8
    codes = _kmin_codes(w_blocks)
    xq, xd = _codes8(x_blocks, n_sub)
    isum = np.einsum("rbe,tbe->trb", codes, xq).astype(np.float32)
    xsum = xq.sum(axis=-1).astype(np.float32)[:, None, :]
    scale, low = quant.q4k_sub_scales(w_blocks)
    xd = xd[:, None, :]
    return lane_sum(isum * (scale[None] * xd) - xsum * (low[None] * xd))


def matvec_kmin_f32_exact(w_blocks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The twin of qmatmul's Q4K or Q5K x f32 product, bit for bit: per sub-block the f32 sums of
    q * x and of x in element order, then sum_qx * s_b - sum_x * m_b, in lane order."""
    codes = _kmin_codes(w_blocks).astype(np.float32)
    xb = np.asarray(x, np.float32).reshape(x.shape[0], 1, -1, quant.BLOCK)
    qx = np.zeros((x.shape[0], *codes.shape[:2]), np.float32)
    xs = np.zeros((x.shape[0], 1, codes.shape[1]), np.float32)
    for e in range(quant.BLOCK):
        qx = qx + codes[None, :, :, e] * xb[..., e]
        xs = xs + xb[..., e]
    scale, low = quant.q4k_sub_scales(w_blocks)
    return lane_sum(qx * scale[None] - xs * low[None])


def matvec_q6k_q8_exact(w_blocks: np.ndarray, x_blocks: np.ndarray) -> np.ndarray:
    """The twin of qmatmul's Q6K x 8-bit product, bit for bit: w_blocks (rows, nb) Q6K; x_blocks
    as matvec_kmin_q8_exact's -> (T, rows) f32. Per 32-value block b and half (elements 0..15,
    16..31): the exact integer sum of (q - 32) times the activation codes, then
    f32(i_lo) * (s_lo * d_x) + f32(i_hi) * (s_hi * d_x)."""
    rows, n_sub = w_blocks.shape[0], w_blocks.shape[1] * 8
    codes = quant.q6k_codes(w_blocks).reshape(rows, n_sub, 2, 16).astype(np.int64) - 32
    xq, xd = _codes8(x_blocks, n_sub)
    isum = np.einsum("rbhe,tbhe->trbh", codes, xq.reshape(-1, n_sub, 2, 16)).astype(np.float32)  # (T, rows, blocks, half)
    scale = quant.q6k_scales(w_blocks).reshape(rows, n_sub, 2)
    xd = xd[:, None, :]
    return lane_sum(isum[..., 0] * (scale[None, ..., 0] * xd) + isum[..., 1] * (scale[None, ..., 1] * xd))


def matvec_q6k_f32_exact(w_blocks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The twin of qmatmul's Q6K x f32 product, bit for bit: per block each half's f32 sum of
    f32(q - 32) * x in element order, then sum_lo * s_lo + sum_hi * s_hi, in lane order."""
    rows, n_sub = w_blocks.shape[0], w_blocks.shape[1] * 8
    codes = quant.q6k_codes(w_blocks).reshape(rows, n_sub, 2, 16).astype(np.float32) - 32
    xb = np.asarray(x, np.float32).reshape(x.shape[0], 1, n_sub, 2, 16)
    sums = np.zeros((x.shape[0], rows, n_sub, 2), np.float32)
    for e in range(16):
        sums = sums + codes[None, ..., e] * xb[..., e]
    scale = quant.q6k_scales(w_blocks).reshape(rows, n_sub, 2)
    return lane_sum(sums[..., 0] * scale[None, ..., 0] + sums[..., 1] * scale[None, ..., 1])


def twin_8bit(w_blocks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The product of quantized weights w_blocks (rows, nb) and x (T, cols) f32 quantized to their
    8-bit activation form, bit for bit the kernels' -> (T, rows)."""
    t = quant.WEIGHTS[quant.type_of(w_blocks)]
    return resolve(t.kernels.twins[0])(w_blocks, quant.ACTIVATIONS[t.activation].quantize(x))


def twin_f32(w_blocks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The product of quantized weights w_blocks (rows, nb) and x (T, cols) f32, bit for bit the
    kernels' -> (T, rows)."""
    return resolve(quant.WEIGHTS[quant.type_of(w_blocks)].kernels.twins[1])(w_blocks, x)


def matvec_f16(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """w: (rows, n) float16 (the f16 weights' twin: tests look it up as matvec_<type>)."""
    return matvec_f32(w.astype(np.float32), x)


def rmsnorm_heads(vec: np.ndarray, head_dim: int, weight: np.ndarray, eps: float) -> np.ndarray:
    return np.concatenate([rmsnorm(h, weight, eps) for h in vec.reshape(-1, head_dim)])


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (weight * (x64 / np.sqrt(np.mean(x64 * x64) + eps))).astype(np.float32)


def rope(vec: np.ndarray, head_dim: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """vec: (n_heads * head_dim,) rotated by one position's cos/sin (head_dim // 2,)."""
    pairs = vec.reshape(-1, head_dim // 2, 2).astype(np.float64)
    a, b = pairs[..., 0], pairs[..., 1]
    out = np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(vec.shape).astype(np.float32)


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, kv_of_head) -> np.ndarray:
    """q: (n_heads, head_dim); keys, values: (n_pos, n_kv, head_dim) -> (n_heads, head_dim)."""
    out = np.empty(q.shape, np.float32)
    for h, kv in enumerate(kv_of_head):
        scores = keys[:, kv, :].astype(np.float64) @ q[h] / np.sqrt(q.shape[1])
        p = np.exp(scores - scores.max())
        out[h] = (p / p.sum()) @ values[:, kv, :]
    return out


def silu_mul(h1: np.ndarray, h3: np.ndarray) -> np.ndarray:
    a = h1.astype(np.float64)
    return (a / (1 + np.exp(-a)) * h3).astype(np.float32)


def sample(logits: np.ndarray, temperature: float, top_p: float, coin: float) -> int:
    """Twin of sampler.sample: greedy at temperature 0, else nucleus sampling; the nucleus is
    every token whose probability reaches that of the smallest member of the top-p set."""
    if temperature == 0:
        return int(np.argmax(logits))
    kept = distribution(logits, temperature, top_p)
    cdf = np.cumsum(kept)
    index = int(np.searchsorted(cdf, coin * cdf[-1], side="right"))
    return index if index < len(kept) else int(np.flatnonzero(kept)[-1])  # rounding at coin ~ 1


def mask_logits(logits: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Twin of vector.mask_logits, as a new array: -inf where the token's bit is clear."""
    bits = np.unpackbits(words.astype("<i4").view(np.uint8), bitorder="little")[: len(logits)]
    return np.where(bits == 1, logits, np.float32(-np.inf)).astype(logits.dtype)


def distribution(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """Twin of vector.distribution: sample's nucleus distribution at temperature > 0."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    ordered = np.sort(p)[::-1]
    cut = ordered[min(np.searchsorted(np.cumsum(ordered), top_p), len(p) - 1)] if top_p < 1 else 0.0
    kept = np.where(p >= cut, p, 0.0)
    return kept / kept.sum()


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Twin of vector.residual, normalised: max(0, p - q) / its sum (p where that is 0)."""
    out = np.maximum(p - q, 0.0)
    return out / out.sum() if out.sum() > 0 else p


class DenseModel:
    """Whole-model forward pass in numpy from stored tensors {name: array} (decoded to f32).

    buffer_type 'q80' reproduces the engine's quantization points: the input of every
    quantized matrix is quantized to its 8-bit form (WeightType.activation), and
    every gathered vector that travels as Q80 (plan.travels_q80) is rounded through Q80.
    Keys and values are held as a KV cache of `kv_type` holds them (quant.KV_TYPES)."""

    def __init__(self, spec: ModelSpec, tensors: dict[str, np.ndarray], buffer_type: str = "f32",
                 kv_type: str = quant.DEFAULT_KV_TYPE):
        self.spec, self.buffer_type, self.kv = spec, buffer_type, quant.KV_TYPES[kv_type]
        self.t = {name: quant.decode(value) for name, value in tensors.items()}
        # quantized matrices multiply as the engine does, bit for bit (qmatmul's twins)
        self.quantized = {name: value for name, value in tensors.items() if quant.WEIGHTS[quant.type_of(value)].quantized}
        self.cos, self.sin = rope_table(spec.rope_freqs(), spec.seq_len)
        self.keys = np.zeros((spec.n_layers, spec.seq_len, spec.n_kv_heads, spec.head_dim), np.float32)
        self.values = np.zeros_like(self.keys)

    def _round_q80(self, x: np.ndarray) -> np.ndarray:
        return quant.dequantize_q80(quant.quantize_q80_activations(x))

    def _mv(self, name: str, x: np.ndarray) -> np.ndarray:
        if name not in self.quantized:
            return matvec_f32(self.t[name], x)
        w = self.quantized[name]
        if self.buffer_type == quant.Q80_ACTIVATIONS.name:
            return twin_8bit(w, x[None])[0]
        return twin_f32(w, x[None])[0]

    def _travel(self, x: np.ndarray, vector: str) -> np.ndarray:
        return self._round_q80(x) if travels_q80(self.spec, vector, self.buffer_type) else x

    def _qk(self, p: str, which: str, xb: np.ndarray, pos: int) -> np.ndarray:
        s = self.spec
        out = self._mv(p + "w" + which, xb)
        if s.qkv_bias:
            out = out + self.t[p + "b" + which]
        if s.qk_norm:
            out = rmsnorm_heads(out, s.head_dim, self.t[p + which + "_norm"], s.norm_eps)
        return rope(out, s.head_dim, self.cos[pos], self.sin[pos])

    def _ffn(self, p: str, xb: np.ndarray) -> np.ndarray:
        """A dense FFN (p: "layers/N/"), or one expert's (p: "layers/N/experts/E/")."""
        return self._mv(p + "w2", self._travel(silu_mul(self._mv(p + "w1", xb), self._mv(p + "w3", xb)), "ffn"))

    def _experts(self, p: str, xb: np.ndarray) -> np.ndarray:
        """A mixture of experts: the chosen experts' FFNs, weighted, added in choice order."""
        chosen, weights = route(matvec_f32(self.t[p + "router"], xb), self.spec.n_experts_used,
                                self.spec.expert_weights_norm)
        out = np.zeros(self.spec.dim, np.float32)
        for e, w in zip(chosen, weights, strict=True):
            out = out + w * self._ffn(f"{p}experts/{e}/", xb)
        return out

    def _cached(self, x: np.ndarray) -> np.ndarray:
        """A position's keys or values (n_kv * head_dim,) -> (n_kv, head_dim) as the cache holds them."""
        return self.kv.decode(*self.kv.encode(x.astype(np.float32).reshape(self.spec.n_kv_heads, -1)))

    def forward(self, token: int, pos: int) -> np.ndarray:
        s = self.spec
        x = self.t["tok_embeddings"][token].astype(np.float32)
        kv_of_head = [h // s.group_size for h in range(s.n_heads)]
        for layer in range(s.n_layers):
            p = f"layers/{layer}/"
            xb = rmsnorm(x, self.t[p + "attention_norm"], s.norm_eps)
            q = self._qk(p, "q", xb, pos)
            self.keys[layer, pos] = self._cached(self._qk(p, "k", xb, pos))
            v = self._mv(p + "wv", xb) + (self.t[p + "bv"] if s.qkv_bias else 0)
            self.values[layer, pos] = self._cached(v)
            att = attention(q.reshape(s.n_heads, -1), self.keys[layer, : pos + 1],
                            self.values[layer, : pos + 1], kv_of_head)
            att = self._travel(att.reshape(-1), "att")
            x = x + self._travel(self._mv(p + "wo", att), "dim")
            xb = rmsnorm(x, self.t[p + "ffn_norm"], s.norm_eps)
            if s.moe:
                x = x + self._travel(self._experts(p, xb), "dim")
            else:
                x = x + self._travel(self._ffn(p, xb), "dim")
        xb = rmsnorm(x, self.t["norm"], s.norm_eps)
        return self._mv("tok_embeddings" if s.shared_classifier else "output", xb)


def route(logits: np.ndarray, n_used: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Twin of vector.route for one row: the n_used experts of the largest router logits (E,)
    (a tie: the lower expert first) and their softmax probabilities, divided by their sum when
    `normalize` (float64 here: the engine's f32 differs in the last bits)."""
    chosen = np.argsort(-logits.astype(np.float64), kind="stable")[:n_used]
    p = np.exp(logits.astype(np.float64) - logits.max())
    weights = p[chosen] / p.sum()
    if normalize:
        weights = weights / max(weights.sum(), 6.103515625e-05)
    return chosen, weights.astype(np.float32)
