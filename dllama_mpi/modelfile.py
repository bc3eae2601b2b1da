"""The HDF5 model file: schema, writer and validating reader (schema in docs/model-format.md)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

from . import quant
from .spec import FORMAT_NAME, FORMAT_VERSION, ModelSpec
from .tokenizer import Tokenizer


class ModelFileError(ValueError):
    """A model file that can't be used, with what was expected, what was found, what to do."""


def tensor_layout(spec: ModelSpec) -> dict[str, tuple[str | None, tuple[int, ...]]]:
    """name -> (matrix kind, dense shape); kind None marks a replicated f32 vector (a norm)."""
    layout: dict[str, tuple[str | None, tuple[int, ...]]] = {
        "tok_embeddings": ("tok_embeddings", (spec.vocab_size, spec.dim)),
    }
    shapes = {
        "wq": (spec.q_dim, spec.dim), "wk": (spec.kv_dim, spec.dim), "wv": (spec.kv_dim, spec.dim),
        "wo": (spec.dim, spec.q_dim), "w1": (spec.hidden_dim, spec.dim),
        "w2": (spec.dim, spec.hidden_dim), "w3": (spec.hidden_dim, spec.dim),
    }
    for layer in range(spec.n_layers):
        p = f"layers/{layer}/"
        layout[p + "attention_norm"] = (None, (spec.dim,))
        for kind, shape in shapes.items():
            layout[p + kind] = (kind, shape)
        layout[p + "ffn_norm"] = (None, (spec.dim,))
    layout["norm"] = (None, (spec.dim,))
    if not spec.shared_classifier:
        layout["output"] = ("output", (spec.vocab_size, spec.dim))
    return layout


def stored_form(spec: ModelSpec, kind: str | None, shape: tuple[int, ...]) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape of a tensor as stored: Q40 matrices hold (rows, cols // 32) blocks."""
    if kind is not None and spec.tensor_type(kind) == "q40":
        return quant.Q40, (shape[0], shape[1] // quant.BLOCK)
    return np.dtype(np.float32), shape


def write_model(path: str | os.PathLike, spec: ModelSpec, tensors: Iterable[tuple[str, np.ndarray]],
                tokenizer: Tokenizer, extra_attrs: dict | None = None) -> None:
    """Write a model file atomically: to a temporary name beside `path`, renamed on success.

    `tensors` yields (name, dense f32 array) in any order, one at a time, so a converter
    holds one tensor in memory; each is quantized here per spec.tensor_type."""
    path = Path(path)
    layout = tensor_layout(spec)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            for key, value in {**spec.to_attrs(), **(extra_attrs or {})}.items():
                f.attrs[key] = value
            seen = set()
            for name, dense in tensors:
                kind, shape = layout[name]
                if dense.shape != shape:
                    raise ModelFileError(f"tensor {name}: expected shape {shape}, got {dense.shape}")
                dtype, _ = stored_form(spec, kind, shape)
                data = quant.quantize_q40(dense) if dtype == quant.Q40 else dense.astype(np.float32)
                ds = f.create_dataset(name, data=data)
                ds.attrs["type"] = "q40" if dtype == quant.Q40 else "f32"
                seen.add(name)
            missing = sorted(set(layout) - seen)
            if missing:
                raise ModelFileError(f"converter produced no tensor(s) {missing[:4]}")
            tokenizer.write_hdf5(f.create_group("tokenizer"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ModelFile:
    """An opened, validated model file. Only rank 0 opens one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise ModelFileError(f"model file {self.path} does not exist; give the path of an .h5 file "
                                 "made by dllama-mpi-convert, or leave out --model to run the built-in synthetic model")
        if not h5py.is_hdf5(self.path):
            raise ModelFileError(f"{self.path} is not an HDF5 file; convert the model first: "
                                 f"dllama-mpi-convert INPUT {self.path.with_suffix('.h5').name}")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise ModelFileError(f"{self.path} can't be opened as HDF5 ({exc}); it may be truncated: convert it again") from exc
        attrs = self._file.attrs
        found = (_str(attrs.get("format")), attrs.get("format_version"))
        if found[0] != FORMAT_NAME or found[1] != FORMAT_VERSION:
            raise ModelFileError(f"{self.path}: expected a {FORMAT_NAME} model file of format version "
                                 f"{FORMAT_VERSION}, found format={found[0]!r} version={found[1]!r}; "
                                 "re-convert it with this version's dllama-mpi-convert")
        try:
            self.spec = ModelSpec.from_attrs(attrs)
        except ValueError as exc:
            raise ModelFileError(f"{self.path}: {exc}") from exc
        self._check_tensors()

    def _check_tensors(self) -> None:
        for name, (kind, shape) in tensor_layout(self.spec).items():
            dtype, stored_shape = stored_form(self.spec, kind, shape)
            ds = self._file.get(name)
            if not isinstance(ds, h5py.Dataset):
                raise ModelFileError(f"{self.path}: tensor {name!r} is missing; the file is incomplete, convert it again")
            if ds.shape != stored_shape or ds.dtype != dtype:
                raise ModelFileError(f"{self.path}: tensor {name!r} should be {dtype} {stored_shape} for this spec, "
                                     f"found {ds.dtype} {ds.shape}; the file is inconsistent, convert it again")

    def read(self, name: str) -> np.ndarray:
        """One whole tensor as stored (f32 array or Q40 blocks)."""
        return self._file[name][()]

    def tokenizer(self) -> Tokenizer:
        group = self._file.get("tokenizer")
        if not isinstance(group, h5py.Group):
            raise ModelFileError(f"{self.path}: no tokenizer group; convert the model again with its tokenizer")
        return Tokenizer.read_hdf5(group)

    def close(self) -> None:
        self._file.close()


def _str(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else (None if value is None else str(value))
