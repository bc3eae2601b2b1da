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
    d = tmp_path_factory.mktemp(request.param)
    hf_dir = d / "hf"
    model = _build(request.param, hf_dir)
    logits, greedy = _reference(model)
    out = d / "model.h5"
    convert(hf_dir, out, None, "f32")
    return request.param, out, logits, greedy


@pytest.mark.jobs
@pytest.mark.parametrize("n, budgets", [(1, ["1"]), (3, ["3", "1", "2"])])
def test_engine_matches_transformers(converted, n, budgets, tmp_path):
    model_type, path, expected, expected_greedy = converted
    out = tmp_path / "dump.npz"
    result = run_mpiexec(n, [sys.executable, str(REPO / "tests" / "engine_dump.py"), str(path), str(out),
                             "--budgets", *budgets, "--tokens", *map(str, PROMPT), "--steps", str(STEPS), "--kv-type", "f32"],
                          timeout=300)  # f32 keys and values, as transformers holds them
    assert result.returncode == 0, result.stderr
    got = np.load(out)
    scale = np.abs(expected).max()
    assert np.abs(got["logits"] - expected).max() <= 1e-4 * scale, model_type
    assert got["greedy"].tolist() == expected_greedy, model_type


def test_sharded_checkpoint_was_exercised(converted):
    model_type, path, _, _ = converted
    hf_dir = path.parent / "hf"
    if model_type == "llama":
        assert (hf_dir / "model.safetensors.index.json").exists() and len(list(hf_dir.glob("*.safetensors"))) > 1


def test_spec_records_the_architecture(converted):
    from dllama_mpi.files.modelfile import ModelFile

    model_type, path, _, _ = converted
    spec = ModelFile(path).spec
    assert spec.architecture == ARCHITECTURE.get(model_type, model_type) and spec.rope_style == "interleaved"
    assert spec.qkv_bias == (model_type == "qwen2") and spec.qk_norm == (model_type in ("qwen3", "qwen3_moe"))
    assert (spec.n_experts, spec.n_experts_used) == {"qwen3_moe": (6, 2), "mixtral": (4, 2)}.get(model_type, (0, 0))
    assert (spec.rope_scaling == "llama3") == (model_type == "llama")
