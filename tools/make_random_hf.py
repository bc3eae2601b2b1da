#!/usr/bin/env python3
"""Write a Hugging Face-style Llama checkpoint with random weights (bf16 safetensors,
config.json, a small byte-level tokenizer) of one of the benchmark's shapes, one tensor at
a time.

    python tools/make_random_hf.py llama-3.2-1b /tmp/llama-1b-random

Speed and memory do not depend on the values, so this stands in for real checkpoints when
measuring the converter (e.g. its peak memory) or the engine.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import numpy as np

from dllama_mpi.commands.bench import SHAPES
from dllama_mpi.files.synthetic import write_hf_tokenizer


def hf_config(spec) -> dict:
    """A Hugging Face llama config.json for one of the benchmark's shapes."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": spec.dim,
            "intermediate_size": spec.hidden_dim, "num_hidden_layers": spec.n_layers,
            "num_attention_heads": spec.n_heads, "num_key_value_heads": spec.n_kv_heads,
            "vocab_size": spec.vocab_size, "rope_theta": spec.rope_theta, "rms_norm_eps": spec.norm_eps,
            "max_position_embeddings": spec.seq_len, "tie_word_embeddings": spec.shared_classifier,
            "bos_token_id": 1, "eos_token_id": 2}


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    dim, hidden, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], dim)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
            p + "self_attn.q_proj.weight": (dim, dim), p + "self_attn.k_proj.weight": (kv, dim),
            p + "self_attn.v_proj.weight": (kv, dim), p + "self_attn.o_proj.weight": (dim, dim),
            p + "mlp.gate_proj.weight": (hidden, dim), p + "mlp.up_proj.weight": (hidden, dim),
            p + "mlp.down_proj.weight": (dim, hidden),
        })
    shapes["model.norm.weight"] = (dim,)
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], dim)
    return shapes


def write(shape: str, out: Path, seed: int = 0) -> None:
    config = hf_config(SHAPES[shape])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    shapes = tensor_shapes(config)
    header, offset = {}, 0
    for name, shp in shapes.items():
        size = 2 * int(np.prod(shp))
        header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shp in shapes.values():
            rows = shp[0]
            step = max(1, (1 << 24) // int(np.prod(shp[1:], dtype=np.int64)))
            for a in range(0, rows, step):  # in slices: memory stays small
                part = (rng.standard_normal((min(step, rows - a), *shp[1:]), dtype=np.float32) * 0.02)
                if len(shp) == 1:
                    part += 1
                (part.view(np.uint32) >> 16).astype(np.uint16).tofile(f)
    write_hf_tokenizer(out, 512, ["random weights, meaningless text"] * 10)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", type=Path)
    args = p.parse_args()
    write(args.shape, args.out)
