"""The frozen model spec: hyperparameters and tensor layout, nothing loaded."""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from . import quant

FORMAT_NAME = "dllama_mpi"
FORMAT_VERSION = 3  # the newest this program writes and reads; a file takes the oldest that holds it
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "qwen3moe", "mixtral")
# the mixture-of-experts fields: absent from a dense model's attributes, so its files and ids stay as they were
MOE_FIELDS = ("n_experts", "n_experts_used", "expert_weights_norm")


# matrices the engine joins into one product, part by part where their types differ (weights.STACKED)
STACKED_KINDS = (("wq", "wk", "wv"), ("w1", "w3"))
TABLE_KINDS = ("tok_embeddings", "output")  # the vocabulary tables: one of each, no layer


@functools.lru_cache(maxsize=64)
def _parse_overrides(text: str) -> Mapping[str, str]:
    pairs = [item.split("=") for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(text)
    return types.MappingProxyType({kind.strip(): t.strip() for kind, t in pairs})


def _override_key(key: str) -> tuple[str, int | None]:
    """"w2" -> ("w2", None); "layers/3/w2" -> ("w2", 3); anything else -> (key, None) (refused by the check)."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isascii() and parts[1].isdigit() \
            and str(int(parts[1])) == parts[1]:  # as tensor_type looks it up: layers/3/w2, not layers/03/w2
        return parts[2], int(parts[1])
    return key, None
MAX_LAYERS = 4096  # the largest models have ~128: anything near this is a damaged header, not a model
MAX_SIZE = 2**31 - 1  # dims, vocabulary and context fit int32 in every format we read


@dataclass(frozen=True)
class ModelSpec:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    seq_len: int  # context the model was trained for; the KV cache may be smaller
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_style: str = "interleaved"  # pairs (x[2i], x[2i+1]) within a head, as llama2.c
    rope_scaling: str = "none"  # or "llama3" (Llama 3.1+ frequency scaling, parameters below)
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    shared_classifier: bool = True  # classifier rows are the embedding table's
    qkv_bias: bool = False  # q/k/v projections have biases (qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (qwen3)
    weight_type: str = "f32"  # requested type; quant.storage_type decides per tensor
    # per-matrix exceptions to weight_type, "output=q80,w2=q80" (what a GGUF's mix became); the
    # matrices the engine stacks (wq wk wv; w1 w3) share one type
    tensor_types: str = ""
    architecture: str = "llama"  # llama, mistral, qwen2, qwen3, qwen3moe, mixtral: one data path, the flags above
    # mixture of experts (qwen3moe, mixtral): every layer's FFN is n_experts experts of hidden_dim rows
    # each, a router (n_experts, dim) picks n_experts_used per token, weighted by the softmax over all
    # experts' router logits, renormalised over the chosen ones when expert_weights_norm (as llama.cpp)
    n_experts: int = 0  # 0: a dense FFN
    n_experts_used: int = 0
    expert_weights_norm: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
            elif value > (MAX_LAYERS if name == "n_layers" else MAX_SIZE):
                problems.append(f"{name} is {value}, more than any model has (at most "
                                f"{MAX_LAYERS if name == 'n_layers' else MAX_SIZE}): a damaged header?")
        if not problems and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not problems and self.head_dim % 2:
            problems.append(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("norm_eps", "rope_theta", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a positive finite number, got {value!r}")
        if self.n_experts or self.n_experts_used:
            if not (isinstance(self.n_experts, int) and isinstance(self.n_experts_used, int)
                    and 1 <= self.n_experts_used <= self.n_experts <= MAX_SIZE):
                problems.append(f"a mixture of experts needs 1 <= n_experts_used <= n_experts, got n_experts_used "
                                f"{self.n_experts_used!r} of n_experts {self.n_experts!r} (a damaged header? convert "
                                "the model again)")
        elif self.expert_weights_norm:
            problems.append("expert_weights_norm is set but the model has no experts (n_experts 0)")
        if self.architecture not in ARCHITECTURES:
            problems.append(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.rope_scaling not in ("none", "llama3"):
            problems.append(f"rope_scaling must be 'none' or 'llama3', got {self.rope_scaling!r}")
        if self.rope_style != "interleaved":
            problems.append(f"rope_style must be 'interleaved', got {self.rope_style!r}")
        if self.weight_type not in quant.WEIGHT_TYPES:
            problems.append(f"weight_type must be one of {quant.WEIGHT_TYPES}, got {self.weight_type!r}")
        if not problems:  # tensor_types is read against valid dimensions and weight_type
            problems += self._tensor_type_problems()
        if problems:
            raise InputError("invalid model spec: " + "; ".join(problems))

    def _tensor_type_problems(self) -> list[str]:
        try:
            types = self.type_overrides()
        except ValueError:
            return [f"tensor_types must read kind=type or layers/N/kind=type, comma-separated; got {self.tensor_types!r}"]
        problems = []
        for key, t in types.items():
            kind, layer = _override_key(key)
            if kind not in self.matrix_cols() or (layer is not None and (kind in TABLE_KINDS
                                                                         or not 0 <= layer < self.n_layers)):
                problems.append(f"tensor_types names {key!r}: expected a matrix ({', '.join(self.matrix_cols())}), "
                                f"or layers/N/<layer matrix> with N below {self.n_layers}")
            if t not in quant.WEIGHT_TYPES:
                problems.append(f"tensor_types gives {key} the type {t!r}; types are {quant.WEIGHT_TYPES}")
        return problems

    @property
    def weights_text(self) -> str:
        """The weight types as printed: "q40", or "q40 (output=q80)" for a mix; per-layer
        exceptions are counted, not listed."""
        if not self.tensor_types:
            return self.weight_type
        kinds = [f"{k}={t}" for k, t in self.type_overrides().items() if "/" not in k]
        layered = sum("/" in k for k in self.type_overrides())
        return f"{self.weight_type} ({', '.join(kinds + ([f'{layered} per-layer'] if layered else []))})"

    def type_overrides(self) -> Mapping[str, str]:
        """tensor_types as {"kind" or "layers/N/kind": type} (read-only; parsed once per text)."""
        return _parse_overrides(self.tensor_types)

    @property
    def moe(self) -> bool:
        """Whether every layer's FFN is a mixture of experts."""
        return self.n_experts > 0

    @property
    def ffn_rows_per_token(self) -> int:
        """Hidden values one token computes per layer: hidden_dim, times the experts it uses."""
        return self.hidden_dim * max(1, self.n_experts_used)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head."""
        return self.n_heads // self.n_kv_heads

    def matrix_cols(self) -> dict[str, int]:
        """Row length (input width) of each per-layer matrix and of the vocabulary tables."""
        return {
            "wq": self.dim, "wk": self.dim, "wv": self.dim, "wo": self.q_dim,
            "w1": self.dim, "w2": self.hidden_dim, "w3": self.dim,
            "tok_embeddings": self.dim, "output": self.dim,
        }

    def tensor_type(self, kind: str, layer: int | None = None) -> str:
        """The stored type of matrix `kind` (of layer `layer`, where a layer's differs)."""
        types = self.type_overrides()
        wanted = types.get(f"layers/{layer}/{kind}") if layer is not None else None
        return quant.storage_type(wanted or types.get(kind, self.weight_type), self.matrix_cols()[kind])

    def weight_types(self) -> set[str]:
        """Every type a matrix of this model is stored in."""
        kinds = [k for k in self.matrix_cols() if k != "output" or not self.shared_classifier]
        return {self.tensor_type(k, layer) for k in kinds for layer in range(self.n_layers)}

    def resident_row_bytes(self, kind: str, layer: int | None = None) -> int:
        """Memory of one local row of matrix `kind` (what a rank's budget pays for)."""
        return quant.resident_row_bytes(self.tensor_type(kind, layer), self.matrix_cols()[kind])

    def rope_freqs(self) -> np.ndarray:
        """Angle per position of each rotated pair, (head_dim // 2,) float64: theta**(-2i/head_dim),
        with Llama 3's scaling when rope_scaling is 'llama3' (as transformers computes it)."""
        inv_freq = self.rope_theta ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        if self.rope_scaling != "llama3":
            return inv_freq
        factor, low, high = self.rope_scaling_factor, self.rope_low_freq_factor, self.rope_high_freq_factor
        old_len = self.rope_original_max_position
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)

    def format_version(self) -> int:
        """The oldest model-file format version that holds this model: 3 for a mixture of experts,
        2 for per-tensor types or a type that came with them (k-quants), so that an older reader
        says the file is newer than it instead of misreading it; 1 for the rest, whose files stay
        as they were."""
        return max([3 if self.moe else 2 if self.tensor_types else 1]
                   + [quant.weight_type(t).format_version for t in self.weight_types()])

    def to_attrs(self) -> dict:
        attrs = dataclasses.asdict(self)
        if not self.tensor_types:  # files, model ids and plan hashes of uniform models stay as they were
            del attrs["tensor_types"]
        if not self.moe:  # ... and those of dense models
            for name in MOE_FIELDS:
                del attrs[name]
        return attrs

    @classmethod
    def from_attrs(cls, attrs) -> ModelSpec:
        """Build from HDF5 root attributes, their text decoded (files.attributes.decoded; extra
        attributes are ignored)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in attrs]
        if missing:
            raise InputError(f"model file lacks attributes {missing}; re-convert it with dllama-mpi-convert")
        values = {}
        for name, field in fields.items():
            if name in attrs:
                values[name] = _attribute(name, attrs[name], field.type)
        return cls(**values)


def _attribute(name: str, value, kind: str):
    """An HDF5 attribute as the spec field's type, refusing what would change its meaning
    (2.5 as an int, 7 as a bool, a number as a string, an array as a number)."""
    found = value
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(())
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        value = value.item()
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "bool" and isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max:
        return float(value)  # finite: the comparison is False for NaN and infinities
    shown = repr(found)
    raise InputError(f"model attribute {name}={shown[:60] + '...' if len(shown) > 60 else shown} is not a valid {kind}")
