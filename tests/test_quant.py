"""Tests for the block formats and numpy codecs in dllama_mpi.model.quant (llama.cpp's Q4_0 / Q8_0,
and Q5_0 and the k-quants Q4_K / Q5_K / Q6_K read from GGUF files)."""

from __future__ import annotations

import numpy as np
import pytest

from dllama_mpi.model import quant


def _varied(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) f32 normal values whose magnitude varies per 32-block over ~6 decades."""
    x = rng.standard_normal((rows, cols))
    scale = 10.0 ** rng.uniform(-3, 3, size=(rows, cols // quant.BLOCK, 1))
    return (x.reshape(rows, -1, quant.BLOCK) * scale).reshape(rows, cols).astype(np.float32)


# ---------------------------------------------------------------- dtypes and storage decisions


def test_block_dtypes_have_llama_cpp_sizes():
    assert quant.BLOCK == 32
    assert quant.Q40.itemsize == 18
    assert quant.Q80.itemsize == 34
    assert quant.Q40.fields["d"][0] == np.dtype("<f2") and quant.Q40.fields["d"][1] == 0
    assert quant.Q80.fields["d"][0] == np.dtype("<f2") and quant.Q80.fields["d"][1] == 0
    assert quant.Q40.fields["qs"][1] == 2 and quant.Q80.fields["qs"][1] == 2
    assert quant.Q50.itemsize == 22  # ggml's block_q5_0: d, qh[4], qs[16]
    assert [quant.Q50.fields[f][1] for f in ("d", "qh", "qs")] == [0, 2, 6]
    assert quant.Q5K.itemsize == 176  # ggml's block_q5_K: d, dmin, scales[12], qh[32], qs[128]
    assert [quant.Q5K.fields[f][1] for f in ("d", "dmin", "scales", "qh", "qs")] == [0, 2, 4, 16, 48]


@pytest.mark.parametrize(
    "weight_type, cols, expected",
    [
        ("q40", 32, "q40"),
        ("q40", 288, "q40"),
        ("q40", 32 * 13, "q40"),
        ("q40", 172, "f32"),  # stories260K's w2: not whole blocks
        ("q40", 31, "f32"),
        ("q40", 33, "f32"),
        ("f32", 288, "f32"),
        ("f32", 172, "f32"),
        ("q50", 896, "q50"),
        ("q50", 172, "f32"),
        ("q5k", 512, "q5k"),
        ("q5k", 896, "q80"),  # the k-quants' rows are whole super-blocks
    ],
)
def test_storage_type_uses_q40_only_for_whole_blocks(weight_type, cols, expected):
    assert quant.storage_type(weight_type, cols) == expected


def test_storage_type_rejects_unknown_weight_type():
    with pytest.raises(ValueError):
        quant.storage_type("q3k", 64)


@pytest.mark.parametrize(
    "tensor_type, cols, expected",
    [("f32", 172, 688), ("f32", 1, 4), ("q40", 32, 18), ("q40", 32 * 7, 7 * 18), ("q40", 288, 9 * 18),
     ("f16", 172, 344), ("q80", 64, 68), ("q4k", 512, 288), ("q5k", 512, 352), ("q6k", 768, 630), ("q50", 896, 28 * 22)],
)
def test_row_bytes(tensor_type, cols, expected):
    assert quant.row_bytes(tensor_type, cols) == expected


@pytest.mark.parametrize("tensor_type, cols, expected", [
    ("q40", 32 * 17, 32 * 18),  # padded to a lane group of 16 blocks
    ("q4k", 512, 296), ("q4k", 256, 296),  # nibbles, 6-bit scales and mins, fp16 d and dmin (a group padded)
    ("q5k", 512, 360), ("q5k", 768, 2 * 360),  # Q4K's and 64 bytes of 5th bits a group
    ("q6k", 512, 420), ("q6k", 768, 2 * 420),  # the file's 210 bytes per 256 (a group padded with zeros)
    ("q50", 32 * 16, 16 * 22), ("q50", 896, 32 * 22),  # the file's 22 bytes per 32 (Qwen2.5-0.5B's 28 blocks padded)
])
def test_resident_row_bytes(tensor_type, cols, expected):
    assert quant.resident_row_bytes(tensor_type, cols) == expected


KEPT_ONLY = [t for t in quant.WEIGHTS.values() if t.encode is None]  # the k-quants and Q5_0


@pytest.mark.parametrize("kind", [t.gguf for t in KEPT_ONLY])
def test_kept_types_dequantize_as_gguf_py_bit_for_bit(kind):
    import gguf

    ggml = gguf.GGMLQuantizationType[kind]
    block, size = gguf.constants.GGML_QUANT_SIZES[ggml]
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, (7, 3, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(1 / 2048).tobytes(), np.uint8)
    dtype = next(t.dtype for t in KEPT_ONLY if t.gguf == kind)
    for field_dtype, at in dtype.fields.values():  # the fp16 scales small and finite
        if field_dtype == np.float16:
            raw[..., at : at + 2] = scale
    ours = quant.decode(raw.reshape(7, -1).view(dtype))
    expected = gguf.quants.dequantize(raw.reshape(7, -1), ggml).astype(np.float32)
    assert ours.shape == (7, 3 * block)
    np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))


def test_k_quants_and_q50_are_never_made_by_quantizing():
    assert [t.name for t in KEPT_ONLY] == [*quant.K_QUANTS, "q50"]
    assert not set(quant.QUANTIZABLE) & {t.name for t in KEPT_ONLY}  # --weights can't ask for them
    for t in KEPT_ONLY:
        with pytest.raises(ValueError, match="kept from GGUF files as stored"):
            quant.encode(np.zeros((1, 256), np.float32), t.name)


def test_each_type_has_its_own_names_codes_and_kernel_layout():
    types = list(quant.WEIGHTS.values())
    for field in ("name", "gguf", "dllama_code"):
        values = [getattr(t, field) for t in types if getattr(t, field) is not None]
        assert len(set(values)) == len(values), field
    packed = [t.layout.packed for t in types if t.quantized]
    assert len(set(packed)) == len(packed)  # the x86 tiles tell the types apart by these
    for t in types:
        assert quant.packed_type(*t.layout.packed) is t if t.quantized else t.kernels.rows_8bit is None
        assert (t.activation in quant.ACTIVATIONS) == t.quantized
        assert t.fallback is None or t.block_values % quant.WEIGHTS[t.fallback].block_values == 0
        assert quant.type_of(np.zeros(1, t.dtype)) == t.name


def test_row_bytes_rejects_unknown_type():
    with pytest.raises(ValueError):
        quant.row_bytes("q3k", 64)


# ---------------------------------------------------------------- Q40


def test_q40_hand_built_block_follows_llama_cpp_nibble_order():
    # element j is the low nibble of byte j, element j + 16 the high nibble; value (q - 8) * d
    q = (np.arange(32) * 7 + 3) % 16  # (32,) distinct-ish nibbles, not symmetric
    block = np.zeros((1, 1), dtype=quant.Q40)
    block["d"] = np.float16(0.375)
    block["qs"][0, 0] = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    got = quant.dequantize_q40(block)  # (1, 32)
    np.testing.assert_array_equal(got[0], (q - 8).astype(np.float32) * np.float32(0.375))


def test_q40_raw_byte_layout():
    # bytes 0-1: little-endian fp16 scale; bytes 2..17: packed nibbles
    block = np.zeros((1, 1), dtype=quant.Q40)
    block["d"] = np.float16(-1.5)
    block["qs"][0, 0] = np.arange(16, dtype=np.uint8) * 17
    raw = quant.as_bytes(block)  # (1, 1, 18)
    assert raw.shape == (1, 1, 18)
    assert raw[0, 0, :2].tobytes() == np.float16(-1.5).tobytes()
    np.testing.assert_array_equal(raw[0, 0, 2:], np.arange(16) * 17)


def test_q40_quantize_packs_low_then_high_nibble():
    # x = (q - 8) * d exactly representable, with the -8 end pinned by the largest magnitude
    rng = np.random.default_rng(1)
    q = rng.integers(1, 16, size=32)
    q[5] = 0  # -8 * d: the signed value of largest magnitude
    d = np.float32(0.25)
    x = ((q - 8) * d).astype(np.float32)[None, :]  # (1, 32)
    blocks = quant.quantize_q40(x)  # (1, 1)
    assert blocks["d"][0, 0] == np.float16(0.25)
    np.testing.assert_array_equal(blocks["qs"][0, 0], (q[:16] | (q[16:] << 4)).astype(np.uint8))
    np.testing.assert_array_equal(quant.dequantize_q40(blocks), x)


def test_q40_scale_is_signed_largest_magnitude_over_minus_8():
    x = np.zeros((2, 32), np.float32)
    x[0, 3], x[0, 9] = 4.0, -2.0  # largest magnitude positive -> negative d
    x[1, 3], x[1, 9] = -4.0, 2.0  # largest magnitude negative -> positive d
    blocks = quant.quantize_q40(x)
    assert blocks["d"][0, 0] == np.float16(-0.5)
    assert blocks["d"][1, 0] == np.float16(0.5)
    np.testing.assert_array_equal(quant.dequantize_q40(blocks), x)


def test_q40_zero_block_gives_zero_scale_and_zeros():
    x = np.zeros((3, 64), np.float32)
    x[1, 32:] = np.linspace(-1, 2, 32)  # one non-zero block among zero blocks
    blocks = quant.quantize_q40(x)  # (3, 2)
    zero = np.ones((3, 2), bool)
    zero[1, 1] = False
    assert np.all(blocks["d"][zero] == 0)
    out = quant.dequantize_q40(blocks)
    np.testing.assert_array_equal(out[:, :32], 0)
    np.testing.assert_array_equal(out[0], 0)
    np.testing.assert_array_equal(out[2], 0)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("rows, cols", [(13, 32 * 7), (17, 32 * 13), (1, 32), (7, 32 * 3)])
def test_q40_round_trip_error_within_half_scale(rows, cols):
    rng = np.random.default_rng(rows * 1000 + cols)
    x = _varied(rng, rows, cols)  # (rows, cols)
    blocks = quant.quantize_q40(x)  # (rows, cols // 32)
    assert blocks.shape == (rows, cols // 32)
    y = quant.dequantize_q40(blocks)
    assert y.shape == x.shape and y.dtype == np.float32
    d = blocks["d"].astype(np.float32)[..., None]  # (rows, nb, 1), signed
    err = np.abs(y - x).reshape(rows, -1, 32)
    r = x.reshape(rows, -1, 32) / d  # position on the grid, in [-8, 8]
    # rounding: |d| / 2; fp16 scale: up to 8 * 2**-11 * |d| (doubled for slack)
    bound = np.abs(d) * (0.5 + 8 * 2.0**-10)
    inside = r <= 7.5
    assert np.all(err[inside] <= np.broadcast_to(bound, err.shape)[inside])
    # llama.cpp clamps q at 15: values in (7.5, 8] * d land on 7 * d, off by up to |d|
    assert np.all(err <= 2 * bound)
    assert np.all(np.abs(r) <= 8 * (1 + 2.0**-10))
    # and the error is not trivially zero: the data is not on the grid
    assert err.max() > 0


def test_q40_element_of_largest_magnitude_maps_to_minus_8():
    rng = np.random.default_rng(7)
    x = _varied(rng, 5, 32 * 4)
    blocks = quant.quantize_q40(x)
    qs = blocks["qs"]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # (5, 4, 32)
    idx = np.abs(x.reshape(5, 4, 32)).argmax(axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(q, idx[..., None], axis=-1), 0)
    assert q.max() <= 15


# ---------------------------------------------------------------- Q50


def test_q50_hand_built_block_reads_as_ggmls_block_q5_0():
    # bytes 0-1 fp16 d; 2-5 qh, a little-endian u32 whose bit j is element j's 5th bit; 6-21 qs,
    # element j the low nibble of qs[j], j + 16 the high one; value ((nibble | bit << 4) - 16) * d
    q = (np.arange(32) * 11 + 5) % 32  # (32,) every code 0..31, 5th bits not symmetric
    raw = np.zeros(22, np.uint8)
    raw[:2] = np.frombuffer(np.float16(-0.375).tobytes(), np.uint8)
    raw[2:6] = np.frombuffer(np.uint32(sum(int(v >> 4) << j for j, v in enumerate(q))).tobytes(), np.uint8)  # "<u4"
    raw[6:] = (q[:16] & 15) | ((q[16:] & 15) << 4)
    block = raw.view(quant.Q50).reshape(1, 1)
    np.testing.assert_array_equal(quant.q50_codes(block)[0, 0], q)
    np.testing.assert_array_equal(quant.dequantize_q50(block)[0], (q - 16).astype(np.float32) * np.float32(-0.375))
    np.testing.assert_array_equal(quant.decode(block), quant.dequantize_q50(block))


def test_q50_extremes_are_minus_16_and_15_steps():
    block = np.zeros((2, 1), quant.Q50)
    block["d"] = np.float16(2.0)
    block["qh"][1] = 0xFF  # every 5th bit set
    block["qs"][1] = 0xFF  # and every nibble
    np.testing.assert_array_equal(quant.dequantize_q50(block), [[-32.0] * 32, [30.0] * 32])


# ---------------------------------------------------------------- Q5K


def test_q5k_hand_built_block_reads_as_ggmls_block_q5_k():
    # bytes 0-3 fp16 d and dmin; 4-15 the 6-bit scales and mins as Q4_K's (get_scale_min_k4); 16-47 qh,
    # bit j of qh[l] sub-block j's element l's 5th bit; 48-175 qs, byte 32 c + l holding sub-block 2c's
    # element l low and 2c + 1's high; value (d * sc_j) * q - dmin * m_j
    q = (np.arange(256).reshape(8, 32) * 13 + 7) % 32  # (sub-block, element): every code 0..31
    sc, m = np.array([1, 63, 7, 32, 40, 17, 5, 62]), np.array([0, 9, 63, 33, 48, 1, 16, 31])
    raw = np.zeros(176, np.uint8)
    raw[0:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    raw[2:4] = np.frombuffer(np.float16(0.25).tobytes(), np.uint8)
    raw[4:8] = sc[:4] | ((sc[4:] >> 4) << 6)
    raw[8:12] = m[:4] | ((m[4:] >> 4) << 6)
    raw[12:16] = (sc[4:] & 15) | ((m[4:] & 15) << 4)
    raw[16:48] = sum((q[j] >> 4) << j for j in range(8))
    raw[48:] = ((q[0::2] & 15) | ((q[1::2] & 15) << 4)).reshape(128)
    block = raw.view(quant.Q5K).reshape(1, 1)
    np.testing.assert_array_equal(quant.q5k_codes(block)[0, 0], q)
    expected = 0.5 * sc[:, None] * q - 0.25 * m[:, None]  # exact: small dyadic numbers
    np.testing.assert_array_equal(quant.dequantize_q5k(block)[0], expected.reshape(256).astype(np.float32))
    np.testing.assert_array_equal(quant.decode(block), quant.dequantize_q5k(block))


# ---------------------------------------------------------------- Q80


def test_q80_hand_built_block_dequantizes_as_q_times_d():
    q = np.arange(-16, 16, dtype=np.int8) * 3 + 1  # (32,) not symmetric
    block = np.zeros(1, dtype=quant.Q80)
    block["d"] = np.float16(0.125)
    block["qs"][0] = q
    np.testing.assert_array_equal(quant.dequantize_q80(block), q.astype(np.float32) * np.float32(0.125))
    raw = quant.as_bytes(block)  # (1, 34)
    assert raw.shape == (1, 34)
    assert raw[0, :2].tobytes() == np.float16(0.125).tobytes()
    np.testing.assert_array_equal(raw[0, 2:].view(np.int8), q)


def test_q80_scale_is_amax_over_127_and_extreme_maps_to_127():
    x = np.linspace(-1.0, 0.5, 32, dtype=np.float32)  # amax 1.0 at element 0 (negative)
    blocks = quant.quantize_q80(x)  # (1,)
    assert blocks["d"][0] == np.float16(np.float32(1.0) / np.float32(127))
    assert blocks["qs"][0, 0] == -127
    assert np.abs(blocks["qs"]).max() == 127


def test_q80_rounds_half_away_from_zero():
    # d = 127 / 127 = 1 exactly; x * 1 hits exact .5 ties
    x = np.zeros(32, np.float32)
    x[0] = 127.0
    x[1:9] = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -3.5]
    blocks = quant.quantize_q80(x)
    assert blocks["d"][0] == np.float16(1.0)
    np.testing.assert_array_equal(blocks["qs"][0, :9], [127, 1, -1, 2, -2, 3, -3, 127, -4])


def test_q80_activations_round_half_to_even_by_127_over_amax_as_llama_cpps_x86_quantizer():
    """The activations' Q80 (llama.cpp's x86 quantize_row_q8_0): the same fp16 scale as the
    weights' quantizer, x * (127 / amax) rounded half to even where that rounds half away."""
    x = np.zeros(32, np.float32)
    x[0] = 127.0
    x[1:9] = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -3.5]
    blocks = quant.quantize_q80_activations(x)
    assert blocks["d"][0] == quant.quantize_q80(x)["d"][0] == np.float16(1.0)
    np.testing.assert_array_equal(blocks["qs"][0, :9], [127, 0, 0, 2, -2, 2, -2, 126, -4])
    # 127 / amax and 1 / (amax / 127) differ in the last bit for some amax: the codes may then differ
    amax = np.float32(0.3)
    assert np.float32(127) / amax != np.float32(1) / (amax / np.float32(127))
    tiny = np.full(32, 1e-38, np.float32)  # 127 / amax overflows: codes 0 (the fp16 scale is 0 too)
    assert not quant.quantize_q80_activations(tiny)["qs"].any() and quant.quantize_q80_activations(tiny)["d"][0] == 0


def test_q8k_is_llama_cpps_quantize_row_q8_k_ref():
    """Per 256 values: the first value of largest magnitude m becomes -127 (iscale = -127 / m),
    the others round half to even, d = 1 / iscale; an all-zero super-block is d = 0, codes 0."""
    x = np.zeros((2, 512), np.float32)
    x[0, :4] = [1.0, -2.0, 2.0, 0.5]  # -2.0 comes first: iscale = 63.5
    x[0, 300] = 127.0  # second super-block: iscale = -1
    x[0, 301] = 2.5  # -2.5: a tie, to even (-2)
    x[1, :256] = np.linspace(-1, 1, 256, dtype=np.float32)
    q = quant.quantize_q8k(x)  # (2, 2)
    assert q.shape == (2, 2) and q.dtype == quant.Q8K
    np.testing.assert_array_equal(q["qs"][0, 0, :4], [64, -127, 127, 32])  # 63.5 * 1 = 63.5 -> 64 (even)
    assert q["d"][0, 0] == np.float32(1) / np.float32(63.5)
    assert q["qs"][0, 1, 300 - 256] == -127 and q["qs"][0, 1, 301 - 256] == -2
    assert q["d"][1, 1] == 0 and not q["qs"][1, 1].any()
    assert q["qs"][1, 0, 0] == -127 and q["qs"][1, 0, 255] == 127  # the first of -1 and 1 is -1: iscale 127
    x_back = q["qs"].astype(np.float32) * q["d"][..., None]
    assert np.abs(x_back.reshape(2, 512) - x).max() <= np.abs(q["d"]).max() / 2 * (1 + 1e-6)


def test_q80_zero_block_gives_zero_scale_and_zeros():
    x = np.zeros(96, np.float32)
    x[32:64] = np.linspace(-3, 1, 32)
    blocks = quant.quantize_q80(x)  # (3,)
    assert blocks["d"][0] == 0 and blocks["d"][2] == 0
    np.testing.assert_array_equal(blocks["qs"][[0, 2]], 0)
    out = quant.dequantize_q80(blocks)
    np.testing.assert_array_equal(out[:32], 0)
    np.testing.assert_array_equal(out[64:], 0)


@pytest.mark.parametrize("n", [32, 32 * 7, 32 * 13])
def test_q80_round_trip_error_within_half_scale(n):
    rng = np.random.default_rng(n)
    x = _varied(rng, 1, n)[0]  # (n,)
    blocks = quant.quantize_q80(x)  # (n // 32,)
    assert blocks.shape == (n // 32,)
    y = quant.dequantize_q80(blocks)
    assert y.shape == x.shape and y.dtype == np.float32
    d = blocks["d"].astype(np.float32)[:, None]  # (nb, 1)
    assert np.all(d > 0)
    err = np.abs(y - x).reshape(-1, 32)
    # rounding: d / 2; fp16 scale rounding: up to 127 * d * 2**-11
    bound = d * (0.5 + 127 * 2.0**-11) * (1 + 1e-6)
    assert np.all(err <= bound)
    assert err.max() > 0


def test_q80_batched_shape_matches_rows():
    rng = np.random.default_rng(3)
    x = _varied(rng, 7, 32 * 3)  # (7, 96)
    blocks = quant.quantize_q80(x)  # (7, 3)
    assert blocks.shape == (7, 3)
    for r in range(7):
        assert quant.as_bytes(quant.quantize_q80(x[r])).tobytes() == quant.as_bytes(blocks[r]).tobytes()
    np.testing.assert_array_equal(quant.dequantize_q80(blocks), np.stack([quant.dequantize_q80(blocks[r]) for r in range(7)]))


def test_as_bytes_shape_and_round_trip():
    rng = np.random.default_rng(4)
    blocks = quant.quantize_q40(_varied(rng, 3, 64))  # (3, 2)
    raw = quant.as_bytes(blocks)  # (3, 2, 18)
    assert raw.shape == (3, 2, 18) and raw.dtype == np.uint8
    back = raw.reshape(-1).view(quant.Q40).reshape(3, 2)
    np.testing.assert_array_equal(back["d"], blocks["d"])
    np.testing.assert_array_equal(back["qs"], blocks["qs"])
