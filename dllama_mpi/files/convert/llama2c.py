"""llama2.c checkpoints ("version 0" .bin) with a llama2.c tokenizer.bin.

Header: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
negative vocab_size: the classifier is not shared), then f32 arrays in a fixed order
(see tensor_offsets). RoPE rotates interleaved pairs, as this project's engine does.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..tokenizer import Tokenizer
from . import ConvertError

FORMAT_NAME = "llama2.c checkpoint (.bin)"
HEADER = struct.Struct("<7i")


def _header(path: Path) -> dict | None:
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        return None
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = HEADER.unpack(raw)
    fields = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                  vocab_size=abs(vocab), seq_len=seq_len)
    if min(fields.values()) <= 0 or n_heads % n_kv or dim % n_heads or max(fields.values()) > 2**24:
        return None
    fields["shared_classifier"] = vocab > 0
    return fields


def _layout(h: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in file order; per-layer arrays are stacked over layers in the file."""
    dim, hidden, L = h["dim"], h["hidden_dim"], h["n_layers"]
    head_dim = dim // h["n_heads"]
    kv_dim = h["n_kv_heads"] * head_dim
    layout = [
        ("tok_embeddings", (h["vocab_size"], dim)), ("attention_norm", (L, dim)),
        ("wq", (L, dim, dim)), ("wk", (L, kv_dim, dim)), ("wv", (L, kv_dim, dim)), ("wo", (L, dim, dim)),
        ("ffn_norm", (L, dim)), ("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)),
        ("norm", (dim,)), ("freq_cis_real", (h["seq_len"], head_dim // 2)),
        ("freq_cis_imag", (h["seq_len"], head_dim // 2)),
    ]
    if not h["shared_classifier"]:
        layout.append(("output", (h["vocab_size"], dim)))
    return layout


def _expected_size(h: dict) -> int:
    return HEADER.size + 4 * sum(int(np.prod(shape)) for _, shape in _layout(h))


def sniff(path: Path) -> bool:
    """A plausible header (the size is checked by read, which can then say the file is cut)."""
    return _header(path) is not None


def read(path: Path, tokenizer_path: str | Path | None):
    from . import Source

    h = _header(path)
    size, expected = path.stat().st_size, _expected_size(h)
    if size != expected:
        raise ConvertError(f"{path} looks like a llama2.c checkpoint of dim {h['dim']} and {h['n_layers']} layers, but "
                           f"it is {size} bytes where that header describes {expected}: it is "
                           f"{'truncated' if size < expected else 'not such a checkpoint'}; copy it again")
    tokenizer_path = Path(tokenizer_path) if tokenizer_path else path.with_name("tokenizer.bin")
    if not tokenizer_path.is_file():
        raise ConvertError(f"llama2.c tokenizer {tokenizer_path} is not a file; pass --tokenizer PATH (e.g. tok512.bin)")
    tokenizer = Tokenizer.from_llama2c(tokenizer_path, h["vocab_size"])
    spec_fields = {k: v for k, v in h.items()}
    spec_fields["head_dim"] = h["dim"] // h["n_heads"]

    def tensors():
        data = np.memmap(path, dtype=np.float32, mode="r", offset=HEADER.size)
        offset = 0
        for name, shape in _layout(h):
            size = int(np.prod(shape))
            array = data[offset : offset + size].reshape(shape)
            offset += size
            if name.startswith("freq_cis"):
                continue  # the engine computes RoPE angles itself (theta 10000)
            if len(shape) == 3 or name in ("attention_norm", "ffn_norm"):
                for layer in range(h["n_layers"]):
                    yield f"layers/{layer}/{name}", np.array(array[layer])
            else:
                yield name, np.array(array)

    return Source(spec_fields, tensors, tokenizer, f"llama2.c checkpoint {path.name}", [path, tokenizer_path])
