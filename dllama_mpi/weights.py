"""Read-only local weights: each rank's rows of every matrix.

From a whole model file, rank 0 reads one tensor at a time and Scatterv's the plan's rows,
so its extra memory is one tensor (plus the duplicated KV-head rows of a split group), not
the model. From shards, every rank reads its own rows from its own file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels, quant
from .comm import Comm
from .modelfile import ModelFile, stored_shape, stored_type, tensor_layout
from .plan import Plan


@dataclass(frozen=True)
class Matrix:
    """Local rows of one weight matrix in the kernels' layout."""

    type: str  # 'f32', 'f16', 'q40' or 'q80'
    rows: int
    cols: int
    w: np.ndarray | None = None  # f32: (rows, cols) f32; f16: (rows, cols) u16 bits
    d: np.ndarray | None = None  # q40/q80: (rows, nb) f32 scales
    qs: np.ndarray | None = None  # q40: (rows, 16, nb) u8 nibbles; q80: (rows, 32, nb) i8 (see kernels)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.w, self.d, self.qs) if a is not None)

    @classmethod
    def from_stored(cls, stored: np.ndarray, cols: int) -> Matrix:
        kind = quant.type_of(stored)
        if kind in ("q40", "q80"):  # byte j of every block of a row contiguous
            return cls(kind, stored.shape[0], cols, d=stored["d"].astype(np.float32),
                       qs=np.ascontiguousarray(stored["qs"].transpose(0, 2, 1)))
        if kind == "f16":
            return cls(kind, stored.shape[0], cols, w=stored.view(np.uint16))
        return cls(kind, stored.shape[0], cols, w=stored)

    def row_to(self, row: int, out: np.ndarray) -> None:
        """Dequantize one local row into out (cols,) f32 (an embedding lookup)."""
        if self.type == "f32":
            out[:] = self.w[row]
        elif self.type == "f16":
            kernels.f16_row(self.w[row], kernels.F16_TABLE, out)
        elif self.type == "q40":
            kernels.dequantize_q40_row(self.d[row], self.qs[row], out)
        else:
            kernels.dequantize_q80_row(self.d[row], self.qs[row], out)


@dataclass(frozen=True)
class LocalWeights:
    layers: tuple[dict[str, np.ndarray | Matrix], ...]  # per layer: vectors (f32) and matrices
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
    """Every rank's share of the model. `model` is the whole file, open on rank 0 only
    (others pass None), or this rank's own shard, open on every rank."""
    spec = plan.spec
    from_shard = model is not None and model.shard is not None
    tensors: dict[str, np.ndarray | Matrix] = {}
    for name, info in tensor_layout(spec).items():
        dtype = quant.stored_dtype(stored_type(spec, info))
        if info.split is None:  # replicated vector
            value = model.read(name) if (from_shard or comm.rank == 0) else np.empty(info.shape, np.float32)
            if not from_shard:
                comm.bcast_array(value)
            tensors[name] = value
            continue
        spans = tuple(plan.rows(info.split, r) for r in range(plan.world_size))
        a, b = spans[comm.rank]
        if from_shard:
            local = model.read(name)
        else:
            full_shape = stored_shape(spec, info)
            row_bytes = dtype.itemsize * int(np.prod(full_shape[1:], dtype=np.int64))
            data = model.read(name) if comm.rank == 0 else None
            rows = data.view(np.uint8).reshape(full_shape[0], row_bytes) if comm.rank == 0 else None
            raw = np.empty((b - a, row_bytes), np.uint8)
            comm.scatter_rows(rows, spans, raw)
            del data, rows
            local = raw.view(dtype).reshape(stored_shape(spec, info, b - a))
        tensors[name] = Matrix.from_stored(local, info.shape[1]) if info.matrix else local
    names = [n.split("/")[-1] for n in tensor_layout(spec) if n.startswith("layers/0/")]
    layers = tuple({k: tensors[f"layers/{i}/{k}"] for k in names} for i in range(spec.n_layers))
    embedding = tensors["tok_embeddings"]
    classifier = embedding if spec.shared_classifier else tensors["output"]
    return LocalWeights(layers, tensors["norm"], embedding, classifier)
