"""Hugging Face model directories: config.json + *.safetensors (+ tokenizer files).

model_type llama, mistral, qwen2 (q/k/v biases), qwen3 (per-head q/k RMSNorm), and the
mixtures of experts qwen3_moe and mixtral (experts one tensor each, as the Hub holds them). Tensors are
memory-mapped and read one at a time; q/k rows are permuted from HF's rotate-halves RoPE
layout to the engine's interleaved pairs.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from . import ConvertError
from .rope import halves_to_interleaved

FORMAT_NAME = "Hugging Face model directory (config.json + safetensors)"
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
ARCHITECTURE = {"qwen3_moe": "qwen3moe"}  # our name where it differs from model_type
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def sniff(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


class SafetensorsFiles:
    """Every tensor of a (possibly sharded) safetensors checkpoint, memory-mapped."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConvertError(f"{index} has no weight_map of tensor names to file names")
            self.files = [directory / n for n in sorted(set(weight_map.values()))]
        else:
            self.files = sorted(directory.glob("*.safetensors"))
        if not self.files:
            raise ConvertError(f"{directory} has no *.safetensors files; save the model with safe_serialization=True")
        self.where: dict[str, tuple[Path, dict, int]] = {}
        for f in self.files:
            for name, (meta, offset) in _safetensors_header(f).items():
                self.where[name] = (f, meta, offset)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...]) -> LazyTensor:
        """One tensor of the dense `shape` config.json implies, read lazily through a memory
        map (see LazyTensor)."""
        if name not in self.where:
            raise ConvertError(f"tensor {name} not found in the safetensors files")
        f, meta, base = self.where[name]
        if meta["dtype"] not in _DTYPES:
            raise ConvertError(f"tensor {name} has dtype {meta['dtype']}; supported: {', '.join(_DTYPES)}")
        if tuple(meta["shape"]) != shape:
            raise ConvertError(f"{f}: tensor {name} has shape {tuple(meta['shape'])}, config.json implies {shape}")
        return LazyTensor(f, base + meta["data_offsets"][0], shape, meta["dtype"])

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return self.get(name, shape)[:]


def _safetensors_header(path: Path) -> dict[str, tuple[dict, int]]:
    """{name: (meta, file offset of its data)}; each tensor's dtype, shape and byte range
    checked against each other and the file's size."""
    if not path.is_file():
        raise ConvertError(f"{path} is missing (named by the checkpoint's index)")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
        if n is None or 8 + n > size:
            raise ConvertError(f"{path} is truncated (its safetensors header runs past the end of the file)")
        header = _json(fh.read(n), path)
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: the safetensors header is not a JSON object")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        shape, offsets, dtype = (meta.get(k) for k in ("shape", "data_offsets", "dtype")) if isinstance(meta, dict) \
            else (None, None, None)
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and isinstance(dtype, str)):
            raise ConvertError(f"{path}: tensor {name!r} has a malformed entry in the safetensors header: {meta!r}")
        if dtype in _DTYPES and offsets[1] - offsets[0] != np.dtype(_DTYPES[dtype]).itemsize * int(np.prod(shape)):
            raise ConvertError(f"{path}: tensor {name!r} of shape {shape} {dtype} spans {offsets[1] - offsets[0]} bytes")
        if not 0 <= offsets[0] <= offsets[1] or 8 + n + offsets[1] > size:
            raise ConvertError(f"{path} is truncated: tensor {name!r} runs to byte {8 + n + offsets[1]} but the file "
                               f"has {size} bytes; copy or download it again")
        out[name] = (meta, 8 + n)
    return out


def read_json(path: Path) -> dict:
    """A JSON object from a file; ConvertError if it is none."""
    data = _json(path.read_bytes(), path)
    if not isinstance(data, dict):
        raise ConvertError(f"{path} is not a JSON object")
    return data


def _json(raw: bytes, path: Path):
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{path} is not valid JSON ({exc})") from None


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


def _spec_fields(config: dict, path: Path) -> dict:
    def number(key: str, kind, default=None, where: dict = config):
        value = where.get(key)
        value = default if value is None else value  # a null in config.json means the default too
        if value is None:
            raise ConvertError(f"{path} lacks {key!r}; is it a transformers model's config?")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (kind is int and not float(value).is_integer()):
            raise ConvertError(f"{path}: {key} is {value!r}, expected a {'whole' if kind is int else 'finite'} number")
        return kind(value)

    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConvertError(f"model_type {model_type!r} is not supported; supported: {', '.join(MODEL_TYPES)}")
    if config.get("mlp_bias") or (model_type != "qwen2" and config.get("attention_bias")):
        raise ConvertError("models with MLP biases or an output-projection bias are not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
    # transformers >= 5 writes rope_parameters (theta inside); earlier, rope_theta + rope_scaling
    for key in ("rope_parameters", "rope_scaling"):
        if not isinstance(config.get(key) or {}, dict):
            raise ConvertError(f"{path}: {key} is {config[key]!r}, expected an object")
    rope = config.get("rope_parameters") or {**(config.get("rope_scaling") or {}),
                                             "rope_theta": config.get("rope_theta", 10000.0)}
    dim, n_heads = number("hidden_size", int), number("num_attention_heads", int)
    hidden_key = "moe_intermediate_size" if model_type == "qwen3_moe" else "intermediate_size"
    fields = {
        "architecture": ARCHITECTURE.get(model_type, model_type), "dim": dim, "hidden_dim": number(hidden_key, int),
        "n_layers": number("num_hidden_layers", int), "n_heads": n_heads,
        "n_kv_heads": number("num_key_value_heads", int, n_heads),
        "head_dim": number("head_dim", int, dim // n_heads if n_heads > 0 else 0),
        "vocab_size": number("vocab_size", int), "seq_len": number("max_position_embeddings", int, 2048),
        "norm_eps": number("rms_norm_eps", float, 1e-6), "rope_theta": number("rope_theta", float, 10000.0, rope),
        "qkv_bias": model_type == "qwen2", "qk_norm": model_type in ("qwen3", "qwen3_moe"),
    }
    if model_type in ("qwen3_moe", "mixtral"):
        fields.update(_experts(config, path, number))
    kind = rope.get("rope_type", rope.get("type"))
    if kind == "llama3":
        fields.update(rope_scaling="llama3", rope_scaling_factor=number("factor", float, where=rope),
                      rope_low_freq_factor=number("low_freq_factor", float, where=rope),
                      rope_high_freq_factor=number("high_freq_factor", float, where=rope),
                      rope_original_max_position=number("original_max_position_embeddings", int, where=rope))
    elif kind not in (None, "default"):
        raise ConvertError(f"rope_scaling type {kind!r} is not supported (supported: llama3)")
    return fields


def _experts(config: dict, path: Path, number) -> dict:
    """A mixture of experts' spec fields: Qwen3-MoE's and Mixtral's softmax over the router
    logits, top-k, renormalised (Mixtral always, Qwen3-MoE with norm_topk_prob); every layer
    sparse."""
    qwen = config["model_type"] == "qwen3_moe"
    # the Hub's Qwen3-MoE configs say num_experts, transformers >= 5 writes num_local_experts for both
    n_experts = number("num_experts" if qwen and "num_experts" in config else "num_local_experts", int)
    if qwen and (config.get("mlp_only_layers") or number("decoder_sparse_step", int, 1) != 1):
        raise ConvertError(f"{path}: dense layers among the expert layers (mlp_only_layers, decoder_sparse_step) "
                           "are not supported")
    return {"n_experts": n_experts, "n_experts_used": number("num_experts_per_tok", int),
            # transformers' Qwen3MoeConfig default (False) where the config leaves it out; the Hub's say true
            "expert_weights_norm": bool(config.get("norm_topk_prob", False)) if qwen else True}


def config_spec_fields(path: Path) -> dict:
    """The spec fields of a model directory from its config.json (a dry run before the weights
    or the tokenizer are downloaded); the classifier is shared where the config says so or,
    where the weights' headers can be read, where they hold no lm_head."""
    config = read_json(path / "config.json")
    tied = bool(config.get("tie_word_embeddings", False))
    try:
        tied = tied or "lm_head.weight" not in SafetensorsFiles(path)
    except ConvertError:  # no weights yet, or some shards still missing: the config alone
        pass
    return {**_spec_fields(config, path / "config.json"), "shared_classifier": tied}


def read(path: Path, tokenizer_path=None):
    from ...model.spec import ModelSpec
    from ..modelfile import tensor_layout
    from ..tokenizer import from_hf_dir
    from . import Source

    config = read_json(path / "config.json")
    fields = _spec_fields(config, path / "config.json")
    weights = SafetensorsFiles(path)
    tied = config.get("tie_word_embeddings", False) or "lm_head.weight" not in weights
    fields["shared_classifier"] = bool(tied)
    tokenizer = from_hf_dir(Path(tokenizer_path) if tokenizer_path else path)
    hd = fields["head_dim"]
    layout = tensor_layout(ModelSpec(**fields))
    n_experts = fields.get("n_experts", 0)
    expert_names = (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")) \
        if fields["architecture"] == "qwen3moe" else (("w1", "w1"), ("w2", "w2"), ("w3", "w3"))

    def tensors():
        def get(hf_name: str, ours: str):
            return weights.get(hf_name, layout[ours].shape)

        def interleaved(hf_name: str, ours: str) -> np.ndarray:
            return halves_to_interleaved(weights.array(hf_name, layout[ours].shape), hd)

        yield "tok_embeddings", get("model.embed_tokens.weight", "tok_embeddings")
        for i in range(fields["n_layers"]):
            hf, ours = f"model.layers.{i}.", f"layers/{i}/"
            yield ours + "attention_norm", get(hf + "input_layernorm.weight", ours + "attention_norm")
            for proj, name in (("q", "wq"), ("k", "wk")):
                yield ours + name, interleaved(f"{hf}self_attn.{proj}_proj.weight", ours + name)
            yield ours + "wv", get(hf + "self_attn.v_proj.weight", ours + "wv")
            yield ours + "wo", get(hf + "self_attn.o_proj.weight", ours + "wo")
            if fields["qkv_bias"]:
                yield ours + "bq", interleaved(hf + "self_attn.q_proj.bias", ours + "bq")
                yield ours + "bk", interleaved(hf + "self_attn.k_proj.bias", ours + "bk")
                yield ours + "bv", get(hf + "self_attn.v_proj.bias", ours + "bv")
            if fields["qk_norm"]:
                yield ours + "q_norm", interleaved(hf + "self_attn.q_norm.weight", ours + "q_norm")
                yield ours + "k_norm", interleaved(hf + "self_attn.k_norm.weight", ours + "k_norm")
            yield ours + "ffn_norm", get(hf + "post_attention_layernorm.weight", ours + "ffn_norm")
            if not n_experts:
                yield ours + "w1", get(hf + "mlp.gate_proj.weight", ours + "w1")
                yield ours + "w2", get(hf + "mlp.down_proj.weight", ours + "w2")
                yield ours + "w3", get(hf + "mlp.up_proj.weight", ours + "w3")
                continue
            moe = hf + ("mlp." if fields["architecture"] == "qwen3moe" else "block_sparse_moe.")
            if f"{moe}experts.gate_up_proj" in weights:
                raise ConvertError(f"{path}: the experts are stored fused ({moe}experts.gate_up_proj: transformers' "
                                   "in-memory layout), not one tensor each as the Hub holds them; save the model "
                                   "again with save_pretrained (it writes them one each) or convert a GGUF of it")
            yield ours + "router", get(moe + "gate.weight", ours + "router")
            for e in range(n_experts):
                for kind, name in expert_names:
                    yield f"{ours}experts/{e}/{kind}", get(f"{moe}experts.{e}.{name}.weight", f"{ours}experts/{e}/{kind}")
        yield "norm", get("model.norm.weight", "norm")
        if not tied:
            yield "output", get("lm_head.weight", "output")

    files = [path / "config.json", *weights.files]
    files += [f for f in (path / "tokenizer.json", path / "tokenizer_config.json") if f.exists()]
    return Source(fields, tensors, tokenizer, f"Hugging Face {config['model_type']} model {path.name}", files)
