"""`python tools/llamacpp_compare.py`: this engine's decode and prefill speed next to llama.cpp's on
the same Q4_0 weights, on this machine, in one markdown table.

What it does, each step cached so that later runs only measure:

1. builds llama.cpp's `llama-bench` once, from the llama-cpp-python sdist of a pinned version
   (its vendor/llama.cpp; `pip download`, cmake with GGML_NATIVE), into --cache-dir
   (default ~/.cache/dllama_mpi/llama.cpp/<version>/); this takes minutes;
2. writes a GGUF of a named shape with random weights (every matrix Q4_0, norms and a mixture of
   experts' router F32, architecture llama, qwen3moe for the qwen3-30b-a3b shapes, a minimal
   SentencePiece vocabulary llama.cpp loads), keyed by shape and seed; or, with --gguf FILE,
   measures that file instead;
3. converts it with dllama-mpi-convert (the Q4_0 blocks are carried over bit-exact);
4. waits until the machine is idle (no other process above --idle-cpu % for --idle-seconds),
   then runs both, interleaved (llama.cpp, ours for each --configs, llama.cpp, ...)
   --repeat times: `llama-bench -p 128 -n 32 -r 1 -o json -ctk T -ctv T` and
   `mpiexec -n N python -m dllama_mpi bench --model OUT.h5 --memory-budget ... --kv-type T --json`,
   both with the KV cache in --kv-type T (default f16, llama.cpp's own default);
   with --depth N ..., decode is also measured after N tokens in the KV cache
   (`llama-bench -d 0,N,...`, our bench's `--depths N ...`), at each depth the model's context allows;
5. prints the medians (min-max) and their ratios to llama.cpp's medians of the same run.

    python tools/llamacpp_compare.py --build-only              # build and write the models only
    python tools/llamacpp_compare.py --shape llama-3.2-1b --repeat 5 --json rows.json
    python tools/llamacpp_compare.py --gguf model.gguf --depth 0 2048 8192 --configs 1

Not run in CI (it compiles C++ for minutes); its pure parts are tested in
tests/test_llamacpp_compare.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dllama_mpi.commands.bench import SHORT_PROMPT, depth, largest_depth
from dllama_mpi.commands.launcher import positive_int
from dllama_mpi.model import quant

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the sdist whose vendor/llama.cpp is built
# bump when the written GGUF changes: the cache key has it (2: the Llama shapes' published contexts; 3: mixtures of
# experts as such, where version 2 wrote a dense llama FFN of the expert's width)
GGUF_MODEL_VERSION = 3
# llama.cpp attending in f32 as we do: no flash attention (its CPU kernel has f16 internals), an f32 KV cache
LLAMA_F32_ATTENTION = ("-fa", "off", "-ctk", "f32", "-ctv", "f32")
# the tools' --llama-attention (f32: LLAMA_F32_ATTENTION; default: llama.cpp's own, an f16 cache) -> our --kv-type
OUR_KV_TYPE = {"f32": "f32", "default": "f16"}
# our --kv-type -> llama-bench's -ctk and -ctv (ggml's type names); its flash attention stays at its
# default, auto, which llama.cpp needs on for a quantized V cache (q8_0)
LLAMA_KV_TYPES = {"f32": "f32", "f16": "f16", "q8_0": "q8_0"}
# bump when the converter makes another file of these GGUFs (2: Q6_K kept as q6k; 3: mixed stacks kept; 4: Q5_0 kept as q50)
CONVERSION_VERSION = 4
PROMPT_TOKENS = 128  # prefill length measured (llama-bench -p, our --prompt-lengths)
GEN_TOKENS = 32  # decode length measured (llama-bench -n, our --decode-steps)
DEFAULT_CONFIGS = ("1", "1-1", "3-2-2-1")
DEFAULT_SHAPE, DEFAULT_SEED, DEFAULT_QUANT = "tinyllama-1.1b", 0, "q4_0"  # the random model's, without --gguf
LLAMA = "llama.cpp"
OURS = "dllama_mpi"

Q4_0 = quant.gguf_type("Q4_0")  # llama.cpp's block_q4_0: our q40 record
# llama.cpp token types (llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6


def log(message: str) -> None:
    print(f"llamacpp_compare: {message}", file=sys.stderr, flush=True)


# ===================================================================== building llama-bench


def default_cache_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dllama_mpi" / "llama.cpp" / version


def download_command(version: str, dest: Path, python: str = sys.executable) -> list[str]:
    return [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}",
            "-d", str(dest)]


# ggml's AMX path (used for Q4_0 when -march=native finds AMX) dies of SIGILL at its first
# `tilezero` in llama-cpp-python 0.3.36's llama.cpp on a Xeon with AMX (seen on this project's
# machine; llama.cpp PR #26954 describes the cause: a tile config the compiler drops). Without
# AMX, llama.cpp's Q4_0 products take its AVX-512 repack path, its usual CPU speed.
X86_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cmake_flags(machine: str | None = None) -> list[str]:
    """Only what llama-bench needs: a static, native (this CPU's instruction set) release build of
    the library, ggml's CPU backend and the tools, without tests, examples, server or HTTPS;
    on x86 without AMX (see X86_NO_AMX)."""
    machine = platform.machine() if machine is None else machine
    flags = [
        "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
        "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DGGML_CCACHE=OFF",
    ]
    if machine.lower() in ("x86_64", "amd64"):
        flags += [f"-DCMAKE_C_FLAGS={X86_NO_AMX}", f"-DCMAKE_CXX_FLAGS={X86_NO_AMX}"]
    return flags


def cmake_configure_command(source: Path, build: Path, generator: str | None = None,
                            machine: str | None = None) -> list[str]:
    command = ["cmake", "-S", str(source), "-B", str(build)]
    if generator:
        command += ["-G", generator]
    return command + cmake_flags(machine)


def cmake_build_command(build: Path, jobs: int) -> list[str]:
    return ["cmake", "--build", str(build), "--config", "Release", "--target", *BINARIES, "-j", str(jobs)]


def niced(command: list[str], niceness: int) -> list[str]:
    return ["nice", "-n", str(niceness), *command] if niceness and shutil.which("nice") else command


def _run_logged(command: list[str], log_path: Path) -> None:
    """Run a build step, its output into `log_path`; on failure, its tail on stderr."""
    with open(log_path, "ab") as out:
        out.write(("\n$ " + " ".join(command) + "\n").encode())
        out.flush()
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
    if code:
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        sys.exit("\n".join(tail) + f"\nllamacpp_compare: failed ({code}): {' '.join(command)}\n(full log: {log_path})")


def _unpack_llama_cpp(sdist: Path, dest: Path) -> Path:
    """Extract the sdist's vendor/llama.cpp only; returns its directory."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"
                   and "/.git/" not in m.name]
        if not members:
            sys.exit(f"llamacpp_compare: {sdist} holds no vendor/llama.cpp")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members, filter="data")
        else:  # Python < 3.11.4
            tar.extractall(dest, members)
    top = members[0].name.split("/")[0]
    return dest / top / "vendor" / "llama.cpp"


BINARIES = ("llama-bench", "llama-quantize")  # built and kept in the cache's bin/


def llama_bench_path(cache: Path) -> Path:
    return cache / "bin" / "llama-bench"


def llama_quantize_path(cache: Path) -> Path:
    return cache / "bin" / "llama-quantize"


def built_with(cache: Path) -> list[str] | None:
    """The cmake flags of the binary in `cache` (None: no finished build)."""
    try:
        return json.loads((cache / "build.json").read_text())["flags"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_llama_bench(cache: Path, version: str, jobs: int, niceness: int) -> Path:
    """The llama-bench binary of `version`, built on first use (minutes) and kept in `cache`;
    built again when it was built with other cmake flags."""
    binary = llama_bench_path(cache)
    if binary.exists() and llama_quantize_path(cache).exists() and built_with(cache) == cmake_flags():
        return binary
    if binary.exists():
        log(f"{binary} was built with other cmake flags (see {cache / 'build.json'}) or without llama-quantize: "
            "building again")
        binary.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    build_log = cache / "build.log"
    t0 = time.monotonic()
    sdist_dir = cache / "sdist"
    sdists = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        log(f"downloading the llama-cpp-python {version} source (pip download, about 75 MB) into {sdist_dir} ...")
        _run_logged(niced(download_command(version, sdist_dir), niceness), build_log)  # it builds metadata
        sdists = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            sys.exit(f"llamacpp_compare: pip download left no llama_cpp_python-*.tar.gz in {sdist_dir}")
    source_root = cache / "src"
    shutil.rmtree(source_root, ignore_errors=True)
    log(f"unpacking its vendor/llama.cpp into {source_root} ...")
    source = _unpack_llama_cpp(sdists[-1], source_root)
    build = cache / "build"
    generator = "Ninja" if shutil.which("ninja") else None
    log(f"configuring llama.cpp (cmake, GGML_NATIVE=ON) in {build} ...")
    _run_logged(niced(cmake_configure_command(source, build, generator), niceness), build_log)
    log(f"compiling {' and '.join(BINARIES)} with {jobs} job(s) at niceness {niceness}: this takes minutes "
        f"(log: {build_log}) ...")
    _run_logged(niced(cmake_build_command(build, jobs), niceness), build_log)
    binary.parent.mkdir(parents=True, exist_ok=True)
    for name in reversed(BINARIES):  # llama-bench last: its presence says the build is complete
        built = build / "bin" / name
        if not built.exists():
            sys.exit(f"llamacpp_compare: the build finished but {built} is missing (log: {build_log})")
        tmp = (binary.parent / name).with_suffix(".tmp")
        shutil.copy2(built, tmp)
        tmp.replace(binary.parent / name)
    seconds = time.monotonic() - t0
    (cache / "build.json").write_text(json.dumps({"version": version, "seconds": seconds, "jobs": jobs,
                                                  "flags": cmake_flags(), "generator": generator}))
    log(f"built {binary} in {seconds / 60:.1f} min")
    return binary


# ===================================================================== the GGUF model


def shapes() -> dict:
    from dllama_mpi.commands.bench import SHAPES

    return SHAPES


def spm_vocab(vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """A minimal SentencePiece ("llama") vocabulary llama.cpp loads: <unk> <s> </s>, the 256
    byte pieces, then distinct word pieces; every text is unique."""
    reserved = 3 + 256
    if vocab_size < reserved + 1:
        raise ValueError(f"a llama vocabulary needs more than {reserved} tokens, got {vocab_size}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["\u2581" + c for c in letters] + list(letters)
    words += ["\u2581" + a + b for a in letters for b in letters]
    n_words = vocab_size - reserved
    words = words[:n_words] + [f"\u2581w{i}" for i in range(n_words - len(words[:n_words]))]
    tokens += words
    scores = [0.0] * reserved + [-float(i) for i in range(n_words)]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256 + [TOKEN_NORMAL] * n_words
    return tokens, scores, types


def gguf_arch(spec) -> str:
    """The GGUF architecture llama.cpp runs `spec` as: qwen3moe for a qwen3moe mixture of experts, else llama
    (Mixtral is llama with an expert count); qwen3moe is the one with q and k norms."""
    arch = "qwen3moe" if spec.moe and spec.architecture == "qwen3moe" else "llama"
    if spec.moe and spec.architecture not in ("qwen3moe", "mixtral"):
        raise ValueError(f"a mixture of experts of architecture {spec.architecture!r}: expected qwen3moe or mixtral")
    if spec.qk_norm != (arch == "qwen3moe"):
        raise ValueError(f"architecture {spec.architecture!r} with qk_norm={spec.qk_norm}: the GGUF is written as "
                         "llama (no q and k norms) or qwen3moe (with them)")
    return arch


def gguf_tensors(spec) -> list[tuple[str, tuple[int, ...], bool]]:
    """(GGUF name, numpy shape, quantized) in llama.cpp's order: a matrix (rows, cols), a mixture of experts'
    (experts, rows, cols) tensor of every expert's matrix, a router (experts, dim) of F32 values, a norm (n,)."""
    q_dim, kv_dim = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    experts = (spec.n_experts,) if spec.moe else ()
    ffn, qk_norm = "_exps" if spec.moe else "", gguf_arch(spec) == "qwen3moe"
    out = [("token_embd.weight", (spec.vocab_size, spec.dim), True)]
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (spec.dim,), False), (p + "attn_q.weight", (q_dim, spec.dim), True),
                (p + "attn_k.weight", (kv_dim, spec.dim), True), (p + "attn_v.weight", (kv_dim, spec.dim), True),
                (p + "attn_output.weight", (spec.dim, q_dim), True)]
        if qk_norm:
            out += [(p + "attn_q_norm.weight", (spec.head_dim,), False), (p + "attn_k_norm.weight", (spec.head_dim,), False)]
        out.append((p + "ffn_norm.weight", (spec.dim,), False))
        if spec.moe:
            out.append((p + "ffn_gate_inp.weight", (spec.n_experts, spec.dim), False))
        out += [(p + f"ffn_gate{ffn}.weight", (*experts, spec.hidden_dim, spec.dim), True),
                (p + f"ffn_down{ffn}.weight", (*experts, spec.dim, spec.hidden_dim), True),
                (p + f"ffn_up{ffn}.weight", (*experts, spec.hidden_dim, spec.dim), True)]
    out.append(("output_norm.weight", (spec.dim,), False))
    if not spec.shared_classifier:
        out.append(("output.weight", (spec.vocab_size, spec.dim), True))
    return out


def _random_tensor(rng, shape: tuple[int, ...], quantized: bool) -> np.ndarray:
    """The bench's random weights (its Q40 blocks are Q4_0's; a router's normal values): a matrix as (rows, row
    bytes) uint8, as GGUF stores it, every expert's as (experts, rows, row bytes), one expert's matrix drawn after
    another."""
    from dllama_mpi.commands.bench import random_tensor

    if quantized and len(shape) == 3:
        return np.stack([_random_tensor(rng, shape[1:], True) for _ in range(shape[0])])
    tensor = random_tensor(rng, shape, quantized)
    return tensor.view(np.uint8).reshape(shape[0], -1) if quantized else tensor


def add_llama_metadata(w, spec) -> None:
    """A GGUFWriter's hyperparameters of `spec` (a writer of gguf_arch(spec)) and a minimal SentencePiece
    vocabulary; a mixture of experts' counts, and for qwen3moe each expert's width as llama.cpp reads it
    (expert_feed_forward_length; Mixtral's is feed_forward_length)."""
    w.add_context_length(spec.seq_len)
    w.add_embedding_length(spec.dim)
    if gguf_arch(spec) == "qwen3moe":
        w.add_expert_feed_forward_length(spec.hidden_dim)
    else:
        w.add_feed_forward_length(spec.hidden_dim)
    if spec.moe:
        w.add_expert_count(spec.n_experts)
        w.add_expert_used_count(spec.n_experts_used)
    w.add_block_count(spec.n_layers)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    if spec.head_dim != spec.dim // spec.n_heads:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    w.add_vocab_size(spec.vocab_size)
    tokens, scores, types = spm_vocab(spec.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)


def write_gguf(path: Path, spec, seed: int, name: str = "random") -> Path:
    """A GGUF of `spec` (architecture gguf_arch(spec)) with random weights: every matrix Q4_0 (token
    embedding, output and each expert's too), norms and routers F32, a minimal SentencePiece
    vocabulary. Streamed tensor by tensor; written under a temporary name, then renamed."""
    import gguf

    if spec.dim % Q4_0.block_values or spec.hidden_dim % Q4_0.block_values:
        raise ValueError(f"Q4_0 needs row lengths divisible by {Q4_0.block_values}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), gguf_arch(spec))
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    add_llama_metadata(w, spec)
    layout = gguf_tensors(spec)
    for tname, shape, quantized in layout:
        if quantized:
            byte_shape = (*shape[:-1], quant.row_bytes(Q4_0.name, shape[-1]))
            w.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                              raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            w.add_tensor_info(tname, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _, shape, quantized in layout:
        w.write_tensor_data(_random_tensor(rng, shape, quantized))
    w.close()
    tmp.replace(path)
    return path


# the GGUF's weights: every matrix Q4_0, or llama-quantize's Q4_K_M of that file
QUANTS = ("q4_0", "q4_k_m")
QUANT_TEXT = {"q4_0": "random Q4_0 weights", "q4_k_m": "random weights as llama-quantize's Q4_K_M"}


def model_paths(cache: Path, shape: str, seed: int, quant: str = "q4_0") -> tuple[Path, Path]:
    stem = f"{shape}-{quant}-seed{seed}-v{GGUF_MODEL_VERSION}"
    return cache / "models" / f"{stem}.gguf", cache / "models" / f"{stem}-c{CONVERSION_VERSION}.h5"


def quantize_command(binary: Path, source: Path, dest: Path, threads: int) -> list[str]:
    """llama-quantize's Q4_K_M of a Q4_0 file (its values dequantized, then quantized again: random
    weights, so only the format matters here)."""
    return [str(binary), "--allow-requantize", str(source), str(dest), "Q4_K_M", str(threads)]


def convert_command(gguf_path: Path, h5_path: Path, python: str = sys.executable) -> list[str]:
    script = Path(python).parent / "dllama-mpi-convert"
    if script.exists():
        return [str(script), str(gguf_path), str(h5_path)]
    return [python, "-m", "dllama_mpi", "convert", str(gguf_path), str(h5_path)]


def prepare_models(cache: Path, shape: str, seed: int, quant: str = "q4_0") -> tuple[Path, Path]:
    """The cached GGUF and its conversion (the converter's default: each tensor's type kept where the
    engine runs it), written on first use."""
    gguf_path, h5_path = model_paths(cache, shape, seed, quant)
    if not gguf_path.exists() and quant == "q4_0":
        log(f"writing a random Q4_0 GGUF of the {shape} shape (seed {seed}) to {gguf_path} ...")
        write_gguf(gguf_path, shapes()[shape], seed, name=f"random {shape} (seed {seed})")
    elif not gguf_path.exists():
        base, _ = prepare_models(cache, shape, seed, "q4_0")
        tmp = gguf_path.with_name(gguf_path.name + ".tmp")
        log(f"making its Q4_K_M with llama-quantize to {gguf_path} (a minute or two) ...")
        _run_logged(quantize_command(llama_quantize_path(cache), base, tmp, len(os.sched_getaffinity(0))),
                    cache / "quantize.log")
        tmp.replace(gguf_path)
    convert_once(gguf_path, h5_path)
    return gguf_path, h5_path


def convert_once(gguf_path: Path, h5_path: Path) -> None:
    """`gguf_path` converted to `h5_path` with the converter's defaults, unless that was done before."""
    if not h5_path.exists():
        log(f"converting {gguf_path} with dllama-mpi-convert to {h5_path} ...")
        code = subprocess.call(convert_command(gguf_path, h5_path))  # it writes atomically
        if code:
            sys.exit(f"llamacpp_compare: dllama-mpi-convert failed ({code}) on {gguf_path}")


def given_model_path(cache: Path, gguf_path: Path) -> Path:
    """Where --gguf FILE's conversion is kept: keyed by the file's name, size and modification time
    (hashing a file of a gigabyte would take longer than many runs) and CONVERSION_VERSION."""
    stat = gguf_path.stat()
    return cache / "models" / "given" / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}-c{CONVERSION_VERSION}.h5"


def prepare_given_model(cache: Path, gguf_path: Path) -> tuple[Path, Path]:
    """--gguf FILE (absolute) and its conversion, converted on first use."""
    gguf_path = gguf_path.resolve()
    h5_path = given_model_path(cache, gguf_path)
    h5_path.parent.mkdir(parents=True, exist_ok=True)
    convert_once(gguf_path, h5_path)
    return gguf_path, h5_path


def model_context(h5_path: Path) -> int:
    """The converted model's context length in tokens (its seq_len)."""
    from dllama_mpi.files.modelfile import ModelFile

    model = ModelFile(h5_path)
    try:
        return model.spec.seq_len
    finally:
        model.close()


def split_depths(requested: list[int], seq_len: int) -> tuple[list[int], list[int]]:
    """(measured, skipped): the requested depths and depth 0 (the usual decode, always measured),
    sorted, and those whose decode measurement does not fit a context of `seq_len` tokens (our
    bench's rule, applied to both systems alike)."""
    deepest = largest_depth(seq_len, GEN_TOKENS)
    wanted = sorted(set(requested) | {0})
    return [d for d in wanted if d <= deepest], [d for d in wanted if d > deepest]


# ===================================================================== idle machine


def parse_pid_stat(text: str) -> tuple[str, int]:
    """(command name, utime + stime in clock ticks) from a /proc/PID/stat line. The name is
    in parentheses and may itself hold spaces and parentheses: the fields follow the last ')'."""
    head, _, rest = text.rpartition(")")
    name = head.partition("(")[2]
    fields = rest.split()  # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return name, int(fields[11]) + int(fields[12])


def cpu_sample(exclude: set[int] | frozenset = frozenset()) -> dict[int, tuple[str, int]]:
    """{pid: (name, CPU ticks so far)} of every process now (ones gone while read are skipped)."""
    sample = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in exclude:
            try:
                with open(f"/proc/{entry}/stat") as f:
                    sample[int(entry)] = parse_pid_stat(f.read())
            except (OSError, ValueError, IndexError):
                continue
    return sample


def busy_processes(before: dict, after: dict, seconds: float, threshold_pct: float,
                   ticks_per_s: float) -> list[tuple[int, str, float]]:
    """(pid, name, CPU %) of the processes that used more than `threshold_pct` % of one core
    between two samples `seconds` apart, busiest first. A process new in `after` counts from
    0 ticks (its whole life lies inside the interval, or it started just before)."""
    busy = []
    for pid, (name, ticks) in after.items():
        used = ticks - before.get(pid, (name, 0))[1]
        if used < 0:  # the pid was reused
            used = ticks
        pct = 100.0 * used / ticks_per_s / seconds
        if pct > threshold_pct:
            busy.append((pid, name, pct))
    return sorted(busy, key=lambda b: -b[2])


def wait_for_idle(quiet_s: float, threshold_pct: float, timeout_s: float, poll_s: float = 1.0) -> bool:
    """Wait until no other process used more than `threshold_pct` % CPU for `quiet_s` seconds
    running; False (with a warning) if that took longer than `timeout_s`."""
    if quiet_s <= 0:
        return True
    ticks = os.sysconf("SC_CLK_TCK")
    me = {os.getpid()}
    start = quiet_since = time.monotonic()
    before, t_before = cpu_sample(me), time.monotonic()
    said = 0.0
    log(f"waiting for an idle machine (no process above {threshold_pct:g}% CPU for {quiet_s:g} s) ...")
    while True:
        time.sleep(poll_s)
        after, t_after = cpu_sample(me), time.monotonic()
        busy = busy_processes(before, after, t_after - t_before, threshold_pct, ticks)
        before, t_before = after, t_after
        if busy:
            quiet_since = t_after
            if t_after - said > 30:
                log("busy: " + ", ".join(f"{name} (pid {pid}) {pct:.0f}%" for pid, name, pct in busy[:5]))
                said = t_after
        elif t_after - quiet_since >= quiet_s:
            return True
        if t_after - start > timeout_s:
            log(f"the machine was not idle within {timeout_s:g} s: measuring anyway (the numbers may be low)")
            return False


# ===================================================================== the runs


def parse_configs(configs: list[str]) -> list[list[str]]:
    """'3-2-2-1' -> the memory budgets of 4 ranks."""
    out = []
    for config in configs:
        budgets = config.split("-")
        if not all(b.strip() for b in budgets):
            raise ValueError(f"config {config!r}: give budgets joined by '-', such as 1, 1-1 or 3-2-2-1")
        out.append(budgets)
    return out


def llama_bench_command(binary: Path, gguf_path: Path, threads: int, depths: Sequence[int] = (0,),
                        kv_type: str = quant.DEFAULT_KV_TYPE) -> list[str]:
    """`depths`: split_depths' measured ones; only depth 0 (the default) leaves -d out, as before there were depths.
    The KV cache's type is always given, so that the command recorded says what was measured."""
    kv = LLAMA_KV_TYPES[kv_type]
    command = [str(binary), "-m", str(gguf_path), "-t", str(threads), "-p", str(PROMPT_TOKENS), "-n", str(GEN_TOKENS),
               "-r", "1", "-o", "json", "-ctk", kv, "-ctv", kv]
    return command + (["-d", ",".join(map(str, depths))] if max(depths) > 0 else [])


def ours_command(mpiexec: str, h5_path: Path, budgets: list[str], python: str = sys.executable,
                 nthreads: int | None = None, depths: Sequence[int] = (0,), kv_type: str = quant.DEFAULT_KV_TYPE) -> list[str]:
    command = [mpiexec, "-n", str(len(budgets)), python, "-m", "dllama_mpi", "bench", "--model", str(h5_path),
               "--memory-budget", *budgets, "--prompt-lengths", str(PROMPT_TOKENS), "--decode-steps", str(GEN_TOKENS),
               "--repeat", "1", "--kv-type", kv_type, "--json"]
    command += ["--depths", *map(str, depths)] if max(depths) > 0 else []
    return command + (["--nthreads", str(nthreads)] if nthreads else [])


def schedule(configs: list[str], repeat: int) -> list[tuple[int, str, str]]:
    """(round, system, config) in run order: each round runs llama.cpp, then ours for every config."""
    order = []
    for i in range(repeat):
        order.append((i, LLAMA, "-"))
        order += [(i, OURS, c) for c in configs]
    return order


def parse_llama_bench(text: str, depths: Sequence[int] = (0,)) -> dict:
    """Decode (tg) tokens/s at each of `depths` (n_depth), prefill (pp) tokens/s at depth 0 and facts
    about the build from llama-bench -o json. With -d, llama-bench also measures prefill at each depth:
    those rows are left out, as our bench measures prefill from an empty cache only."""
    rows = json.loads(text)
    pp = [r for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0 and r.get("n_depth", 0) == 0]
    tg_rows = [r for r in rows if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0]
    tg_depths = sorted(r.get("n_depth", 0) for r in tg_rows)
    if len(pp) != 1 or tg_depths != sorted(depths):
        raise ValueError(f"llama-bench JSON: expected one pp row at depth 0 and one tg row at each depth of "
                         f"{sorted(depths)}, found {len(pp)} pp row(s) at depth 0 and tg rows at depths {tg_depths}")
    tg = {r.get("n_depth", 0): r for r in tg_rows}
    first = rows[0]
    return {"decode": float(tg[0]["avg_ts"]), "prefill": float(pp[0]["avg_ts"]),
            "decode_at_depth": {str(d): float(tg[d]["avg_ts"]) for d in sorted(depths)},
            "n_prompt": pp[0]["n_prompt"], "n_gen": tg[0]["n_gen"], "threads": first.get("n_threads"),
            "build_commit": first.get("build_commit"), "build_number": first.get("build_number"),
            "cpu_info": first.get("cpu_info"), "backends": first.get("backends"), "model_type": first.get("model_type")}


def parse_ours(text: str, depths: Sequence[int] = (0,)) -> dict:
    """Decode tokens/s at each of `depths` and prefill-128 tokens/s from `python -m dllama_mpi bench --json`
    (its first JSON line)."""
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        raise ValueError("dllama_mpi.commands.bench printed no JSON line")
    r = json.loads(lines[0])
    at_depth = r.get("decode_tokens_per_s_at_depth", {})
    if sorted(map(int, at_depth)) != sorted(depths):
        raise ValueError(f"dllama_mpi.commands.bench: expected decode at depths {sorted(depths)}, found it at "
                         f"{sorted(map(int, at_depth))}")
    return {"decode": float(r["decode_tokens_per_s"]), "prefill": float(r["prefill_tokens_per_s"][str(PROMPT_TOKENS)]),
            "decode_at_depth": {str(d): float(at_depth[str(d)]) for d in sorted(depths)},
            "kernel_isa": r.get("kernel_isa", "unknown"), "threads": r.get("threads_per_rank"),
            "world_size": r.get("world_size")}


def run_in_session(command: list[str], timeout: float) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `command`, run in a session of its own so that a timeout
    or Ctrl-C ends all of it (mpiexec's ranks too)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # the timeout, Ctrl-C
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out, err


def run_capture(command: list[str], timeout: float, tool: str = "llamacpp_compare") -> tuple[str, str]:
    """(stdout, stderr) of `command` (run_in_session); on failure, exit with its stderr, naming `tool`."""
    returncode, out, err = run_in_session(command, timeout)
    if returncode:
        how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
        sys.exit(f"{err[-6000:]}\n{tool}: failed ({how}): {' '.join(command)}")
    return out, err


# ===================================================================== the table


def _stat(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per (system, config), in first-run order: median, min and max of decode (at each depth)
    and prefill tokens/s, and our medians' ratios to llama.cpp's (at the same depth)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["system"], r["config"]), []).append(r)
    out = []
    for (system, config), runs in groups.items():
        s = {"system": system, "config": config, "runs": len(runs)}
        for key in ("decode", "prefill"):
            s[key] = _stat([r[key] for r in runs])
        s["decode_at_depth"] = {d: _stat([r["decode_at_depth"][d] for r in runs]) for d in runs[0]["decode_at_depth"]}
        out.append(s)
    base = next((s for s in out if s["system"] == LLAMA), None)
    for s in out:
        for key in ("decode", "prefill"):
            s[f"{key}_ratio"] = s[key]["median"] / base[key]["median"] if base else None
        s["decode_ratio_at_depth"] = {d: stat["median"] / base["decode_at_depth"][d]["median"] if base else None
                                      for d, stat in s["decode_at_depth"].items()}
    return out


def _cell(stat: dict) -> str:
    return f"{stat['median']:.2f} ({stat['min']:.2f}-{stat['max']:.2f})"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def markdown_table(summary: list[dict]) -> str:
    """Decode and prefill at depth 0 as before --depth, then for each deeper depth its decode and ratio."""
    deeper = [d for d in summary[0]["decode_at_depth"] if d != "0"]
    lines = [f"| config | decode tok/s median (min-max) | prefill-{PROMPT_TOKENS} tok/s median (min-max) "
             "| decode ratio | prefill ratio |" + "".join(f" decode @ d{d} tok/s median (min-max) | decode ratio @ d{d} |"
                                                          for d in deeper),
             "|---|---|---|---|---|" + "---|---|" * len(deeper)]
    for s in summary:
        name = LLAMA if s["system"] == LLAMA else f"{OURS} {s['config']}"
        lines.append(f"| {name} | {_cell(s['decode'])} | {_cell(s['prefill'])} | {_ratio(s['decode_ratio'])} "
                     f"| {_ratio(s['prefill_ratio'])} |"
                     + "".join(f" {_cell(s['decode_at_depth'][d])} | {_ratio(s['decode_ratio_at_depth'][d])} |"
                               for d in deeper))
    return "\n".join(lines)


def cpu_model_name(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model name", "cpu model"):
            return value.strip()
    return "unknown"


def report(summary: list[dict], facts: dict) -> str:
    commit = facts.get("llama_build")
    build = f" (build {commit})" if commit and commit != "unknown" else ""  # an sdist has no git commit
    model = (f"model {facts['gguf']} (converted with dllama-mpi-convert's defaults)" if facts.get("gguf")
             else f"shape {facts['shape']} ({QUANT_TEXT[facts.get('quant', 'q4_0')]}, seed {facts['seed']})")
    deeper = [d for d in facts.get("depths", [0]) if d > 0]
    skipped = facts.get("skipped_depths")
    head = [
        f"CPU: {facts['cpu']} ({facts['cores']} cores); our kernels' instruction set: {facts['kernel_isa']}",
        f"{model}; llama.cpp from llama-cpp-python "
        f"{facts['version']}{build}{' without AMX (see X86_NO_AMX)' if facts.get('no_amx') else ''}, "
        f"{facts['llama_threads']} threads; KV cache {facts['kv_type']} on both (llama-bench -ctk/-ctv, our --kv-type); "
        f"ours: threads per rank {facts.get('our_threads') or 'the bench default'}; {facts['repeat']} interleaved "
        f"round(s); ratios = our median / llama.cpp's median{'' if facts['idle'] else '; MACHINE NOT IDLE'}"
        + (f"; {facts['disturbed_runs']} of {facts['runs']} runs had another process above the idle threshold beside "
           "them" if facts.get("disturbed_runs") else "")
        + ("; decode @ dN: after N tokens in the KV cache (llama-bench -d; ours: bench --depths, whose depth 0 "
           f"decodes after a {SHORT_PROMPT}-token prompt)" if deeper else "")
        + (f"; depth(s) {', '.join(map(str, skipped))} skipped: a decode measurement at depth N needs N + "
           f"{GEN_TOKENS + 1} tokens of the model's {facts['seq_len']}-token context" if skipped else ""),
        "",
    ]
    return "\n".join(head) + markdown_table(summary)


# ===================================================================== main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python tools/llamacpp_compare.py", allow_abbrev=False,
        description="Build llama.cpp's llama-bench once, write a random Q4_0 GGUF of a model shape (or take --gguf) "
                    "and convert it, "
                    "then measure llama.cpp and this engine interleaved on the same weights and print one markdown "
                    "table of medians and ratios.")
    # --shape, --seed and --quant default to None so that giving one beside --gguf can be refused (model_options)
    p.add_argument("--shape", choices=sorted(shapes()),
                   help=f"model shape (the bench's shapes; default: {DEFAULT_SHAPE})")
    p.add_argument("--seed", type=int, help=f"seed of the random weights (default: {DEFAULT_SEED})")
    p.add_argument("--quant", choices=QUANTS,
                   help="the GGUF's weights: every matrix Q4_0, or llama-quantize's Q4_K_M (Q4_K and Q6_K) of it, "
                        f"converted with the converter's default (default: {DEFAULT_QUANT})")
    p.add_argument("--gguf", type=Path, metavar="FILE",
                   help="measure this GGUF file (any types the converter takes; converted once into the cache) "
                        "instead of random weights of --shape (default: off)")
    p.add_argument("--depth", nargs="+", type=depth, default=[0], metavar="N",
                   help="also measure decode after N tokens in the KV cache, for each N (llama-bench -d; ours: bench "
                        "--depths); depths beyond the model's context are skipped, saying so (default: 0)")
    p.add_argument("--kv-type", choices=list(LLAMA_KV_TYPES), default=quant.DEFAULT_KV_TYPE,
                   help="the KV cache's type on both sides: our bench's --kv-type, llama-bench's -ctk and -ctv "
                        "(default: %(default)s, the default of both)")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), metavar="B-B-...",
                   help="our configurations: memory budgets joined by '-', one per rank (default: %(default)s)")
    p.add_argument("--repeat", type=positive_int, default=5, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=len(os.sched_getaffinity(0)),
                   help="llama.cpp's threads (default: this process's cores, %(default)s)")
    p.add_argument("--nthreads", type=positive_int, help="our threads per rank (default: the bench's, the rank's share of cores)")
    p.add_argument("--cache-dir", type=Path, help="where the build and the models are kept "
                                                  "(default: ~/.cache/dllama_mpi/llama.cpp/VERSION)")
    p.add_argument("--llama-cpp-python", default=LLAMA_CPP_PYTHON_VERSION, metavar="VERSION",
                   help="the llama-cpp-python sdist whose llama.cpp is built (default: %(default)s)")
    p.add_argument("--build-jobs", type=positive_int, default=len(os.sched_getaffinity(0)),
                   help="parallel compile jobs (default: %(default)s)")
    p.add_argument("--build-nice", type=int, default=19, help="niceness of the compile (default: %(default)s)")
    p.add_argument("--build-only", action="store_true", help="build llama-bench and write the models, then stop")
    p.add_argument("--idle-seconds", type=float, default=20,
                   help="quiet time required before measuring (0: don't wait; default: %(default)s)")
    p.add_argument("--idle-cpu", type=float, default=10, help="CPU %% above which a process is busy (default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=1800,
                   help="measure anyway after waiting this long, saying so (default: %(default)s s)")
    p.add_argument("--run-timeout", type=float, default=3600, help="limit of one run in seconds (default: %(default)s)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the raw rows and the summary to FILE")
    return p


def model_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--gguf, or the random model's --shape, --seed and --quant with their defaults filled in;
    exits through `p` when both are given or the file is missing."""
    random_options = [f"--{name}" for name in ("shape", "seed", "quant") if getattr(args, name) is not None]
    if args.gguf is None:
        args.shape = args.shape or DEFAULT_SHAPE
        args.seed = DEFAULT_SEED if args.seed is None else args.seed
        args.quant = args.quant or DEFAULT_QUANT
    elif random_options:
        p.error(f"{' '.join(random_options)}: these choose the random model's weights, and --gguf measures the "
                "given file instead; leave them out, or leave out --gguf")
    elif not args.gguf.is_file():
        p.error(f"--gguf {args.gguf}: expected a GGUF file, found {'a directory' if args.gguf.is_dir() else 'nothing'} "
                "there; give the path of a .gguf model")


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    model_options(p, args)
    try:
        configs = parse_configs(args.configs)
    except ValueError as exc:
        p.error(str(exc))
    cache = args.cache_dir or default_cache_dir(args.llama_cpp_python)
    binary = build_llama_bench(cache, args.llama_cpp_python, args.build_jobs, args.build_nice)
    if args.gguf is not None:
        gguf_path, h5_path = prepare_given_model(cache, args.gguf)
    else:
        gguf_path, h5_path = prepare_models(cache, args.shape, args.seed, args.quant)
    seq_len = model_context(h5_path)
    depths, skipped = split_depths(args.depth, seq_len)
    if skipped:
        log(f"skipping depth(s) {', '.join(map(str, skipped))}: a decode measurement at depth N needs N + "
            f"{GEN_TOKENS + 1} tokens, and the model's context is {seq_len} tokens")
    if args.build_only:
        print(f"{binary}\n{gguf_path}\n{h5_path}")
        return 0
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if not mpiexec:
        sys.exit("llamacpp_compare: mpiexec not found next to the Python interpreter or on PATH")
    idle = wait_for_idle(args.idle_seconds, args.idle_cpu, args.idle_timeout)
    by_config = dict(zip(args.configs, configs))
    rows, llama_facts, our_facts = [], {}, {}
    me, ticks = {os.getpid()}, os.sysconf("SC_CLK_TCK")
    for i, system, config in schedule(args.configs, args.repeat):
        if system == LLAMA:
            command = llama_bench_command(binary, gguf_path, args.threads, depths, args.kv_type)
        else:
            command = ours_command(mpiexec, h5_path, by_config[config], nthreads=args.nthreads, depths=depths,
                                   kv_type=args.kv_type)
        log(f"round {i + 1}/{args.repeat}: {system} {config}")
        before, t0 = cpu_sample(me), time.monotonic()
        out, _ = run_capture(command, args.run_timeout)
        seconds = time.monotonic() - t0
        # the run's own processes have ended: whatever the sample after it holds ran beside it
        others = busy_processes(before, cpu_sample(me), seconds, args.idle_cpu, ticks)
        parsed = parse_llama_bench(out, depths) if system == LLAMA else parse_ours(out, depths)
        (llama_facts if system == LLAMA else our_facts).update(parsed)
        rows.append({"round": i, "system": system, "config": config, "kv_type": args.kv_type, "seconds": seconds,
                     "command": command,
                     "disturbed_by": [f"{name} (pid {pid}) {pct:.0f}%" for pid, name, pct in others], **parsed})
        log(f"  decode {parsed['decode']:.2f} tok/s, prefill-{PROMPT_TOKENS} {parsed['prefill']:.2f} tok/s"
            + "".join(f", decode @ d{d} {v:.2f} tok/s" for d, v in parsed["decode_at_depth"].items() if d != "0")
            + (f"; disturbed by {', '.join(rows[-1]['disturbed_by'][:3])}" if others else ""))
    summary = summarize(rows)
    facts = {"cpu": cpu_model_name(), "cores": len(os.sched_getaffinity(0)),
             "kernel_isa": our_facts.get("kernel_isa", "unknown"), "shape": args.shape, "seed": args.seed,
             "quant": args.quant, "gguf": str(gguf_path) if args.gguf is not None else None,
             "depths": depths, "skipped_depths": skipped, "seq_len": seq_len, "kv_type": args.kv_type,
             "version": args.llama_cpp_python, "llama_build": llama_facts.get("build_commit"),
             "llama_threads": args.threads, "our_threads": args.nthreads, "repeat": args.repeat, "idle": idle,
             "disturbed_runs": sum(bool(r["disturbed_by"]) for r in rows), "runs": len(rows),
             "no_amx": any(X86_NO_AMX in flag for flag in cmake_flags())}
    print(report(summary, facts))
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "rows": rows, "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
