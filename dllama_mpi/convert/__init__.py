"""Model conversion into the project's HDF5 model file (`dllama-mpi-convert`).

Each source format is a reader module with `sniff(path) -> bool` and
`read(path, tokenizer_path) -> Source`; new formats slot into READERS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__, quant
from ..modelfile import write_model
from ..spec import ModelSpec
from ..tokenizer import Tokenizer


@dataclass
class Source:
    """What a reader hands the writer: the spec (weight_type filled in by the writer),
    tensors as (name, dense f32 array) produced one at a time, and the tokenizer."""

    spec_fields: dict
    tensors: Callable[[], Iterator[tuple[str, np.ndarray]]]
    tokenizer: Tokenizer
    description: str


def _readers():
    from . import llama2c

    return [llama2c]


class ConvertError(ValueError):
    pass


def convert(input_path: str | Path, output_path: str | Path, tokenizer_path: str | Path | None,
            weights: str, force: bool = False) -> ModelSpec:
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise ConvertError(f"input {input_path} does not exist")
    if output_path.exists() and not force:
        raise ConvertError(f"output {output_path} exists; pass --force to overwrite it")
    for reader in _readers():
        if reader.sniff(input_path):
            source = reader.read(input_path, tokenizer_path)
            break
    else:
        names = ", ".join(r.FORMAT_NAME for r in _readers())
        raise ConvertError(f"can't tell the format of {input_path}: it is none of: {names}")
    spec = ModelSpec(**source.spec_fields, weight_type=weights)
    kept_f32 = sorted({k for k in spec.matrix_cols() if spec.tensor_type(k) == "f32"}) if weights != "f32" else []
    write_model(output_path, spec, source.tensors(), source.tokenizer, {
        "source": source.description, "source_file": input_path.name, "converter_version": __version__,
    })
    if kept_f32:
        print(f"note: {', '.join(kept_f32)} kept as f32: their rows are not whole {quant.BLOCK}-value blocks",
              file=sys.stderr)
    return spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dllama-mpi-convert", description="Convert a model into a dllama_mpi HDF5 model file.")
    p.add_argument("input", help="source model (llama2.c .bin checkpoint)")
    p.add_argument("output", help="HDF5 model file to write")
    p.add_argument("--tokenizer", help="tokenizer file (llama2.c tokenizer.bin); default: tokenizer.bin beside the input")
    p.add_argument("--weights", choices=quant.WEIGHT_TYPES, default="q40", help="weight type (default q40)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    args = p.parse_args(argv)
    try:
        spec = convert(args.input, args.output, args.tokenizer, args.weights, args.force)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {spec.n_layers} layers, dim {spec.dim}, vocab {spec.vocab_size}, "
          f"weights {spec.weight_type}", file=sys.stderr)
    return 0
