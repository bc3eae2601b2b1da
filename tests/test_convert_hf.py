"""Hugging Face checkpoints: tiny random models built with transformers, converted, and run
by the engine on 1 and 3 ranks against transformers' own forward pass."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_mpiexec

torch = pytest.importorskip("torch", reason="the HF tests need torch (pip install '.[test]')")
transformers = pytest.importorskip("transformers", reason="the HF tests need transformers (pip install '.[test]')")

from dllama_mpi.files.convert import convert  # noqa: E402
from dllama_mpi.files.synthetic import write_hf_tokenizer  # noqa: E402

PROMPT = [1, 17, 250, 3, 99, 42, 7, 180, 260, 11, 5, 77, 123, 64, 31, 2, 8, 200, 150, 9]  # 20 tokens
STEPS = 32
# dims that are multiples of 32 but not of 64 (96, 160, 288); head_dim != dim / n_heads for qwen3
MODELS = {
    "llama": dict(cls="LlamaForCausalLM", cfg="LlamaConfig", hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=3, num_key_value_heads=1, vocab_size=320, tie_word_embeddings=False,
                  rope_theta=50000.0, max_position_embeddings=128,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": dict(cls="MistralForCausalLM", cfg="MistralConfig", hidden_size=128, intermediate_size=288,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                    tie_word_embeddings=True, max_position_embeddings=128, sliding_window=None),
    "qwen2": dict(cls="Qwen2ForCausalLM", cfg="Qwen2Config", hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, vocab_size=320, tie_word_embeddings=True,
                  max_position_embeddings=128, rope_theta=1000000.0),
    "qwen3": dict(cls="Qwen3ForCausalLM", cfg="Qwen3Config", hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=320,
                  tie_word_embeddings=False, max_position_embeddings=128),
    # mixtures of experts: the experts' hidden width (64, 96) beside the dense width config.json also has
    "qwen3_moe": dict(cls="Qwen3MoeForCausalLM", cfg="Qwen3MoeConfig", hidden_size=96, intermediate_size=160,
                      moe_intermediate_size=64, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=320,
                      tie_word_embeddings=False, max_position_embeddings=128),
    "mixtral": dict(cls="MixtralForCausalLM", cfg="MixtralConfig", hidden_size=128, intermediate_size=96,
                    num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=320, tie_word_embeddings=False, max_position_embeddings=128),
}
ARCHITECTURE = {"qwen3_moe": "qwen3moe"}  # ours, where it differs from model_type


def _build(model_type: str, directory: Path):
    params = dict(MODELS[model_type])
    cls, cfg = getattr(transformers, params.pop("cls")), getattr(transformers, params.pop("cfg"))
    torch.manual_seed(0)
    config = cfg(**params, bos_token_id=1, eos_token_id=2)
    model = cls(config).eval()
    with torch.no_grad():  # norms and biases away from their trivial init, so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
            if name.endswith(".gate.weight"):  # a router: logits far apart, so no near-tie decides a choice
                p.mul_(50)
    # llama: several safetensors files with model.safetensors.index.json
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="100KB" if model_type == "llama" else "1GB")
    write_hf_tokenizer(directory, 300, ["Once upon a time there was a tiny model.", "It ran on three ranks."] * 20)
    return model


def _reference(model):
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(ids).logits[0].numpy()
        seq = list(PROMPT)
        for _ in range(STEPS):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return logits, seq[len(PROMPT):]


@pytest.fixture(scope="module", params=list(MODELS))
def converted(request, tmp_path_factory):
    """(model type, converted file, transformers' model)."""
    d = tmp_path_factory.mktemp(request.param)
    hf_dir = d / "hf"
    model = _build(request.param, hf_dir)
    out = d / "model.h5"
    convert(hf_dir, out, None, "f32")
    return request.param, out, model


@pytest.fixture(scope="module")
def reference(converted):
    """transformers' logits and greedy tokens, computed only where a test compares with them (the
    unit tier's checks of the converted file don't: 33 forward passes, a second a model)."""
    return _reference(converted[2])


@pytest.mark.jobs
@pytest.mark.parametrize("n, budgets", [(1, ["1"]), (3, ["3", "1", "2"])])
def test_engine_matches_transformers(converted, reference, n, budgets, tmp_path):
    model_type, path, _ = converted
    expected, expected_greedy = reference
    out = tmp_path / "dump.npz"
    result = run_mpiexec(n, [sys.executable, str(REPO / "tests" / "engine_dump.py"), str(path), str(out),
                             "--budgets", *budgets, "--tokens", *map(str, PROMPT), "--steps", str(STEPS), "--kv-type", "f32"],
                          timeout=300)  # f32 keys and values, as transformers holds them
    assert result.returncode == 0, result.stderr
    got = np.load(out)
    scale = np.abs(expected).max()
    assert np.abs(got["logits"] - expected).max() <= 1e-4 * scale, model_type
    assert got["greedy"].tolist() == expected_greedy, model_type


@pytest.mark.parametrize("converted", ["llama"], indirect=True)  # the model saved in several files (see _build)
def test_sharded_checkpoint_was_exercised(converted):
    _, path, _ = converted
    hf_dir = path.parent / "hf"
    assert (hf_dir / "model.safetensors.index.json").exists() and len(list(hf_dir.glob("*.safetensors"))) > 1


def test_spec_records_the_architecture(converted):
    from dllama_mpi.files.modelfile import ModelFile

    model_type, path, _ = converted
    spec = ModelFile(path).spec
    assert spec.architecture == ARCHITECTURE.get(model_type, model_type) and spec.rope_style == "interleaved"
    assert spec.qkv_bias == (model_type == "qwen2") and spec.qk_norm == (model_type in ("qwen3", "qwen3_moe"))
    assert (spec.n_experts, spec.n_experts_used) == {"qwen3_moe": (6, 2), "mixtral": (4, 2)}.get(model_type, (0, 0))
    assert (spec.rope_scaling == "llama3") == (model_type == "llama")


def _write_moe_gguf(model, model_type: str, hf_dir: Path, path: Path, expert_type) -> dict:
    """The transformers model saved in hf_dir as llama.cpp's convert_hf_to_gguf writes it:
    qwen3moe (q/k as they are: NEOX RoPE) or Mixtral as arch llama (q/k rows permuted to
    interleaved pairs), each layer's experts stacked into one (experts, rows, cols) tensor of
    `expert_type`. Returns the stacked expert tensors as written, by GGUF name."""
    import gguf
    from safetensors.numpy import load_file

    from dllama_mpi.files.convert.hf import config_spec_fields
    from dllama_mpi.model.spec import ModelSpec
    from llamacpp_compare import add_llama_metadata

    c = model.config
    qwen = model_type == "qwen3_moe"
    arch = "qwen3moe" if qwen else "llama"
    sd = {}  # the Hub's layout, one tensor an expert (transformers >= 5 fuses them in memory)
    for f in sorted(hf_dir.glob("*.safetensors")):
        sd.update(load_file(f))
    w = gguf.GGUFWriter(str(path), arch)
    spec = ModelSpec(**config_spec_fields(hf_dir))
    add_llama_metadata(w, spec)  # the hyperparameters as the tool writes them

    def permute(a: np.ndarray, n_head: int) -> np.ndarray:  # convert_hf_to_gguf's LlamaModel.permute
        return a.reshape(n_head, 2, a.shape[0] // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    stacked = {}
    for i in range(c.num_hidden_layers):
        hf, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = sd[hf + "self_attn.q_proj.weight"], sd[hf + "self_attn.k_proj.weight"]
        if not qwen:
            q, k = permute(q, c.num_attention_heads), permute(k, c.num_key_value_heads)
        for name, array in (("attn_norm", sd[hf + "input_layernorm.weight"]), ("attn_q", q), ("attn_k", k),
                            ("attn_v", sd[hf + "self_attn.v_proj.weight"]), ("attn_output", sd[hf + "self_attn.o_proj.weight"]),
                            ("ffn_norm", sd[hf + "post_attention_layernorm.weight"])):
            w.add_tensor(f"{b}{name}.weight", array)
        if qwen:
            w.add_tensor(b + "attn_q_norm.weight", sd[hf + "self_attn.q_norm.weight"])
            w.add_tensor(b + "attn_k_norm.weight", sd[hf + "self_attn.k_norm.weight"])
        moe = hf + ("mlp." if qwen else "block_sparse_moe.")
        w.add_tensor(b + "ffn_gate_inp.weight", sd[moe + "gate.weight"])
        names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"} if qwen else {"gate": "w1", "up": "w3", "down": "w2"}
        for ggml, theirs in names.items():
            array = np.stack([sd[f"{moe}experts.{e}.{theirs}.weight"] for e in range(spec.n_experts)])
            if expert_type != gguf.GGMLQuantizationType.F32:
                array = gguf.quants.quantize(array, expert_type)
            stacked[f"{b}ffn_{ggml}_exps.weight"] = array
            w.add_tensor(f"{b}ffn_{ggml}_exps.weight", array, raw_dtype=expert_type)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stacked


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_a_mixture_of_experts_gguf_gives_the_hugging_face_conversions_logits(tmp_path, model_type):
    """The same model through llama.cpp's GGUF layout (experts stacked, Mixtral as arch llama
    with permuted q/k) and through the Hugging Face reader: the same logits, bit for bit; its
    Q8_0 experts are kept bit-exact, one matrix per expert."""
    import gguf

    from dllama_mpi.files.modelfile import ModelFile
    from dllama_mpi.job.loading import open_job
    from dllama_mpi.model import quant
    from dllama_mpi.parallel.comm import Comm

    model = _build(model_type, tmp_path / "hf")
    _write_moe_gguf(model, model_type, tmp_path / "hf", tmp_path / "m.gguf", gguf.GGMLQuantizationType.F32)
    logits = {}
    for name, src in (("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf")):
        convert(src, tmp_path / f"{name}.h5", None, "f32")
        job = open_job(Comm(), tmp_path / f"{name}.h5", (1,), buffer_type="f32", max_seq_len=8, kv_type="f32")
        logits[name] = np.stack([job.engine.forward(t, pos).copy() for pos, t in enumerate(PROMPT[:6])])
    assert np.abs(logits["hf"]).max() > 0.1
    np.testing.assert_array_equal(logits["gguf"], logits["hf"])

    stacked = _write_moe_gguf(model, model_type, tmp_path / "hf", tmp_path / "q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    convert(tmp_path / "q8.gguf", tmp_path / "q8.h5", None, None)
    stored = ModelFile(tmp_path / "q8.h5")
    try:
        assert stored.spec.tensor_type("w1", 0) == "q80" and stored.spec.architecture == ARCHITECTURE.get(model_type, model_type)
        for e in (0, stored.spec.n_experts - 1):
            got = stored.read(f"layers/1/experts/{e}/w2")
            assert got.dtype == quant.Q80 and np.array_equal(quant.as_bytes(got).reshape(got.shape[0], -1),
                                                             stacked["blk.1.ffn_down_exps.weight"][e])
    finally:
        stored.close()



def test_experts_stored_fused_are_refused_saying_how_to_save_them(tmp_path):
    """transformers >= 5 holds a layer's experts fused in memory (experts.gate_up_proj); a
    checkpoint written from that state dict as it is can't be read expert by expert."""
    from safetensors.torch import save_file

    from dllama_mpi.files.convert import ConvertError

    model = _build("qwen3_moe", tmp_path / "hf")
    for f in (tmp_path / "hf").glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConvertError, match="stored fused .* save the model again with save_pretrained"):
        convert(tmp_path / "hf", tmp_path / "m.h5", None, "f32")
