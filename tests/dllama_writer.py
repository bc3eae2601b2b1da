"""Test-only writer of b4rtaz/distributed-llama `.m` models and `.t` tokenizers, written
from the format as distributed-llama's converter/writer.py and tokenizer-writer.py write it
(not from dllama_mpi's reader): int32 magic, int32 header size (8 + 8 * pairs), int32
(key, value) pairs, then the raw tensors in converter order."""

from __future__ import annotations

import struct

import numpy as np

MODEL_MAGIC = 0x0A00ABCD
TOKENIZER_MAGIC = 0x567124
MODEL_KEYS = {
    "version": 0, "arch_type": 1, "dim": 2, "hidden_dim": 3, "n_layers": 4, "n_heads": 5, "n_kv_heads": 6,
    "n_experts": 7, "n_active_experts": 8, "vocab_size": 9, "max_seq_len": 10, "hidden_act": 11,
    "rope_theta": 12, "weights_float_type": 13, "rope_scaling_factor": 14, "rope_scaling_low_freq_factor": 15,
    "rope_scaling_high_freq_factory": 16, "rope_scaling_orig_max_seq_len": 17, "rope_type": 18,
    "head_dim": 19, "norm_epsilon": 20,
}
FLOAT_TYPES = {"f32": 0, "f16": 1, "q40": 2, "q80": 3}
LLAMA, QWEN3 = 0xABCD00, 0xABCD01


def q40_bytes(x: np.ndarray) -> bytes:
    """writer.py writeQuantizedQ40Tensor: per 32 values, fp16 delta + 16 nibble pairs."""
    groups = np.asarray(x, np.float32).reshape(-1, 32)
    gmax, gmin = groups.max(axis=1), groups.min(axis=1)
    deltas = np.where(-gmin > gmax, gmin, gmax) / -8
    ids = np.where(deltas != 0, 1.0 / np.where(deltas != 0, deltas, 1), 0)
    q = np.clip(groups * ids[:, None] + 8.5, 0, 15).astype(int)
    packed = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    return b"".join(struct.pack("<e16B", d, *row) for d, row in zip(deltas.astype(np.float16), packed))


def q80_bytes(x: np.ndarray) -> bytes:
    """writer.py writeQuantizedQ80Tensor: per 32 values, fp16 delta + 32 int8."""
    groups = np.asarray(x, np.float32).reshape(-1, 32)
    amax = np.abs(groups).max(axis=1)
    deltas = amax / 127
    ids = np.where(deltas != 0, 1.0 / np.where(deltas != 0, deltas, 1), 0)
    q = np.round(groups * ids[:, None]).astype(np.int8)
    return b"".join(struct.pack("<e32b", d, *row) for d, row in zip(deltas.astype(np.float16), q))


def tensor_bytes(x: np.ndarray, kind: str) -> bytes:
    if kind == "f32":
        return np.asarray(x, "<f4").tobytes()
    if kind == "f16":
        return np.asarray(x, "<f2").tobytes()
    if kind == "q40":
        return q40_bytes(x)
    if kind == "q80":
        return q80_bytes(x)
    raise ValueError(kind)


def header_bytes(params: dict) -> bytes:
    data = b"".join(struct.pack("<ii", MODEL_KEYS[k], v) for k, v in params.items())
    return struct.pack("<ii", MODEL_MAGIC, 8 + len(data)) + data


def write_model(path, params: dict, weights: dict, weight_type: str, arch: int = LLAMA) -> None:
    """params: header values by writer.py key name (weights_float_type is set here).
    weights: tok_embeddings, norm, output, and per layer i lists under wq, wk, wv, wo, w1,
    w2, w3, attention_norm, ffn_norm (+ q_norm, k_norm for qwen3), as the file holds them
    (q/k already in the file's RoPE layout)."""
    params = {**params, "arch_type": arch, "weights_float_type": FLOAT_TYPES[weight_type]}
    with open(path, "wb") as f:
        f.write(header_bytes(params))
        f.write(tensor_bytes(weights["tok_embeddings"], "f32"))
        for i in range(params["n_layers"]):
            for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
                f.write(tensor_bytes(weights[name][i], weight_type))
            if arch == QWEN3:
                f.write(tensor_bytes(weights["q_norm"][i], "f32"))
                f.write(tensor_bytes(weights["k_norm"][i], "f32"))
            f.write(tensor_bytes(weights["attention_norm"][i], "f32"))
            f.write(tensor_bytes(weights["ffn_norm"][i], "f32"))
        f.write(tensor_bytes(weights["norm"], "f32"))
        f.write(tensor_bytes(weights["output"], weight_type))


def write_tokenizer(path, tokens: list[bytes], scores, bos_id: int, eos_ids: list[int],
                    chat_template: bytes | None = None) -> None:
    """tokenizer-writer.py writeTokenizer."""
    params = {3: bos_id, 0: 1, 1: len(tokens), 2: max(len(t) for t in tokens)}
    if chat_template:
        params[7] = len(chat_template)
    params[9] = len(eos_ids)
    data = b"".join(struct.pack("<ii", k, v) for k, v in params.items())
    with open(path, "wb") as f:
        f.write(struct.pack("<ii", TOKENIZER_MAGIC, 8 + len(data)))
        f.write(data)
        if chat_template:
            f.write(chat_template)
        for e in eos_ids:
            f.write(struct.pack("<i", e))
        for t, s in zip(tokens, scores):
            f.write(struct.pack("<fI", float(s), len(t)))
            f.write(t)
