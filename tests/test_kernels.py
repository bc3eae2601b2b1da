"""The numba kernels against their plain-numpy twins (reference.py, quant.py), on odd sizes.

Sizes are deliberately lopsided (13/17/7/1 rows, 7 or 13 blocks, head_dim 6/10/64, positions
1/5/17) so that a swapped axis or an off-by-one cannot pass by symmetry.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dllama_mpi import kernels, quant, reference, threads

F16_MAX = 65504.0


# ---------------------------------------------------------------- helpers


def _varied(rng: np.random.Generator, n: int, lo: float = -2, hi: float = 2) -> np.ndarray:
    """(n,) f32 normal values; each 32-block (and the tail) scaled by 10**U(lo, hi)."""
    x = rng.standard_normal(n)
    nb = -(-n // 32)
    scale = np.repeat(10.0 ** rng.uniform(lo, hi, size=nb), 32)[:n]
    return (x * scale).astype(np.float32)


def _matrix(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) f32, rows of different magnitudes."""
    scale = 10.0 ** rng.uniform(-1, 1, size=(rows, 1))
    return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)


def _q40(rng: np.random.Generator, rows: int, cols: int):
    """Q40 weights in both forms: structured (rows, nb) blocks, and the kernels'
    f32 scales (rows, nb) + nibbles (rows, nb, 16)."""
    blocks = quant.quantize_q40(_matrix(rng, rows, cols))
    wd = np.ascontiguousarray(blocks["d"].astype(np.float32))
    wqs = np.ascontiguousarray(blocks["qs"])
    return blocks, wd, wqs


def _kernel_q80(x: np.ndarray):
    """x: (n,) f32 -> kernel Q80 bytes (nb, 34) and decoded scales (nb,)."""
    nb = x.shape[0] // 32
    blocks = np.zeros((nb, 34), np.uint8)
    d = np.zeros(nb, np.float32)
    kernels.quantize_q80(x, blocks)
    kernels.q80_scales(blocks, d)
    return blocks, d


def _assert_close(got: np.ndarray, expected: np.ndarray, rel: float = 1e-5) -> None:
    """Close relative to the scale of the whole output."""
    assert got.shape == expected.shape
    assert got.dtype == np.float32
    atol = rel * float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(got, expected, rtol=rel, atol=atol)


@pytest.fixture
def restore_threads():
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


needs_two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="numba has a single thread")


# ---------------------------------------------------------------- fp16 scale codec


def test_f16_bits_to_f32_matches_numpy_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # (65536,)
    blocks = np.zeros((bits.size, 34), np.uint8)
    blocks[:, 0] = bits & 0xFF
    blocks[:, 1] = bits >> 8
    d = np.zeros(bits.size, np.float32)
    kernels.q80_scales(blocks, d)
    expected = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(d), nan)
    np.testing.assert_array_equal(d[~nan].view(np.uint32), expected[~nan].view(np.uint32))


@pytest.mark.parametrize("h", [0x0000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0x7C00, 0x8001, 0xBC00, 0xFBFF, 0xFC00])
def test_f16_bits_to_f32_scalar_calls(h):
    expected = np.array([h], np.uint16).view(np.float16).astype(np.float32)[0]
    assert np.float32(kernels.f16_bits_to_f32(h)).view(np.uint32) == expected.view(np.uint32)


def _f16_bits(x: np.float32) -> int:
    with np.errstate(over="ignore"):
        return int(np.array([x], np.float32).astype(np.float16).view(np.uint16)[0])


def test_f32_to_f16_bits_exact_values_ties_and_neighbours():
    # every finite non-negative fp16 value, the midpoints between neighbours (exact ties:
    # round half to even), and the float32 values just either side of each midpoint
    grid = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)  # (31744,)
    mids = ((grid[:-1] + grid[1:]) / 2).astype(np.float32)
    assert np.all(mids.astype(np.float64) == (grid[:-1] + grid[1:]) / 2)  # ties are exact in f32
    values = np.concatenate(
        [
            grid.astype(np.float32),
            mids,
            np.nextafter(mids, np.float32(0)),
            np.nextafter(mids, np.float32(np.inf)),
        ]
    )
    got = np.array([kernels.f32_to_f16_bits(v) for v in values], np.int64)
    expected = values.astype(np.float16).view(np.uint16).astype(np.int64)
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, [(float(values[i]), int(got[i]), int(expected[i])) for i in bad[:5]]


@pytest.mark.parametrize(
    "x",
    [
        0.0,
        2.0**-24,  # smallest subnormal
        2.0**-25,  # tie between 0 and the smallest subnormal -> 0 (even)
        3 * 2.0**-25,  # tie between 1 and 2 subnormal units -> 2
        2.0**-26,  # below half the smallest subnormal -> 0
        1e-7,
        7.874e-9,  # a Q80 scale of amax 1e-6
        6.0975e-05,  # just below the smallest normal, rounds up to it
        2.0**-14,  # smallest normal
        1.0 / 127,
        0.1,
        1.0,
        1.0 + 2.0**-11,  # tie -> 1.0 (even)
        1.0 + 3 * 2.0**-11,  # tie -> 1 + 2**-9 (even)
        2047.5,  # tie at the carry into the next binade: -> 2048
        472.44095,  # a Q80 scale of amax 6e4
        F16_MAX,
        65519.99,  # still rounds down to 65504
        65520.0,  # tie -> inf
        1e5,  # overflow -> inf
        3e38,
    ],
)
def test_f32_to_f16_bits_hand_picked(x):
    v = np.float32(x)
    assert int(kernels.f32_to_f16_bits(v)) == _f16_bits(v)


@settings(max_examples=400, deadline=None)
@given(st.floats(min_value=0.0, max_value=F16_MAX, width=32, allow_nan=False, allow_infinity=False))
@example(2.0**-24 * 1.5)
@example(6.1035156e-05)
def test_f32_to_f16_bits_matches_numpy(x):
    v = np.float32(x)
    assert int(kernels.f32_to_f16_bits(v)) == _f16_bits(v)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=0.0, max_value=2.0**-14, width=32, allow_nan=False, allow_infinity=False))
def test_f32_to_f16_bits_matches_numpy_on_subnormals(x):
    v = np.float32(x)
    assert int(kernels.f32_to_f16_bits(v)) == _f16_bits(v)


# ---------------------------------------------------------------- Q80 quantization


def _q80_bytes_match(x: np.ndarray) -> None:
    blocks, d = _kernel_q80(x)
    expected = quant.quantize_q80(x)  # (nb,) Q80
    raw = quant.as_bytes(expected)  # (nb, 34)
    bad = np.flatnonzero((blocks != raw).any(axis=1))
    assert bad.size == 0, f"blocks differ: {bad[:5]}"
    np.testing.assert_array_equal(d.view(np.uint32), expected["d"].astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("n, seed", [(32, 0), (32 * 7, 1), (32 * 13, 2), (32 * 101, 3)])
def test_quantize_q80_byte_identical_on_random_vectors(n, seed):
    rng = np.random.default_rng(seed)
    _q80_bytes_match(_varied(rng, n, -7, 4.5))  # block scales from ~1e-7 to ~3e4


def test_quantize_q80_byte_identical_with_rounding_ties():
    # blocks whose amax is 127 * 2**k: d = 2**k and inv = 2**-k are exact, so
    # x = (m + 0.5) * 2**k lands exactly on a .5 tie (half away from zero)
    rng = np.random.default_rng(11)
    blocks = []
    for k in (-20, -3, 0, 2, 7):
        m = rng.integers(-127, 127, size=32).astype(np.float64) + 0.5
        m[rng.integers(32)] = 127.0 if k % 2 else -127.0
        blocks.append(m * 2.0**k)
    x = np.concatenate(blocks).astype(np.float32)  # (160,)
    q = quant.quantize_q80(x)
    assert np.all(np.abs(q["qs"].astype(int)) <= 127)
    _q80_bytes_match(x)


def test_quantize_q80_byte_identical_with_tiny_huge_and_zero_blocks():
    rng = np.random.default_rng(12)
    parts = [
        rng.standard_normal(32) * 1e-6,  # scale rounds to an fp16 subnormal / zero
        np.zeros(32),  # d = 0 and all q = 0
        rng.standard_normal(32) * 6e4,
        np.full(32, 6e4) * np.sign(rng.standard_normal(32)),  # every element at +-amax
        rng.standard_normal(32) * 3e-3,  # subnormal fp16 scale
        np.linspace(-1, 1, 32),  # exact +-amax at both ends
        rng.standard_normal(32),
    ]
    x = np.concatenate(parts).astype(np.float32)  # (224,)
    _q80_bytes_match(x)
    blocks, d = _kernel_q80(x)
    assert d[1] == 0 and np.all(blocks[1] == 0)


def test_quantize_q80_overflowing_scale_matches_numpy():
    # amax / 127 above the fp16 range: both sides store an infinite scale
    x = np.linspace(-1e7, 2e7, 64).astype(np.float32)
    blocks, d = _kernel_q80(x)
    with np.errstate(over="ignore"):
        expected = quant.as_bytes(quant.quantize_q80(x))
    np.testing.assert_array_equal(blocks, expected)
    assert np.all(np.isinf(d))


def test_quantize_q80_ignores_a_trailing_partial_block():
    # kernels quantize n // 32 blocks; a prefix of whole blocks is what gets written
    rng = np.random.default_rng(13)
    x = _varied(rng, 32 * 3 + 5)
    blocks = np.full((3, 34), 0xAB, np.uint8)
    kernels.quantize_q80(x, blocks)
    np.testing.assert_array_equal(blocks, quant.as_bytes(quant.quantize_q80(x[:96])))


# ---------------------------------------------------------------- dequantization


@pytest.mark.parametrize("n", [32, 32 * 7, 32 * 13])
def test_dequantize_q80_matches_numpy(n):
    rng = np.random.default_rng(n)
    x = _varied(rng, n)
    blocks, d = _kernel_q80(x)
    out = np.full(n, np.nan, np.float32)
    kernels.dequantize_q80(blocks, d, out)
    np.testing.assert_array_equal(out, quant.dequantize_q80(quant.quantize_q80(x)))


@pytest.mark.parametrize("rows, cols", [(13, 32 * 7), (7, 32 * 13), (1, 32)])
def test_dequantize_q40_row_matches_numpy(rows, cols):
    rng = np.random.default_rng(rows + cols)
    blocks, wd, wqs = _q40(rng, rows, cols)
    expected = quant.dequantize_q40(blocks)  # (rows, cols)
    for r in range(rows):
        out = np.full(cols, np.nan, np.float32)
        kernels.dequantize_q40_row(wd[r], wqs[r], out)
        np.testing.assert_array_equal(out, expected[r])


# ---------------------------------------------------------------- matvec


@pytest.mark.parametrize("rows, cols", [(13, 32 * 7), (17, 32 * 13), (7, 172), (1, 37), (17, 1)])
def test_matvec_f32_matches_reference(rows, cols):
    rng = np.random.default_rng(rows * 7 + cols)
    w = _matrix(rng, rows, cols)  # (rows, cols)
    x = _varied(rng, cols)  # (cols,)
    out = np.full(rows, np.nan, np.float32)
    kernels.matvec_f32(w, x, out)
    _assert_close(out, reference.matvec_f32(w, x))


@pytest.mark.parametrize("rows, cols", [(13, 32 * 7), (17, 32 * 13), (7, 32), (1, 32 * 13)])
def test_matvec_q40_q80_matches_reference(rows, cols):
    rng = np.random.default_rng(rows * 11 + cols)
    blocks, wd, wqs = _q40(rng, rows, cols)  # (rows, nb)
    x = _varied(rng, cols)
    xblocks, xd = _kernel_q80(x)  # (nb, 34), (nb,)
    out = np.full(rows, np.nan, np.float32)
    kernels.matvec_q40_q80(wd, wqs, xblocks, xd, out)
    _assert_close(out, reference.matvec_q40_q80(blocks, quant.quantize_q80(x)))


@pytest.mark.parametrize("rows, cols", [(13, 32 * 7), (17, 32 * 13), (7, 32), (1, 32 * 13)])
def test_matvec_q40_f32_matches_reference(rows, cols):
    rng = np.random.default_rng(rows * 13 + cols)
    blocks, wd, wqs = _q40(rng, rows, cols)
    x = _varied(rng, cols)
    out = np.full(rows, np.nan, np.float32)
    kernels.matvec_q40_f32(wd, wqs, x, out)
    _assert_close(out, reference.matvec_q40_f32(blocks, x))


def test_matvec_q40_q80_single_block_by_hand():
    # one row, one block: the kernel pairs weight nibble j with x element j, nibble j+16 with j+16
    qw = (np.arange(32) * 5 + 2) % 16  # (32,) weight codes
    qx = (np.arange(32) * 9 % 255 - 127).astype(np.int8)  # (32,) int8 input codes
    qx[0] = 127
    wd = np.array([[0.5]], np.float32)
    wqs = (qw[:16] | (qw[16:] << 4)).astype(np.uint8).reshape(1, 1, 16)
    xq = np.zeros(1, quant.Q80)
    xq["d"], xq["qs"] = np.float16(0.25), qx
    xblocks = quant.as_bytes(xq)  # (1, 34)
    xd = np.array([0.25], np.float32)
    out = np.zeros(1, np.float32)
    kernels.matvec_q40_q80(wd, wqs, xblocks, xd, out)
    assert out[0] == np.float32(np.dot(qw - 8, qx.astype(np.int64)) * 0.5 * 0.25)


@pytest.mark.parametrize("kind", ["f32", "q40_q80", "q40_f32"])
def test_matvec_zero_rows(kind):
    # a rank whose share of a matrix is empty: (0, cols)
    rng = np.random.default_rng(0)
    cols = 32 * 7
    x = _varied(rng, cols)
    out = np.zeros(0, np.float32)
    if kind == "f32":
        kernels.matvec_f32(np.zeros((0, cols), np.float32), x, out)
    else:
        wd, wqs = np.zeros((0, 7), np.float32), np.zeros((0, 7, 16), np.uint8)
        if kind == "q40_q80":
            xblocks, xd = _kernel_q80(x)
            kernels.matvec_q40_q80(wd, wqs, xblocks, xd, out)
        else:
            kernels.matvec_q40_f32(wd, wqs, x, out)
    assert out.shape == (0,)
    assert reference.matvec_f32(np.zeros((0, cols), np.float32), x).shape == (0,)


# ---------------------------------------------------------------- rmsnorm, rope, silu


@pytest.mark.parametrize("n", [1, 6, 37, 32 * 7, 32 * 13])
def test_rmsnorm_matches_reference(n):
    rng = np.random.default_rng(n)
    x = _varied(rng, n)
    weight = (1 + 0.5 * rng.standard_normal(n)).astype(np.float32)
    out = np.full(n, np.nan, np.float32)
    kernels.rmsnorm(x, weight, 1e-5, out)
    _assert_close(out, reference.rmsnorm(x, weight, 1e-5))


def test_rmsnorm_eps_matters_for_small_inputs():
    # (7,) tiny values: eps dominates the mean square
    x = np.array([1e-4, -2e-4, 3e-4, 0, 5e-4, -1e-4, 2e-4], np.float32)
    weight = np.linspace(0.5, 2, 7).astype(np.float32)
    out = np.zeros(7, np.float32)
    kernels.rmsnorm(x, weight, 1e-2, out)
    _assert_close(out, reference.rmsnorm(x, weight, 1e-2))
    _assert_close(out, (weight * x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-2)).astype(np.float32))


def test_rope_table_angles():
    head_dim, theta = 10, 10000.0
    freqs = theta ** (-np.arange(0, head_dim, 2) / head_dim)  # (5,)
    cos, sin = kernels.rope_table(freqs, 18)  # (18, 5) each
    assert cos.shape == sin.shape == (18, 5) and cos.dtype == np.float32
    p, i = np.meshgrid(np.arange(18), np.arange(5), indexing="ij")
    angles = p * theta ** (-2.0 * i / head_dim)
    np.testing.assert_allclose(cos, np.cos(angles), rtol=0, atol=1e-7)
    np.testing.assert_allclose(sin, np.sin(angles), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(cos[0], 1)
    np.testing.assert_array_equal(sin[0], 0)


@pytest.mark.parametrize("head_dim", [6, 10, 64])
@pytest.mark.parametrize("pos", [1, 5, 17])
def test_rope_matches_reference(head_dim, pos):
    n_heads = 3
    rng = np.random.default_rng(head_dim * 100 + pos)
    cos, sin = kernels.rope_table(10000.0 ** (-np.arange(0, head_dim, 2) / head_dim), 18)  # (18, head_dim // 2)
    vec = _varied(rng, n_heads * head_dim)  # (n_heads * head_dim,)
    expected = reference.rope(vec.copy(), head_dim, cos[pos], sin[pos])
    kernels.rope(vec, n_heads, head_dim, cos[pos], sin[pos])
    _assert_close(vec, expected)


def test_rope_rotates_interleaved_pairs_by_hand():
    # 2 heads of head_dim 4: pairs (0,1), (2,3) | (4,5), (6,7); pair i uses angle i of the table
    cos = np.array([0.0, np.float32(np.cos(0.3))], np.float32)
    sin = np.array([1.0, np.float32(np.sin(0.3))], np.float32)
    vec = np.array([1, 2, 3, 4, 5, 6, 7, 8], np.float32)
    c, s = cos[1], sin[1]
    expected = np.array(
        [-2, 1, 3 * c - 4 * s, 3 * s + 4 * c, -6, 5, 7 * c - 8 * s, 7 * s + 8 * c], np.float32
    )
    kernels.rope(vec, 2, 4, cos, sin)
    np.testing.assert_allclose(vec, expected, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 37, 32 * 13])
def test_silu_mul_matches_reference(n):
    rng = np.random.default_rng(n + 5)
    h1 = (rng.standard_normal(n) * 4).astype(np.float32)
    h1[:: max(1, n // 5)] = np.float32(-30.0)  # deep in the tail
    if n > 2:
        h1[1] = 30.0
    h3 = _varied(rng, n)
    out = np.full(n, np.nan, np.float32)
    kernels.silu_mul(h1, h3, out)
    _assert_close(out, reference.silu_mul(h1, h3))


# ---------------------------------------------------------------- attention


def _attention_case(rng, n_heads, n_kv, head_dim, n_pos, extra=4):
    """q: (n_heads, head_dim); caches: (n_pos + extra, n_kv, head_dim) whose rows past
    n_pos hold huge garbage that must not be read."""
    max_seq = n_pos + extra
    q = (rng.standard_normal((n_heads, head_dim)) * 1.5).astype(np.float32)
    k = (rng.standard_normal((max_seq, n_kv, head_dim)) * 1.5).astype(np.float32)
    v = (rng.standard_normal((max_seq, n_kv, head_dim)) * 10.0 ** rng.uniform(-1, 1, (1, n_kv, head_dim))).astype(np.float32)
    k[n_pos:] = 1e4
    v[n_pos:] = -1e6
    return q, k, v


def _run_attention(q, k, v, kv_of_head, n_pos):
    scores = np.full((q.shape[0], k.shape[0] + 3), np.nan, np.float32)  # wider than n_pos
    out = np.full(q.shape, np.nan, np.float32)
    kernels.attention(q, k, v, np.asarray(kv_of_head, np.int64), n_pos, scores, out)
    return out


@pytest.mark.parametrize("group", [2, 3])
@pytest.mark.parametrize("head_dim", [6, 10, 64])
@pytest.mark.parametrize("n_pos", [1, 5, 17])
def test_attention_gqa_matches_reference(group, head_dim, n_pos):
    n_kv = 2
    n_heads = n_kv * group
    rng = np.random.default_rng(group * 1000 + head_dim * 10 + n_pos)
    q, k, v = _attention_case(rng, n_heads, n_kv, head_dim, n_pos)
    kv_of_head = [h // group for h in range(n_heads)]
    got = _run_attention(q, k, v, kv_of_head, n_pos)
    _assert_close(got, reference.attention(q, k[:n_pos], v[:n_pos], kv_of_head))


def test_attention_single_position_returns_its_value():
    rng = np.random.default_rng(21)
    q, k, v = _attention_case(rng, 6, 2, 10, 1)
    kv_of_head = [0, 0, 0, 1, 1, 1]
    got = _run_attention(q, k, v, kv_of_head, 1)
    np.testing.assert_allclose(got, v[0][kv_of_head], rtol=1e-6)


def test_attention_uses_the_given_kv_mapping_not_h_div_group():
    # (5, 10) queries over 3 KV heads with an irregular mapping
    rng = np.random.default_rng(22)
    q, k, v = _attention_case(rng, 5, 3, 10, 17)
    kv_of_head = [2, 0, 2, 1, 0]
    got = _run_attention(q, k, v, kv_of_head, 17)
    _assert_close(got, reference.attention(q, k[:17], v[:17], kv_of_head))


# ---------------------------------------------------------------- sampling


def _probs(logits, temperature):
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return p / p.sum()


def _nucleus_cut(p, top_p):
    """Probability of the smallest member of the smallest top set with mass >= top_p."""
    if top_p >= 1:
        return 0.0
    ordered = np.sort(p)[::-1]
    k = int(np.searchsorted(np.cumsum(ordered), top_p))
    return ordered[min(k, len(p) - 1)]


def _safe_coins(p, cut, n=400, seed=0):
    """Coins in [0, 1) at least 1e-9 away from every cdf boundary of the nucleus."""
    kept = np.where(p >= cut, p, 0.0)
    edges = np.cumsum(kept) / kept.sum()
    coins = np.random.default_rng(seed).random(n)
    coins = np.concatenate([coins, [0.0, 1e-6, 0.5, 1 - 1e-6]])
    far = np.min(np.abs(coins[:, None] - edges[None, :]), axis=1) > 1e-9
    return coins[far]


def _kernel_sample(logits, temperature, top_p, coin):
    n = logits.shape[0]
    return int(kernels.sample(logits, float(temperature), float(top_p), float(coin), np.zeros(n), np.zeros(n)))


@pytest.mark.parametrize("n", [1, 37, 512])
def test_sample_temperature_zero_is_argmax(n):
    rng = np.random.default_rng(n)
    logits = (rng.standard_normal(n) * 3).astype(np.float32)
    for coin in (0.0, 0.3, 0.999):
        assert _kernel_sample(logits, 0.0, 0.9, coin) == int(np.argmax(logits))
        assert reference.sample(logits, 0.0, 0.9, coin) == int(np.argmax(logits))


def test_sample_temperature_zero_takes_first_of_ties():
    logits = np.array([0.5, -1, 3.25, 0, 3.25, 2, 3.25], np.float32)  # (7,) max at 2, 4, 6
    assert _kernel_sample(logits, 0.0, 1.0, 0.5) == 2
    assert reference.sample(logits, 0.0, 1.0, 0.5) == 2


@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("n", [37, 513])
def test_sample_matches_reference_and_stays_in_nucleus(temperature, top_p, n):
    rng = np.random.default_rng(int(temperature * 10) * 1000 + int(top_p * 10) * 10 + n)
    logits = (rng.standard_normal(n) * 2.5).astype(np.float32)
    p = _probs(logits, temperature)
    cut = _nucleus_cut(p, top_p)
    nucleus = set(np.flatnonzero(p >= cut).tolist())
    if top_p < 1:
        assert len(nucleus) < n  # the cut is doing something on these logits
    coins = _safe_coins(p, cut, seed=n)
    assert coins.size > 300
    seen = set()
    for coin in coins:
        got = _kernel_sample(logits, temperature, top_p, coin)
        assert got == reference.sample(logits, temperature, top_p, coin), coin
        assert got in nucleus
        seen.add(got)
    assert len(seen) > 1


def test_sample_coin_maps_to_cdf_in_index_order():
    # (5,) equal logits at temperature 1, top_p 1: uniform, token = floor(coin * 5)
    logits = np.zeros(5, np.float32)
    for coin, token in [(0.0, 0), (0.19, 0), (0.21, 1), (0.59, 2), (0.61, 3), (0.99, 4)]:
        assert _kernel_sample(logits, 1.0, 1.0, coin) == token
        assert reference.sample(logits, 1.0, 1.0, coin) == token


def test_sample_nucleus_keeps_ties_of_the_smallest_member():
    # probabilities 0.4, 0.2, 0.2, 0.2 (by construction): top_p 0.5 needs {0, one of the 0.2s},
    # and every token tied with the smallest member is kept -> all four
    logits = np.log(np.array([0.2, 0.4, 0.2, 0.2])).astype(np.float32)
    got = {_kernel_sample(logits, 1.0, 0.5, c) for c in np.linspace(0.01, 0.99, 23)}
    assert got == {0, 1, 2, 3}
    # with top_p 0.3 only the single largest token is kept
    got = {_kernel_sample(logits, 1.0, 0.3, c) for c in np.linspace(0.01, 0.99, 23)}
    assert got == {1}



def test_sample_coin_just_below_one_stays_in_nucleus():
    # (200,) logits, temperature 1, top_p 0.9, coin = the largest double below 1 (random.random()
    # can return it). The nucleus' cdf in index order ends at sum(kept) computed sequentially;
    # a coin * (pairwise-summed mass) can land at or past that end, and the token must then
    # still be the last member of the nucleus, never a token outside it.
    n = 200
    logits = (np.random.default_rng(2998).standard_normal(n) * 2.5).astype(np.float32)
    p = _probs(logits, 1.0)
    cut = _nucleus_cut(p, 0.9)
    last_kept = int(np.flatnonzero(p >= cut)[-1])
    coin = float(np.nextafter(1.0, 0.0))
    assert _kernel_sample(logits, 1.0, 0.9, coin) == last_kept
    assert reference.sample(logits, 1.0, 0.9, coin) == last_kept


# ---------------------------------------------------------------- determinism


def _all_matvecs(rng, rows, cols):
    w = _matrix(rng, rows, cols)
    _, wd, wqs = _q40(rng, rows, cols)
    x = _varied(rng, cols)
    xblocks, xd = _kernel_q80(x)

    def run(a=0, b=rows):
        outs = [np.zeros(b - a, np.float32) for _ in range(3)]
        kernels.matvec_f32(w[a:b], x, outs[0])
        kernels.matvec_q40_q80(wd[a:b], wqs[a:b], xblocks, xd, outs[1])
        kernels.matvec_q40_f32(wd[a:b], wqs[a:b], x, outs[2])
        return outs

    return run


@needs_two_threads
def test_matvec_bit_identical_for_one_and_two_threads(restore_threads):
    run = _all_matvecs(np.random.default_rng(31), 17, 32 * 13)
    assert threads.set_threads(1) == 1
    one = run()
    assert threads.set_threads(2) == 2
    two = run()
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@needs_two_threads
def test_attention_bit_identical_for_one_and_two_threads(restore_threads):
    rng = np.random.default_rng(32)
    q, k, v = _attention_case(rng, 6, 2, 64, 17)
    kv_of_head = [0, 0, 0, 1, 1, 1]
    threads.set_threads(1)
    one = _run_attention(q, k, v, kv_of_head, 17)
    threads.set_threads(2)
    two = _run_attention(q, k, v, kv_of_head, 17)
    np.testing.assert_array_equal(one.view(np.uint32), two.view(np.uint32))


@pytest.mark.parametrize("a, b", [(0, 5), (5, 13), (3, 4), (12, 13), (0, 13), (7, 7)])
def test_matvec_row_slice_bit_identical_to_full_product(a, b):
    # (13, 224) matrices: a rank computing rows [a, b) gets exactly those rows of the full result
    run = _all_matvecs(np.random.default_rng(33), 13, 32 * 7)
    full = run()
    part = run(a, b)
    for f, s in zip(full, part):
        np.testing.assert_array_equal(s.view(np.uint32), f[a:b].view(np.uint32))


def test_attention_head_slice_bit_identical_to_full():
    # 6 heads over 2 KV heads (group 3); a rank holding KV head 1 and query heads 3..5
    rng = np.random.default_rng(34)
    q, k, v = _attention_case(rng, 6, 2, 10, 17)
    full = _run_attention(q, k, v, [0, 0, 0, 1, 1, 1], 17)
    local_k = np.ascontiguousarray(k[:, 1:2])
    local_v = np.ascontiguousarray(v[:, 1:2])
    part = _run_attention(np.ascontiguousarray(q[3:]), local_k, local_v, [0, 0, 0], 17)
    np.testing.assert_array_equal(part.view(np.uint32), full[3:].view(np.uint32))


# --- f16 and q80 weights, per-head norm -----------------------------------------------------


@pytest.mark.parametrize("rows, cols", [(13, 7), (17, 64), (7, 224), (1, 13)])
def test_matvec_f16_matches_reference(rows, cols):
    rng = np.random.default_rng(rows * 31 + cols)
    w = _matrix(rng, rows, cols).astype(np.float16)  # (rows, cols)
    x = _varied(rng, cols)
    out = np.zeros(rows, np.float32)
    kernels.matvec_f16(w.view(np.uint16), kernels.F16_TABLE, x, out)
    _assert_close(out, reference.matvec_f16(w, x))


def test_f16_table_and_row_decode_every_value():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)  # (65536,) every fp16 pattern
    finite = np.isfinite(bits.view(np.float16))
    expected = bits.view(np.float16).astype(np.float32)
    out = np.zeros(bits.size, np.float32)
    kernels.f16_row(bits, kernels.F16_TABLE, out)
    np.testing.assert_array_equal(out[finite], expected[finite])


@pytest.mark.parametrize("rows, cols", [(13, 224), (17, 32), (7, 416), (1, 96)])
def test_matvec_q80_weights_match_reference(rows, cols):
    rng = np.random.default_rng(rows * 7 + cols)
    w_blocks = quant.quantize_q80(_matrix(rng, rows, cols))  # (rows, cols // 32) Q80
    d, qs = w_blocks["d"].astype(np.float32), np.ascontiguousarray(w_blocks["qs"])
    x = _varied(rng, cols)
    xb, xd = _kernel_q80(x)
    out = np.zeros(rows, np.float32)
    kernels.matvec_q80_q80(d, qs, xb, xd, out)
    _assert_close(out, reference.matvec_q80_q80(w_blocks, quant.quantize_q80(x)))
    kernels.matvec_q80_f32(d, qs, x, out)
    _assert_close(out, reference.matvec_q80_f32(w_blocks, x))
    row = np.zeros(cols, np.float32)
    kernels.dequantize_q80_row(d[rows // 2], qs[rows // 2], row)
    np.testing.assert_array_equal(row, quant.dequantize_q80(w_blocks[rows // 2]))


@pytest.mark.parametrize("n_heads, head_dim", [(3, 10), (1, 64), (5, 6)])
def test_rmsnorm_heads_matches_reference(n_heads, head_dim):
    rng = np.random.default_rng(n_heads * 100 + head_dim)
    vec = _varied(rng, n_heads * head_dim)  # (n_heads * head_dim,)
    weight = (1 + 0.3 * rng.standard_normal(head_dim)).astype(np.float32)  # (head_dim,)
    expected = reference.rmsnorm_heads(vec, head_dim, weight, 1e-6)
    kernels.rmsnorm_heads(vec, n_heads, head_dim, weight, 1e-6)
    _assert_close(vec, expected)
