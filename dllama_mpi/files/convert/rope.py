"""RoPE layouts. The engine rotates interleaved pairs (x[2i], x[2i+1]) within each head
(llama2.c / Meta); Hugging Face checkpoints (and llama.cpp's qwen2 GGUF tensors) rotate
halves (x[i], x[i + head_dim/2]). A reader of a halves-layout source passes every q/k
weight, bias and per-head norm weight through `halves_to_interleaved`, the one place this
permutation lives."""

from __future__ import annotations

import numpy as np


def halves_to_interleaved(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Reorder the rows (axis 0) of each head from [first half, second half] to
    interleaved pairs: new row 2i <- old row i, new row 2i+1 <- old row i + head_dim/2.
    rows: (n_heads * head_dim, ...) for a weight or bias, or (head_dim,) for a per-head norm."""
    n = rows.shape[0]
    assert n % head_dim == 0 and head_dim % 2 == 0, (n, head_dim)
    heads = rows.reshape(n // head_dim, 2, head_dim // 2, *rows.shape[1:])
    return np.ascontiguousarray(heads.swapaxes(1, 2)).reshape(rows.shape)
