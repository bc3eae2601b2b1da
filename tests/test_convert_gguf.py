"""GGUF reader (dllama_mpi.files.convert.gguf_model) on small GGUF files written with gguf.GGUFWriter
the way llama.cpp's convert_hf_to_gguf lays them out."""

from __future__ import annotations

import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from dllama_mpi.files.convert import ConvertError, gguf_model  # noqa: E402
from dllama_mpi.files.convert.rope import halves_to_interleaved  # noqa: E402
from dllama_mpi.model import quant  # noqa: E402

Q = gguf.GGMLQuantizationType
DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, CTX = 96, 160, 2, 3, 1, 300, 128
HEAD_DIM = DIM // HEADS
LAYER_NAMES = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w1": "ffn_gate",
               "w2": "ffn_down", "w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def hf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute (halves -> interleaved pairs per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(rng, arch: str, tied: bool = False) -> dict[str, np.ndarray]:
    """Hugging Face layout (q/k halves), our names."""
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w = {"tok_embeddings": r(VOCAB, DIM), "norm": r(DIM)}
    if not tied:
        w["output"] = r(VOCAB, DIM)
    for i in range(LAYERS):
        p = f"layers/{i}/"
        w.update({p + "wq": r(HEADS * HEAD_DIM, DIM), p + "wk": r(KV_HEADS * HEAD_DIM, DIM),
                  p + "wv": r(KV_HEADS * HEAD_DIM, DIM), p + "wo": r(DIM, HEADS * HEAD_DIM),
                  p + "w1": r(HIDDEN, DIM), p + "w2": r(DIM, HIDDEN), p + "w3": r(HIDDEN, DIM),
                  p + "attention_norm": r(DIM), p + "ffn_norm": r(DIM)})
        if arch == "qwen2":
            w.update({p + "bq": r(HEADS * HEAD_DIM), p + "bk": r(KV_HEADS * HEAD_DIM), p + "bv": r(KV_HEADS * HEAD_DIM)})
    return w


def gguf_name(ours: str) -> str:
    if ours == "tok_embeddings":
        return "token_embd.weight"
    if ours == "norm":
        return "output_norm.weight"
    if ours == "output":
        return "output.weight"
    _, i, kind = ours.split("/")
    if kind in ("bq", "bk", "bv"):
        return f"blk.{i}.attn_{kind[1]}.bias"
    return f"blk.{i}.{LAYER_NAMES[kind]}.weight"


def stored_layout(hf: dict, arch: str) -> dict:
    """What convert_hf_to_gguf stores: llama q/k permuted to interleaved, qwen2 untouched."""
    out = dict(hf)
    if arch == "llama":
        for name in hf:
            if name.endswith("/wq"):
                out[name] = hf_permute(hf[name], HEADS)
            elif name.endswith("/wk"):
                out[name] = hf_permute(hf[name], KV_HEADS)
    return out


def ours_expected(hf: dict) -> dict:
    """The engine's layout: q/k rows (and biases) interleaved."""
    out = dict(hf)
    for name in hf:
        if name.rsplit("/", 1)[-1] in ("wq", "wk", "bq", "bk"):
            out[name] = halves_to_interleaved(hf[name], HEAD_DIM)
    return out


def spm_vocab():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁the", "▁once", "▁upon", "▁a", "▁time", "the", "on", "ce"]
    tokens += words + [f"▁w{i}" for i in range(VOCAB - len(tokens) - len(words))]
    types = [2, 3, 3] + [6] * 256 + [1] * (VOCAB - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(VOCAB - 259)]
    return tokens, scores, types


def write_gguf(path, arch: str, tensors: dict, types: dict | None = None, rope_freqs: np.ndarray | None = None,
               theta: float = 10000.0, extra=None) -> dict:
    """tensors: our name -> f32 array as stored, or the raw bytes (rows, bytes per row) u8 of its
    types entry; types: our name -> GGML type (default F32). Returns our name -> the raw stored
    array (quantized bytes or floats)."""
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(CTX)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(HEAD_DIM)
    if extra:
        extra(w)
    tokens, scores, ttypes = spm_vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(ttypes)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    raw = {}
    for name, array in tensors.items():
        kind = types.get(name, Q.F32)
        if kind == Q.F32:
            data = np.ascontiguousarray(array, dtype=np.float32)
            w.add_tensor(gguf_name(name), data)
        elif array.dtype == np.uint8:  # raw blocks (gguf-py quantizes no k-quant)
            data = array
            w.add_tensor(gguf_name(name), data, raw_dtype=kind)
        else:
            data = gguf.quants.quantize(array, kind)
            w.add_tensor(gguf_name(name), data, raw_dtype=kind)
        raw[name] = data
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw


def base_fields(arch, tied=False):
    f = dict(dim=DIM, hidden_dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
             vocab_size=VOCAB, seq_len=CTX, norm_eps=pytest.approx(1e-6), rope_theta=10000.0,
             shared_classifier=tied, architecture=arch)
    if arch == "qwen2":
        f["qkv_bias"] = True
    return f


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_f32_layouts(tmp_path, arch, tied):
    hf = hf_weights(np.random.default_rng(0), arch, tied)
    path = tmp_path / "m.gguf"
    write_gguf(path, arch, stored_layout(hf, arch))
    assert gguf_model.sniff(path)
    src = gguf_model.read(path, None)
    assert src.spec_fields == base_fields(arch, tied)
    got = dict(src.tensors())
    expected = ours_expected(hf)
    assert set(got) == set(expected)
    for name, array in got.items():
        assert array.dtype == np.float32, name
        np.testing.assert_array_equal(array, expected[name], err_msg=name)
    assert src.notes == []


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q4_0_and_q8_0_pass_through_bit_exact(tmp_path, arch):
    hf = hf_weights(np.random.default_rng(1), arch)
    stored = stored_layout(hf, arch)
    types = {n: Q.Q4_0 for n in stored if n.rsplit("/", 1)[-1] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")}
    types["output"] = Q.Q8_0
    types["tok_embeddings"] = Q.Q4_0
    path = tmp_path / "q.gguf"
    raw = write_gguf(path, arch, stored, types)
    got = dict(gguf_model.read(path, None).tensors())
    for name, kind in types.items():
        array = got[name]
        assert array.dtype == (quant.Q40 if kind == Q.Q4_0 else quant.Q80), name
        rows, cols = stored[name].shape
        assert array.shape == (rows, cols // 32)
        expected_bytes = raw[name]
        if arch == "qwen2" and name.rsplit("/", 1)[-1] in ("wq", "wk"):
            expected_bytes = halves_to_interleaved(expected_bytes, HEAD_DIM)  # whole rows of blocks move
        assert array.tobytes() == np.ascontiguousarray(expected_bytes).tobytes(), name
        # and the values are the source's, in our layout
        decoded = quant.decode(array)
        np.testing.assert_allclose(decoded, ours_expected(hf)[name], atol=np.abs(hf[name]).max() / 6)


def test_other_types_are_dequantized_and_forcing_a_type_says_what_it_changes(tmp_path, capsys):
    from dllama_mpi.files.convert import convert

    hf = hf_weights(np.random.default_rng(2), "llama")
    stored = stored_layout(hf, "llama")
    types = {"layers/0/w2": Q.Q5_1, "layers/1/w1": Q.Q5_1, "layers/0/wo": Q.BF16, "layers/1/w3": Q.F16,
             "layers/1/wq": Q.Q8_0}
    path = tmp_path / "k.gguf"
    write_gguf(path, "llama", stored, types)
    src = gguf_model.read(path, None)
    assert src.native_types["layers/0/w2"] == "Q5_1" and src.native_types["layers/0/wq"] == "F32"
    convert(path, tmp_path / "q40.h5", None, "q40")
    assert capsys.readouterr().err.splitlines() == [  # every type --weights changed, Q8_0 included
        "note: BF16 x 1 tensor(s) -> q40: quantized (--weights q40)",
        "note: F16 x 1 tensor(s) -> q40: quantized (--weights q40)",
        "note: F32 x 11 tensor(s) -> q40: quantized (--weights q40)",
        "note: Q5_1 x 2 tensor(s) -> q40: re-quantized (--weights q40)",
        "note: Q8_0 x 1 tensor(s) -> q40: re-quantized (--weights q40)"]
    got = dict(src.tensors())
    for name in ("layers/0/w2", "layers/1/w1"):
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], stored[name], atol=np.abs(stored[name]).max() / 12)
    assert got["layers/0/wo"].dtype == np.float32
    np.testing.assert_allclose(got["layers/0/wo"], stored["layers/0/wo"], rtol=1e-2)
    assert got["layers/1/w3"].dtype == np.float16
    np.testing.assert_array_equal(got["layers/1/w3"], stored["layers/1/w3"].astype(np.float16))


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    hf = hf_weights(np.random.default_rng(3), "llama")
    factors = gguf_model.llama3_rope_factors(HEAD_DIM, 500000.0, 32.0, 1.0, 4.0, 8192)
    assert 1 < len(set(factors.tolist()))
    path = tmp_path / "l3.gguf"
    write_gguf(path, "llama", stored_layout(hf, "llama"), rope_freqs=factors, theta=500000.0)
    src = gguf_model.read(path, None)
    f = src.spec_fields
    assert (f["rope_scaling"], f["rope_scaling_factor"], f["rope_low_freq_factor"], f["rope_high_freq_factor"],
            f["rope_original_max_position"]) == ("llama3", 32.0, 1.0, 4.0, 8192)
    assert "rope_freqs" not in dict(src.tensors())


def test_unsupported_inputs(tmp_path):
    hf = hf_weights(np.random.default_rng(4), "llama")
    path = tmp_path / "y.gguf"
    write_gguf(path, "llama", stored_layout(hf, "llama"),
               extra=lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN), w.add_rope_scaling_factor(4.0)))
    with pytest.raises(ConvertError, match="RoPE scaling"):
        gguf_model.read(path, None)
    other = tmp_path / "x.bin"
    other.write_bytes(b"\x00" * 64)
    assert not gguf_model.sniff(other)
    assert not gguf_model.sniff(tmp_path / "missing")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[:200])
    assert gguf_model.sniff(bad)
    with pytest.raises(ConvertError, match=r"bad.gguf is truncated or damaged: its header runs past the end of the file \(200"):
        gguf_model.read(bad, None)


@pytest.mark.parametrize("missing", [1, 100, 50_000])
def test_a_truncated_gguf_is_named_with_the_bytes_missing(tmp_path, missing):
    path = tmp_path / "t.gguf"
    write_gguf(path, "llama", stored_layout(hf_weights(np.random.default_rng(4), "llama"), "llama"))
    data = path.read_bytes()
    path.write_bytes(data[:-missing])
    with pytest.raises(ConvertError, match=f"its tensor data runs to byte {len(data)} but the file has "
                                           f"{len(data) - missing} bytes .{missing} missing."):
        gguf_model.read(path, None)


def test_end_to_end_q40_bit_exact(tmp_path):
    import h5py

    from dllama_mpi.files.convert import convert

    for arch in ("llama", "qwen2"):
        hf = hf_weights(np.random.default_rng(5), arch)
        stored = stored_layout(hf, arch)
        types = {n: Q.Q4_0 for n in stored if n.rsplit("/", 1)[-1] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")}
        types["output"] = Q.Q4_0
        path = tmp_path / f"{arch}.gguf"
        raw = write_gguf(path, arch, stored, types)
        out = tmp_path / f"{arch}.h5"
        convert(path, out, None, "q40")
        with h5py.File(out, "r") as f:
            for name in ("layers/0/w1", "layers/1/w2", "layers/1/wv", "output"):
                assert f[name][()].tobytes() == raw[name].tobytes(), (arch, name)
            wq = halves_to_interleaved(raw["layers/0/wq"], HEAD_DIM) if arch == "qwen2" else raw["layers/0/wq"]
            assert f["layers/0/wq"][()].tobytes() == np.ascontiguousarray(wq).tobytes(), arch


HF_NAMES = {"wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
            "wo": "self_attn.o_proj.weight", "w1": "mlp.gate_proj.weight", "w2": "mlp.down_proj.weight",
            "w3": "mlp.up_proj.weight", "attention_norm": "input_layernorm.weight",
            "ffn_norm": "post_attention_layernorm.weight", "bq": "self_attn.q_proj.bias",
            "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias"}


def write_hf_dir(directory, arch: str, hf: dict) -> None:
    """The same weights as a Hugging Face directory (config, safetensors, a small tokenizer)."""
    import json

    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    directory.mkdir()
    names = {"tok_embeddings": "model.embed_tokens.weight", "norm": "model.norm.weight", "output": "lm_head.weight"}
    tensors = {}
    for ours, array in hf.items():
        if ours in names:
            tensors[names[ours]] = array
        else:
            _, i, kind = ours.split("/")
            tensors[f"model.layers.{i}.{HF_NAMES[kind]}"] = array
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({
        "model_type": arch, "hidden_size": DIM, "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
        "max_position_embeddings": CTX, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": "output" not in hf}))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["a tiny tokenizer"], trainers.BpeTrainer(vocab_size=280, special_tokens=["<s>", "</s>"]))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_and_hf_paths_give_the_same_logits(tmp_path, arch):
    from dllama_mpi.files.convert import convert
    from dllama_mpi.job.loading import open_job
    from dllama_mpi.parallel.comm import Comm

    rng = np.random.default_rng(11)
    hf = {k: (v / np.sqrt(v.shape[-1]) if v.ndim == 2 else 1 + 0.1 * v).astype(np.float32)
          for k, v in hf_weights(rng, arch).items()}
    write_hf_dir(tmp_path / "hf", arch, hf)
    write_gguf(tmp_path / "m.gguf", arch, stored_layout(hf, arch))
    logits = {}
    for name, src in (("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf")):
        convert(src, tmp_path / f"{name}.h5", None, "f32")
        job = open_job(Comm(), tmp_path / f"{name}.h5", (1,), buffer_type="f32", max_seq_len=8)
        logits[name] = np.stack([job.engine.forward(t, pos).copy() for pos, t in enumerate([1, 5, 260, 77])])
    assert np.abs(logits["hf"]).max() > 0.1
    np.testing.assert_array_equal(logits["gguf"], logits["hf"])


def test_a_vocabulary_only_gguf_is_not_taken_for_truncated():
    """llama.cpp's vocab-only files end right after the header (no tensors, no padding)."""
    from conftest import SHARED_MODELS

    path = SHARED_MODELS / "llamacpp-vocab" / "ggml-vocab-llama-spm.gguf"
    if not path.exists():
        pytest.skip(f"{path} not found")
    assert len(gguf_model.open_gguf(path).tensors) == 0


def random_k_blocks(rng, rows: int, cols: int, kind) -> np.ndarray:
    """Random but valid k-quant rows: (rows, bytes) u8 with every super-block's fp16 scales
    (d, and dmin for Q4_K) set small and finite; the other bytes (sub-scales, codes) random."""
    block, size = gguf.constants.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(1 / 2048).tobytes(), np.uint8)
    if kind == Q.Q6_K:  # ql[128] qh[64] scales[16] d
        raw[..., 208:210] = scale
    else:  # Q4_K: d dmin scales[12] qs[128]
        raw[..., 0:2] = scale
        raw[..., 2:4] = scale
    return raw.reshape(rows, -1)


@pytest.fixture
def k_dims(monkeypatch):
    """This module's shape with rows of whole 256-value super-blocks (k-quants need them)."""
    for name, value in (("DIM", 256), ("HIDDEN", 512), ("HEADS", 4), ("KV_HEADS", 2), ("HEAD_DIM", 64)):
        monkeypatch.setitem(globals(), name, value)


def q4km_like(tmp_path, rng, path_name="q4km.gguf"):
    """A GGUF laid out as llama-quantize's Q4_K_M: Q4_K matrices, Q6_K for layer 0's wv and w2 and
    for the output, the embedding Q4_K; norms F32. Returns (path, raw stored arrays, GGML types)."""
    stored = stored_layout({k: (v / np.sqrt(v.shape[-1]) if v.ndim == 2 else 1 + 0.1 * v).astype(np.float32)
                            for k, v in hf_weights(rng, "llama").items()}, "llama")
    types = {n: Q.Q4_K for n in stored if n.rsplit("/", 1)[-1] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")}
    types.update({"layers/0/wv": Q.Q6_K, "layers/0/w2": Q.Q6_K, "output": Q.Q6_K, "tok_embeddings": Q.Q4_K})
    for name, kind in types.items():
        stored[name] = random_k_blocks(rng, *stored[name].shape, kind)
    raw = write_gguf(tmp_path / path_name, "llama", stored, types)
    return tmp_path / path_name, raw, types, stored


def float_reference(tmp_path, raw, types, stored, arch="llama"):
    """The model as gguf-py dequantizes every tensor, written as F32 and converted to f32."""
    from dllama_mpi.files.convert import convert

    dense = {n: (gguf.quants.dequantize(raw[n], types[n]) if n in types else stored[n]) for n in stored}
    write_gguf(tmp_path / "ref.gguf", arch, dense)
    convert(tmp_path / "ref.gguf", tmp_path / "ref.h5", None, "f32")
    return tmp_path / "ref.h5"


def assert_float_reference_logits(tmp_path, raw, types, stored, arch="llama") -> None:
    """The converted model (tmp_path / "m.h5") gives the float reference's logits to f32 rounding (products in
    another order than the reference's: 2.4e-7 to 9.4e-7 of the largest logit measured; 1e-5 allowed) and
    the same top tokens."""
    got, expected = _logits(tmp_path / "m.h5"), _logits(float_reference(tmp_path, raw, types, stored, arch))
    scale = np.abs(expected).max()
    assert scale > 0.1
    error = np.abs(got - expected).max() / scale
    assert error < 1e-5, error
    assert (got.argmax(1) == expected.argmax(1)).all()


def _logits(path, tokens=(1, 5, 260, 77)):
    from dllama_mpi.job.loading import open_job
    from dllama_mpi.parallel.comm import Comm

    job = open_job(Comm(), path, (1,), buffer_type="f32", max_seq_len=8)
    return np.stack([job.engine.forward(t, pos).copy() for pos, t in enumerate(tokens)])


def test_a_q4_k_m_file_keeps_q4_k_and_q6_k_natively_and_gives_the_float_references_logits(tmp_path, k_dims, capsys):
    """Q4_K and Q6_K kept bit-exact and run by their own kernels, layer 0's wq wk wv stack holding
    both too (its parts run as products of their own); nothing re-quantized; logits as those of
    gguf-py's dequantization."""
    import h5py

    from dllama_mpi.files.convert import convert, info
    from dllama_mpi.job.weights import Parts

    path, raw, types, stored = q4km_like(tmp_path, np.random.default_rng(14))
    convert(path, tmp_path / "m.h5", None, None)
    err = capsys.readouterr().err
    assert "note: Q4_K x 13 tensor(s) -> q4k: kept bit-exact" in err, err  # all but layer 0's wv and w2 and output
    assert "note: Q6_K x 3 tensor(s) -> q6k: kept bit-exact" in err, err
    assert "re-quantized" not in err, err
    with h5py.File(tmp_path / "m.h5", "r") as f:
        # the most common type is the model's; the others are listed, per layer where a kind's types differ
        assert (f.attrs["weight_type"], f.attrs["tensor_types"]) == ("q4k", "output=q6k,layers/0/w2=q6k,layers/0/wv=q6k")
        assert f.attrs["format_version"] == 2  # a reader from before k-quants says the file is newer than it
        for name in ("layers/1/w1", "layers/0/wo", "layers/1/w2", "layers/1/wv", "tok_embeddings", "layers/0/w2",
                     "layers/0/wq", "layers/0/wv", "output"):
            assert f[name].attrs["type"] == ("q6k" if types[name] == Q.Q6_K else "q4k"), name
            assert f[name][()].tobytes() == raw[name].tobytes(), name
    assert re.search(r"by type: f32 5 tensor\(s\) [\d.]+ MiB, q4k 13 tensor\(s\) [\d.]+ MiB, q6k 3 tensor\(s\) ",
                     info(tmp_path / "m.h5"))
    from dllama_mpi.job.loading import open_job
    from dllama_mpi.parallel.comm import Comm

    job = open_job(Comm(), tmp_path / "m.h5", (1,), max_seq_len=8)
    assert job.weights.nbytes == job.plan.weight_bytes(0)  # the memory plan counts q4k's resident bytes exactly
    stack = job.weights.layers[0]["wqkv"]
    assert isinstance(stack, Parts) and [(m.type, m.rows) for m in stack.parts] == [
        ("q4k", job.plan.spec.q_dim + job.plan.spec.kv_dim), ("q6k", job.plan.spec.kv_dim)]  # wq and wk one product
    del job
    # (0.33% when layer 0's stack was re-quantized to 8-bit blocks)
    assert_float_reference_logits(tmp_path, raw, types, stored)


def test_a_q6_k_file_runs_every_matrix_natively_with_the_float_references_logits(tmp_path, k_dims):
    """All matrices Q6_K (llama-quantize's Q6_K type): nothing re-quantized, so the logits are the
    float reference's up to the f32 rounding of the products."""
    import h5py

    from dllama_mpi.files.convert import convert

    rng = np.random.default_rng(16)
    stored = stored_layout({k: (v / np.sqrt(v.shape[-1]) if v.ndim == 2 else 1 + 0.1 * v).astype(np.float32)
                            for k, v in hf_weights(rng, "llama").items()}, "llama")
    types = {n: Q.Q6_K for n, v in stored.items() if v.ndim == 2}
    for name, kind in types.items():
        stored[name] = random_k_blocks(rng, *stored[name].shape, kind)
    raw = write_gguf(tmp_path / "q6k.gguf", "llama", stored, types)
    convert(tmp_path / "q6k.gguf", tmp_path / "m.h5", None, None)
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert (f.attrs["weight_type"], f.attrs.get("tensor_types", "")) == ("q6k", "")
        assert f.attrs["format_version"] == 2
    assert_float_reference_logits(tmp_path, raw, types, stored)


def test_q5_0_is_kept_bit_exact_and_gives_the_float_references_and_the_dense_twins_logits(tmp_path, capsys):
    """As llama-quantize's Q4_K_M lays out Qwen2.5-0.5B, whose 896-wide rows are not whole
    super-blocks: Q5_0 matrices, Q8_0 wv and output (qwen2: wq and wk rows move whole into the
    interleaved layout). Q5_0 kept bit-exact and run by its own kernels: the logits those of
    gguf-py's dequantization with f32 buffers, the dense twin's with q80 buffers."""
    import h5py
    from conftest import read_dense

    from dllama_mpi.files.convert import convert
    from dllama_mpi.job.loading import open_job
    from dllama_mpi.kernels.reference import DenseModel
    from dllama_mpi.parallel.comm import Comm

    rng = np.random.default_rng(22)
    stored = stored_layout({k: (v / np.sqrt(v.shape[-1]) if v.ndim == 2 else 1 + 0.1 * v).astype(np.float32)
                            for k, v in hf_weights(rng, "qwen2").items()}, "qwen2")
    types = {n: Q.Q5_0 for n, v in stored.items() if v.ndim == 2}
    types.update({"layers/0/wv": Q.Q8_0, "layers/1/wv": Q.Q8_0, "output": Q.Q8_0})
    raw = write_gguf(tmp_path / "q5.gguf", "qwen2", stored, types)
    convert(tmp_path / "q5.gguf", tmp_path / "m.h5", None, None)
    err = capsys.readouterr().err
    assert "note: Q5_0 x 13 tensor(s) -> q50: kept bit-exact" in err, err  # 6 a layer and the embedding
    assert "re-quantized" not in err, err
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert (f.attrs["weight_type"], f.attrs["tensor_types"]) == ("q50", "output=q80,wv=q80")
        assert f.attrs["format_version"] == 2  # a reader from before q50 says the file is newer than it
        for name, kind in types.items():
            expected = raw[name]
            if name.rsplit("/", 1)[-1] in ("wq", "wk"):
                expected = halves_to_interleaved(expected, HEAD_DIM)
            assert f[name].attrs["type"] == ("q50" if kind == Q.Q5_0 else "q80"), name
            assert f[name][()].tobytes() == np.ascontiguousarray(expected).tobytes(), name
    assert_float_reference_logits(tmp_path, raw, types, stored, "qwen2")
    spec, tensors = read_dense(tmp_path / "m.h5")
    dense = DenseModel(spec, tensors, "q80", "f32")
    job = open_job(Comm(), tmp_path / "m.h5", (1,), buffer_type="q80", max_seq_len=8, kv_type="f32")
    for pos, token in enumerate((1, 5, 260, 77)):
        got, expected = job.engine.forward(token, pos), dense.forward(token, pos)
        # the products are their twins' bit for bit (the logits were equal when measured); numpy's norms and
        # attention may round otherwise and move an 8-bit activation code by one: test_engine's tolerance
        assert np.abs(got - expected).max() <= 2e-2 * np.abs(expected).max(), pos


@pytest.mark.jobs
def test_a_q4_k_m_model_gives_the_same_bits_on_1_2_and_3_ranks(tmp_path, k_dims):
    """With q80 buffers (Q8K activations, a stack of mixed types in parts, whole vectors in transit)."""
    path, *_ = q4km_like(tmp_path, np.random.default_rng(15))
    assert_same_bits_on_1_2_and_3_ranks(tmp_path, path)


def assert_same_bits_on_1_2_and_3_ranks(tmp_path, path) -> None:
    """A GGUF converted with the defaults: the same logits and greedy ids on 1, 2 and 3 ranks (q80 buffers)."""
    import sys

    from conftest import REPO, run_mpiexec

    from dllama_mpi.files.convert import convert

    convert(path, tmp_path / "m.h5", None, None)
    dumps = []
    for n, budgets in ((1, ["1"]), (2, ["1", "1"]), (3, ["3", "1", "2"])):
        out = tmp_path / f"dump{n}.npz"
        result = run_mpiexec(n, [sys.executable, str(REPO / "tests" / "engine_dump.py"), str(tmp_path / "m.h5"), str(out),
                                 "--budgets", *budgets, "--tokens", "1", "5", "260", "77", "--steps", "8",
                                 "--buffer", "q80"], timeout=180)
        assert result.returncode == 0, result.stderr
        dumps.append(np.load(out))
    for other in dumps[1:]:
        np.testing.assert_array_equal(other["logits"].view(np.uint32), dumps[0]["logits"].view(np.uint32))
        assert other["greedy"].tolist() == dumps[0]["greedy"].tolist()


def test_choose_types_keeps_what_runs_per_tensor():
    from dllama_mpi.files.convert import choose_types

    q4km = {}
    for layer in range(3):
        q4km.update({f"layers/{layer}/{k}": "Q4_K" for k in ("wq", "wk", "wo", "w1", "w3")})
        q4km[f"layers/{layer}/wv"] = "Q6_K" if layer == 1 else "Q4_K"
        q4km[f"layers/{layer}/w2"] = "Q6_K" if layer != 1 else "Q4_K"
    q4km.update({"tok_embeddings": "Q4_K", "output": "Q6_K"})
    weight_type, tensor_types, notes = choose_types(q4km)
    # w2 is Q6_K in layers 0 and 2 (q6k for the kind, layer 1 its exception); layer 1's wv stays q6k beside
    # its stack's q4k wq and wk (the engine runs a stack's parts of different types one after another)
    assert (weight_type, tensor_types) == ("q4k", "output=q6k,w2=q6k,layers/1/w2=q4k,layers/1/wv=q6k")
    assert notes == ["Q4_K x 19 tensor(s) -> q4k: kept bit-exact", "Q6_K x 4 tensor(s) -> q6k: kept bit-exact"]
    q40 = {f"layers/0/{k}": "Q4_0" for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")}
    assert choose_types({**q40, "output": "Q6_K", "tok_embeddings": "Q4_0"})[:2] == ("q40", "output=q6k")
    assert choose_types({**q40, "output": "Q5_K", "tok_embeddings": "Q4_0"})[:2] == ("q40", "output=q5k")
    assert choose_types({**q40, "output": "Q3_K", "tok_embeddings": "Q4_0"})[:2] == ("q40", "output=q80")  # no kernels: q80
    # Q4_K_M's Q5_0 where rows are not whole super-blocks (Qwen2.5-0.5B's 896): kept
    assert choose_types({**q40, "layers/0/w1": "Q5_0"}) == ("q40", "w1=q50", ["Q4_0 x 6 tensor(s) -> q40: kept bit-exact",
                                                                          "Q5_0 x 1 tensor(s) -> q50: kept bit-exact"])
    assert choose_types({**q40, "layers/0/wv": "Q8_0"})[:2] == ("q40", "wv=q80")
    bf16 = {f"layers/0/{k}": "BF16" for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")}
    assert choose_types(bf16) == ("f32", "", ["BF16 x 7 tensor(s) -> f32: widened"])
    assert choose_types({**q40, "output": "F16"})[2][0] == "F16 x 1 tensor(s) -> f16: kept bit-exact"
    q4k = {f"layers/0/{k}": "Q4_K" for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")}
    # a kind may differ per layer: layer 1's Q4_0 w2 stays q40
    assert choose_types({**q4k, "output": "Q6_K", "layers/1/w2": "Q4_0"})[:2] == ("q4k", "output=q6k,layers/1/w2=q40")
    # Q4_0 and Q4_K in one stack: each its own
    assert choose_types({**q4k, "layers/0/wv": "Q4_0"})[:2] == ("q4k", "wv=q40")


@pytest.mark.parametrize(("extra", "message"), [
    (lambda w: (w.add_expert_count(4), w.add_expert_used_count(2), w.add_expert_shared_count(1)), "shared experts"),
    (lambda w: (w.add_expert_count(4), w.add_expert_used_count(5)), r"expert_used_count <= llama.expert_count, found 5 of 4"),
    (lambda w: (w.add_expert_count(4), w.add_expert_used_count(2), w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)),
     "gating function 2"),
])
def test_mixtures_of_experts_it_cannot_run_are_refused_before_converting(tmp_path, extra, message):
    path = tmp_path / "moe.gguf"
    write_gguf(path, "llama", stored_layout(hf_weights(np.random.default_rng(4), "llama"), "llama"), extra=extra)
    with pytest.raises(ConvertError, match=message):
        gguf_model.read(path, None)


def test_a_mixture_of_experts_gguf_saying_expert_weights_norm_is_read_as_llama_cpp_runs_it(tmp_path):
    """gguf-py writes expert_weights_norm as a bool; llama.cpp's qwen3moe and llama builds
    renormalise whatever it says, and so do we."""
    path = tmp_path / "moe.gguf"
    extra = lambda w: (w.add_expert_count(4), w.add_expert_used_count(2), w.add_expert_weights_norm(False))  # noqa: E731
    write_gguf(path, "llama", stored_layout(hf_weights(np.random.default_rng(4), "llama"), "llama"), extra=extra)
    fields = gguf_model.read(path, None).spec_fields
    assert (fields["architecture"], fields["n_experts"], fields["n_experts_used"], fields["expert_weights_norm"]) == \
        ("mixtral", 4, 2, True)


def test_an_old_mixtral_gguf_with_a_tensor_per_expert_says_to_convert_it_again():
    with pytest.raises(ConvertError, match="convert the model again with a current llama.cpp"):
        gguf_model._map_name("blk.0.ffn_gate.3.weight")
