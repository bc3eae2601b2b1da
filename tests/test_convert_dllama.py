"""distributed-llama .m / .t reader (dllama_mpi.files.convert.dllama)."""

from __future__ import annotations

import struct

import dllama_writer as dw
import numpy as np
import pytest

from dllama_mpi.files.convert import ConvertError, dllama
from dllama_mpi.files.convert.rope import halves_to_interleaved
from dllama_mpi.model import quant

DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ = 96, 160, 2, 3, 1, 300, 64
HEAD_DIM = DIM // HEADS


def _tokens():
    words = [" the", " once", " upon", " a", " time", "the", "on", "ce", " t", "he"]
    tokens = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)]
    tokens += [w.encode() for w in words]
    tokens += [f" w{i}".encode() for i in range(VOCAB - len(tokens))]
    scores = np.concatenate([np.zeros(259), -np.arange(VOCAB - 259, dtype=np.float32)]).astype(np.float32)
    return tokens, scores


def _weights(rng, arch=dw.LLAMA):
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w = {"tok_embeddings": r(VOCAB, DIM), "norm": r(DIM), "output": r(VOCAB, DIM)}
    shapes = {"wq": (DIM, DIM), "wk": (KV_HEADS * HEAD_DIM, DIM), "wv": (KV_HEADS * HEAD_DIM, DIM),
              "wo": (DIM, DIM), "w1": (HIDDEN, DIM), "w2": (DIM, HIDDEN), "w3": (HIDDEN, DIM),
              "attention_norm": (DIM,), "ffn_norm": (DIM,)}
    if arch == dw.QWEN3:
        shapes.update(q_norm=(HEAD_DIM,), k_norm=(HEAD_DIM,))
    for name, shape in shapes.items():
        w[name] = [r(*shape) for _ in range(LAYERS)]
    return w


PARAMS = dict(version=0, dim=DIM, hidden_dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS,
              n_experts=0, n_active_experts=0, vocab_size=VOCAB, max_seq_len=SEQ, hidden_act=1, rope_theta=10000)


@pytest.fixture
def tokenizer_file(tmp_path):
    tokens, scores = _tokens()
    path = tmp_path / "tok.t"
    dw.write_tokenizer(path, tokens, scores, bos_id=1, eos_ids=[2], chat_template=b"{{ messages }}")
    return path


def _flat(weights):
    """name -> source array in our naming."""
    out = {"tok_embeddings": weights["tok_embeddings"], "norm": weights["norm"], "output": weights["output"]}
    for key, value in weights.items():
        if isinstance(value, list):
            for i, a in enumerate(value):
                out[f"layers/{i}/{key}"] = a
    return out


@pytest.mark.parametrize("weight_type", [t.name for t in quant.WEIGHTS.values() if t.dllama_code is not None])
def test_llama_round_trip(tmp_path, tokenizer_file, weight_type):
    rng = np.random.default_rng(1)
    w = _weights(rng)
    path = tmp_path / "model.m"
    dw.write_model(path, PARAMS, w, weight_type)
    assert dllama.sniff(path)
    src = dllama.read(path, tokenizer_file)
    assert src.spec_fields == dict(dim=DIM, hidden_dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS,
                                   head_dim=HEAD_DIM, vocab_size=VOCAB, seq_len=SEQ, norm_eps=1e-5,
                                   rope_theta=10000.0, shared_classifier=False, architecture="llama")
    expected = _flat(w)
    got = dict(src.tensors())
    assert set(got) == set(expected)
    for name, array in got.items():
        src_array = expected[name]
        kind = weight_type if (name.rsplit("/", 1)[-1] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")) else "f32"
        assert quant.type_of(array) == kind, name
        if quant.WEIGHTS[kind].quantized:
            assert array.shape == (src_array.shape[0], src_array.shape[1] // 32)
            assert array.tobytes() == dw.tensor_bytes(src_array, kind), name  # bit-exact blocks
        else:  # f32, or f16 as the values rounded
            np.testing.assert_array_equal(array, src_array.astype(quant.stored_dtype(kind)), err_msg=name)


def test_q40_blocks_decode_like_the_writer_quantized(tmp_path, tokenizer_file):
    rng = np.random.default_rng(2)
    w = _weights(rng)
    path = tmp_path / "model.m"
    dw.write_model(path, PARAMS, w, "q40")
    got = dict(dllama.read(path, tokenizer_file).tensors())
    wq = w["wq"][0]
    dec = quant.dequantize_q40(got["layers/0/wq"])
    scale = np.abs(wq.reshape(-1, 32)).max(axis=1).repeat(32).reshape(wq.shape)
    assert np.all(np.abs(dec - wq) <= scale / 8 + 1e-3)


def test_qwen3_halves_to_interleaved_and_llama3_rope(tmp_path, tokenizer_file):
    rng = np.random.default_rng(3)
    w = _weights(rng, dw.QWEN3)
    params = {**PARAMS, "head_dim": HEAD_DIM, "norm_epsilon": 6, "rope_theta": 1000000}
    path = tmp_path / "qwen3.m"
    dw.write_model(path, params, w, "f32", arch=dw.QWEN3)
    src = dllama.read(path, tokenizer_file)
    f = src.spec_fields
    assert f["architecture"] == "qwen3" and f["qk_norm"] is True
    assert f["norm_eps"] == 1e-6 and f["rope_theta"] == 1e6
    got = dict(src.tensors())
    for i in range(LAYERS):
        for name in ("wq", "wk", "q_norm", "k_norm"):
            np.testing.assert_array_equal(got[f"layers/{i}/{name}"], halves_to_interleaved(w[name][i], HEAD_DIM))
        np.testing.assert_array_equal(got[f"layers/{i}/wv"], w["wv"][i])

    params = {**PARAMS, "rope_scaling_factor": 32, "rope_scaling_low_freq_factor": 1,
              "rope_scaling_high_freq_factory": 4, "rope_scaling_orig_max_seq_len": 8192, "rope_type": 2}
    path = tmp_path / "llama3.m"
    dw.write_model(path, params, _weights(rng), "f32")
    f = dllama.read(path, tokenizer_file).spec_fields
    assert (f["rope_scaling"], f["rope_scaling_factor"], f["rope_low_freq_factor"], f["rope_high_freq_factor"],
            f["rope_original_max_position"]) == ("llama3", 32.0, 1.0, 4.0, 8192)


def test_malformed_models(tmp_path, tokenizer_file):
    rng = np.random.default_rng(4)
    path = tmp_path / "model.m"
    dw.write_model(path, PARAMS, _weights(rng), "q40")
    data = path.read_bytes()

    bad = tmp_path / "bad.m"
    bad.write_bytes(struct.pack("<i", 0x12345678) + data[4:])
    assert not dllama.sniff(bad)
    with pytest.raises(ConvertError, match="bad magic"):
        dllama.read(bad, tokenizer_file)

    bad.write_bytes(struct.pack("<i", 0xABCD00) + data[4:])
    with pytest.raises(ConvertError, match="old distributed-llama"):
        dllama.read(bad, tokenizer_file)

    bad.write_bytes(data[:20])  # header cut
    with pytest.raises(ConvertError, match="truncated"):
        dllama.read(bad, tokenizer_file)

    bad.write_bytes(data[:-5])  # weights cut
    with pytest.raises(ConvertError, match="truncated"):
        dllama.read(bad, tokenizer_file)

    bad.write_bytes(data[:6])
    with pytest.raises(ConvertError, match="truncated"):
        dllama.read(bad, tokenizer_file)

    moe = tmp_path / "moe.m"
    moe.write_bytes(dw.header_bytes({**PARAMS, "n_experts": 8, "weights_float_type": 2}))
    with pytest.raises(ConvertError, match="mixture-of-experts"):
        dllama.read(moe, tokenizer_file)

    with pytest.raises(ConvertError, match="--tokenizer"):
        dllama.read(path, None)
    with pytest.raises(ConvertError, match="--tokenizer"):
        dllama.read(path, tmp_path / "missing.t")


def test_tokenizer_round_trip(tmp_path, tokenizer_file):
    tokens, scores = _tokens()
    tok = dllama.read_tokenizer(tokenizer_file)
    assert tok.pieces == tokens
    np.testing.assert_array_equal(tok.scores, scores)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, VOCAB)
    the = tokens.index(b" the")
    assert tok.decode(1, the) == b"the" and tok.decode(5, the) == b" the"
    assert tok.decode(0, 3 + 0x41) == b"A"


def test_malformed_tokenizers(tmp_path, tokenizer_file):
    data = tokenizer_file.read_bytes()
    bad = tmp_path / "bad.t"
    bad.write_bytes(struct.pack("<i", 0x1234) + data[4:])
    with pytest.raises(ConvertError, match="bad magic"):
        dllama.read_tokenizer(bad)
    bad.write_bytes(data[:-3])
    with pytest.raises(ConvertError, match="truncated"):
        dllama.read_tokenizer(bad)
    bad.write_bytes(data[:10])
    with pytest.raises(ConvertError, match="truncated"):
        dllama.read_tokenizer(bad)
    # a byte-level BPE vocabulary (no <0xXX> pieces) is refused with a clear error
    dw.write_tokenizer(bad, [b"a", b"b", b"<s>"] + [b"x%d" % i for i in range(300)], np.zeros(303), 2, [2])
    with pytest.raises(ConvertError, match="sentencepiece"):
        dllama.read_tokenizer(bad)


def _converted_q40(tmp_path, tokenizer_file, seed):
    """Random weights written as a Q40 .m, converted: (weights, HDF5 path)."""
    from dllama_mpi.files.convert import convert

    w = _weights(np.random.default_rng(seed))
    path = tmp_path / "model.m"
    dw.write_model(path, PARAMS, w, "q40")
    out = tmp_path / "model.h5"
    convert(path, out, tokenizer_file, "q40")
    return w, out


def test_end_to_end_q40_bit_exact(tmp_path, tokenizer_file):
    import h5py

    w, out = _converted_q40(tmp_path, tokenizer_file, 5)
    with h5py.File(out, "r") as f:
        for name, src_array in [("layers/1/w2", w["w2"][1]), ("output", w["output"]), ("layers/0/wq", w["wq"][0])]:
            assert f[name][()].tobytes() == dw.tensor_bytes(src_array, "q40"), name


def test_converted_model_gives_the_writers_logits(tmp_path, tokenizer_file):
    """Engine logits of a converted .m equal a dense numpy forward pass over the blocks the
    distributed-llama writer produced (independent of our reader)."""
    from dllama_mpi.job.loading import open_job
    from dllama_mpi.kernels.reference import DenseModel
    from dllama_mpi.parallel.comm import Comm

    w, out = _converted_q40(tmp_path, tokenizer_file, 6)
    expected_tensors = {}
    for name, array in _flat(w).items():
        if array.ndim == 2 and name != "tok_embeddings":  # the writer's Q40 blocks
            blocks = np.frombuffer(dw.tensor_bytes(array, "q40"), dtype=quant.Q40)
            expected_tensors[name] = blocks.reshape(array.shape[0], array.shape[1] // 32)
        elif name == "tok_embeddings":  # .m keeps it f32; our q40 file quantizes it
            expected_tensors[name] = quant.quantize_q40(array)
        else:
            expected_tensors[name] = array
    job = open_job(Comm(), out, (1,), buffer_type="f32", max_seq_len=16)
    dense = DenseModel(job.plan.spec, expected_tensors, "f32")
    for pos, token in enumerate([1, 260, 7, 299, 42]):
        got, expected = job.engine.forward(token, pos), dense.forward(token, pos)
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max(), pos


@pytest.mark.parametrize("weight_type", ["q80", "f16"])
def test_a_model_keeps_its_type_unless_weights_says_otherwise(tmp_path, tokenizer_file, weight_type, capsys):
    import h5py

    from dllama_mpi.files.convert import convert

    path = tmp_path / "model.m"
    dw.write_model(path, PARAMS, _weights(np.random.default_rng(3)), weight_type)
    convert(path, tmp_path / "kept.h5", tokenizer_file, None)
    with h5py.File(tmp_path / "kept.h5", "r") as f:  # never quantized to 4 bits behind the user's back
        assert f.attrs["weight_type"] == weight_type and f["layers/1/w2"].attrs["type"] == weight_type
        assert f["tok_embeddings"].attrs["type"] == "f32"  # as distributed-llama stores and uses it
    assert "kept bit-exact" in capsys.readouterr().err
    convert(path, tmp_path / "q40.h5", tokenizer_file, "q40")
    assert f"-> q40: {'re-quantized' if weight_type == 'q80' else 'quantized'} (--weights q40)" in capsys.readouterr().err
