"""Read-only local weights: each rank's rows of every matrix, scattered from rank 0.

Rank 0 reads one tensor at a time and Scatterv's the plan's rows, so its extra memory is
one tensor (plus the duplicated KV-head rows of a split group), not the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import quant
from .comm import Comm
from .modelfile import ModelFile, stored_form, tensor_layout
from .plan import Plan


@dataclass(frozen=True)
class Matrix:
    """Local rows of one weight matrix in the kernels' layout."""

    type: str  # 'f32' or 'q40'
    rows: int
    cols: int
    w: np.ndarray | None = None  # f32: (rows, cols)
    d: np.ndarray | None = None  # q40: (rows, cols // 32) f32 scales
    qs: np.ndarray | None = None  # q40: (rows, cols // 32, 16) u8 nibbles

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.w, self.d, self.qs) if a is not None)

    @classmethod
    def from_stored(cls, stored: np.ndarray, cols: int) -> Matrix:
        if stored.dtype == quant.Q40:
            return cls("q40", stored.shape[0], cols, d=stored["d"].astype(np.float32),
                       qs=np.ascontiguousarray(stored["qs"]))
        return cls("f32", stored.shape[0], cols, w=stored)


@dataclass(frozen=True)
class LocalWeights:
    layers: tuple[dict[str, np.ndarray | Matrix], ...]  # per layer: norms (f32) and matrices
    norm: np.ndarray  # (dim,)
    embedding: Matrix  # local vocab rows of tok_embeddings
    classifier: Matrix  # local vocab rows of output (the embedding's when shared)

    @property
    def nbytes(self) -> int:
        total = self.norm.nbytes + self.embedding.nbytes
        if self.classifier is not self.embedding:
            total += self.classifier.nbytes
        for layer in self.layers:
            total += sum(v.nbytes for v in layer.values())
        return total


def load(comm: Comm, plan: Plan, model: ModelFile | None) -> LocalWeights:
    """Every rank's share of the model; `model` is open on rank 0 only."""
    spec = plan.spec
    tensors: dict[str, np.ndarray | Matrix] = {}
    for name, (kind, shape) in tensor_layout(spec).items():
        dtype, stored_shape = stored_form(spec, kind, shape)
        data = model.read(name) if comm.rank == 0 else None
        if kind is None:  # replicated f32 vector
            value = data if comm.rank == 0 else np.empty(stored_shape, np.float32)
            comm.bcast_array(value)
            tensors[name] = value
            continue
        spans = tuple(plan.rows(kind, r) for r in range(plan.world_size))
        a, b = spans[comm.rank]
        row_bytes = stored_shape[1] * dtype.itemsize
        local = np.empty((b - a, row_bytes), np.uint8)
        rows = data.view(np.uint8).reshape(stored_shape[0], row_bytes) if comm.rank == 0 else None
        comm.scatter_rows(rows, spans, local)
        del data, rows
        tensors[name] = Matrix.from_stored(local.view(dtype).reshape(b - a, stored_shape[1]), shape[1])
    layers = tuple(
        {k: tensors[f"layers/{i}/{k}"] for k in ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")}
        for i in range(spec.n_layers)
    )
    embedding = tensors["tok_embeddings"]
    classifier = embedding if spec.shared_classifier else tensors["output"]
    return LocalWeights(layers, tensors["norm"], embedding, classifier)
