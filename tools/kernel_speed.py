#!/usr/bin/env python3
"""`python tools/kernel_speed.py`: how fast each weight type's product streams its weights, and
attention its KV cache, next to the node's read bandwidth measured in the same run (issue 22: "each
kernel's achieved GB/s against a read-bandwidth probe").

For each weight type of the registry (or --types) and each product of a model's layer (qkv, wo,
w1+w3, w2) and its classifier, on that model's shapes (--shape, one of bench's, or --model FILE),
it times one token's product (q80 buffers: the 8-bit activation form of the type; f32 and f16
take f32) on matrices of arbitrary values held as the kernels hold them, enough copies of each to
stream at least --stream-mib from memory (the kernels' time does not depend on the values). It
reports GB/s of the weights read per second and that figure as a fraction of the probe. Then, for
each KV cache type (--kv-types) and depth (--depths), one decode row's attention over every head of
a layer, on caches of random keys and values (enough layers' worth to stream --stream-mib): GB/s
of the cache read:

    python tools/kernel_speed.py --shape tinyllama-1.1b --threads 2
    python tools/kernel_speed.py --model qwen.h5 --types q80 q4k q6k --json kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from dllama_mpi.commands.bench import SHAPES, read_bandwidth
from dllama_mpi.commands.launcher import positive_int
from dllama_mpi.job.engine import GROUP, Activations, matmul
from dllama_mpi.job.speed import held_matrix, layer_shapes
from dllama_mpi.kernels import qmatmul, vector
from dllama_mpi.model import quant
from dllama_mpi.parallel import threads
from llamacpp_compare import cpu_model_name

PRODUCT_NAMES = ("wq+wk+wv", "wo", "w1+w3", "w2")  # layer_shapes' order


def median_seconds(stream, seconds: float) -> float:
    """The median time of stream() over `seconds` of runs (at least one), after one run that
    compiles and warms."""
    stream()
    runs, t_end = [], time.perf_counter() + seconds
    while not runs or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        stream()
        runs.append(time.perf_counter() - t0)
    return float(np.median(runs))


def product_speed(kind: str, rows: int, cols: int, stream_bytes: int, seconds: float) -> dict:
    """One token's product of a (rows, cols) matrix of type `kind`, timed over copies that
    stream `stream_bytes` at least."""
    first = held_matrix(kind, rows, cols)
    copies = [first] + [held_matrix(kind, rows, cols) for _ in range(max(0, -(-stream_bytes // first.nbytes) - 1))]
    x = Activations(cols, 1, frozenset(quant.ACTIVATIONS) | {quant.F32_TYPE.name})
    x.f32[:] = np.random.default_rng(0).standard_normal(x.f32.shape, dtype=np.float32)
    x.prepare(1)
    pool, out = threads.Pool(), np.zeros((1, rows), np.float32)
    lanes = (np.zeros((vector.CHUNKS, GROUP), np.int32), np.zeros((vector.CHUNKS, GROUP), np.float32))

    def stream():
        for m in copies:
            matmul(pool, lanes, m, x, 1, out)

    per_product = median_seconds(stream, seconds) / len(copies)
    return {"type": kind, "rows": rows, "cols": cols, "bytes": first.nbytes, "us": per_product * 1e6,
            "gb_s": first.nbytes / per_product / 1e9}


def attention_speed(spec, kv_type: str, depth: int, stream_bytes: int, seconds: float) -> dict:
    """One decode row at position `depth` attending over every head of a layer of `spec`, its
    KV cache in `kv_type`, timed over copies of the cache that stream `stream_bytes` at least."""
    kv = quant.KV_TYPES[kv_type]
    n_heads, n_kv, hd, n_pos = spec.n_heads, spec.n_kv_heads, spec.head_dim, depth + 1
    rng = np.random.default_rng(0)
    one = kv.encode(rng.standard_normal((1, n_kv, n_pos, hd), dtype=np.float32))  # codes, scales of one slot
    cache_bytes = 2 * sum(a.nbytes for a in one)  # keys and values
    copies = [tuple(a.copy() for a in (*one, *one)) for _ in range(max(1, -(-stream_bytes // cache_bytes)))]
    q = rng.standard_normal((1, n_heads, hd), dtype=np.float32)
    kv_of_head = np.arange(n_heads, dtype=np.int64) // spec.group_size
    slots, positions = np.zeros(1, np.int64), np.array([depth], np.int64)
    scratch, out = vector.attention_scratch(n_heads, hd, threads.Pool().n_threads), np.zeros_like(q)

    def stream():
        for k_codes, k_scales, v_codes, v_scales in copies:
            vector.attention(q, k_codes, k_scales, v_codes, v_scales, kv_of_head, slots, positions, *scratch, out)

    per_layer = median_seconds(stream, seconds) / len(copies)
    return {"kv_type": kv_type, "depth": depth, "bytes": cache_bytes, "us": per_layer * 1e6,
            "gb_s": cache_bytes / per_layer / 1e9}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tools/kernel_speed.py", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b",
                        help="one of bench's model shapes (default: %(default)s)")
    source.add_argument("--model", help="a model file (.h5): its shapes (its own types are not used: see --types)")
    p.add_argument("--types", nargs="+", choices=quant.WEIGHT_TYPES, default=list(quant.WEIGHT_TYPES),
                   help="weight types to time (default: all)")
    p.add_argument("--kv-types", nargs="+", choices=quant.KV_TYPES, default=list(quant.KV_TYPES),
                   help="KV cache types whose attention to time (default: all)")
    p.add_argument("--depths", nargs="+", type=positive_int, default=[2048, 8192], metavar="N",
                   help="positions already in the KV cache when attention is timed (default: 2048 8192)")
    p.add_argument("--threads", type=positive_int, default=threads.node_cores(),
                   help="numba threads (default: the node's cores, %(default)s)")
    p.add_argument("--stream-mib", type=positive_int, default=256,
                   help="MiB of copies each product streams per pass, to read from memory and not a cache (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds of timing per product (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="also write the rows and the facts to FILE")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.model:
        from dllama_mpi.files.modelfile import open_model

        model = open_model(args.model)
        spec, label = model.spec, args.model
        model.close()
    else:
        spec, label = SHAPES[args.shape], args.shape
    threads.set_threads(args.threads)
    shapes = [(r, c, name) for (r, c, _, _), name in zip(layer_shapes(spec), PRODUCT_NAMES)]
    shapes.append((spec.vocab_size, spec.dim, "classifier"))
    bandwidth = read_bandwidth()
    rows = []
    print(f"{label}: {args.threads} thread(s), kernels on {qmatmul.ISA}, read bandwidth {bandwidth:.1f} GB/s "
          "(vector.read_sum, best of 3)")
    print(f"{'type':>5} {'product':>10} {'rows':>7} {'cols':>6} {'MiB':>7} {'us':>9} {'GB/s':>6} {'of probe':>8}")
    for kind in args.types:
        for r, c, name in shapes:
            if quant.storage_type(kind, c) != kind:  # the model would hold it in its fallback type, timed as that
                print(f"{kind:>5} {name:>10} {r:>7} {c:>6}  rows of {c} are not whole {kind} blocks: "
                      f"held as {quant.storage_type(kind, c)}")
                continue
            row = {**product_speed(kind, r, c, args.stream_mib * 2**20, args.seconds), "product": name}
            row["of_probe"] = row["gb_s"] / bandwidth
            rows.append(row)
            print(f"{row['type']:>5} {name:>10} {r:>7} {c:>6} {row['bytes'] / 2**20:>7.2f} {row['us']:>9.1f} "
                  f"{row['gb_s']:>6.1f} {row['of_probe']:>8.2f}")
    attention = []
    print(f"\nattention of one decode row over a layer's {spec.n_heads} heads ({spec.n_kv_heads} KV heads of "
          f"{spec.head_dim})")
    print(f"{'KV':>5} {'depth':>6} {'MiB':>7} {'us':>9} {'GB/s':>6} {'of probe':>8}")
    for kv_type in args.kv_types:
        for depth in args.depths:
            row = attention_speed(spec, kv_type, depth, args.stream_mib * 2**20, args.seconds)
            row["of_probe"] = row["gb_s"] / bandwidth
            attention.append(row)
            print(f"{kv_type:>5} {depth:>6} {row['bytes'] / 2**20:>7.2f} {row['us']:>9.1f} {row['gb_s']:>6.1f} "
                  f"{row['of_probe']:>8.2f}")
    if args.json:
        facts = {"model": label, "threads": args.threads, "kernel_isa": qmatmul.ISA, "read_gb_s": bandwidth,
                 "cpu": cpu_model_name(), "cores": os.cpu_count(),
                 "date": time.strftime("%Y-%m-%d"), "stream_mib": args.stream_mib}
        with open(args.json, "w") as f:
            json.dump({"facts": facts, "rows": rows, "attention": attention}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
