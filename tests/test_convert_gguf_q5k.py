"""GGUF Q5_K tensors (llama-quantize's Q5_K_M and Q5_K_S files) through the converter: kept bit-exact as
q5k and run by its own kernels. The GGUF helpers are test_convert_gguf's."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from test_convert_gguf import (  # noqa: E402
    Q,
    assert_float_reference_logits,
    assert_same_bits_on_1_2_and_3_ranks,
    hf_weights,
    k_dims,  # noqa: F401 (a fixture)
    random_k_blocks,
    stored_layout,
    write_gguf,
)

from dllama_mpi.model import quant  # noqa: E402


def q5km_like(tmp_path, rng):
    """A GGUF laid out as llama-quantize's Q5_K_M: Q5_K matrices, Q6_K for layer 0's wv and w2 and for the
    output, norms F32. Returns (path, raw stored arrays, GGML types, stored)."""
    stored = stored_layout({k: (v / np.sqrt(v.shape[-1]) if v.ndim == 2 else 1 + 0.1 * v).astype(np.float32)
                            for k, v in hf_weights(rng, "llama").items()}, "llama")
    types = {n: Q.Q5_K for n, v in stored.items() if v.ndim == 2}
    types.update({"layers/0/wv": Q.Q6_K, "layers/0/w2": Q.Q6_K, "output": Q.Q6_K})
    for name, kind in types.items():
        stored[name] = random_k_blocks(rng, *stored[name].shape, kind)  # d and dmin at bytes 0..3 as Q4_K's
    raw = write_gguf(tmp_path / "q5km.gguf", "llama", stored, types)
    return tmp_path / "q5km.gguf", raw, types, stored


def test_a_q5_k_m_file_keeps_q5_k_bit_exact_and_gives_the_float_references_logits(tmp_path, k_dims, capsys):  # noqa: F811
    """Q5_K kept byte for byte, its values gguf-py's dequantization's bit for bit, nothing re-quantized;
    the logits those of gguf-py's dequantization up to the f32 rounding of the products."""
    import h5py

    from dllama_mpi.files.convert import convert

    path, raw, types, stored = q5km_like(tmp_path, np.random.default_rng(23))
    convert(path, tmp_path / "m.h5", None, None)
    err = capsys.readouterr().err
    assert "note: Q5_K x 13 tensor(s) -> q5k: kept bit-exact" in err, err  # 7 a layer less 2, and the embedding
    assert "note: Q6_K x 3 tensor(s) -> q6k: kept bit-exact" in err, err
    assert "re-quantized" not in err, err
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert (f.attrs["weight_type"], f.attrs["tensor_types"]) == ("q5k", "output=q6k,layers/0/w2=q6k,layers/0/wv=q6k")
        assert f.attrs["format_version"] == 2
        for name, kind in types.items():
            assert f[name].attrs["type"] == ("q5k" if kind == Q.Q5_K else "q6k"), name
            assert f[name][()].tobytes() == raw[name].tobytes(), name
            ours = quant.decode(f[name][()])
            expected = gguf.quants.dequantize(raw[name], kind).astype(np.float32)
            np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))
    assert_float_reference_logits(tmp_path, raw, types, stored)


@pytest.mark.jobs
def test_a_q5_k_m_model_gives_the_same_bits_on_1_2_and_3_ranks(tmp_path, k_dims):  # noqa: F811
    """With q80 buffers (the Q5_K products on Q8K activations, layer 0's stack of q5k and q6k parts)."""
    path, *_ = q5km_like(tmp_path, np.random.default_rng(24))
    assert_same_bits_on_1_2_and_3_ranks(tmp_path, path)
