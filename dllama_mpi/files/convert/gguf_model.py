"""GGUF models (llama.cpp), architectures llama, qwen2, qwen3 and the mixtures of experts qwen3moe
and llama with experts (Mixtral).

Read memory-mapped by gguf_file.GGUFFile. Layout facts (checked in llama.cpp's source,
convert_hf_to_gguf.py and llama_model_rope_type):

* GGUF lists dims reversed (ne[0] is the row length); GGUFFile hands numpy arrays in
  (rows, cols) order, and quantized tensors as (rows, row bytes) uint8.
* arch llama: convert_hf_to_gguf's LlamaModel.permute turns the Hugging Face q/k rows
  (halves) into interleaved pairs, and llama.cpp rotates llama with LLAMA_ROPE_TYPE_NORM
  (consecutive pairs): the tensors are already in this engine's layout.
* arch qwen2 / qwen3: no permute, LLAMA_ROPE_TYPE_NEOX (pairs offset by n_rot/2): q/k
  weights, biases and q/k norms go through rope.halves_to_interleaved.
* llama3 RoPE scaling is not metadata: the converter bakes it into a `rope_freqs` tensor
  (head_dim/2 per-pair divisors); the parameters are recovered from it here.
* Q4_0 / Q5_0 / Q8_0 / Q4_K / Q5_K / Q6_K blocks are llama.cpp's block_q4_0 / block_q5_0 /
  block_q8_0 / block_q4_K / block_q5_K / block_q6_K = quant.Q40 / Q50 / Q80 / Q4K / Q5K / Q6K, passed through
  bit-exact (quant.gguf_type); other quantized types are dequantized to f32 here. Each
  matrix's GGUF type goes to the converter (Source.native_types), which decides and says
  what it becomes (convert.choose_types).
* A mixture of experts stores each FFN matrix of a layer as one tensor of every expert,
  ne (cols, rows, experts) -> (experts, rows, ...): it is written as one matrix per expert
  (layers/N/experts/E/w1), typed as the layer's kind (layers/N/w1); the router ffn_gate_inp
  (experts, dim) is an f32 vector of the layer.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ...model import quant
from ..gguf_file import MAGIC, GGUFError, GGUFFile
from . import MATRICES, ConvertError
from .rope import halves_to_interleaved

FORMAT_NAME = "GGUF (llama.cpp)"
ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe")  # llama with experts: Mixtral
HALVES_ARCHS = ("qwen2", "qwen3", "qwen3moe")  # llama.cpp rotates these with NEOX RoPE (halves)

_GLOBAL_TENSORS = {"token_embd.weight": "tok_embeddings", "output_norm.weight": "norm", "output.weight": "output"}
_LAYER_TENSORS = {
    "attn_norm.weight": "attention_norm", "attn_q.weight": "wq", "attn_k.weight": "wk",
    "attn_v.weight": "wv", "attn_output.weight": "wo", "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "w1", "ffn_down.weight": "w2", "ffn_up.weight": "w3",
    "attn_q.bias": "bq", "attn_k.bias": "bk", "attn_v.bias": "bv",
    "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
}
# a mixture of experts' tensors: the router, and each FFN matrix of every expert as one (E, rows, cols) tensor
_EXPERT_TENSORS = {"ffn_gate_exps.weight": "w1", "ffn_down_exps.weight": "w2", "ffn_up_exps.weight": "w3"}
_LAYER_TENSORS["ffn_gate_inp.weight"] = "router"
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
_ROPE_ROWS = {"wq", "wk", "bq", "bk", "q_norm", "k_norm"}
# Llama 3.1 / 3.2 rope_scaling defaults (low, high, original context), tried before a fit
_LLAMA3_CANDIDATES = ((1.0, 4.0, 8192),)


def sniff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def open_gguf(path: Path) -> GGUFFile:
    """The GGUF file at `path`, its metadata read and its tensors mapped (a truncated or damaged
    file is named as such)."""
    try:
        return GGUFFile(path)
    except GGUFError as exc:
        raise ConvertError(str(exc)) from None


def _map_name(name: str) -> str | None:
    """Our tensor name for a llama.cpp one; None for tensors read but not stored."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    if name == "rope_freqs.weight":
        return None
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"layers/{int(m.group(1))}/{_LAYER_TENSORS[m.group(2)]}"
    if m and m.group(2) in _EXPERT_TENSORS:  # "layers/N/w1": its experts' kind, as the converter types it
        return f"layers/{int(m.group(1))}/{_EXPERT_TENSORS[m.group(2)]}"
    if m and re.fullmatch(r"ffn_(gate|down|up)\.\d+\.weight", m.group(2)):
        raise ConvertError(f"GGUF tensor {name!r}: experts stored one tensor each (an old Mixtral GGUF) are not "
                           "supported; convert the model again with a current llama.cpp (ffn_*_exps tensors)")
    raise ConvertError(f"GGUF tensor {name!r} has no counterpart in this engine (unsupported model variant)")


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float,
                        orig: int) -> np.ndarray:
    """The per-pair divisors llama.cpp's convert_hf_to_gguf writes as rope_freqs."""
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    low_wavelen, high_wavelen = orig / low, orig / high
    out = []
    for freq in freqs.astype(np.float64):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _llama3_from_factors(factors: np.ndarray, head_dim: int, theta: float) -> dict:
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise ConvertError(f"GGUF rope_freqs has {factors.size} values, expected head_dim/2 = {head_dim // 2}")
    factor = float(factors.max())
    if np.allclose(factors, 1.0, rtol=1e-6):
        return {}

    def fields(low, high, orig):
        return {"rope_scaling": "llama3", "rope_scaling_factor": factor, "rope_low_freq_factor": float(low),
                "rope_high_freq_factor": float(high), "rope_original_max_position": int(orig)}

    def matches(low, high, orig):
        return np.allclose(llama3_rope_factors(head_dim, theta, factor, low, high, orig), factors, rtol=1e-4, atol=1e-5)

    for low, high, orig in _LLAMA3_CANDIDATES:
        if matches(low, high, orig):
            return fields(low, high, orig)
    # only the wavelength thresholds orig/low and orig/high matter: fit s = a*freq + b on the
    # smooth pairs (1 < f < factor) and express it with orig = 8192
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    smooth = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    if smooth.sum() >= 2:
        s = (1 / factors[smooth] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(freqs[smooth].astype(np.float64), s, 1)
        orig = 8192
        span = orig / (2 * math.pi * a)
        low = -b * span
        high = low + span
        if low > 0 and high > low and matches(low, high, orig):
            return fields(low, high, orig)
    raise ConvertError("GGUF rope_freqs tensor does not follow llama3 RoPE scaling; this model's RoPE "
                     "scaling is not supported")


def _rope_scaling(reader, arch: str, head_dim: int, theta: float) -> dict:
    kind = reader.string(f"{arch}.rope.scaling.type")
    factor = reader.scalar(f"{arch}.rope.scaling.factor", "number", 1.0)
    if kind not in (None, "none") and not (kind == "linear" and _number(factor, "rope.scaling.factor", float) == 1.0):
        raise ConvertError(f"GGUF RoPE scaling type {kind!r} (factor {factor}) is not supported; "
                         "supported: none, llama3 (rope_freqs)")
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            return _llama3_from_factors(_dense(t), head_dim, theta)
    return {}


def _dense(t, data=None) -> np.ndarray:
    """A tensor (or `data`, part of its rows) as float values of its numpy shape (the float
    types we keep, f32 and f16, as stored; bf16 and quantized -> f32)."""
    import gguf

    data = t.data if data is None else data
    ours = quant.gguf_type(t.tensor_type.name)
    if ours is not None and not ours.quantized:
        return np.array(data)
    return np.asarray(gguf.quants.dequantize(np.asarray(data), t.tensor_type), dtype=np.float32)


def _spec_fields(reader, path: Path) -> dict:
    arch = reader.string("general.architecture")
    if arch is None:
        raise ConvertError(f"{path}: GGUF metadata lacks 'general.architecture'")
    if arch not in ARCHITECTURES:
        raise ConvertError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}
    if not tensors:
        raise ConvertError(f"{path} holds no tensors: a vocabulary-only GGUF (such as llama.cpp's ggml-vocab-*.gguf) "
                           "has no weights to convert")
    if "token_embd.weight" not in tensors or len(tensors["token_embd.weight"].shape) != 2:
        raise ConvertError(f"{path}: GGUF file has no 2-D token_embd.weight tensor")

    def get(key: str, default=None, per_layer: bool = False):
        """Metadata `arch.key`, a number (`per_layer`: or a list, one per layer); required without a default."""
        field = reader.field(f"{arch}.{key}", "number", array=None if per_layer else False)
        if field is None:
            if default is None:
                raise ConvertError(f"{path}: GGUF metadata lacks {arch + '.' + key!r}")
            return default
        return field.value.tolist() if isinstance(field.value, np.ndarray) else field.value

    dim = _number(get("embedding_length"), "embedding_length", int)
    n_heads = _scalar(get("attention.head_count", per_layer=True), "attention.head_count")
    n_kv = _scalar(get("attention.head_count_kv", n_heads, per_layer=True), "attention.head_count_kv")
    head_dim = _number(get("attention.key_length", dim // n_heads), "attention.key_length", int)
    value_length = _number(get("attention.value_length", head_dim), "attention.value_length", int)
    if value_length != head_dim:
        raise ConvertError(f"{path}: key_length {head_dim} != value_length {value_length} is not supported")
    rope_dims = _number(get("rope.dimension_count", head_dim), "rope.dimension_count", int)
    if rope_dims != head_dim:
        raise ConvertError(f"{path}: partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    n_experts = _number(get("expert_count", 0), "expert_count", int)
    moe = {}
    if n_experts or arch == "qwen3moe":
        moe = _experts(get, path, arch, n_experts)
    theta = _number(get("rope.freq_base", 10000.0), "rope.freq_base", float)
    hidden_key = "expert_feed_forward_length" if arch == "qwen3moe" else "feed_forward_length"
    fields = dict(
        dim=dim, hidden_dim=_number(get(hidden_key), hidden_key, int), **moe,
        n_layers=_number(get("block_count"), "block_count", int),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # shape is ne: (dim, vocab)
        seq_len=_number(get("context_length"), "context_length", int),
        norm_eps=_number(get("attention.layer_norm_rms_epsilon", 1e-5), "attention.layer_norm_rms_epsilon", float),
        rope_theta=theta, shared_classifier="output.weight" not in tensors, architecture=arch,
    )
    if arch == "qwen2":
        fields["qkv_bias"] = True
    if arch in ("qwen3", "qwen3moe"):
        fields["qk_norm"] = True
    if arch == "llama" and moe:
        fields["architecture"] = "mixtral"
    fields.update(_rope_scaling(reader, arch, head_dim, theta))
    return fields


def _experts(get, path: Path, arch: str, n_experts: int) -> dict:
    """A mixture of experts' spec fields, as llama.cpp runs qwen3moe and Mixtral: softmax
    gating, the chosen experts' weights renormalised (llama.cpp's build of both passes
    norm_w = true whatever {arch}.expert_weights_norm says, and no weight scale), no shared
    experts."""
    if not n_experts:
        raise ConvertError(f"{path}: a {arch} GGUF without {arch}.expert_count metadata: the file is incomplete; "
                           "convert the model again with a current llama.cpp")
    used = _number(get("expert_used_count", 0), "expert_used_count", int)
    if not 1 <= used <= n_experts:
        raise ConvertError(f"{path}: a mixture of experts needs 1 <= {arch}.expert_used_count <= {arch}.expert_count, "
                           f"found {used} of {n_experts}")
    if _number(get("expert_shared_count", 0), "expert_shared_count", int):
        raise ConvertError(f"{path}: shared experts (qwen2moe, deepseek) are not supported")
    gating = _number(get("expert_gating_func", 1), "expert_gating_func", int)
    if gating != 1:  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX
        raise ConvertError(f"{path}: expert gating function {gating} is not supported (only softmax, 1)")
    return dict(n_experts=n_experts, n_experts_used=used, expert_weights_norm=True)


def _scalar(value, key: str) -> int:
    if isinstance(value, list) and value:  # per-layer head counts
        if len(set(value)) != 1:
            raise ConvertError(f"GGUF {key} varies per layer ({value}); not supported")
        value = value[0]
    return _number(value, key, int)


def _number(value, key: str, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConvertError(f"GGUF metadata {key!r} is {value!r}, expected a finite number")
    if kind is int and not float(value).is_integer():
        raise ConvertError(f"GGUF metadata {key!r} is {value!r}, expected a whole number")
    return kind(value)


def _convert(t, name: str, arch: str, head_dim: int, data=None) -> np.ndarray:
    """Tensor t (or `data`, one expert's rows of it) as the writer takes it."""
    ours = quant.gguf_type(t.tensor_type.name)
    data = t.data if data is None else data
    if ours is not None:  # a type we keep (f32, f16, our blocks are ggml's): passed through bit-exact
        array = np.ascontiguousarray(data).view(ours.dtype)
    else:  # widened or dequantized to f32 here; the writer makes it the type the converter chose
        array = _dense(t, data)
    if array.ndim == 2 and array.shape[0] == 1 and len(t.shape) == 1:
        array = array[0]
    if arch in HALVES_ARCHS and name.rsplit("/", 1)[-1] in _ROPE_ROWS:
        array = halves_to_interleaved(array, head_dim)
    return np.array(array)  # own copy: the memory map may close before the writer is done


def read(path: Path, tokenizer_path=None):
    from . import Source

    path = Path(path)
    from ..tokenizer import from_gguf

    reader = open_gguf(path)
    fields = _spec_fields(reader, path)
    tokenizer = from_gguf(reader)
    arch, head_dim = fields["architecture"], fields["head_dim"]
    names = {}
    for t in reader.tensors:
        ours = _map_name(t.name)
        if ours is not None:
            names[t.name] = ours
    # each matrix's stored type: the converter decides (and says) what becomes of it
    native_types = {names[t.name]: t.tensor_type.name for t in reader.tensors
                    if t.name in names and names[t.name].rsplit("/", 1)[-1] in MATRICES}

    experts = fields.get("n_experts", 0)

    def tensors():
        r = open_gguf(path)
        for t in r.tensors:
            ours = names.get(t.name)
            if ours is None:
                continue
            m = _LAYER_RE.fullmatch(t.name)
            if m and m.group(2) in _EXPERT_TENSORS:
                prefix, kind = ours.rsplit("/", 1)
                if t.data.shape[0] != experts:
                    raise ConvertError(f"GGUF tensor {t.name!r} holds {t.data.shape[0]} experts, but the file's "
                                       f"expert_count metadata says {experts}: the file is inconsistent; convert the "
                                       "model again")
                for e in range(experts):  # one expert at a time: the writer holds one expert's rows
                    yield f"{prefix}/experts/{e}/{kind}", _convert(t, ours, arch, head_dim, t.data[e])
            else:
                yield ours, _convert(t, ours, arch, head_dim)

    return Source(fields, tensors, tokenizer, f"GGUF {arch} model {path.name}", files=[path],
                  native_types=native_types)
