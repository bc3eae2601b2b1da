"""Read-only local weights: each rank's rows of every matrix.

From a whole model file, rank 0 reads one tensor at a time and Scatterv's the plan's rows,
so its extra memory is one tensor (plus the duplicated KV-head rows of a split group), not
the model. From shards, every rank reads its own rows from its own file.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..files.modelfile import ModelFile, ModelFileError, stored_shape, stored_type, tensor_layout
from ..kernels import resolve
from ..model import quant
from ..model.spec import STACKED_KINDS
from ..parallel.comm import Comm
from ..parallel.plan import Plan


@dataclass(frozen=True)
class Matrix:
    """Local rows of one weight matrix in the kernels' layout."""

    type: str  # a weight type's name (quant.WEIGHTS)
    rows: int
    cols: int
    w: np.ndarray | None = None  # f32: (rows, cols) f32; f16: (rows, cols) u16 bits
    # the kernels' layouts (qmatmul): d, the scales: q40/q80: (rows, 16 G) u16 fp16; q50: i16; q4k/q5k: (rows, 40 G)
    # u8; q6k: (rows, 36 G) i8. qs, the codes: q40, q4k: (rows, 256 G) u8 nibbles; q50: (rows, 320 G) u8; q5k:
    # (rows, 320 G) i8; q80: (rows, 512 G) i8; q6k: (rows, 384 G) u8
    d: np.ndarray | None = None
    qs: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.w, self.d, self.qs) if a is not None)

    @property
    def weight_type(self) -> quant.WeightType:
        return quant.WEIGHTS[self.type]

    @classmethod
    def from_stored(cls, stored: np.ndarray, cols: int) -> Matrix:
        t = quant.WEIGHTS[quant.type_of(stored)]
        held = resolve(t.kernels.pack)(stored) if t.kernels.pack else stored
        if t.quantized:
            qs, d = held
            return cls(t.name, stored.shape[0], cols, d=d, qs=qs)
        return cls(t.name, stored.shape[0], cols, w=held)

    def row_to(self, row: int, out: np.ndarray) -> None:
        """Dequantize one local row into out (cols,) f32 (an embedding lookup)."""
        kernels = self.weight_type.kernels
        if kernels.row is None:
            out[:] = self.w[row]
        elif self.weight_type.quantized:
            resolve(kernels.row)(self.qs[row], self.d[row], self.cols // quant.BLOCK, out)
        else:
            resolve(kernels.row)(self.w[row], out)


@dataclass(frozen=True)
class Parts:
    """A stacked product whose parts differ in type (a Q4_K_M file's Q6_K wv beside Q4_K wq and
    wk): each run of one type a Matrix of its own, run one after another (Engine._part_by_part)."""

    parts: tuple[Matrix, ...]

    @property
    def rows(self) -> int:
        return sum(m.rows for m in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.parts)


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts FFN's local rows (the plan's ffn and dim rows of each expert, as of
    a dense FFN), every expert's in one matrix per product, expert after expert, so that one
    kernel call runs all of a step's chosen experts (vector.EXPERTS): w13 holds each expert's
    w1 rows then its w3 rows (a part per type where the two differ, as Parts), w2 its w2 rows."""

    n: int  # experts
    w13: tuple[Matrix, ...]  # one part, or two (w1, w3) where their types differ; each n x its rows per expert
    w2: Matrix  # n x own dim rows

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.w13) + self.w2.nbytes


@dataclass(frozen=True)
class LocalWeights:
    # per layer: vectors (f32; a mixture of experts' router (n_experts, dim)), matrices, and Experts
    layers: tuple[dict[str, np.ndarray | Matrix | Parts | Experts], ...]
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
    """Collective: every rank's share of the model. `model` is the whole file, open on rank 0
    only (others pass None), or this rank's own shard, open on every rank. A tensor that
    can't be read (a damaged file) is a UsageError on every rank, so the job ends through
    its normal exit with the message, not by an abort that may lose it."""
    spec = plan.spec
    layout = tensor_layout(spec)
    if model is not None and model.shard is not None:
        tensors, problem = {}, None
        try:
            for name, info in layout.items():
                _put(tensors, name, model.read(name), info)
                _experts_done(tensors, name, spec)
        except ModelFileError as exc:
            problem = str(exc)
        if problems := [p for p in comm.allgather_obj(problem) if p]:
            raise UsageError("; ".join(problems))
    else:
        tensors = {}
        for name, info in layout.items():
            _put(tensors, name, _scattered(comm, plan, model, name, info), info)
            _experts_done(tensors, name, spec)
    layers = tuple(_layer(tensors, f"layers/{i}/") for i in range(spec.n_layers))
    embedding = tensors["tok_embeddings"]
    classifier = embedding if spec.shared_classifier else tensors["output"]
    return LocalWeights(layers, tensors["norm"], embedding, classifier)


def _layer(tensors: dict, prefix: str) -> dict:
    """One layer's local tensors, taken out of `tensors`."""
    return {n[len(prefix):]: tensors.pop(n) for n in [n for n in tensors if n.startswith(prefix)]}


def _stack_experts(tensors: dict, prefix: str, n_experts: int, cols: dict[str, int]) -> None:
    """A layer's experts, their stored rows, become one Experts: each product's rows of every
    expert packed at once (a layer at a time, so loading holds one layer's experts twice at
    most: plan.expert_layer_bytes, counted in a rank's need). cols: the row length of w1 (w3's)
    and w2."""
    def take(kind: str) -> list[np.ndarray]:
        return [tensors.pop(f"{prefix}experts/{e}/{kind}") for e in range(n_experts)]

    w1, w3 = take("w1"), take("w3")
    if w1[0].dtype == w3[0].dtype:  # expert by expert: its w1 rows, then its w3 rows
        parts = [np.concatenate([a for pair in zip(w1, w3, strict=True) for a in pair])]
    else:  # a part a type: every expert's w1 rows, then every expert's w3 rows
        parts = [np.concatenate(w1), np.concatenate(w3)]
    del w1, w3  # each product's rows are held twice at most: as stored, then packed
    w13 = []
    while parts:
        w13.append(Matrix.from_stored(parts.pop(0), cols["w1"]))
    w2 = np.concatenate(take("w2"))
    tensors[prefix + "experts"] = Experts(n_experts, tuple(w13), Matrix.from_stored(w2, cols["w2"]))


def _experts_done(tensors: dict, name: str, spec) -> None:
    """After the last tensor of a layer's experts (tensor_layout's order), stack them."""
    if spec.moe and name.endswith(f"/experts/{spec.n_experts - 1}/w3"):
        _stack_experts(tensors, name.split("experts/")[0], spec.n_experts, spec.matrix_cols())


# products that read the same input, stacked into one matrix (one product, one parallel
# region): a layer's q/k/v rows, and its w1/w3 rows, one part after another
STACKED = dict(zip(("wqkv", "w13"), STACKED_KINDS, strict=True))


def _put(tensors: dict, name: str, stored: np.ndarray, info) -> None:
    """tensors[name] = the local form of a tensor's stored rows. A part of a stacked product
    waits, as stored rows, for its siblings; then the parts become one Matrix, or Parts where
    their types differ (converted once, layer by layer, so loading holds at most one layer's
    extra copies)."""
    prefix, _, short = name.rpartition("/")
    if "/experts/" in name:  # an expert's rows wait, as stored, for the layer's other experts (_stack_experts)
        tensors[name] = stored
        return
    for stacked, parts in STACKED.items():
        if short in parts:
            tensors[name] = stored
            if all(f"{prefix}/{p}" in tensors for p in parts):
                stored_parts = [tensors.pop(f"{prefix}/{p}") for p in parts]
                # neighbours of one type stay one product (a Q4_K_M's wq and wk beside its Q6_K wv)
                runs = [np.concatenate(list(run)) for _, run in itertools.groupby(stored_parts, lambda a: a.dtype)]
                matrices = tuple(Matrix.from_stored(run, info.shape[1]) for run in runs)
                tensors[f"{prefix}/{stacked}"] = matrices[0] if len(matrices) == 1 else Parts(matrices)
            return
    tensors[name] = _local(stored, info)


def _local(stored: np.ndarray, info) -> np.ndarray | Matrix:
    return Matrix.from_stored(stored, info.shape[1]) if info.matrix else stored


def _scattered(comm: Comm, plan: Plan, model: ModelFile | None, name: str, info) -> np.ndarray:
    """This rank's stored rows of tensor `name` (all of a replicated one), read by rank 0
    from the whole file; every rank learns first whether rank 0 could read it."""
    spec = plan.spec
    data, problem = None, None
    if comm.rank == 0:
        try:
            data = model.read(name)
        except ModelFileError as exc:
            problem = str(exc)
    if problem := comm.bcast_obj(problem):
        raise UsageError(problem)
    if info.split is None:  # replicated vector
        value = data if comm.rank == 0 else np.empty(info.shape, np.float32)
        comm.bcast_array(value)
        return value
    dtype = quant.stored_dtype(stored_type(spec, info))
    spans = tuple(plan.rows(info.split, r) for r in range(plan.world_size))
    a, b = spans[comm.rank]
    full_shape = stored_shape(spec, info)
    row_bytes = dtype.itemsize * int(np.prod(full_shape[1:], dtype=np.int64))
    rows = data.view(np.uint8).reshape(full_shape[0], row_bytes) if comm.rank == 0 else None
    raw = np.empty((b - a, row_bytes), np.uint8)
    comm.scatter_rows(rows, spans, raw)
    return raw.view(dtype).reshape(stored_shape(spec, info, b - a))
