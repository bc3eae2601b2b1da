"""Model conversion into the project's HDF5 model file (`dllama-mpi-convert`).

Each source format is a reader module with FORMAT_NAME, `sniff(path) -> bool` and
`read(path, tokenizer_path) -> Source`; a new format slots into _readers().
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ... import __version__
from ...errors import InputError
from ...model import quant


@dataclass
class Source:
    """What a reader hands the writer.

    spec_fields: every ModelSpec field but weight_type and tensor_types (the converter's choice).
    tensors: called once; yields (name, array) one tensor at a time, names as in
        modelfile.tensor_layout, q/k rows in the engine's interleaved RoPE layout (see
        convert.rope). An array is float values of the dense shape (f32/f16; bf16 widened
        to f32 by the reader), or quant.Q40 / Q50 / Q80 blocks of shape (rows, cols // 32) or
        quant.Q4K / Q5K / Q6K super-blocks (rows, cols // 256), which the writer keeps bit-exact
        when the output type matches.
    tokenizer: anything with write_hdf5(group) (see dllama_mpi.files.tokenizer).
    files: the source files read, recorded with their sha256.
    notes: lines the converter prints (e.g. which tensors were re-quantized).
    native_types: a quantized source's type of each matrix as stored there, by our name
        (GGUF: "Q4_0", "Q6_K", "F16", ...); with it and no --weights the writer keeps each
        type the engine runs (choose_types)."""

    spec_fields: dict
    tensors: Callable[[], Iterator[tuple[str, np.ndarray]]]
    tokenizer: object
    description: str
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    native_types: dict[str, str] = field(default_factory=dict)


MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "tok_embeddings", "output")  # ModelSpec.matrix_cols' kinds

# What each stored type becomes when no --weights is given: the type itself where the engine
# runs it (a record's gguf name), otherwise the nearest that loses nothing measurable. BF16
# widens to f32 (a record's widens: f16 would clip its range); every other quantized type (Q4_1,
# Q5_1, Q3_K, ...) is re-quantized to 8-bit blocks (REQUANTIZED): its values carry at most 6
# bits, which 8-bit blocks of 32 hold to within half a step of 1/127 of each block's largest
# value (4-bit blocks would quantize them a second time, coarser than they are: issue 14's
# damaged answers).
KEPT = {name: t.name for t in quant.WEIGHTS.values() for name in (t.gguf, *t.widens) if name is not None}
REQUANTIZED = quant.Q80_TYPE.name
WIDER = tuple(sorted(quant.WEIGHTS, key=lambda name: quant.WEIGHTS[name].bits))  # narrowest first: the tie-break


def _bit_exact(stored: str, ours: str) -> bool:
    """Whether ggml type `stored` becomes our type `ours` unchanged."""
    return quant.WEIGHTS[ours].gguf == stored


def choose_types(native: dict[str, str]) -> tuple[str, str, list[str]]:
    """(weight_type, tensor_types, notes) keeping a quantized source's types: each tensor the
    type KEPT gives its stored one; the model's weight_type is the most common, and
    tensor_types lists the rest, per kind where a kind is one type in every layer, else per
    layer (a Q4_K_M file holds Q6_K in some layers' w2 and wv only)."""

    def where(name: str) -> tuple[int | None, str]:
        parts = name.split("/")
        return (int(parts[1]), parts[2]) if len(parts) == 3 else (None, name)

    ours = {where(name): KEPT.get(stored, REQUANTIZED) for name, stored in native.items()}
    in_layers = [t for (layer, _), t in ours.items() if layer is not None] or list(ours.values())
    weight_type = max(WIDER, key=lambda t: (in_layers.count(t), -WIDER.index(t)))
    entries = []
    for kind in sorted({kind for _, kind in ours}):
        layers = {layer: t for (layer, k), t in ours.items() if k == kind}
        values = list(layers.values())
        usual = max(WIDER, key=lambda t: (values.count(t), t == weight_type))
        if usual != weight_type:
            entries.append(f"{kind}={usual}")
        entries += [f"layers/{layer}/{kind}={t}" for layer, t in sorted(layers.items()) if t != usual]
    notes = []
    for stored, became in sorted({(t, ours[where(n)]) for n, t in native.items()}):
        names = [n for n, t in native.items() if t == stored and ours[where(n)] == became]
        if _bit_exact(stored, became):
            how = "kept bit-exact"
        elif not quant.WEIGHTS[became].quantized:
            how = "widened"
        else:
            how = "re-quantized to 8-bit blocks (no native kernels for it yet)"
        notes.append(f"{stored} x {len(names)} tensor(s) -> {became}: {how}")
    return weight_type, ",".join(entries), notes


def forced_notes(native: dict[str, str], weights: str) -> list[str]:
    """What --weights does to a quantized source's tensors: one note per stored type it changes."""
    notes = []
    for stored in sorted(set(native.values())):
        if _bit_exact(stored, weights):
            continue
        count = sum(t == stored for t in native.values())
        floats = stored in KEPT and not quant.WEIGHTS[KEPT[stored]].quantized
        how = "converted" if not quant.WEIGHTS[weights].quantized else "quantized" if floats else "re-quantized"
        notes.append(f"{stored} x {count} tensor(s) -> {weights}: {how} (--weights {weights})")
    return notes


class ConvertError(InputError):
    """A conversion that can't be done as asked (input, output, options)."""


def _readers():
    from . import dllama, gguf_model, hf, llama2c

    return [hf, gguf_model, dllama, llama2c]


def read_source(input_path: Path, tokenizer_path: str | Path | None) -> Source:
    import h5py

    from . import hf

    if not (input_path.is_file() or input_path.is_dir()):  # a FIFO or a device would block or never end
        raise ConvertError(f"{input_path} is not a regular file or directory; give a model file or directory")
    if input_path.is_file() and h5py.is_hdf5(input_path):
        raise ConvertError(f"{input_path} is an HDF5 file: a dllama_mpi model file needs no conversion (run it with "
                           "--model); other HDF5 files are not a source format")
    if input_path.is_dir() and not hf.sniff(input_path):
        raise ConvertError(f"{input_path} is a directory without config.json; give a Hugging Face model directory "
                           "(config.json + *.safetensors) or a model file (.gguf, distributed-llama .m, llama2.c .bin)")
    for reader in _readers():
        if reader.sniff(input_path):
            return reader.read(input_path, tokenizer_path)
    names = "; ".join(r.FORMAT_NAME for r in _readers())
    raise ConvertError(f"can't tell the format of {input_path}: it is none of: {names}")


DEFAULT_WEIGHTS = "q40"  # what a float source (HF, llama2.c) is quantized to unless --weights says otherwise


def source_spec(input_path: str | Path):
    """The ModelSpec `dllama-mpi-convert INPUT` would write with its defaults, read from the
    source's metadata alone (a GGUF's header, a Hugging Face directory's config.json: its
    weights need not be there), for sizing a launch before converting."""
    from ...model.spec import ModelSpec
    from . import gguf_model, hf

    input_path = Path(input_path)
    if hf.sniff(input_path):
        return ModelSpec(**hf.config_spec_fields(input_path), weight_type=DEFAULT_WEIGHTS)
    if not gguf_model.sniff(input_path):
        raise ConvertError(f"{input_path} is neither a dllama_mpi model file (or shard directory) nor a source sized "
                           "before converting (a GGUF file, a Hugging Face directory with config.json); convert it "
                           "first (dllama-mpi-convert INPUT OUTPUT.h5), then give --dry-run the file it writes")
    source = read_source(input_path, None)
    if source.native_types:
        weights, tensor_types, _ = choose_types(source.native_types)
        return ModelSpec(**source.spec_fields, weight_type=weights, tensor_types=tensor_types)
    return ModelSpec(**source.spec_fields, weight_type=DEFAULT_WEIGHTS)


def convert(input_path: str | Path, output_path: str | Path, tokenizer_path: str | Path | None,
            weights: str | None, force: bool = False, budgets: list[str] | None = None, progress: bool = False):
    """Convert one model; with `budgets` (as --memory-budget takes them: ratios or sizes),
    output_path becomes a directory of per-rank shards. With `force`, only what the converter
    wrote is replaced (modelfile.check_output). Returns the ModelSpec written."""
    from ...model.spec import ModelSpec
    from ...parallel.budgets import parse_budgets
    from ...parallel.plan import make_plan
    from ..modelfile import check_not_a_loop, check_output, sha256_of, write_model

    if str(output_path).endswith("/") and not budgets:  # Path() would drop the slash and write a file of that name
        raise ConvertError(f"OUTPUT {output_path} ends in '/', so it names a directory, but a model file is written; "
                           f"name the file (e.g. {output_path}model.h5), or add --memory-budget to write per-rank "
                           "shards into that directory")
    input_path, output_path = Path(input_path), Path(output_path)
    if budgets and str(budgets[0]).strip().lower() == "auto":
        raise ConvertError("--memory-budget auto chooses the split when the job starts, so shards can't be split "
                           "for it; run the job once with auto on the unsplit file (it prints the budgets it chose: "
                           "'--memory-budget auto chose 667 333'), then split with those: --memory-budget 667 333")
    check_not_a_loop(input_path, "point INPUT at the model file or directory")
    if not input_path.exists():
        raise ConvertError(f"input {input_path} does not exist")
    ratios = parse_budgets(budgets, len(budgets)).ratios if budgets else None
    check_output(output_path, shards=ratios is not None, force=force)
    source = read_source(input_path, tokenizer_path)
    tensor_types, type_notes = "", []
    if weights is None and source.native_types:
        weights, tensor_types, type_notes = choose_types(source.native_types)
    elif source.native_types:
        type_notes = forced_notes(source.native_types, weights)
    spec = ModelSpec(**source.spec_fields, weight_type=weights or DEFAULT_WEIGHTS, tensor_types=tensor_types)
    plan = make_plan(spec, ratios) if ratios else None
    files = sorted({Path(f) for f in source.files} or {input_path})
    attrs = {
        "source": source.description, "converter_version": __version__,
        "quantization": spec.weights_text,
        "source_files": [f.name for f in files], "source_sha256": [sha256_of(f) for f in files],
    }
    write_model(output_path, spec, source.tensors(), source.tokenizer, attrs, plan=plan, progress=progress)
    for note in type_notes + source.notes:
        print(f"note: {note}", file=sys.stderr)
    fell_back = {}  # (stored type, values of the asked type's block): matrices quant.storage_type gave another type
    for k in sorted(spec.matrix_cols()):
        asked = spec.type_overrides().get(k, spec.weight_type)
        if spec.tensor_type(k) != asked:
            fell_back.setdefault((spec.tensor_type(k), quant.WEIGHTS[asked].block_values), []).append(k)
    for (kind, values), names in sorted(fell_back.items()):
        print(f"note: {', '.join(names)} kept as {kind}: their rows are not whole {values}-value blocks", file=sys.stderr)
    return spec


def info(path: str | Path) -> str:
    """What `--info` prints: attributes, tensors with types and sizes, and a shard set's plan."""
    from ...parallel.plan import make_plan
    from ..modelfile import check_not_a_loop, open_model

    path = Path(path)
    check_not_a_loop(path, "give --info the model file or the directory of its shards")
    lines = []
    first = open_model(path)
    try:
        lines.append(f"{path}: {'shards' if first.shard else 'model file'}")
        for key, value in sorted(first.attrs().items()):
            if key not in ("shard_rank",):
                lines.append(f"  {key} = {value}")
        if first.shard is not None:
            plan = make_plan(first.spec, first.shard[2])
            lines.append(f"plan {first.shard[3]} over {first.shard[1]} ranks:")
            lines.append(plan.table(first.spec.seq_len))
        lines.append(f"{'tensor':<28} {'type':>5} {'shape':>18} {'MiB':>9}")
        total, by_type = 0, {}
        for name, size, kind, shape in first.datasets():
            if name.startswith("tokenizer"):
                continue
            total += size
            count, nbytes = by_type.get(kind, (0, 0))
            by_type[kind] = count + 1, nbytes + size
            lines.append(f"{name:<28} {kind:>5} {str(shape):>18} {size / 2**20:>9.2f}")
        lines.append(f"{'total' if not first.shard else 'total (shard 0)'}: {total / 2**20:.2f} MiB; by type: "
                     + ", ".join(f"{kind} {count} tensor(s) {nbytes / 2**20:.2f} MiB"
                                 for kind, (count, nbytes) in sorted(by_type.items())))
    finally:
        first.close()
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dllama-mpi-convert", allow_abbrev=False,
        description="Convert a model (Hugging Face directory, GGUF, distributed-llama .m, llama2.c .bin) "
                    "into a dllama_mpi HDF5 model file, optionally pre-split into per-rank shards.")
    p.add_argument("input", help="source model (the format is detected), or with --info a model file/shard directory")
    p.add_argument("output", nargs="?", help="HDF5 model file to write (a directory of shards with --memory-budget)")
    p.add_argument("--tokenizer", help="tokenizer file when the model has none inside (llama2.c tokenizer.bin, "
                                       "distributed-llama .t); default: tokenizer.bin beside a llama2.c input")
    p.add_argument("--weights", choices=quant.QUANTIZABLE,
                   help="weight type of every matrix (default: a GGUF's own types where the engine runs them, its "
                        f"other quantized types as q80; {DEFAULT_WEIGHTS} for float sources)")
    p.add_argument("--memory-budget", nargs="+", metavar="B",
                   help="write per-rank shards into the directory OUTPUT, split for these budgets (one per rank, "
                        "ratios or sizes as at run time: 3 2 2 1 or 6GiB 2GiB 2GiB 1GiB)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing OUTPUT, only if the converter wrote it (a model file, a directory of shards)")
    p.add_argument("--info", action="store_true", help="print a model file's (or shard directory's) contents and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_intermixed_args(argv)  # options may stand between INPUT and OUTPUT
    for name, value in (("INPUT", args.input), ("OUTPUT", args.output), ("--tokenizer", args.tokenizer)):
        if value == "":  # Path("") would be the current directory
            p.error(f"{name} is empty; give a path")
    if args.info and (args.output is not None or args.memory_budget):
        p.error("--info takes INPUT alone (a model file or a shard directory)")
    try:
        if args.info:
            print(info(args.input))
            return 0
        if args.output is None:
            p.error("OUTPUT is required unless --info is given")
        spec = convert(args.input, args.output, args.tokenizer, args.weights, args.force, args.memory_budget,
                       progress=True)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    split = f", split for budgets {' '.join(args.memory_budget)}" if args.memory_budget else ""
    print(f"wrote {args.output}: {spec.architecture}, {spec.n_layers} layers, dim {spec.dim}, vocab {spec.vocab_size}, "
          f"weights {spec.weights_text}{split}", file=sys.stderr)
    return 0
