"""The HDF5 model file: schema, writer and validating readers (schema in docs/model-format.md).

A model is one file, or a directory of per-rank shard files split by a partition plan
(`shard-R-of-N.h5`), each holding only its rank's rows, so that each rank reads its own
file (and a node needs only its own shard on local disk).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from ..errors import InputError
from ..model import quant
from ..model.spec import FORMAT_NAME, FORMAT_VERSION, ModelSpec
from ..parallel.plan import Plan
from .atomic_output import Owner, Temporary, check_target, install, is_hdf5_of, remove_stale
from .attributes import attribute_text, decoded, plain, plain_value


class ModelFileError(InputError):
    """A model file that can't be used (or written), with what was expected, what was found,
    what to do."""


class TensorInfo(NamedTuple):
    split: str | None  # the plan's row kind (plan.rows), or None: replicated on every rank
    shape: tuple[int, ...]  # dense shape
    matrix: bool  # a weight matrix (stored in its type: spec.tensor_type) or an f32 vector
    layer: int | None = None  # the layer of a layer's tensor (a matrix's type may be its layer's own)


def tensor_layout(spec: ModelSpec) -> dict[str, TensorInfo]:
    """Every tensor of a model with `spec`, by name."""
    layout = {"tok_embeddings": TensorInfo("tok_embeddings", (spec.vocab_size, spec.dim), True)}
    matrices = {
        "wq": (spec.q_dim, spec.dim), "wk": (spec.kv_dim, spec.dim), "wv": (spec.kv_dim, spec.dim),
        "wo": (spec.dim, spec.q_dim), "w1": (spec.hidden_dim, spec.dim),
        "w2": (spec.dim, spec.hidden_dim), "w3": (spec.hidden_dim, spec.dim),
    }
    for layer in range(spec.n_layers):
        p = f"layers/{layer}/"
        layout[p + "attention_norm"] = TensorInfo(None, (spec.dim,), False)
        for kind, shape in matrices.items():
            layout[p + kind] = TensorInfo(kind, shape, True, layer)
        if spec.qkv_bias:
            for bias, kind in (("bq", "wq"), ("bk", "wk"), ("bv", "wv")):
                layout[p + bias] = TensorInfo(kind, (matrices[kind][0],), False)
        if spec.qk_norm:
            layout[p + "q_norm"] = TensorInfo(None, (spec.head_dim,), False)
            layout[p + "k_norm"] = TensorInfo(None, (spec.head_dim,), False)
        layout[p + "ffn_norm"] = TensorInfo(None, (spec.dim,), False)
        if spec.moe:  # the router, replicated, then each expert's FFN, split as a dense FFN is
            del layout[p + "w1"], layout[p + "w2"], layout[p + "w3"]
            layout[p + "router"] = TensorInfo(None, (spec.n_experts, spec.dim), False)
            for e in range(spec.n_experts):
                for kind in ("w1", "w2", "w3"):
                    layout[f"{p}experts/{e}/{kind}"] = TensorInfo(kind, matrices[kind], True, layer)
    layout["norm"] = TensorInfo(None, (spec.dim,), False)
    if not spec.shared_classifier:
        layout["output"] = TensorInfo("output", (spec.vocab_size, spec.dim), True)
    return layout


def stored_type(spec: ModelSpec, info: TensorInfo) -> str:
    return spec.tensor_type(info.split, info.layer) if info.matrix else "f32"


def stored_shape(spec: ModelSpec, info: TensorInfo, rows: int | None = None) -> tuple[int, ...]:
    """Shape as stored (quantized rows hold blocks of 32), optionally of `rows` rows only."""
    rows = info.shape[0] if rows is None else rows
    if len(info.shape) == 1:
        return (rows,)
    return rows, quant.stored_cols(stored_type(spec, info), info.shape[1])


def model_bytes(spec: ModelSpec) -> int:
    return sum(int(np.prod(stored_shape(spec, i))) * quant.stored_dtype(stored_type(spec, i)).itemsize
               for i in tensor_layout(spec).values())


def largest_tensor_bytes(spec: ModelSpec) -> int:
    """The largest tensor as stored: what rank 0 holds at once while scattering a whole file."""
    return max(quant.stored_dtype(stored_type(spec, info)).itemsize * math.prod(stored_shape(spec, info))
               for info in tensor_layout(spec).values())


SHARD_NAME = re.compile(r"shard-(0|[1-9][0-9]*)-of-([1-9][0-9]*)\.h5")  # as shard_name writes them: no leading zeros


def shard_name(rank: int, world_size: int) -> str:
    return f"shard-{rank}-of-{world_size}.h5"


def shard_files(directory: Path) -> tuple[int, dict[int, Path]]:
    """(count, {rank: path}) of the shard files in `directory` (names exactly shard-R-of-N.h5;
    others, such as a file manager's 'shard-0-of-2 (copy).h5', are not shards). The files
    must all be of one split: ModelFileError names them otherwise."""
    found = {p: (int(m[1]), int(m[2])) for p in sorted(directory.iterdir()) if (m := SHARD_NAME.fullmatch(p.name))}
    by_count: dict[int, list[str]] = {}
    for p, (_, count) in found.items():
        by_count.setdefault(count, []).append(p.name)
    if len(by_count) > 1:
        sets = "; ".join(f"for {count} rank(s): {', '.join(names)}" for count, names in sorted(by_count.items()))
        raise ModelFileError(f"{directory} holds shard files of {len(by_count)} different splits ({sets}); keep one "
                             "split's files there (move the others away) or convert the shards again")
    stray = [p.name for p, (rank, count) in found.items() if rank >= count]
    if stray:
        raise ModelFileError(f"{directory}: {', '.join(stray)} names a rank beyond its shard count; "
                             "convert the shards again")
    count = next(iter(by_count), 0)
    return count, {rank: p for p, (rank, _) in found.items()}


def is_model_file(path: Path) -> bool:
    """Whether `path` is a plain file holding a dllama_mpi model (what this converter writes)."""
    return is_hdf5_of(path, FORMAT_NAME)


def check_not_a_loop(path: Path, fix: str) -> None:
    """ModelFileError, ending in `fix`, if `path` is (or goes through) a symbolic link that
    loops: Path.exists() says False for it, as for nothing there, and that would be misreported."""
    try:
        path.stat()
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            return
        where = "is a symbolic link" if path.is_symlink() else "goes through a symbolic link"
        raise ModelFileError(f"{path} {where} that loops (ELOOP); {fix}") from None


ONLY_OURS = "--force replaces only what the converter wrote"


def check_output(path: Path, shards: bool, force: bool) -> None:
    """Whether a model file (or, with `shards`, a shard directory) may be written at `path`
    (atomic_output.check_target): what stands there is replaced only with `force` and only if
    this converter wrote it (a model file; a directory holding nothing but shard files).
    ModelFileError says what stands in the way."""
    check_not_a_loop(path, "remove the link or choose another output name")
    check_target(path, force, _owner(shards), directory=shards)


def _owner(shards: bool) -> Owner:
    """The converter as atomic_output.check_target and install see it, writing a file or shards."""
    return Owner("output", ONLY_OURS, lambda path: _not_replaceable(path, shards),
                 "changed while converting (another conversion of it at the same time?); this conversion replaced "
                 "nothing: check what is there, or convert again", error=ModelFileError, replaced="shards")


def _not_replaceable(path: Path, shards: bool) -> str | None:
    """Why what stands at `path` (not a link) may not be replaced by a model file (or shards), or None."""
    if not shards:
        if path.is_dir():
            return (f"{path} is a directory; give the model file's path, e.g. {path / 'model.h5'} "
                    "(or add --memory-budget to write per-rank shards into a directory)")
        if not is_model_file(path):
            return f"{path} is not a dllama_mpi model file; {ONLY_OURS}: remove it yourself or choose another name"
        return None
    if not path.is_dir():
        return f"{path} is a file; shards are written into a directory: choose a directory name"
    if foreign := _foreign_entries(path):
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        return (f"{path} holds entries the converter did not write ({', '.join(foreign[:5])}{more}); {ONLY_OURS} "
                "(a directory of shard files alone): choose another directory or move them away")
    return None


def _foreign_entries(directory: Path) -> list[str]:
    """Entries of `directory` that are not model files named as shards."""
    return [p.name + ("/" if p.is_dir() else "") for p in sorted(directory.iterdir())
            if not (SHARD_NAME.fullmatch(p.name) and is_model_file(p))]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


CHUNK_VALUES = 1 << 22  # values converted at a time: a big tensor never exists as f32 whole


def _to_stored(name: str, source, spec: ModelSpec, info: TensorInfo) -> np.ndarray:
    """A source tensor in its stored type, converted a block of rows at a time. `source` is an
    array, or any object with .shape, .dtype and row slicing (a lazily read tensor), holding
    floats of the dense shape or blocks of a quantized type (quant.block_type)."""
    kind = stored_type(spec, info)
    block = quant.block_type(source.dtype)
    blocks = block is not None
    found = (source.shape[0], source.shape[1] * block.block_values) if blocks else tuple(source.shape)
    if found != info.shape:
        raise ModelFileError(f"tensor {name}: expected shape {info.shape}, got {found}")
    rows = info.shape[0]
    out = np.empty(stored_shape(spec, info), quant.stored_dtype(kind))
    step = max(1, CHUNK_VALUES // max(1, int(np.prod(info.shape[1:], dtype=np.int64))))
    for a in range(0, rows, step):
        chunk = np.asarray(source[a : a + step])
        if not blocks and chunk.dtype not in (np.float32, np.float16):
            chunk = chunk.astype(np.float32)
        out[a : a + step] = quant.convert(chunk, kind)
    return out


def write_model(path: str | os.PathLike, spec: ModelSpec, tensors: Iterable[tuple[str, np.ndarray]],
                tokenizer, extra_attrs: dict | None = None, plan: Plan | None = None,
                progress: bool = False) -> None:
    """Write a model atomically: to a temporary beside `path` (atomic_output.Temporary), renamed
    on success, so an interrupted conversion leaves nothing at `path`.

    `tensors` yields (name, array) one at a time (floats or blocks of a quantized type, see
    _to_stored), so a converter holds about one tensor in memory. With a `plan`, `path` is a
    directory of per-rank shards, each with the rows the plan gives its rank."""
    path = Path(path)
    check_output(path, shards=plan is not None, force=True)
    layout = tensor_layout(spec)
    n_files = 1 if plan is None else plan.world_size
    remove_stale(path, entries=SHARD_NAME)
    tmp = Temporary(path)
    attrs = {"format": FORMAT_NAME, "format_version": spec.format_version(), **spec.to_attrs(), **(extra_attrs or {})}
    attrs["model_id"] = hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    need, free = model_bytes(spec), shutil.disk_usage(path.parent).free
    if need > free:
        raise ModelFileError(f"{path.parent} has {free / 2**20:.1f} MiB free but the model takes about "
                             f"{need / 2**20:.1f} MiB; free some space or write it elsewhere")
    files = []
    try:
        with _writable(path.parent):
            if plan is None:
                files.append(tmp.create_file())
            else:
                tmp.create_directory()
                files += [h5py.File(tmp.path / shard_name(r, n_files), "x") for r in range(n_files)]
        try:
            for r, f in enumerate(files):
                f.attrs.update(attrs)
                if plan is not None:
                    f.attrs.update({"shard_rank": r, "shard_count": n_files, "plan_budgets": list(plan.budgets),
                                    "plan_hash": plan.plan_hash()})
            shown = _progress(model_bytes(spec), progress)
            seen = set()
            for name, array in tensors:
                info = layout.get(name)
                if info is None:
                    raise ModelFileError(f"unexpected tensor {name!r} for this spec")
                stored = _to_stored(name, array, spec, info)
                for r, f in enumerate(files):
                    part = stored
                    if plan is not None and info.split is not None:
                        a, b = plan.rows(info.split, r)
                        part = stored[a:b]
                    # fletcher32: a flipped byte in a weight is caught when it is read
                    ds = f.create_dataset(name, data=part, fletcher32=part.size > 0, chunks=part.size > 0 or None)
                    ds.attrs["type"] = quant.type_of(stored)
                    f.flush()  # a full disk shows here, as an exception, not later inside close()
                seen.add(name)
                if shown is not None:
                    shown.update(stored.nbytes, name)
                del array, stored
            if shown is not None:
                shown.close()
            missing = sorted(set(layout) - seen)
            if missing:
                raise ModelFileError(f"the source produced no tensor(s) {missing[:4]}")
            for f in files:
                tokenizer.write_hdf5(f.create_group("tokenizer"))
                f.flush()
            tmp.unmark(files[0] if plan is None else None)
        except Exception:  # h5py reports a failed write as RuntimeError or OSError, mostly without errno
            if not _disk_full(tmp.path if plan is not None else tmp.path.parent):
                raise
            for f in files:  # empty the temporaries: closing them then has nothing left to write
                os.truncate(f.filename, 0)
            raise ModelFileError(f"out of disk space writing {path} (about {need / 2**20:.1f} MiB needed, "
                                 f"{free / 2**20:.1f} MiB were free at the start); nothing was written") from None
        finally:
            for f in files:
                f.close()
        with _writable(path.parent):
            install(tmp.path, path, _owner(plan is not None))
    finally:
        tmp.discard()


def _disk_full(directory: Path, probe_bytes: int = 1 << 20) -> bool:
    """Whether `directory`'s filesystem is out of space: reserving `probe_bytes` there fails
    with ENOSPC (h5py's exceptions don't carry the errno of the write that failed)."""
    try:
        with tempfile.TemporaryFile(dir=directory) as probe:
            os.posix_fallocate(probe.fileno(), 0, probe_bytes)
    except OSError as exc:
        return exc.errno == errno.ENOSPC
    return False


@contextlib.contextmanager
def _writable(directory: Path):
    """A write refused by the system (permissions, a read-only filesystem) as the user's
    ModelFileError: nothing was written."""
    try:
        yield
    except OSError as exc:
        if not (isinstance(exc, PermissionError) or exc.errno == errno.EROFS):
            raise
        reason = os.strerror(exc.errno) if exc.errno else str(exc)  # h5py's strerror is a paragraph
        raise ModelFileError(f"can't write in {directory}: {reason}; write the model somewhere you may write to") from None


PROGRESS_INTERVAL_S = 5.0  # at most this long between plain progress lines (stderr not a terminal)


def _progress(total: int, enabled: bool):
    """How the conversion shows its progress on stderr: a bar on a terminal, plain lines in a
    log (CI, Slurm), where a bar's carriage returns would print nothing readable."""
    if not enabled:
        return None
    return _Bar(total) if sys.stderr.isatty() else _Lines(total)


class _Bar:
    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting")

    def update(self, nbytes: int, name: str) -> None:
        self.bar.set_postfix_str(name)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


class _Lines:
    """`converting: 312.0 of 650.1 MiB (48 %), 7 s, layers/11/w2`, at most every
    PROGRESS_INTERVAL_S and once at the end."""

    def __init__(self, total: int):
        self.total, self.done, self.name = total, 0, ""
        self.start = self.shown = time.monotonic()

    def update(self, nbytes: int, name: str) -> None:
        self.done, self.name = self.done + nbytes, name
        if time.monotonic() - self.shown >= PROGRESS_INTERVAL_S:
            self._show()

    def close(self) -> None:
        self._show()

    def _show(self) -> None:
        self.shown = time.monotonic()
        print(f"converting: {self.done / 2**20:.1f} of {self.total / 2**20:.1f} MiB "
              f"({100 * self.done // max(1, self.total)} %), {self.shown - self.start:.0f} s, {self.name}",
              file=sys.stderr, flush=True)


class ModelFile:
    """An opened, validated model file (whole, or one rank's shard).

    Every read of the HDF5 file goes through _hdf5: the HDF5 library reports damaged
    metadata as KeyError, OSError, RuntimeError or ValueError alike, so at that boundary
    any exception means a damaged file; what is read is then checked outside it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        check_not_a_loop(self.path, "point --model at the model file (or the directory of its shards)")
        if not self.path.exists():
            raise ModelFileError(f"model file {self.path} does not exist; give the path of an .h5 file "
                                 "made by dllama-mpi-convert, or leave out --model to run the built-in synthetic model")
        if not self.path.is_file() or not h5py.is_hdf5(self.path):
            raise ModelFileError(f"{self.path} is not an HDF5 file; convert the model first: "
                                 f"dllama-mpi-convert INPUT {self.path.with_suffix('.h5').name}")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise ModelFileError(f"{self.path} can't be opened as HDF5 ({exc}); it may be truncated: convert it again") from exc
        try:
            self._validate()
        except BaseException:
            self._file.close()  # refused: the file is not left open
            raise

    def _hdf5(self, what: str, read):
        try:
            return read()
        except Exception as exc:  # the HDF5 library on damaged metadata: see the class docstring
            raise ModelFileError(f"{self.path} is damaged ({what}: {type(exc).__name__}: {exc}); convert it again") from None

    def _validate(self) -> None:
        attrs = self._hdf5("its attributes", lambda: decoded(self._file.attrs))
        found = (attrs.get("format"), attrs.get("format_version"))
        if (attribute_text(found[0]) != FORMAT_NAME
                or not (isinstance(found[1], (int, np.integer)) and 1 <= found[1] <= FORMAT_VERSION)):
            raise ModelFileError(f"{self.path}: expected a {FORMAT_NAME} model file of format version 1 to "
                                 f"{FORMAT_VERSION}, found format={plain_value(found[0])!r} "
                                 f"version={plain_value(found[1])!r}; "
                                 "re-convert it with this version's dllama-mpi-convert")
        try:
            self.spec = ModelSpec.from_attrs(attrs)
        except InputError as exc:  # the spec's own message, with the file named
            raise ModelFileError(f"{self.path}: {exc}") from exc
        self.model_id = attribute_text(attrs.get("model_id"))
        self.shard = None  # (rank, count, budgets, plan_hash) for a shard
        if "shard_rank" in attrs:
            self.shard = self._shard_attrs(attrs)
        else:
            self.check_tensors()

    def _shard_attrs(self, attrs) -> tuple[int, int, tuple[int, ...], str]:
        rank, count, budgets, plan_hash = (attrs.get(k) for k in ("shard_rank", "shard_count", "plan_budgets", "plan_hash"))
        whole = (int, np.integer)
        if (isinstance(rank, whole) and isinstance(count, whole) and 0 <= rank < count <= 2**16
                and isinstance(budgets, np.ndarray) and budgets.shape == (count,) and budgets.dtype.kind in "iu"
                and (budgets > 0).all() and isinstance(plan_hash, str)):
            return int(rank), int(count), tuple(int(b) for b in budgets), plan_hash
        raise ModelFileError(f"{self.path}: malformed shard attributes (shard_rank={plain_value(rank)!r}, "
                             f"shard_count={plain_value(count)!r}, plan_budgets={plain_value(budgets)!r}); "
                             "convert the shards again")

    def check_shard(self, rank: int, plan: Plan, model_id: str) -> None:
        """This file is shard `rank` of `plan`'s split of the model `model_id` (shard 0's),
        with every tensor as the plan gives that rank."""
        if self.shard is None:
            raise ModelFileError(f"{self.path} is a whole model file, not shard {rank} of the shards beside it; "
                                 "convert the shards again")
        if self.model_id != model_id:
            raise ModelFileError(f"{self.path} is a shard of another model (model {self.model_id}; shard 0 is of "
                                 f"model {model_id}); convert the shards again into one directory")
        if self.shard[0] != rank:
            raise ModelFileError(f"{self.path} holds the rows of shard {self.shard[0]}, not of shard {rank} "
                                 "(renamed?); convert the shards again")
        if self.shard[3] != plan.plan_hash():
            raise ModelFileError(f"{self.path} is a shard of another split (budgets "
                                 f"{' '.join(map(str, self.shard[2]))}, plan {self.shard[3]}; shard 0's is plan "
                                 f"{plan.plan_hash()}); convert the shards again into one directory")
        self.check_tensors(plan, rank)

    def check_tensors(self, plan: Plan | None = None, rank: int = 0) -> None:
        """Every tensor present with the stored dtype and shape the spec implies (for a
        shard: the rows of `rank` in `plan`)."""
        def shape_and_dtype(name: str):
            ds = self._file.get(name)
            return (ds.shape, ds.dtype) if isinstance(ds, h5py.Dataset) else None

        for name, info in tensor_layout(self.spec).items():
            rows = None
            if self.shard is not None and info.split is not None:
                a, b = plan.rows(info.split, rank)
                rows = b - a
            dtype = quant.stored_dtype(stored_type(self.spec, info))
            shape = stored_shape(self.spec, info, rows)
            found = self._hdf5(f"tensor {name!r}", lambda name=name: shape_and_dtype(name))
            if found is None:
                raise ModelFileError(f"{self.path}: tensor {name!r} is missing; the file is incomplete, convert it again")
            if found != (shape, dtype):
                raise ModelFileError(f"{self.path}: tensor {name!r} should be {dtype} {shape} for this spec, "
                                     f"found {found[1]} {found[0]}; the file is inconsistent, convert it again")

    def read(self, name: str) -> np.ndarray:
        """One whole tensor as stored (a shard: this rank's rows of it); a checksum mismatch
        (fletcher32) or truncated data is a ModelFileError."""
        return self._hdf5(f"tensor {name!r} can't be read", lambda: self._file[name][()])

    def tokenizer(self):
        """The tokenizer stored with the model: its group is copied into memory at the HDF5
        boundary, then parsed (a parser's bug still shows as one)."""
        from .tokenizer import load_tokenizer

        def copy_to_memory():
            group = self._file.get("tokenizer")
            if not isinstance(group, h5py.Group):
                return None
            memory = h5py.File(io.BytesIO(), "w")
            self._file.copy(group, memory, name="tokenizer")
            return memory

        memory = self._hdf5("its tokenizer", copy_to_memory)
        if memory is None:
            raise ModelFileError(f"{self.path}: no tokenizer group; convert the model again with its tokenizer")
        try:
            return load_tokenizer(memory["tokenizer"])
        except InputError as exc:
            raise ModelFileError(f"{self.path}: {exc}; convert the model again") from None
        finally:
            memory.close()

    def attrs(self) -> dict:
        return self._hdf5("its attributes", lambda: plain(self._file.attrs))

    def datasets(self) -> list[tuple[str, int, str, tuple[int, ...]]]:
        """(name, bytes stored, type attribute, shape) of every dataset."""
        def visit():
            found = []
            self._file.visititems(lambda name, obj: found.append(
                (name, obj.id.get_storage_size(), obj.attrs.get("type", "f32"), obj.shape))
                if isinstance(obj, h5py.Dataset) else None)
            return found

        return self._hdf5("its datasets", visit)

    def close(self) -> None:
        self._file.close()


def open_model(path: str | os.PathLike, rank: int = 0, world_size: int = 1) -> ModelFile:
    """The file `rank` reads: the model file itself, or its shard in a shard directory."""
    path = Path(path)
    if path.is_dir():
        count, shards = shard_files(path)
        if not count:
            raise ModelFileError(f"{path} is a directory without shard files (shard-R-of-N.h5); "
                                 "give a model file or a directory written by dllama-mpi-convert --memory-budget")
        if rank >= count:
            raise ModelFileError(f"{path} holds shards for {count} ranks; this job has {world_size}: relaunch with "
                                 f"mpirun -n {count} and the shards' budgets, or use the unsplit model file")
        if rank not in shards:
            raise ModelFileError(f"shard {shard_name(rank, count)} is missing from {path}; copy it there or convert "
                                 "the shards again")
        return ModelFile(shards[rank])
    return ModelFile(path)
