"""The numba kernels against their plain-numpy twins (reference.py, quant.py), on odd sizes.

Sizes are deliberately lopsided (13/17/7/1 rows, 7 or 13 blocks, head_dim 6/10/64, 1/3/5
tokens at positions 0..16) so that a swapped axis or an off-by-one cannot pass by symmetry.
Kernels work on blocks of T tokens; the twins take one token (a 1-D vector), so every
comparison is token by token. Quantized weights are put in the kernels' packed layout by
weights.Matrix.from_stored, the loader's own conversion; the quantized products must equal
their exact twins bit for bit (every instruction set: tests/test_qmatmul.py).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dllama_mpi.job.weights import Matrix
from dllama_mpi.kernels import qmatmul, reference, resolve, vector
from dllama_mpi.model import quant
from dllama_mpi.parallel import threads

F16_MAX = 65504.0
# weight type _ activation form: the engine's pairs (each quantized type's activation form with q80 buffers, f32 with
# f32 ones): f32, f16, q40_q80, q40_f32, q80_q80, q80_f32, q4k_q8k, q4k_f32, q5k_q8k, q5k_f32, q6k_q8k, q6k_f32, q50_q80,
# q50_f32
MATMULS = tuple(pair for t in quant.WEIGHTS.values()
                for pair in ((f"{t.name}_{t.activation}", f"{t.name}_f32") if t.quantized else (t.name,)))



# ---------------------------------------------------------------- helpers


def _varied(rng: np.random.Generator, n: int, lo: float = -2, hi: float = 2) -> np.ndarray:
    """(n,) f32 normal values; each 32-block (and the tail) scaled by 10**U(lo, hi)."""
    x = rng.standard_normal(n)
    nb = -(-n // 32)
    scale = np.repeat(10.0 ** rng.uniform(lo, hi, size=nb), 32)[:n]
    return (x * scale).astype(np.float32)


def _tokens(rng: np.random.Generator, n_tok: int, n: int, lo: float = -2, hi: float = 2) -> np.ndarray:
    """(n_tok, n) f32: one _varied row per token."""
    return np.stack([_varied(rng, n, lo, hi) for _ in range(n_tok)])


def _matrix(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) f32, rows of different magnitudes."""
    scale = 10.0 ** rng.uniform(-1, 1, size=(rows, 1))
    return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)


def _min_blocks(rng: np.random.Generator, rows: int, cols: int, dtype: np.dtype) -> np.ndarray:
    """(rows, cols // 256) Q4K or Q5K super-blocks of random sub-scales, mins and codes, rows of
    different magnitudes (no quantizer makes them here: the converter keeps GGUF's)."""
    nb = cols // quant.QK
    blocks = np.frombuffer(rng.bytes(rows * nb * dtype.itemsize), dtype).reshape(rows, nb).copy()
    scale = 10.0 ** rng.uniform(-1, 1, size=(rows, 1)) / 32
    blocks["d"] = (scale * rng.uniform(0.5, 1.5, (rows, nb))).astype(np.float16)
    blocks["dmin"] = (8 * scale * rng.uniform(0.5, 1.5, (rows, nb))).astype(np.float16)
    return blocks


def _q4k_blocks(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return _min_blocks(rng, rows, cols, quant.Q4K)


def _q5k_blocks(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """As _q4k_blocks, random 5th bits too."""
    return _min_blocks(rng, rows, cols, quant.Q5K)


def _random_codes(rng: np.random.Generator, dtype: np.dtype, block_values: int, rows: int, cols: int,
                  d_scale: float) -> np.ndarray:
    """(rows, cols // block_values) blocks of `dtype` of random bytes (codes and any 8-bit scales)
    whose fp16 d gives rows of different magnitudes: 10**U(-1, 1) * d_scale, each block within 2x."""
    nb = cols // block_values
    blocks = np.frombuffer(rng.bytes(rows * nb * dtype.itemsize), dtype).reshape(rows, nb).copy()
    blocks["d"] = (10.0 ** rng.uniform(-1, 1, size=(rows, 1)) * d_scale * rng.uniform(0.5, 1.5, (rows, nb))).astype(np.float16)
    return blocks


def _q6k_blocks(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Q6K super-blocks of random int8 scales and codes."""
    return _random_codes(rng, quant.Q6K, quant.QK, rows, cols, 1 / 2048)


def _q50_blocks(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Q50 blocks of random codes (5th bits included)."""
    return _random_codes(rng, quant.Q50, quant.BLOCK, rows, cols, 1 / 16)


# random blocks of the types no quantizer makes (kept from GGUF files)
KEPT_BLOCKS = {quant.Q4K: _q4k_blocks, quant.Q5K: _q5k_blocks, quant.Q6K: _q6k_blocks, quant.Q50: _q50_blocks}


def _stored(rng: np.random.Generator, kind: str, rows: int, cols: int) -> np.ndarray:
    """Stored weights of the matmul `kind`: (rows, cols) f32 / f16, or (rows, nb) Q40 / Q50 / Q80 / Q4K / Q5K / Q6K blocks."""
    t = quant.WEIGHTS[kind.split("_")[0]]
    if t.encode is None:
        return KEPT_BLOCKS[t.dtype](rng, rows, cols)
    return t.encode(_matrix(rng, rows, cols))


def _kernel_q80(x: np.ndarray):
    """x: (T, n) f32 -> kernel Q80 bytes (T, nb, 34) and the packed product inputs
    xq (T, 512 G) i8, xsum (T, 16 G) i32, xd (T, 16 G) f32 (zeroed first, as the engine
    allocates them: padding blocks stay zero)."""
    n_tok, nb = x.shape[0], x.shape[1] // 32
    g = qmatmul.groups(nb)
    blocks = np.full((n_tok, nb, 34), 0xAB, np.uint8)
    xq, xsum, xd = np.zeros((n_tok, 512 * g), np.int8), np.zeros((n_tok, 16 * g), np.int32), np.zeros((n_tok, 16 * g), np.float32)
    vector.quantize_q80(x, blocks)
    qmatmul.pack_q80(blocks, xq, xsum, xd)
    return blocks, xq, xsum, xd


def _kernel_q8k(x: np.ndarray):
    """x: (T, n) f32, whole super-blocks -> its packed Q8K form xq, xsum, xd (zeroed first, as
    the engine allocates them)."""
    n_tok, g = x.shape[0], qmatmul.groups(x.shape[1] // 32)
    xq, xsum, xd = np.zeros((n_tok, 512 * g), np.int8), np.zeros((n_tok, 16 * g), np.int32), np.zeros((n_tok, 16 * g), np.float32)
    qmatmul.pack_q8k(x, xq, xsum, xd)
    return xq, xsum, xd


def _kernel_8bit(form: str, x: np.ndarray):
    """x: (T, n) f32 -> its packed 8-bit activation `form` (quant.ACTIVATIONS) xq, xsum, xd."""
    return _kernel_q8k(x) if quant.ACTIVATIONS[form].pack else _kernel_q80(x)[1:]


def _kernel_xt(x: np.ndarray) -> np.ndarray:
    """x: (T, nb * 32) -> xt (T, 512 G), the packed f32 input of quantized weights."""
    xt = np.zeros((x.shape[0], 512 * qmatmul.groups(x.shape[1] // 32)), np.float32)
    qmatmul.pack_f32(x, xt)
    return xt


def _matmul(kind: str, m: Matrix, x: np.ndarray, a: int = 0, b: int | None = None, serial: bool = False) -> np.ndarray:
    """Kernel product of rows [a, b) of m with the tokens x (T, cols) -> (T, b - a), through
    the parallel driver or (serial) the rows kernel called directly.
    Scratch lanes are full of garbage: kernels must not depend on their contents."""
    b = m.rows if b is None else b
    n_tok = x.shape[0]
    out = np.full((n_tok, b - a), np.nan, np.float32)
    lanes = np.full((vector.CHUNKS, 16), 77777, np.int32), np.full((vector.CHUNKS, 16), 1e30, np.float32)
    t, form = quant.WEIGHTS[m.type], kind.partition("_")[2]
    if not t.quantized:
        rows, args = resolve(t.kernels.rows_f32), (m.w[a:b], x)
    elif form in quant.ACTIVATIONS:
        xq, xsum, xd = _kernel_8bit(form, x)
        rows = resolve(t.kernels.rows_8bit)
        args = (m.qs[a:b], m.d[a:b], xq, xsum, xd, *lanes)
    else:
        rows = resolve(t.kernels.rows_f32)
        args = (m.qs[a:b], m.d[a:b], _kernel_xt(x), *lanes)
    if serial:
        rows(0, b - a, 0, *args, out)
    else:
        vector.PARALLEL[rows](*args, out)
    return out


def _reference_matvec(kind: str, stored: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The numpy twin of `kind` on one token x (cols,) -> (rows,)."""
    if kind.partition("_")[2] in quant.ACTIVATIONS:
        return reference.twin_8bit(stored, x[None])[0]
    if quant.WEIGHTS[quant.type_of(stored)].quantized:
        return reference.twin_f32(stored, x[None])[0]
    return getattr(reference, f"matvec_{kind}")(stored, x)


def _assert_close(got: np.ndarray, expected: np.ndarray, rel: float = 1e-5) -> None:
    """Close relative to the scale of the whole output (call per token)."""
    assert got.shape == expected.shape
    assert got.dtype == np.float32
    atol = rel * float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(got, expected, rtol=rel, atol=atol)


def _assert_bits(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.fixture
def restore_threads():
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)


needs_two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="numba has a single thread")


# ---------------------------------------------------------------- fp16 scale codec


def test_f16_bits_to_f32_matches_numpy_for_every_bit_pattern():
    # every pattern as the scale of one Q80 block, decoded by pack_q80
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # (65536,)
    blocks = np.zeros((1, bits.size, 34), np.uint8)  # (T=1, nb=65536, 34)
    blocks[0, :, 0] = bits & 0xFF
    blocks[0, :, 1] = bits >> 8
    xq = np.zeros((1, 32 * bits.size), np.int8)
    xsum = np.zeros((1, bits.size), np.int32)
    xd = np.zeros((1, bits.size), np.float32)
    qmatmul.pack_q80(blocks, xq, xsum, xd)
    d = xd[0]
    expected = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(d), nan)
    np.testing.assert_array_equal(d[~nan].view(np.uint32), expected[~nan].view(np.uint32))


@pytest.mark.parametrize("h", [0x0000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0x7C00, 0x8001, 0xBC00, 0xFBFF, 0xFC00])
def test_f16_bits_to_f32_scalar_calls(h):
    expected = np.array([h], np.uint16).view(np.float16).astype(np.float32)[0]
    assert np.float32(vector.f16_bits_to_f32(h)).view(np.uint32) == expected.view(np.uint32)


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
    got = np.array([vector.f32_to_f16_bits(v) for v in values], np.int64)
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
    assert int(vector.f32_to_f16_bits(v)) == _f16_bits(v)


@settings(max_examples=400, deadline=None)
@given(st.floats(min_value=0.0, max_value=F16_MAX, width=32, allow_nan=False, allow_infinity=False))
@example(2.0**-24 * 1.5)
@example(6.1035156e-05)
def test_f32_to_f16_bits_matches_numpy(x):
    v = np.float32(x)
    assert int(vector.f32_to_f16_bits(v)) == _f16_bits(v)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=0.0, max_value=2.0**-14, width=32, allow_nan=False, allow_infinity=False))
def test_f32_to_f16_bits_matches_numpy_on_subnormals(x):
    v = np.float32(x)
    assert int(vector.f32_to_f16_bits(v)) == _f16_bits(v)


def test_f16_row_decodes_every_value():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)  # (65536,) every fp16 pattern
    finite = np.isfinite(bits.view(np.float16))
    expected = bits.view(np.float16).astype(np.float32)
    out = np.zeros(bits.size, np.float32)
    vector.f16_row(bits, out)
    np.testing.assert_array_equal(out[finite], expected[finite])


def test_f16_products_decode_every_value_exactly_in_lanes_and_tail():
    # f16 weights are decoded inside kernels.dot by integer steps (no F16C needed): every
    # finite pattern times 1, through the 8-lane path (rows of 8) and the scalar tail (rows of 1)
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    bits = bits[np.isfinite(bits.view(np.float16))]  # (63488,)
    expected = bits.view(np.float16).astype(np.float32)
    lanes = bits.reshape(-1, 8)  # (7936, 8)
    for j in range(8):
        x = np.zeros((1, 8), np.float32)
        x[0, j] = 1
        out = np.zeros((1, lanes.shape[0]), np.float32)
        vector.f16_rows(0, lanes.shape[0], 0, lanes, x, out)
        np.testing.assert_array_equal(out[0], expected.reshape(-1, 8)[:, j] + np.float32(0))  # -0 sums to +0
    out = np.zeros((1, bits.size), np.float32)
    vector.f16_rows(0, bits.size, 0, bits.reshape(-1, 1), np.ones((1, 1), np.float32), out)
    np.testing.assert_array_equal(out[0], expected + np.float32(0))
    special = np.array([[0x7C00], [0xFC00], [0x7E00]], np.uint16)  # +inf, -inf, nan
    out = np.zeros((1, 3), np.float32)
    vector.f16_rows(0, 3, 0, special, np.ones((1, 1), np.float32), out)
    assert out[0, 0] == np.inf and out[0, 1] == -np.inf and np.isnan(out[0, 2])


# ---------------------------------------------------------------- Q80 quantization and unpacking


def _q80_bytes_match(x: np.ndarray) -> None:
    """x: (T, n) -> kernel blocks byte-identical to quant's, and the unpacked scales equal."""
    blocks, _, _, xd = _kernel_q80(x)  # (T, nb, 34), (T, 16 G)
    expected = quant.quantize_q80_activations(x)  # (T, nb) Q80
    raw = quant.as_bytes(expected)  # (T, nb, 34)
    assert blocks.shape == raw.shape
    bad = np.argwhere((blocks != raw).any(axis=2))
    assert bad.size == 0, f"(token, block) differ: {bad[:5].tolist()}"
    _assert_bits(xd[:, : expected.shape[1]], expected["d"].astype(np.float32))


@pytest.mark.parametrize("n_tok, n, seed", [(1, 32, 0), (3, 32 * 7, 1), (1, 32 * 13, 2), (5, 32 * 13, 4), (2, 32 * 101, 3)])
def test_quantize_q80_byte_identical_on_random_vectors(n_tok, n, seed):
    rng = np.random.default_rng(seed)
    _q80_bytes_match(_tokens(rng, n_tok, n, -7, 4.5))  # block scales from ~1e-7 to ~3e4


def test_quantize_q80_byte_identical_with_rounding_ties():
    # blocks whose amax is 127 * 2**k: d = 2**k and 127 / amax = 2**-k are exact, so
    # x = (m + 0.5) * 2**k lands exactly on a .5 tie (half to even, as llama.cpp's x86 quantizer)
    rng = np.random.default_rng(11)
    blocks = []
    for k in (-20, -3, 0, 2, 7, 1):
        m = rng.integers(-127, 127, size=32).astype(np.float64) + 0.5
        m[rng.integers(32)] = 127.0 if k % 2 else -127.0
        blocks.append(m * 2.0**k)
    x = np.concatenate(blocks).astype(np.float32).reshape(2, 96)  # 2 tokens of 3 blocks
    q = quant.quantize_q80_activations(x)
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
    x = np.stack([x, x[::-1].copy()])  # (2, 224): the zero block is block 1 and block 5
    _q80_bytes_match(x)
    blocks, xq, xsum, xd = _kernel_q80(x)
    for t, b in ((0, 1), (1, 5)):
        assert xd[t, b] == 0 and np.all(blocks[t, b] == 0) and np.all(_block_codes(xq, t, b) == 0) and xsum[t, b] == 0


def test_quantize_q80_overflowing_scale_matches_numpy():
    # amax / 127 above the fp16 range: both sides store an infinite scale
    x = np.linspace(-1e7, 2e7, 64).astype(np.float32).reshape(1, 64)
    blocks, _, _, xd = _kernel_q80(x)
    with np.errstate(over="ignore"):
        expected = quant.as_bytes(quant.quantize_q80_activations(x))
    np.testing.assert_array_equal(blocks, expected)
    assert np.all(np.isinf(xd[:, :2]))


def test_quantize_q80_ignores_a_trailing_partial_block():
    # kernels quantize n // 32 blocks per token; a prefix of whole blocks is what gets written
    rng = np.random.default_rng(13)
    x = _tokens(rng, 2, 32 * 3 + 5)  # (2, 101)
    blocks = np.full((2, 3, 34), 0xAB, np.uint8)
    vector.quantize_q80(x, blocks)
    np.testing.assert_array_equal(blocks, quant.as_bytes(quant.quantize_q80_activations(np.ascontiguousarray(x[:, :96]))))


def _block_codes(packed: np.ndarray, t: int, b: int) -> np.ndarray:
    """The 32 values of block b of token t in a packed activation (qmatmul's layout:
    element e of block 16 g + l at [g, e // 4, l, e % 4])."""
    g, lane = divmod(b, 16)
    e = np.arange(32)
    return packed[t, g * 512 + (e // 4) * 64 + lane * 4 + e % 4]


@pytest.mark.parametrize("n_tok, n", [(1, 32), (3, 32 * 7), (2, 32 * 13), (1, 32 * 17)])
def test_pack_q80_layout_block_sums_and_zero_padding(n_tok, n):
    rng = np.random.default_rng(n_tok * 1000 + n)
    x = _tokens(rng, n_tok, n)
    _, xq, xsum, xd = _kernel_q80(x)
    expected = quant.quantize_q80_activations(x)  # (T, nb) Q80
    nb = n // 32
    for t in range(n_tok):
        for b in range(nb):
            np.testing.assert_array_equal(_block_codes(xq, t, b), expected["qs"][t, b])
    np.testing.assert_array_equal(xsum[:, :nb], expected["qs"].astype(np.int64).sum(axis=2))
    _assert_bits(xd[:, :nb], expected["d"].astype(np.float32))
    assert xsum[:, nb:].size and not xsum[:, nb:].any() and not xd[:, nb:].any()  # padded to 16 blocks
    assert not any(_block_codes(xq, t, b).any() for t in range(n_tok) for b in range(nb, xd.shape[1]))


@pytest.mark.parametrize("n_tok, n", [(1, 256), (3, 256 * 3), (2, 256 * 5)])
def test_pack_q8k_is_llama_cpps_q8_k_in_the_packed_layout(n_tok, n):
    """Q8K codes and scales (quant.quantize_q8k, llama.cpp's quantize_row_q8_K_ref) with the
    super-block's d at each of its blocks; an all-zero super-block, a negative largest value
    and two of equal magnitude and opposite sign (the first wins) included."""
    rng = np.random.default_rng(n_tok * 1000 + n)
    x = _tokens(rng, n_tok, n)
    x[0, :256] = 0
    if n > 256:
        x[0, 256 + 7] = -2 * np.abs(x[0, 256:512]).max()  # negative largest value: iscale > 0
    if n_tok > 1:
        peak = 2 * np.abs(x[1, :256]).max()
        x[1, 3], x[1, 200] = -peak, peak  # a tie: the first (negative) one sets the sign
    xq, xsum, xd = _kernel_q8k(x)
    expected = quant.quantize_q8k(x)  # (T, n / 256) Q8K
    nb = n // 32
    codes = expected["qs"].reshape(n_tok, nb, 32)
    for t in range(n_tok):
        for b in range(nb):
            np.testing.assert_array_equal(_block_codes(xq, t, b), codes[t, b])
    np.testing.assert_array_equal(xsum[:, :nb], codes.astype(np.int64).sum(axis=2))
    _assert_bits(xd[:, :nb], np.repeat(expected["d"], 8, axis=1))
    assert not xd[0, :8].any() and not any(_block_codes(xq, 0, b).any() for b in range(8))  # the zero super-block
    if n > 256:
        assert _block_codes(xq, 0, 8)[7] == -127 and xd[0, 8] > 0
    if n_tok > 1:
        assert _block_codes(xq, 1, 0)[3] == -127 and _block_codes(xq, 1, 6)[8] == 127 and xd[1, 0] > 0
    assert np.abs(expected["qs"]).max() <= 127
    assert not xsum[:, nb:].any() and not xd[:, nb:].any()  # padded to 16 blocks


def test_pack_q80_sums_extreme_codes():
    # hand-made blocks (T=2, nb=3) including -128, which quantization never writes
    codes = np.zeros((2, 3, 32), np.int8)
    codes[0, 0] = 127
    codes[0, 1] = -128
    codes[0, 2] = np.arange(32) - 16
    codes[1, 0, ::2], codes[1, 0, 1::2] = -128, 127
    codes[1, 2, 7] = -1
    q = np.zeros((2, 3), quant.Q80)
    q["d"], q["qs"] = np.float16(0.5), codes
    blocks = np.ascontiguousarray(quant.as_bytes(q))  # (2, 3, 34)
    xq, xsum, xd = np.zeros((2, 512), np.int8), np.zeros((2, 16), np.int32), np.zeros((2, 16), np.float32)
    qmatmul.pack_q80(blocks, xq, xsum, xd)
    np.testing.assert_array_equal(xsum[:, :3], [[127 * 32, -128 * 32, -16], [-16, 0, -1]])
    for t in range(2):
        for b in range(3):
            np.testing.assert_array_equal(_block_codes(xq, t, b), codes[t, b])
    np.testing.assert_array_equal(xd[:, :3], 0.5)


@pytest.mark.parametrize("n_tok, n", [(1, 32), (3, 32 * 7), (5, 32 * 13)])
def test_q80_values_match_numpy_dequantize(n_tok, n):
    rng = np.random.default_rng(n + n_tok)
    x = _tokens(rng, n_tok, n)
    blocks, _, _, _ = _kernel_q80(x)
    out = np.full((n_tok, n), np.nan, np.float32)
    vector.q80_values(blocks, out)
    _assert_bits(out, quant.dequantize_q80(quant.quantize_q80_activations(x)))


@pytest.mark.parametrize("n_tok, nb", [(1, 1), (3, 7), (2, 13), (1, 17)])
def test_pack_f32_layout(n_tok, nb):
    x = np.arange(n_tok * nb * 32, dtype=np.float32).reshape(n_tok, nb * 32) + 1  # (T, nb * 32), no zeros
    xt = _kernel_xt(x)
    for t in range(n_tok):
        for b in range(nb):
            np.testing.assert_array_equal(_block_codes(xt, t, b), x[t, b * 32 : (b + 1) * 32])
    assert np.count_nonzero(xt) == x.size  # the padding stays zero


# ---------------------------------------------------------------- weight rows (embedding lookups)


@pytest.mark.parametrize("kind", [t.name for t in quant.WEIGHTS.values() if t.quantized])
@pytest.mark.parametrize("rows, cols", [(13, 32 * 7), (7, 32 * 13), (17, 32), (1, 96), (3, 256 * 3)])
def test_dequantize_row_matches_numpy(kind, rows, cols):
    if cols % quant.WEIGHTS[kind].block_values:
        pytest.skip("k-quant rows are whole 256-value super-blocks")
    rng = np.random.default_rng(rows * 7 + cols)
    stored = _stored(rng, kind, rows, cols)  # (rows, nb) Q40 / Q50 / Q80 / Q4K / Q5K / Q6K
    m = Matrix.from_stored(stored, cols)  # d (rows, 16 G), qs (rows, 256 G or 512 G); Q50 and the k-quants: see qmatmul
    expected = quant.decode(stored)  # (rows, cols)
    dequantize_row = resolve(quant.WEIGHTS[kind].kernels.row)
    for r in range(rows):
        out = np.full(cols, np.nan, np.float32)
        dequantize_row(m.qs[r], m.d[r], cols // 32, out)
        _assert_bits(out, expected[r])
        out[:] = np.nan
        m.row_to(r, out)
        _assert_bits(out, expected[r])


# ---------------------------------------------------------------- matmul

# (rows, cols) per weight type: f32 and f16 take any width, quantized ones whole blocks
SHAPES = {
    "f32": [(13, 32 * 7), (17, 32 * 13), (7, 172), (1, 37), (17, 1)],
    "f16": [(13, 7), (17, 64), (7, 224), (1, 13)],
    "q40": [(13, 32 * 7), (17, 32 * 13), (7, 32), (1, 32 * 13), (5, 32 * 33)],
    "q80": [(13, 224), (17, 32), (7, 416), (1, 96), (5, 32 * 33)],
    "q50": [(13, 32 * 7), (17, 32 * 28), (7, 32), (1, 32 * 13), (5, 32 * 33)],  # 28 blocks: Qwen2.5-0.5B's 896
    "q4k": [(13, 256), (17, 256 * 3), (7, 256 * 5), (1, 256 * 2), (5, 256 * 9)],  # 8 to 72 sub-blocks
    "q5k": [(13, 256), (17, 256 * 3), (7, 256 * 5), (1, 256 * 2), (5, 256 * 9)],
    "q6k": [(13, 256), (17, 256 * 3), (7, 256 * 5), (1, 256 * 2), (5, 256 * 9)],
}
MATMUL_CASES = [(kind, rows, cols) for kind in MATMULS for rows, cols in SHAPES[kind.split("_")[0]]]


@pytest.mark.parametrize("n_tok", [1, 3, 5, 10])  # token tiles of 4 and every remainder
@pytest.mark.parametrize("kind, rows, cols", MATMUL_CASES)
def test_matmul_matches_reference_and_single_tokens(kind, rows, cols, n_tok):
    rng = np.random.default_rng(rows * 7 + cols + 1000 * MATMULS.index(kind) + 100000 * n_tok)
    stored = _stored(rng, kind, rows, cols)
    m = Matrix.from_stored(stored, cols)
    x = _tokens(rng, n_tok, cols)  # (T, cols)
    out = _matmul(kind, m, x)  # (T, rows)
    for t in range(n_tok):
        if m.weight_type.quantized:  # the quantized products equal their twins exactly
            _assert_bits(out[t], _reference_matvec(kind, stored, x[t]))
        else:
            _assert_close(out[t], _reference_matvec(kind, stored, x[t]))
        # batching never changes a value: token t alone gives the same bits
        _assert_bits(out[t], _matmul(kind, m, x[t : t + 1])[0])


def test_matmul_q40_q80_single_block_by_hand():
    # one row, one block: the kernel pairs weight nibble j with x element j, nibble j+16 with j+16
    qw = (np.arange(32) * 5 + 2) % 16  # (32,) weight codes
    qx = (np.arange(32) * 9 % 255 - 127).astype(np.int8)  # (32,) int8 input codes
    qx[0] = 127
    w = np.zeros((1, 1), quant.Q40)
    w["d"], w["qs"] = np.float16(0.5), (qw[:16] | (qw[16:] << 4)).astype(np.uint8)
    m = Matrix.from_stored(w, 32)
    xb = np.zeros((1, 1), quant.Q80)
    xb["d"], xb["qs"] = np.float16(0.25), qx
    xblocks = np.ascontiguousarray(quant.as_bytes(xb))  # (1, 1, 34)
    xq, xsum, xd = np.zeros((1, 512), np.int8), np.zeros((1, 16), np.int32), np.zeros((1, 16), np.float32)
    qmatmul.pack_q80(xblocks, xq, xsum, xd)
    out = np.zeros((1, 1), np.float32)
    lanes = np.zeros((vector.CHUNKS, 16), np.int32), np.zeros((vector.CHUNKS, 16), np.float32)
    qmatmul.matmul_q_q80(m.qs, m.d, xq, xsum, xd, *lanes, out)
    exact = np.dot(qw - 8, qx.astype(np.int64)) * 0.5 * 0.25
    assert out[0, 0] == np.float32(exact)
    # the same codes as f32 activations
    xt = _kernel_xt((qx.astype(np.float32) * np.float32(0.25)).reshape(1, 32))
    qmatmul.matmul_q_f32(m.qs, m.d, xt, *lanes, out)
    assert out[0, 0] == np.float32(exact)


def test_matmul_q80_q80_extreme_codes_by_hand():
    # int8 products at the extremes (127 * -127, -128 * -127) summed over 32 elements and 3 blocks
    w = np.zeros((2, 3), quant.Q80)
    w["d"] = np.float16(1.0)
    w["qs"][0] = 127
    w["qs"][1] = -128
    w["qs"][1, 2, ::2] = 127
    m = Matrix.from_stored(w, 96)
    xb = np.zeros((1, 3), quant.Q80)
    xb["d"], xb["qs"] = np.float16(2.0), -127  # activations lie in [-127, 127] (qmatmul)
    xq, xsum, xd = np.zeros((1, 512), np.int8), np.zeros((1, 16), np.int32), np.zeros((1, 16), np.float32)
    qmatmul.pack_q80(np.ascontiguousarray(quant.as_bytes(xb)), xq, xsum, xd)
    out = np.zeros((1, 2), np.float32)
    lanes = np.zeros((vector.CHUNKS, 16), np.int32), np.zeros((vector.CHUNKS, 16), np.float32)
    qmatmul.matmul_q_q80(m.qs, m.d, xq, xsum, xd, *lanes, out)
    wv = quant.dequantize_q80(w).astype(np.float64)  # (2, 96)
    np.testing.assert_array_equal(out[0], (wv @ np.full(96, -254.0)).astype(np.float32))


@pytest.mark.parametrize("kind", MATMULS)
def test_matmul_zero_rows(kind):
    # a rank whose share of a matrix is empty: (0, cols)
    rng = np.random.default_rng(0)
    block = quant.WEIGHTS[kind.split("_")[0]].block_values
    cols = 32 * 7 if 32 * 7 % block == 0 else block
    stored = _stored(rng, kind, 1, cols)[:0]  # (0, cols) or (0, nb): quant can't quantize 0 rows (-1 reshape)
    m = Matrix.from_stored(stored, cols)
    out = _matmul(kind, m, _tokens(rng, 3, cols))
    assert out.shape == (3, 0)
    assert reference.matvec_f32(np.zeros((0, cols), np.float32), np.zeros(cols, np.float32)).shape == (0,)


# ---------------------------------------------------------------- rmsnorm, rope, silu


@pytest.mark.parametrize("n_tok", [1, 3])
@pytest.mark.parametrize("n", [1, 6, 37, 32 * 7, 32 * 13])
def test_rmsnorm_matches_reference(n, n_tok):
    rng = np.random.default_rng(n + 1000 * n_tok)
    x = _tokens(rng, n_tok, n)  # (T, n)
    weight = (1 + 0.5 * rng.standard_normal(n)).astype(np.float32)  # (n,)
    out = np.full((n_tok, n), np.nan, np.float32)
    vector.rmsnorm(x, weight, 1e-5, out)
    for t in range(n_tok):
        _assert_close(out[t], reference.rmsnorm(x[t], weight, 1e-5))


def test_rmsnorm_eps_matters_for_small_inputs():
    # (1, 7) tiny values: eps dominates the mean square
    x = np.array([[1e-4, -2e-4, 3e-4, 0, 5e-4, -1e-4, 2e-4]], np.float32)
    weight = np.linspace(0.5, 2, 7).astype(np.float32)
    out = np.zeros((1, 7), np.float32)
    vector.rmsnorm(x, weight, 1e-2, out)
    _assert_close(out[0], reference.rmsnorm(x[0], weight, 1e-2))
    _assert_close(out[0], (weight * x[0] / np.sqrt(np.mean(x[0].astype(np.float64) ** 2) + 1e-2)).astype(np.float32))


@pytest.mark.parametrize("n_tok", [1, 3])
@pytest.mark.parametrize("n_heads, head_dim", [(3, 10), (1, 64), (5, 6)])
def test_rmsnorm_heads_matches_reference(n_heads, head_dim, n_tok):
    rng = np.random.default_rng(n_heads * 100 + head_dim + 1000 * n_tok)
    vec = _tokens(rng, n_tok, n_heads * head_dim)  # (T, n_heads * head_dim)
    weight = (1 + 0.3 * rng.standard_normal(head_dim)).astype(np.float32)  # (head_dim,)
    expected = [reference.rmsnorm_heads(v, head_dim, weight, 1e-6) for v in vec]
    vector.rmsnorm_heads(vec, head_dim, weight, 1e-6)
    for t in range(n_tok):
        _assert_close(vec[t], expected[t])


def test_rope_table_angles():
    head_dim, theta = 10, 10000.0
    freqs = theta ** (-np.arange(0, head_dim, 2) / head_dim)  # (5,)
    cos, sin = vector.rope_table(freqs, 18)  # (18, 5) each
    assert cos.shape == sin.shape == (18, 5) and cos.dtype == np.float32
    p, i = np.meshgrid(np.arange(18), np.arange(5), indexing="ij")
    angles = p * theta ** (-2.0 * i / head_dim)
    np.testing.assert_allclose(cos, np.cos(angles), rtol=0, atol=1e-7)
    np.testing.assert_allclose(sin, np.sin(angles), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(cos[0], 1)
    np.testing.assert_array_equal(sin[0], 0)


@pytest.mark.parametrize("head_dim", [6, 10, 64])
@pytest.mark.parametrize("pos0, n_tok", [(1, 1), (5, 1), (17, 1), (0, 3), (3, 5), (15, 3)])
def test_rope_matches_reference(head_dim, pos0, n_tok):
    # tokens at positions pos0 .. pos0 + T - 1, each rotated by its own row of the table
    n_heads = 3
    rng = np.random.default_rng(head_dim * 100 + pos0 * 10 + n_tok)
    freqs = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    cos, sin = vector.rope_table(freqs, pos0 + n_tok)  # (pos0 + T, head_dim // 2)
    vec = _tokens(rng, n_tok, n_heads * head_dim)  # (T, n_heads * head_dim)
    expected = [reference.rope(vec[t].copy(), head_dim, cos[pos0 + t], sin[pos0 + t]) for t in range(n_tok)]
    vector.rope(vec, head_dim, np.ascontiguousarray(cos[pos0:]), np.ascontiguousarray(sin[pos0:]))
    for t in range(n_tok):
        _assert_close(vec[t], expected[t])


def test_rope_rotates_interleaved_pairs_by_hand():
    # 2 heads of head_dim 4: pairs (0,1), (2,3) | (4,5), (6,7); pair i uses angle i of the
    # token's row: token 0 by (pi/2, 0.3), token 1 by (0, 0) (unchanged)
    cos = np.array([[0.0, np.float32(np.cos(0.3))], [1.0, 1.0]], np.float32)  # (T=2, 2)
    sin = np.array([[1.0, np.float32(np.sin(0.3))], [0.0, 0.0]], np.float32)
    vec = np.array([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]], np.float32)  # (2, 8)
    c, s = cos[0, 1], sin[0, 1]
    expected = np.array(
        [[-2, 1, 3 * c - 4 * s, 3 * s + 4 * c, -6, 5, 7 * c - 8 * s, 7 * s + 8 * c], [1, 2, 3, 4, 5, 6, 7, 8]],
        np.float32,
    )
    vector.rope(vec, 4, cos, sin)
    np.testing.assert_allclose(vec, expected, rtol=1e-6)


@pytest.mark.parametrize("n_tok", [1, 3])
@pytest.mark.parametrize("n", [1, 37, 32 * 13])
def test_silu_mul_matches_reference(n, n_tok):
    rng = np.random.default_rng(n + 5 + 1000 * n_tok)
    h1 = (rng.standard_normal((n_tok, n)) * 4).astype(np.float32)  # (T, n)
    h1[:, :: max(1, n // 5)] = np.float32(-30.0)  # deep in the tail
    if n > 2:
        h1[:, 1] = 30.0
    h3 = _tokens(rng, n_tok, n)
    out = np.full((n_tok, n), np.nan, np.float32)
    vector.silu_mul(np.concatenate((h1, h3), axis=1), out)  # the stacked w1/w3 product's rows
    for t in range(n_tok):
        _assert_close(out[t], reference.silu_mul(h1[t], h3[t]))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 37, 1000])
def test_exp_matches_numpy_within_two_ulp_and_lanes_equal_the_tail(n):
    rng = np.random.default_rng(n)
    x = np.concatenate([rng.uniform(-87, 88, n), [0.0, -1e-7, 1e-7, -20.5, 88.0, -87.0]]).astype(np.float32)
    out = np.full_like(x, np.nan)
    vector.exp_into(x, 1.0, 0.0, out)
    expected = np.exp(x.astype(np.float64))
    assert np.all(np.abs(out - expected) <= 2 * np.spacing(expected.astype(np.float32)))
    # an element gives the same bits in a vector lane (the first 8s) and in the scalar tail
    for i in range(len(x)):
        one = np.full(1, np.nan, np.float32)
        vector.exp_into(x[i : i + 1], 1.0, 0.0, one)
        assert one.view(np.uint32)[0] == out.view(np.uint32)[i]


def test_exp_clamps_instead_of_overflowing():
    x = np.array([-1e4, -100, 100, 1e4, -np.inf, np.inf], np.float32)
    out = np.empty_like(x)
    vector.exp_into(x, 1.0, 0.0, out)
    assert np.all(np.isfinite(out)) and np.all(out[:2] < 1e-37) and np.all(out[2:4] > 1e38)
    assert out[4] < 1e-37 and out[5] > 1e38


# ---------------------------------------------------------------- attention


KV_TYPES = tuple(quant.KV_TYPES)
# the largest error of attention over a cache in each type, against attention over the f32 keys and values
# it was given, relative to the largest output value: fp16 rounding (2**-11 per value) and 8-bit codes
KV_TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "q8_0": 4e-2}


def _attention_case(rng, n_heads, n_kv, head_dim, pos0, n_tok, extra=4):
    """T tokens at positions pos0 .. pos0 + T - 1: q (T, n_heads, head_dim); caches
    (pos0 + T + extra, n_kv, head_dim) holding the block's keys and values, whose rows past
    the last position hold huge garbage that must not be read."""
    n_pos = pos0 + n_tok
    max_seq = n_pos + extra
    q = (rng.standard_normal((n_tok, n_heads, head_dim)) * 1.5).astype(np.float32)
    k = (rng.standard_normal((max_seq, n_kv, head_dim)) * 1.5).astype(np.float32)
    v = (rng.standard_normal((max_seq, n_kv, head_dim)) * 10.0 ** rng.uniform(-1, 1, (1, n_kv, head_dim))).astype(np.float32)
    k[n_pos:] = 1e4
    v[n_pos:] = -6e4
    return q, k, v


def _cache(k, v, kv_type):
    """f32 keys and values (n_slots, max_seq, n_kv, head_dim) -> the cache (k codes, k scales,
    v codes, v scales; each (n_slots, n_kv, max_seq, ...)) in kv_type, by the numpy encoders."""
    kv = quant.KV_TYPES[kv_type]
    return tuple(np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (*kv.encode(k), *kv.encode(v)))


def _run_attention(q, k, v, kv_of_head, pos0, slots=None, positions=None, chunks=None, kv_type="f32"):
    """q (T, n_heads, head_dim) -> out (T, n_heads, head_dim). k, v: one sequence's f32 keys and
    values (max_seq, n_kv, head_dim) at positions pos0...; or, with `slots` and `positions`,
    several sequences' (n_slots, max_seq, n_kv, head_dim) and each row's own slot and position.
    chunks: attention's chunk count (the threads), None: attention_chunk alone (serial)."""
    if slots is None:
        k, v = k[None], v[None]
        slots, positions = np.zeros(q.shape[0], np.int64), pos0 + np.arange(q.shape[0])
    out = np.full(q.shape, np.nan, np.float32)
    scratch = vector.attention_scratch(q.shape[1], q.shape[2], chunks or 1)
    for a in scratch:
        a[...] = np.nan  # nothing is read before it is written
    args = (q, *_cache(k, v, kv_type), np.asarray(kv_of_head, np.int64), np.asarray(slots, np.int64),
            np.asarray(positions, np.int64), *scratch, out)
    if chunks is None:
        vector.attention_chunk(0, 1, *args)
    else:
        vector.attention(*args)
    return out


def _reference_attention(q, k, v, kv_of_head, pos0, kv_type="f32"):
    """Token t over positions [0, pos0 + t] of the cache as kv_type holds it -> (T, n_heads, head_dim)."""
    kv = quant.KV_TYPES[kv_type]
    k, v = (kv.decode(*kv.encode(a)) for a in (k, v))
    return np.stack([reference.attention(q[t], k[: pos0 + t + 1], v[: pos0 + t + 1], kv_of_head) for t in range(q.shape[0])])


@pytest.mark.parametrize("kv_type", KV_TYPES)
@pytest.mark.parametrize("group", [2, 3])
@pytest.mark.parametrize("head_dim", [8, 10, 64])
@pytest.mark.parametrize("pos0, n_tok", [(0, 1), (4, 1), (16, 1), (0, 3), (2, 5), (14, 3), (62, 3), (130, 2)])
def test_attention_gqa_matches_reference(kv_type, group, head_dim, pos0, n_tok):
    # (130, 2) and (62, 3) cross the online softmax's blocks of ATT_BLOCK positions
    if kv_type == "q8_0" and head_dim == 10:
        head_dim = 80 if group == 2 else 12  # blocks of 16: gcd(80, 32); of 4, shorter than a vector
    n_kv = 2
    n_heads = n_kv * group
    rng = np.random.default_rng(group * 1000 + head_dim * 10 + pos0 + 100000 * n_tok)
    q, k, v = _attention_case(rng, n_heads, n_kv, head_dim, pos0, n_tok)
    kv_of_head = [h // group for h in range(n_heads)]
    got = _run_attention(q, k, v, kv_of_head, pos0, chunks=2, kv_type=kv_type)
    expected = _reference_attention(q, k, v, kv_of_head, pos0, kv_type)
    for t in range(n_tok):
        _assert_close(got[t], expected[t])


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_attention_over_a_smaller_cache_stays_within_its_tolerance_of_f32(kv_type):
    rng = np.random.default_rng(77)
    q, k, v = _attention_case(rng, 8, 2, 64, 300, 2)
    kv_of_head = [h // 4 for h in range(8)]
    got = _run_attention(q, k, v, kv_of_head, 300, chunks=2, kv_type=kv_type)
    exact = _reference_attention(q, k, v, kv_of_head, 300)
    for t in range(2):
        err = np.abs(got[t] - exact[t]).max() / np.abs(exact[t]).max()
        assert 0 < err <= KV_TOLERANCE[kv_type], err


@pytest.mark.parametrize("kv_type", KV_TYPES)
@pytest.mark.parametrize("pos0, n_tok", [(0, 1), (0, 4), (3, 5), (13, 4), (61, 6), (127, 3)])
def test_attention_block_bit_identical_to_tokens_alone_and_any_chunking(kv_type, pos0, n_tok):
    # a block of T tokens gives each token exactly what it gets alone at its position, on one
    # chunk or several (threads)
    rng = np.random.default_rng(40 + pos0 + n_tok)
    q, k, v = _attention_case(rng, 6, 2, 32, pos0, n_tok)
    kv_of_head = [0, 1, 0, 1, 1, 0]
    block = _run_attention(q, k, v, kv_of_head, pos0, kv_type=kv_type)
    for chunks in (1, 2, 3, 5):
        _assert_bits(_run_attention(q, k, v, kv_of_head, pos0, chunks=chunks, kv_type=kv_type), block)
    for t in range(n_tok):
        _assert_bits(block[t], _run_attention(q[t : t + 1], k, v, kv_of_head, pos0 + t, kv_type=kv_type)[0])


def test_attention_on_a_rank_without_heads_does_nothing():
    # more ranks than query heads: a rank holds no head and no KV head, and its threads have nothing to share
    rng = np.random.default_rng(47)
    q, k, v = _attention_case(rng, 0, 0, 32, 5, 2)
    assert _run_attention(q, k, v, [], 5, chunks=2).shape == (2, 0, 32)


def test_attention_of_a_head_does_not_depend_on_the_other_heads():
    # a split gives a rank some of the heads: each head's output is what it is among all of them
    rng = np.random.default_rng(45)
    q, k, v = _attention_case(rng, 6, 3, 32, 90, 2)
    kv_of_head = [0, 0, 1, 1, 2, 2]
    whole = _run_attention(q, k, v, kv_of_head, 90, chunks=2, kv_type="f16")
    part = _run_attention(np.ascontiguousarray(q[:, 2:5]), k[:, 1:], v[:, 1:], [0, 0, 1], 90, chunks=2, kv_type="f16")
    _assert_bits(part, whole[:, 2:5])


def test_attention_rows_of_several_sequences_each_equal_their_own_alone():
    # one step holding rows of 3 sequences (slots 2, 0, 2, 1 at their own positions) gives each
    # row exactly what its sequence gets alone, on the parallel and the serial path
    rng = np.random.default_rng(43)
    n_slots, max_seq, kv_of_head = 3, 80, [0, 1, 0, 1, 1, 0]
    k = (rng.standard_normal((n_slots, max_seq, 2, 10)) * 1.5).astype(np.float32)
    v = rng.standard_normal((n_slots, max_seq, 2, 10)).astype(np.float32)
    q = (rng.standard_normal((4, 6, 10)) * 1.5).astype(np.float32)
    slots, positions = [2, 0, 2, 1], [5, 70, 6, 0]
    for chunks in (None, 2):
        got = _run_attention(q, k, v, kv_of_head, None, slots, positions, chunks, kv_type="f16")
        for t, (s, p) in enumerate(zip(slots, positions)):
            _assert_bits(got[t], _run_attention(q[t : t + 1], k[s], v[s], kv_of_head, p, kv_type="f16")[0])


@pytest.mark.parametrize("kv_type", KV_TYPES)
@pytest.mark.parametrize("head_dim", [40, 12])
def test_store_kv_puts_each_row_in_its_slot_at_its_position_as_the_twin_encodes_it(kv_type, head_dim):
    kv = quant.KV_TYPES[kv_type]
    rng = np.random.default_rng(44)
    n_kv = 2  # q8_0: blocks of 8 and 4
    codes = np.zeros((3, n_kv, 8, head_dim), kv.code_dtype)  # (slots, KV heads, positions, head_dim)
    scales = np.zeros((3, n_kv, 8, kv.scales_per_row(head_dim)), np.uint16)
    k_codes, k_scales, v_codes, v_scales = codes, scales, codes.copy(), scales.copy()
    k, v = (_tokens(rng, 3, n_kv * head_dim) for _ in range(2))
    slots, positions = np.array([1, 2, 1]), np.array([0, 7, 3])
    vector.store_kv(k, v, slots, positions, k_codes, k_scales, v_codes, v_scales)
    for t, (s, p) in enumerate(zip(slots, positions)):
        for x, c, sc in ((k, k_codes, k_scales), (v, v_codes, v_scales)):
            want_codes, want_scales = kv.encode(x[t].reshape(n_kv, head_dim))
            assert np.array_equal(c[s, :, p], want_codes) and np.array_equal(sc[s, :, p], want_scales)
    assert np.count_nonzero(k_codes) == np.count_nonzero(kv.encode(k.reshape(3, n_kv, head_dim))[0])


def test_f16_encoding_equals_numpys_on_edges_and_random_bits():
    rng = np.random.default_rng(46)
    edges = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFF800001, 0x477FE000,
                      0x477FF000, 0x477FEFFF, 0x47800000, 0x38800000, 0x38000000, 0x387FE000, 0x387FF000, 0x33000000,
                      0x33000001, 0x32FFFFFF, 0x00000001], np.uint32)
    halfway = (np.arange(2**16, dtype=np.uint32) << 16) | 0x1000  # ties and near-ties of every exponent
    bits = np.concatenate([edges, edges | 0x80000000, halfway, rng.integers(0, 2**32, 2**18, dtype=np.uint64).astype(np.uint32)])
    x = bits.view(np.float32)
    codes = np.zeros(x.size, np.uint16)
    vector.store_kv(x[None], x[None], np.zeros(1, np.int64), np.zeros(1, np.int64), codes.reshape(1, 1, 1, -1),
                    np.zeros((1, 1, 1, 0), np.uint16), np.zeros((1, 1, 1, x.size), np.uint16), np.zeros((1, 1, 1, 0), np.uint16))
    with np.errstate(all="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(codes[~nan], want[~nan])
    assert np.all(np.isnan(codes[nan].view(np.float16)))  # a NaN stays a NaN (numpy keeps its payload's top bits too)


def test_attention_is_causal_within_the_block():
    # the first tokens of a block never see the later ones: changing the last token's key and
    # value leaves every earlier token's output unchanged, bit for bit
    rng = np.random.default_rng(41)
    q, k, v = _attention_case(rng, 4, 2, 10, 3, 4)  # positions 3..6
    before = _run_attention(q, k, v, [0, 0, 1, 1], 3)
    k[6], v[6] = 50.0, 1e3
    after = _run_attention(q, k, v, [0, 0, 1, 1], 3)
    _assert_bits(after[:3], before[:3])
    assert not np.array_equal(after[3], before[3])


def test_attention_single_position_returns_its_value():
    rng = np.random.default_rng(21)
    q, k, v = _attention_case(rng, 6, 2, 10, 0, 1)
    kv_of_head = [0, 0, 0, 1, 1, 1]
    got = _run_attention(q, k, v, kv_of_head, 0)  # (1, 6, 10)
    np.testing.assert_allclose(got[0], v[0][kv_of_head], rtol=1e-6)


def test_attention_uses_the_given_kv_mapping_not_h_div_group():
    # (T=2, 5, 10) queries at positions 16, 17 over 3 KV heads with an irregular mapping
    rng = np.random.default_rng(22)
    q, k, v = _attention_case(rng, 5, 3, 10, 16, 2)
    kv_of_head = [2, 0, 2, 1, 0]
    got = _run_attention(q, k, v, kv_of_head, 16, chunks=2)
    expected = _reference_attention(q, k, v, kv_of_head, 16)
    for t in range(2):
        _assert_close(got[t], expected[t])


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
    return int(vector.sample(logits, float(temperature), float(top_p), float(coin), np.zeros(n), np.zeros(n)))


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


def _all_matmuls(rng, rows, cols, n_tok=3):
    """Every matmul kind on one (rows, cols) shape and T tokens; run(a, b) -> the six
    (T, b - a) products of rows [a, b)."""
    blocks = {kind: quant.WEIGHTS[kind.split("_")[0]].block_values for kind in MATMULS}
    width = {kind: blocks[kind] * -(-cols // blocks[kind]) for kind in MATMULS}
    mats = {kind: Matrix.from_stored(_stored(rng, kind, rows, width[kind]), width[kind]) for kind in MATMULS}
    x = {w: _tokens(rng, n_tok, w) for w in set(width.values())}  # (T, cols)

    def run(a=0, b=rows):
        return [_matmul(kind, mats[kind], x[width[kind]], a, b) for kind in MATMULS]

    return run


@needs_two_threads
def test_matmul_bit_identical_for_one_and_two_threads(restore_threads):
    run = _all_matmuls(np.random.default_rng(31), 17, 32 * 13)
    assert threads.set_threads(1) == 1
    one = run()
    assert threads.set_threads(2) == 2
    two = run()
    for a, b in zip(one, two):
        _assert_bits(a, b)


@needs_two_threads
def test_attention_bit_identical_for_one_and_two_threads(restore_threads):
    rng = np.random.default_rng(32)
    q, k, v = _attention_case(rng, 6, 2, 64, 14, 3)
    kv_of_head = [0, 0, 0, 1, 1, 1]
    serial = _run_attention(q, k, v, kv_of_head, 14)
    threads.set_threads(1)
    one = _run_attention(q, k, v, kv_of_head, 14, chunks=1)
    threads.set_threads(2)
    two = _run_attention(q, k, v, kv_of_head, 14, chunks=2)
    _assert_bits(one, serial)
    _assert_bits(two, serial)
    # one row over one KV head: its query heads are shared out between the two threads
    shared = _run_attention(q[:1], k[:, :1], v[:, :1], [0, 0, 0], 14, chunks=2)
    _assert_bits(shared, _run_attention(q[:1], k[:, :1], v[:, :1], [0, 0, 0], 14))


@pytest.mark.parametrize("a, b", [(0, 5), (5, 13), (3, 4), (12, 13), (0, 13), (7, 7)])
def test_matmul_row_slice_bit_identical_to_full_product(a, b):
    # (13, 224) matrices, 3 tokens: a rank computing rows [a, b) gets exactly those columns
    # of the full (T, 13) result
    run = _all_matmuls(np.random.default_rng(33), 13, 32 * 7)
    full = run()
    part = run(a, b)
    for f, s in zip(full, part):
        _assert_bits(s, np.ascontiguousarray(f[:, a:b]))


def test_matmul_row_slice_with_more_rows_than_chunks():
    # 150 rows (> CHUNKS, so chunks hold several rows each) and 5 tokens: an uneven split
    # still gives every row exactly its value in the full product
    assert 150 > vector.CHUNKS
    run = _all_matmuls(np.random.default_rng(35), 150, 32 * 3, n_tok=5)
    full = run()
    for a, b in [(0, 71), (71, 150), (64, 65)]:
        for f, s in zip(full, run(a, b)):
            _assert_bits(s, np.ascontiguousarray(f[:, a:b]))


def test_attention_head_slice_bit_identical_to_full():
    # 6 heads over 2 KV heads (group 3); a rank holding KV head 1 and query heads 3..5
    rng = np.random.default_rng(34)
    q, k, v = _attention_case(rng, 6, 2, 10, 14, 3)
    full = _run_attention(q, k, v, [0, 0, 0, 1, 1, 1], 14)
    local_k = np.ascontiguousarray(k[:, 1:2])
    local_v = np.ascontiguousarray(v[:, 1:2])
    part = _run_attention(np.ascontiguousarray(q[:, 3:]), local_k, local_v, [0, 0, 0], 14)
    _assert_bits(part, np.ascontiguousarray(full[:, 3:]))


@pytest.mark.parametrize("kind", [kind for kind in MATMULS if 96 % quant.WEIGHTS[kind.split("_")[0]].block_values == 0])
@pytest.mark.parametrize("rows, n_tok", [(150, 1), (7, 3), (1, 1)])
def test_serial_rows_kernel_bit_identical_to_parallel_driver(restore_threads, kind, rows, n_tok):
    """Small products run the rows kernel on the calling thread, big ones its parallel driver:
    a split may send the same rows through either, so they must agree bit for bit."""
    rng = np.random.default_rng(rows * 13 + n_tok)
    cols = 96
    m = Matrix.from_stored(_stored(rng, kind.split("_")[0], rows, cols), cols)
    x = _tokens(rng, n_tok, cols)  # (T, cols)
    threads.set_threads(2)
    _assert_bits(_matmul(kind, m, x, serial=True), _matmul(kind, m, x))


def test_serial_attention_bit_identical_to_parallel(restore_threads):
    rng = np.random.default_rng(5)
    q, k, v = _attention_case(rng, 6, 2, 64, 9, 3)
    kv_of_head = np.array([0, 0, 0, 1, 1, 1], np.int64)
    threads.set_threads(2)
    for kv_type in KV_TYPES:
        _assert_bits(_run_attention(q, k, v, kv_of_head, 9, kv_type=kv_type),
                     _run_attention(q, k, v, kv_of_head, 9, chunks=2, kv_type=kv_type))
