"""Hugging Face model directories: config.json + *.safetensors (+ tokenizer files).

model_type llama, mistral, qwen2 (q/k/v biases), qwen3 (per-head q/k RMSNorm). Tensors are
memory-mapped and read one at a time; q/k rows are permuted from HF's rotate-halves RoPE
layout to the engine's interleaved pairs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .rope import halves_to_interleaved

FORMAT_NAME = "Hugging Face model directory (config.json + safetensors)"
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def sniff(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


class SafetensorsFiles:
    """Every tensor of a (possibly sharded) safetensors checkpoint, memory-mapped."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            self.files = [directory / n for n in names]
        else:
            self.files = sorted(directory.glob("*.safetensors"))
        if not self.files:
            raise ValueError(f"{directory} has no *.safetensors files; save the model with safe_serialization=True")
        self.where: dict[str, tuple[Path, dict, int]] = {}
        for f in self.files:
            with open(f, "rb") as fh:
                raw = fh.read(8)
                if len(raw) < 8:
                    raise ValueError(f"{f} is truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", raw)
                header = json.loads(fh.read(n))
            for name, meta in header.items():
                if name != "__metadata__":
                    self.where[name] = (f, meta, 8 + n)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> LazyTensor:
        """One tensor, read lazily through a memory map (see LazyTensor)."""
        if name not in self.where:
            raise ValueError(f"tensor {name} not found in the safetensors files")
        f, meta, base = self.where[name]
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name} has dtype {meta['dtype']}; supported: {', '.join(_DTYPES)}")
        return LazyTensor(f, base + meta["data_offsets"][0], tuple(meta["shape"]), meta["dtype"])

    def array(self, name: str) -> np.ndarray:
        return self.get(name)[:]


class LazyTensor:
    """Rows of a safetensors tensor on demand: each slice maps just its bytes, so reading a
    big tensor in row blocks keeps memory near one block (bf16 is widened to f32)."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: str):
        self.path, self.offset, self.shape, self._raw = path, offset, shape, np.dtype(_DTYPES[dtype])
        self.dtype = np.dtype(np.float32) if dtype == "BF16" else self._raw
        self._row = int(np.prod(shape[1:], dtype=np.int64))

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(self.shape[0])
        b = max(a, b)
        count = (b - a) * self._row
        if count == 0:
            return np.empty((0, *self.shape[1:]), self.dtype)
        data = np.memmap(self.path, dtype=self._raw, mode="r", offset=self.offset + a * self._row * self._raw.itemsize,
                         shape=(count,)).reshape(b - a, *self.shape[1:])
        if self._raw == np.uint16:  # bf16: the high half of an f32
            wide = data.astype(np.uint32)
            wide <<= 16
            return wide.view(np.float32)
        return np.array(data)


def _spec_fields(config: dict) -> dict:
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(MODEL_TYPES)}")
    if config.get("mlp_bias") or (model_type != "qwen2" and config.get("attention_bias")):
        raise ValueError("models with MLP biases or an output-projection bias are not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
    # transformers >= 5 writes rope_parameters (theta inside); earlier, rope_theta + rope_scaling
    rope = config.get("rope_parameters") or {**(config.get("rope_scaling") or {}),
                                             "rope_theta": config.get("rope_theta", 10000.0)}
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    fields = {
        "architecture": model_type, "dim": config["hidden_size"], "hidden_dim": config["intermediate_size"],
        "n_layers": config["num_hidden_layers"], "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads, "head_dim": head_dim,
        "vocab_size": config["vocab_size"], "seq_len": config.get("max_position_embeddings", 2048),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)), "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "qkv_bias": model_type == "qwen2", "qk_norm": model_type == "qwen3",
    }
    kind = rope.get("rope_type", rope.get("type"))
    if kind == "llama3":
        fields.update(rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
                      rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_max_position=int(rope["original_max_position_embeddings"]))
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: llama3)")
    return fields


def read(path: Path, tokenizer_path=None):
    from ..tokenizer import from_hf_dir
    from . import Source

    config = json.loads((path / "config.json").read_text())
    fields = _spec_fields(config)
    weights = SafetensorsFiles(path)
    tied = config.get("tie_word_embeddings", False) or "lm_head.weight" not in weights
    fields["shared_classifier"] = bool(tied)
    tokenizer = from_hf_dir(Path(tokenizer_path) if tokenizer_path else path)
    hd = fields["head_dim"]

    def tensors():
        yield "tok_embeddings", weights.get("model.embed_tokens.weight")
        for i in range(fields["n_layers"]):
            hf, ours = f"model.layers.{i}.", f"layers/{i}/"
            yield ours + "attention_norm", weights.get(hf + "input_layernorm.weight")
            for proj, name in (("q", "wq"), ("k", "wk")):
                yield ours + name, halves_to_interleaved(weights.array(f"{hf}self_attn.{proj}_proj.weight"), hd)
            yield ours + "wv", weights.get(hf + "self_attn.v_proj.weight")
            yield ours + "wo", weights.get(hf + "self_attn.o_proj.weight")
            if fields["qkv_bias"]:
                yield ours + "bq", halves_to_interleaved(weights.array(hf + "self_attn.q_proj.bias"), hd)
                yield ours + "bk", halves_to_interleaved(weights.array(hf + "self_attn.k_proj.bias"), hd)
                yield ours + "bv", weights.get(hf + "self_attn.v_proj.bias")
            if fields["qk_norm"]:
                yield ours + "q_norm", halves_to_interleaved(weights.array(hf + "self_attn.q_norm.weight"), hd)
                yield ours + "k_norm", halves_to_interleaved(weights.array(hf + "self_attn.k_norm.weight"), hd)
            yield ours + "ffn_norm", weights.get(hf + "post_attention_layernorm.weight")
            yield ours + "w1", weights.get(hf + "mlp.gate_proj.weight")
            yield ours + "w2", weights.get(hf + "mlp.down_proj.weight")
            yield ours + "w3", weights.get(hf + "mlp.up_proj.weight")
        yield "norm", weights.get("model.norm.weight")
        if not tied:
            yield "output", weights.get("lm_head.weight")

    files = [path / "config.json", *weights.files]
    files += [f for f in (path / "tokenizer.json", path / "tokenizer_config.json") if f.exists()]
    return Source(fields, tensors, tokenizer, f"Hugging Face {config['model_type']} model {path.name}", files)
