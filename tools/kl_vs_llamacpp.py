"""`python tools/kl_vs_llamacpp.py`: do we compute what llama.cpp computes on the same k-quant GGUF?

1. writes a GGUF of a model shape (`--shape`, default `tiny`: dim 256, rows whole 256-value super-blocks; `tiny-moe`:
   a qwen3moe mixture of 8 experts, 2 a token, or with `--mixtral` the same experts as Mixtral, llama with experts)
   with random F32 weights of standard deviation `--scale / sqrt(fan-in)`, a router's too (peaked next-token
   distributions: with llamacpp_compare's small random weights they are nearly uniform and any engine agrees);
2. llama.cpp's `llama-quantize` makes it `--type` (default Q4_K_M); `llama-perplexity --kl-divergence-base` saves
   llama.cpp's log-probabilities over `--text` in chunks of `--ctx`, attending in f32 as we do (no flash
   attention, an f32 KV cache) unless `--llama-attention default`;
3. `dllama-mpi-convert` converts the same quantized GGUF (its default: each type kept where our engine runs it),
   and `python -m dllama_mpi perplexity --kl-base` scores llama.cpp's very tokens on `-n` ranks against them.

It prints both engines' PPL, the KL divergence of ours from llama.cpp's distributions and how often both rank the
same token first. llama.cpp's binaries are tools/llamacpp_compare.py's (built on first use, minutes).

    python tools/kl_vs_llamacpp.py --ranks 1 2
    python tools/kl_vs_llamacpp.py --shape tiny-moe --type Q8_0
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from dllama_mpi.commands.launcher import positive_int
from dllama_mpi.model import quant
from llamacpp_compare import (
    LLAMA_CPP_PYTHON_VERSION,
    LLAMA_F32_ATTENTION,
    OUR_KV_TYPE,
    add_llama_metadata,
    build_llama_bench,
    default_cache_dir,
    gguf_arch,
    gguf_tensors,
    llama_quantize_path,
    run_capture,
    shapes,
)

REPO = Path(__file__).resolve().parents[1]


def write_f32_gguf(path: Path, spec, scale: float, seed: int) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), gguf_arch(spec))
    add_llama_metadata(w, spec)
    rng = np.random.default_rng(seed)
    for name, shape, _ in gguf_tensors(spec):
        if len(shape) > 1:  # a matrix, every expert's matrix, a router
            w.add_tensor(name, (rng.standard_normal(shape) * (scale / np.sqrt(shape[-1]))).astype(np.float32))
        else:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/kl_vs_llamacpp.py", allow_abbrev=False,
                                description="KL divergence of our engine from llama.cpp's on the same quantized GGUF.")
    p.add_argument("--shape", default="tiny", choices=sorted(shapes()), help="model shape (default: %(default)s)")
    p.add_argument("--mixtral", action="store_true",
                   help="write the mixture-of-experts --shape as Mixtral (GGUF architecture llama with experts, "
                        "no q and k norms) instead of qwen3moe")
    p.add_argument("--type", default="Q4_K_M", help="llama-quantize's type (default: %(default)s)")
    p.add_argument("--pure", action="store_true", help="llama-quantize --pure: every matrix --type, no Q6_K mixture")
    p.add_argument("--scale", type=float, default=1.0,
                   help="weight std x sqrt(fan-in) (default: %(default)s; 4 makes a chaotic network, where any "
                        "difference in rounding grows through the layers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", type=Path, default=REPO / "tests" / "data" / "tinystories_sample.txt")
    p.add_argument("--ctx", type=positive_int, default=128)
    p.add_argument("--buffer-float-type", choices=quant.BUFFER_TYPES, default=quant.Q80_ACTIVATIONS.name,
                   help="ours (default: %(default)s)")
    p.add_argument("--ranks", type=positive_int, nargs="+", default=[1, 2], help="our rank counts (default: 1 2)")
    p.add_argument("--llama-attention", choices=("f32", "default"), default="f32",
                   help="llama.cpp's attention: in f32 (ours then --kv-type f32), or its defaults (flash attention "
                        "with f16 internals, an f16 KV cache; ours then its default f16 cache) (default: %(default)s)")
    args = p.parse_args(argv)
    spec = shapes()[args.shape]
    if args.mixtral and not spec.moe:
        p.error(f"--mixtral: shape {args.shape} has no experts; give a mixture-of-experts shape such as tiny-moe")
    if args.mixtral:
        spec = dataclasses.replace(spec, architecture="mixtral", qk_norm=False)
    cache = default_cache_dir(LLAMA_CPP_PYTHON_VERSION)
    bench = build_llama_bench(cache, LLAMA_CPP_PYTHON_VERSION, jobs=2, niceness=19)
    perplexity = cache / "build" / "bin" / "llama-perplexity"
    if not perplexity.exists():
        run_capture(["cmake", "--build", str(cache / "build"), "--target", "llama-perplexity"], 3600, "kl_vs_llamacpp")
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        write_f32_gguf(t / "f32.gguf", spec, args.scale, args.seed)
        run_capture([str(llama_quantize_path(cache)), *(["--pure"] if args.pure else []), str(t / "f32.gguf"),
                     str(t / "q.gguf"), args.type, "2"], 3600, "kl_vs_llamacpp")
        _, err = run_capture([str(perplexity), "-m", str(t / "q.gguf"), "-f", str(args.text), "-c", str(args.ctx),
                              "-t", "2", *(LLAMA_F32_ATTENTION if args.llama_attention == "f32" else ()),
                              "--kl-divergence-base", str(t / "llama.kld")], 3600, "kl_vs_llamacpp")
        final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", err)
        pure = " --pure" if args.pure else ""
        mixtral = " as Mixtral" if args.mixtral else ""
        print(f"{args.shape}{mixtral} {args.type}{pure} (random weights, scale {args.scale}, seed {args.seed}), text "
              f"{args.text.name}, chunks of {args.ctx}; llama.cpp {bench.parent.parent.name}, attention "
              f"{args.llama_attention}: PPL = {final[1]} +/- {final[2]}")
        converted = subprocess.run([sys.executable, "-m", "dllama_mpi", "convert", str(t / "q.gguf"), str(t / "q.h5")],
                                   capture_output=True, text=True, check=True)
        print("".join(line + "\n" for line in converted.stderr.splitlines() if line.startswith(("note:", "wrote"))),
              end="")
        for n in args.ranks:
            out, _ = run_capture([mpiexec, "-n", str(n), sys.executable, "-m", "dllama_mpi", "perplexity", "--model",
                                  str(t / "q.h5"), "--kl-base", str(t / "llama.kld"), "--buffer-float-type",
                                  args.buffer_float_type, "--kv-type", OUR_KV_TYPE[args.llama_attention]], 3600,
                                 "kl_vs_llamacpp")
            wanted = ("Final estimate", "Mean PPL", "Mean    KLD", "Maximum KLD", "99.0%", "Median", "Same top")
            print(f"ours, -n {n}, {args.buffer_float_type} buffers:")
            print("".join(f"  {line}\n" for line in out.splitlines() if line.startswith(wanted)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
