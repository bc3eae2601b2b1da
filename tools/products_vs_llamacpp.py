"""`python tools/products_vs_llamacpp.py`: are our quantized products llama.cpp's, operand for operand?

A small C program linked against the static libraries of the llama.cpp that tools/llamacpp_compare.py builds
(`ggml`, `ggml-cpu`, `ggml-base`; built on first use, minutes) quantizes random activations with llama.cpp's
own `from_float` of each weight type's `vec_dot_type` (Q8_0 for Q8_0 and Q4_0 weights, Q8_K for Q4_K and
Q6_K) and multiplies them through `ggml_mul_mat` (1, 4 and 128 tokens: its vector and its batched paths) on
random weight blocks. The same operands go through our quantizers (quant.quantize_q80 / quantize_q8k, the
kernels' twins) and our products' numpy twins (reference.twin_8bit, bit for bit the kernels'). It prints, per
weight type, how many activation bytes differ and the largest difference of the outputs relative to the
largest output: f32 rounding (about 1e-7) means the same arithmetic in another order.

    python tools/products_vs_llamacpp.py [--cols 512] [--rows 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from llamacpp_compare import LLAMA_CPP_PYTHON_VERSION, build_llama_bench, default_cache_dir

HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ggml.h"
#include "ggml-cpu.h"

/* harness TYPE K M N w.bin x.bin out.bin act.bin: out (N, M) = x (N, K) @ w.T through ggml_mul_mat;
   act: the N activation rows as from_float of the type's vec_dot_type makes them */
static void *slurp(const char *path, size_t n) {
    void *p = malloc(n); FILE *f = fopen(path, "rb");
    if (!f || fread(p, 1, n, f) != n) { fprintf(stderr, "can't read %s\n", path); exit(1); }
    fclose(f); return p;
}
static void spill(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb"); fwrite(p, 1, n, f); fclose(f);
}
int main(int argc, char **argv) {
    if (argc != 9) { fprintf(stderr, "usage: harness TYPE K M N w x out act\n"); return 2; }
    enum ggml_type type = (enum ggml_type) atoi(argv[1]);
    long k = atol(argv[2]), m = atol(argv[3]), n = atol(argv[4]);
    ggml_cpu_init();
    struct ggml_init_params params = { 512 * 1024 * 1024, NULL, false };
    struct ggml_context *ctx = ggml_init(params);
    struct ggml_tensor *w = ggml_new_tensor_2d(ctx, type, k, m);
    struct ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, n);
    void *wd = slurp(argv[5], ggml_nbytes(w)), *xd = slurp(argv[6], ggml_nbytes(x));
    memcpy(w->data, wd, ggml_nbytes(w)); memcpy(x->data, xd, ggml_nbytes(x));
    struct ggml_tensor *out = ggml_mul_mat(ctx, w, x);
    struct ggml_cgraph *graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(graph, out);
    ggml_graph_compute_with_ctx(ctx, graph, 2);
    spill(argv[7], out->data, ggml_nbytes(out));
    enum ggml_type act = ggml_get_type_traits_cpu(type)->vec_dot_type;
    size_t act_bytes = ggml_row_size(act, k);
    char *q = malloc(act_bytes * n);
    for (long t = 0; t < n; t++)
        ggml_get_type_traits_cpu(act)->from_float((const float *) x->data + t * k, q + t * act_bytes, k);
    spill(argv[8], q, act_bytes * n);
    return 0;
}
"""


def build_harness(cache: Path, work: Path) -> Path:
    """The harness compiled against the cached llama.cpp build's static libraries."""
    source = cache / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    libs = cache / "build" / "ggml" / "src"
    (work / "harness.c").write_text(HARNESS)
    # ggml-cpu and ggml refer to each other: the archives are listed twice for the one-pass linker
    archives = [libs / "libggml-cpu.a", libs / "libggml.a", libs / "libggml-cpu.a", libs / "libggml-base.a"]
    subprocess.run(["gcc", "-O2", f"-I{source / 'ggml' / 'include'}", str(work / "harness.c"), "-o",
                    str(work / "harness"), *map(str, archives), "-lstdc++", "-lm", "-lpthread", "-fopenmp"],
                   check=True)
    return work / "harness"


def random_weights(rng: np.random.Generator, t, rows: int, cols: int) -> np.ndarray:
    """Random stored blocks of weight type `t` (a quant.WeightType): quantized Gaussians for the types
    we quantize (Q4_0/Q8_0), random codes and scales (small finite fp16 d) for the others (the k-quants)."""
    if t.encode is not None:
        return t.encode(rng.standard_normal((rows, cols)).astype(np.float32))
    stored = np.frombuffer(rng.bytes(rows * cols // t.block_values * t.dtype.itemsize), t.dtype).reshape(rows, -1).copy()
    for field in (f for f in t.dtype.names if t.dtype[f] == np.float16):
        stored[field] = rng.uniform(1e-3, 1e-2, stored.shape).astype(np.float16)
    return stored


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/products_vs_llamacpp.py", allow_abbrev=False,
                                description="Our quantizers and quantized products against llama.cpp's own.")
    p.add_argument("--cols", type=int, default=512, help="weight row length, whole 256-value blocks (default: %(default)s)")
    p.add_argument("--rows", type=int, default=64, help="weight rows (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.cols % 256 or args.cols <= 0 or args.rows <= 0:
        p.error("--cols must be a positive multiple of 256 and --rows positive")
    import gguf

    from dllama_mpi.kernels import reference
    from dllama_mpi.model import quant

    cache = default_cache_dir(LLAMA_CPP_PYTHON_VERSION)
    build_llama_bench(cache, LLAMA_CPP_PYTHON_VERSION, jobs=2, niceness=19)
    rng = np.random.default_rng(args.seed)
    print(f"llama.cpp {cache.name}; weights {args.rows} x {args.cols}, seed {args.seed}")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        harness = build_harness(cache, t)
        for weight_type in (t for t in quant.WEIGHTS.values() if t.quantized):
            kind, act = weight_type.name, quant.ACTIVATIONS[weight_type.activation]
            ggml_type = gguf.GGMLQuantizationType[weight_type.gguf].value
            their_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[act.gguf]][1]
            w = random_weights(rng, weight_type, args.rows, args.cols)
            worst, act_bytes, act_differ = 0.0, 0, 0
            for n_tok in (1, 4, 128):
                # activations of mixed scales, and "nice" values (multiples of 1/8) whose codes may fall on a half step
                x = (rng.standard_normal((n_tok, args.cols)) * 10.0 ** rng.uniform(-2, 2, (n_tok, 1))).astype(np.float32)
                x[:, ::7] = np.round(x[:, ::7] * 8) / 8
                np.ascontiguousarray(quant.as_bytes(w)).tofile(t / "w.bin")
                x.tofile(t / "x.bin")
                subprocess.run([str(harness), str(ggml_type), str(args.cols), str(args.rows), str(n_tok),
                                str(t / "w.bin"), str(t / "x.bin"), str(t / "out.bin"), str(t / "act.bin")], check=True)
                theirs = np.fromfile(t / "out.bin", np.float32).reshape(n_tok, args.rows)
                ours_act = act.quantize(x)
                mine = reference.twin_8bit(w, x)
                worst = max(worst, float(np.abs(mine - theirs).max() / np.abs(theirs).max()))
                # block_q8_K: f32 d, 256 codes, then 16 int16 block sums (ours keeps none)
                their_act = np.fromfile(t / "act.bin", np.uint8).reshape(-1, their_block)[:, : act.dtype.itemsize]
                mine_act = np.ascontiguousarray(ours_act).view(np.uint8).reshape(their_act.shape)
                act_bytes += their_act.size
                act_differ += int((their_act != mine_act).sum())
            print(f"{kind} weights x {act.name} activations: activation bytes differing {act_differ} of {act_bytes}; "
                  f"products, |ours - llama.cpp| / max |llama.cpp|: {worst:.2g} (1, 4, 128 tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
