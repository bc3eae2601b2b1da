"""`python -m dllama_mpi bench`: decode and prefill speed of real model shapes, under any
`mpirun -n N ... --memory-budget ...`; or, with --encode, the tokenizers' encoding speed.

The models have random Q40 weights (speed does not depend on values), generated once and
cached on disk; or --model measures a given model file (or shard directory). Besides
tokens/s it measures, in the same run, the node's memory read bandwidth, and reports the
decode roofline fraction = tokens/s x weight bytes read per token / bandwidth (a mixture of
experts reads its chosen experts' share, n_experts_used of n_experts, on average). With
--depths N ..., it also measures decode after a prompt of N tokens (N in the KV cache). With
--rows R ..., it also times forward passes of R tokens at one position (what R sequences
decoding together cost per step) and reports R x steps / time for each R.

`--encode VOCAB ...` runs as one process without MPI: it encodes a deterministic English-like
text of --encode-kib KiB with each vocabulary (a model .h5, a llama2.c tokenizer.bin or a
GGUF file) and reports the median time of --repeat runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import sys
import time

import numpy as np
from numba import get_num_threads as numba_threads

from .. import LAUNCHED
from ..errors import InputError, UsageError
from ..model import quant
from ..model.spec import ModelSpec
from .launcher import add_job_options, parse_budgets, positive_int, run_alone, run_job

# the published models' shapes and contexts (a context bounds the depths a decode can be measured at; the
# bench allocates the KV cache its longest measurement needs, no more)
_QWEN3_30B_A3B = ModelSpec(dim=2048, hidden_dim=768, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128,
                           vocab_size=151936, seq_len=40960, norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True,
                           architecture="qwen3moe", n_experts=128, n_experts_used=8, expert_weights_norm=True,
                           weight_type="q40", shared_classifier=False)
SHAPES = {
    "tiny": ModelSpec(dim=256, hidden_dim=768, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, vocab_size=1024,
                      seq_len=1024, weight_type="q40"),
    "tinyllama-1.1b": ModelSpec(dim=2048, hidden_dim=5632, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64,
                                vocab_size=32000, seq_len=2048, weight_type="q40", shared_classifier=False),
    "llama-3.2-1b": ModelSpec(dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                              vocab_size=128256, seq_len=131072, rope_theta=500000.0, weight_type="q40"),
    "llama-3-8b": ModelSpec(dim=4096, hidden_dim=14336, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                            vocab_size=128256, seq_len=8192, rope_theta=500000.0, weight_type="q40",
                            shared_classifier=False),
    # mixture of experts: 128 experts of 768 rows a layer, 8 chosen a token (3.3B of 30.5B parameters active)
    "qwen3-30b-a3b": _QWEN3_30B_A3B,
    # its first 8 of 48 layers: what fits this 24 GiB machine beside llama.cpp's copy, for the benchmark
    "qwen3-30b-a3b-8l": dataclasses.replace(_QWEN3_30B_A3B, n_layers=8),
    "tiny-moe": dataclasses.replace(_QWEN3_30B_A3B, dim=256, hidden_dim=256, n_layers=4, n_heads=8, head_dim=32,
                                    vocab_size=1024, seq_len=1024, n_experts=8, n_experts_used=2),  # k-quant rows
}
BENCH_MODEL_VERSION = 2  # 2: the Llama shapes' published contexts
SHORT_PROMPT = 8  # the prompt before a depth-0 decode measurement, and the position --rows is timed at


def largest_depth(seq_len: int, decode_steps: int) -> int:
    """The largest depth whose decode measurement fits a context of `seq_len` tokens: the prompt,
    the decoded tokens and one spare position, as the bench's max_seq_len."""
    return seq_len - decode_steps - 1


def bench_model_path(shape: str):
    """The cached random model of `shape`, written on first use by one process."""
    from ..files.modelfile import tensor_layout, write_model
    from ..files.synthetic import cache_dir
    from ..files.tokenizer import Tokenizer

    spec = SHAPES[shape]
    path = cache_dir() / f"bench-{shape}-q40-v{BENCH_MODEL_VERSION}.h5"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors = ((name, random_tensor(rng, info.shape, info.matrix)) for name, info in tensor_layout(spec).items())
    write_model(path, spec, tensors, Tokenizer.synthetic(max(spec.vocab_size, 259)),
                {"source": f"random weights, {shape} shape (benchmark)"})
    return path


def random_tensor(rng, shape: tuple[int, ...], matrix: bool) -> np.ndarray:
    """Random weights of `shape`, drawn from `rng`: a norm's float32 values near 1, a router's
    (experts, dim) normal values, or a matrix's Q40 blocks of random nibbles, scaled so that
    activations stay in range."""
    if not matrix and len(shape) == 2:
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[1])).astype(np.float32)
    if not matrix:
        return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    rows, cols = shape
    blocks = np.empty((rows, cols // quant.BLOCK), quant.Q40)
    raw = quant.as_bytes(blocks)
    raw[...] = rng.integers(0, 256, raw.shape, dtype=np.uint8)  # random nibbles
    blocks["d"] = (rng.random(blocks.shape, dtype=np.float32) * 0.02 / np.sqrt(cols)).astype(np.float16)
    return blocks


def _read_bandwidth(comm) -> float:
    """The node's memory read bandwidth in GB/s: rank 0 streams 1 GiB with as many threads
    as the node has cores while the other ranks sleep (they don't compete for the cores);
    best of 3."""
    from ..parallel import threads

    best = 0.0
    comm.sleeping_barrier()
    if comm.rank == 0:
        previous = numba_threads()
        threads.set_threads(threads.node_cores())
        best = read_bandwidth()
        threads.set_threads(previous)
    comm.sleeping_barrier()
    return comm.bcast_obj(best)


def read_bandwidth(runs: int = 3) -> float:
    """GB/s of a plain read of 1 GiB with this process's threads (vector.read_sum), best of `runs`."""
    from ..kernels import vector

    buf = np.ones((1 << 30) // 8, np.float64)
    vector.read_sum(buf)  # compile, and fault the pages in
    best = 0.0
    for _ in range(runs):
        t0 = time.perf_counter()
        vector.read_sum(buf)
        best = max(best, buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def kernel_isa() -> str:
    """The instruction set the quantized products run on (qmatmul.ISA)."""
    from ..kernels import qmatmul

    return qmatmul.ISA


def _rows_per_step(comm, engine, rows: list[int], steps: int, repeat: int, rng, vocab_size: int) -> list[dict]:
    """Collective: for each R, time `steps` forward passes of R tokens at one fixed position
    (the KV cache rows there are rewritten each time), `repeat` times; tokens/s = R x steps /
    time, the median. The logits are those of the last row only (one classifier product)."""
    if rows and max(rows) > engine.max_rows:
        raise UsageError(f"--rows {max(rows)}: a forward pass takes at most {engine.max_rows} tokens")
    pos = SHORT_PROMPT
    out = []
    for r in rows:
        tokens = rng.integers(3, vocab_size, r).astype(np.int64)
        engine.forward_block(tokens, pos)  # the first pass of this size: warm
        rates = []
        for _ in range(repeat):
            comm.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.forward_block(tokens, pos)
            comm.barrier()
            rates.append(r * steps / (time.perf_counter() - t0))
        out.append({"rows": r, "tok_s": float(np.median(rates))})
    return out


def _decode_at_depth(comm, job, depth: int, decode_steps: int, repeat: int, rng, vocab_size: int) -> float:
    """Collective: decode tokens/s after a prompt of `depth` random tokens, the median of `repeat`
    runs; the prompt's time is not counted."""
    from ..serving.scheduler import generate

    rates = []
    for _ in range(repeat):
        prompt = rng.integers(3, vocab_size, depth).tolist()  # every rank draws it: the rng stays in step
        comm.barrier()
        r = generate(job, prompt if comm.rank == 0 else None, decode_steps + 1, stop_ids=())
        rates.append(r["n_decode"] / r["decode_s"])
    return float(np.median(rates))


def _refuse_depths_beyond(depths: list[int], decode_steps: int):
    """open_job's check: refuses, before loading, a depth whose measurement does not fit the model's context."""
    def check(tokenizer, launch) -> None:
        seq_len = launch.plan.spec.seq_len
        beyond = [d for d in depths if d > largest_depth(seq_len, decode_steps)]
        if beyond:
            raise InputError(f"--depths {' '.join(map(str, beyond))}: the model's context is {seq_len} tokens, and a "
                             f"measurement at depth N needs N + {decode_steps + 1} (--decode-steps {decode_steps} and "
                             f"one spare); give depths of at most {largest_depth(seq_len, decode_steps)}")
    return check


def run(comm, args) -> dict | None:
    from ..job.loading import open_job
    from ..parallel import threads
    from ..serving.scheduler import generate

    budgets = parse_budgets(args.memory_budget, comm.size)
    n_threads = threads.for_rank(comm.local_rank, comm.local_size, args.nthreads)
    if args.model is not None:
        path, label = args.model, args.model
    else:
        path = bench_model_path(args.shape) if comm.rank == 0 else None
        path, label = comm.bcast_obj(str(path) if path else None), args.shape
    rng = np.random.default_rng(1)
    row_counts = args.rows or []
    depths = sorted(set(args.depths) - {0})  # depth 0 is the decode measurement every run makes
    isa = kernel_isa()
    mpi = comm.mpi_run()  # which MPI measured this: its library and version, and who started the ranks
    results = {}
    for buffer_type in args.buffer_float_type:
        longest = max(args.prompt_lengths + [SHORT_PROMPT + max(row_counts, default=0)] + depths)
        job = open_job(comm, path, budgets, buffer_type=buffer_type, max_seq_len=longest + args.decode_steps + 1,
                       kv_type=args.kv_type, check=_refuse_depths_beyond(depths, args.decode_steps))
        load_s = job.load_s
        engine, spec = job.engine, job.plan.spec
        prefill = {}
        ttft = None
        for length in args.prompt_lengths:
            rates = []
            # one untimed run first, as llama-bench's warm-up run: the first prefill after loading ran
            # 25% slower (Llama-3.2-1B Q4_K_M, 1 rank: 64.6 tok/s at --repeat 1, 85.8 after a warm-up)
            for i in range(args.repeat + 1):
                prompt = rng.integers(3, spec.vocab_size, length).tolist()  # every rank draws it: the rng stays in step
                comm.barrier()
                r = generate(job, prompt if comm.rank == 0 else None, 1, stop_ids=())
                if i:
                    rates.append(length / r["prompt_s"])
                if ttft is None:
                    ttft = time.perf_counter() - LAUNCHED
            prefill[str(length)] = float(np.median(rates))
        decode, per_rank = [], []
        loopback_0 = _loopback_bytes() if comm.rank == 0 else None
        for _ in range(args.repeat):
            prompt = rng.integers(3, spec.vocab_size, SHORT_PROMPT).tolist()
            comm.barrier()
            c0, f0, s0 = engine.collective_s, engine.forward_s, comm.bytes_sent
            r = generate(job, prompt if comm.rank == 0 else None, args.decode_steps + 1, stop_ids=())
            n_forward = SHORT_PROMPT + args.decode_steps
            decode.append(r["n_decode"] / r["decode_s"])
            per_rank.append(((engine.forward_s - f0) / n_forward, (engine.collective_s - c0) / n_forward,
                             (comm.bytes_sent - s0) / n_forward))
        loopback_1 = _loopback_bytes() if comm.rank == 0 else None
        at_depth = {depth: _decode_at_depth(comm, job, depth, args.decode_steps, args.repeat, rng, spec.vocab_size)
                    for depth in depths}
        rows_per_step = _rows_per_step(comm, engine, row_counts, args.decode_steps, args.repeat, rng, spec.vocab_size)
        fwd, coll, sent = np.median(np.array(per_rank), axis=0)
        mine = {
            "compute": float(fwd - coll), "collective": float(coll), "sent": float(sent),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            # what the memory check counted: the weights and one slot's KV cache in --kv-type
            "planned_mb": (job.plan.weight_bytes(comm.rank)
                           + job.plan.kv_cache_bytes(comm.rank, engine.max_seq_len, args.kv_type)) / 2**20,
            "weight_bytes": job.weights.nbytes - (job.weights.embedding.nbytes
                                                      if not spec.shared_classifier else 0),
            # of which a decoded token reads its experts' share in a mixture of experts (k of n, on average)
            "unread_bytes": sum(layer["experts"].nbytes for layer in job.weights.layers if "experts" in layer)
            * (1 - spec.n_experts_used / spec.n_experts) if spec.moe else 0,
            "threads": n_threads,
        }
        bandwidth = _read_bandwidth(comm)  # after the RSS reading: its buffer is not the model's
        rows = comm.gather_obj(mine)
        if comm.rank == 0:
            weight_bytes = sum(m["weight_bytes"] for m in rows)  # what was loaded
            read_bytes = weight_bytes - sum(m["unread_bytes"] for m in rows)  # read once per decoded token
            tps = float(np.median(decode))
            results[buffer_type] = {
                "shape": label, "model": str(path), "world_size": comm.size, "budgets": list(budgets.ratios),
                "buffer_float_type": buffer_type, "kv_type": args.kv_type,
                "threads_per_rank": [m["threads"] for m in rows],
                "decode_tokens_per_s": tps, "prefill_tokens_per_s": prefill,
                "decode_tokens_per_s_at_depth": {str(d): v for d, v in {0: tps, **at_depth}.items()},
                "prefill_to_decode_ratio": {k: v / tps for k, v in prefill.items()},
                "time_to_first_token_s": ttft, "load_s": load_s,
                "load_gb_s": weight_bytes / load_s / 1e9,
                "bandwidth_gb_s": bandwidth, "weight_bytes_per_token": read_bytes,
                "roofline_fraction": tps * read_bytes / (bandwidth * 1e9),
                "bytes_sent_per_token": [m["sent"] for m in rows],
                "loopback_bytes_per_token": None if loopback_0 is None or loopback_1 is None
                else (loopback_1 - loopback_0) / (args.repeat * (SHORT_PROMPT + args.decode_steps)),
                "compute_s_per_token": [m["compute"] for m in rows],
                "collective_s_per_token": [m["collective"] for m in rows],
                "wait_s_per_token": [m["collective"] - min(r["collective"] for r in rows) for m in rows],
                "peak_rss_mb": [m["rss_mb"] for m in rows], "planned_mb": [m["planned_mb"] for m in rows],
                "repeats": args.repeat, "decode_steps": args.decode_steps,
                "rows_per_step": rows_per_step, "kernel_isa": isa, "mpi": mpi,
                "budgets_chosen": list(job.plan.budgets),
                "auto_predicted_ms_per_token": 1e3 * job.auto.token_s if job.auto is not None else None,
                "auto_equal_predicted_ms_per_token": 1e3 * job.auto.equal_token_s if job.auto is not None else None,
            }
        del job, engine
    return results if comm.rank == 0 else None


def _loopback_bytes() -> int | None:
    """Bytes sent through this network namespace's loopback interface so far. Under
    tools/netsim.py all ranks talk TCP over a private loopback, so the difference over the
    decode runs is what crossed between ranks, headers included; otherwise it is other
    traffic of the host and means nothing."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, counters = line.partition(":")
                if name.strip() == "lo":
                    return int(counters.split()[8])  # transmit bytes
    except OSError:
        pass
    return None


def table(result: dict) -> str:
    r = result
    lines = [
        f"{r['shape']}: {r['world_size']} rank(s), budgets "
        + (f"auto: {' '.join(map(str, r['budgets_chosen']))}" if r["auto_predicted_ms_per_token"] is not None
           else " ".join(map(str, r["budgets"]))) + ", "
        f"buffers {r['buffer_float_type']}, KV cache {r['kv_type']}, threads {r['threads_per_rank']}, "
        f"kernels {r['kernel_isa']}",
        f"  MPI: {r['mpi']['text']}",
        f"  decode {r['decode_tokens_per_s']:.2f} tokens/s; roofline fraction {r['roofline_fraction']:.2f} "
        f"({r['weight_bytes_per_token'] / 1e6:.0f} MB/token over {r['bandwidth_gb_s']:.1f} GB/s measured)",
        "  prefill " + ", ".join(f"{k} tokens: {v:.2f} tokens/s ({r['prefill_to_decode_ratio'][k]:.2f}x decode)"
                                 for k, v in r["prefill_tokens_per_s"].items()),
        f"  time to first token {r['time_to_first_token_s']:.1f} s from launch; load {r['load_s']:.1f} s "
        f"({r['load_gb_s']:.2f} GB/s)",
    ]
    if len(r["decode_tokens_per_s_at_depth"]) > 1:
        lines.append("  decode at depth " + ", ".join(f"{d}: {v:.2f}" for d, v in r["decode_tokens_per_s_at_depth"].items())
                     + f" tokens/s (tokens in the KV cache; 0: after the {SHORT_PROMPT}-token prompt)")
    if r["rows_per_step"]:
        lines.append("  rows per step: " + ", ".join(f"{x['rows']}: {x['tok_s']:.2f} tokens/s" for x in r["rows_per_step"]))
    lines += [
        f"  {'rank':>4} {'compute ms/tok':>14} {'collective ms/tok':>17} {'waiting ms/tok':>14} "
        f"{'sent KiB/tok':>12} {'peak RSS MiB':>12} {'planned MiB':>11}",
    ]
    for i in range(r["world_size"]):
        lines.append(
            f"  {i:>4} {1e3 * r['compute_s_per_token'][i]:>14.2f} {1e3 * r['collective_s_per_token'][i]:>17.2f} "
            f"{1e3 * r['wait_s_per_token'][i]:>14.2f} {r['bytes_sent_per_token'][i] / 1024:>12.1f} "
            f"{r['peak_rss_mb'][i]:>12.0f} {r['planned_mb'][i]:>11.0f}")
    return "\n".join(lines)


# Sentences of the --encode text: plain English with punctuation, digits and some non-ASCII
# (accents, typographic quotes, CJK, an emoji) so byte fallback and multi-byte pieces show.
_ENCODE_SENTENCES = (
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the sun with her dog, Max.",
    "One day, they found a shiny red ball under the old oak tree.",
    "\u201cCan we keep it?\u201d asked Tom, and his mother smiled.",
    "The caf\u00e9 on the corner sold cr\u00e8me br\u00fbl\u00e9e and tiny na\u00efve cakes.",
    "Zo\u00eb wrote to her friend in Malm\u00f6 about the snow \u2014 it was \u221212 \u00b0C that night.",
    "The quick brown fox jumps over the lazy dog.",
    "He drew \u732b and \u72ac in his notebook, then a smiling face \U0001F600.",
    "In 1969, 600 million people watched the first steps on the Moon.",
    "The train left at 7:45 a.m. and arrived at 11:30, twenty minutes late.",
    "They shared the cake, and everyone was happy.",
    "Why is the sky blue? Because air scatters blue light more than red light.",
    "The committee's report (pages 12-48) recommended three changes.",
    "After the storm, the garden was full of leaves, branches and puddles.",
    "\u00bfD\u00f3nde est\u00e1 la biblioteca?\" she asked in Spanish.",
    "The little bird sang a song every morning from the top of the tree.",
)


def encode_text(kib: float, seed: int = 0) -> str:
    """A deterministic English-like text of at most `kib` KiB of UTF-8 (a few bytes less: it
    ends on a whole character): `seed`-shuffled sentences, now and then a paragraph break."""
    rng = random.Random(seed)
    target = int(kib * 1024)
    parts, size = [], 0
    while size < target:
        part = rng.choice(_ENCODE_SENTENCES) + ("\n\n" if rng.random() < 0.1 else " ")
        parts.append(part)
        size += len(part.encode())
    return "".join(parts).encode()[:target].decode("utf-8", "ignore")


def load_vocab(path: str):
    """The tokenizer of a model .h5, a GGUF file (vocab-only ones too) or a llama2.c tokenizer.bin."""
    from pathlib import Path

    from ..files.tokenizer import Tokenizer, from_gguf

    source = Path(path)
    if not source.is_file():
        raise InputError(f"vocabulary {source} is not a file; give a model .h5, a GGUF file or a llama2.c tokenizer.bin")
    if source.suffix == ".h5":
        from ..files.modelfile import ModelFile

        model = ModelFile(source)
        try:
            return model.tokenizer()
        finally:
            model.close()
    if source.suffix == ".gguf":
        from ..files.convert.gguf_model import open_gguf

        return from_gguf(open_gguf(source))
    return Tokenizer.from_llama2c(source)


def run_encode(args) -> list[dict]:
    """Encoding speed of each --encode vocabulary on the same text."""
    text = encode_text(args.encode_kib)
    results = []
    for path in args.encode:
        tokenizer = load_vocab(path)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ids = tokenizer.encode(text)
            times.append(time.perf_counter() - t0)
        seconds = float(np.median(times))
        results.append({"vocab": path, "tokenizer": type(tokenizer).__name__, "kib": len(text.encode()) / 1024,
                        "chars": len(text), "tokens": len(ids), "seconds": seconds, "tokens_per_s": len(ids) / seconds,
                        "repeats": args.repeat})
    return results


def encode_table(r: dict) -> str:
    return (f"{r['vocab']} ({r['tokenizer']}): {r['kib']:.1f} KiB -> {r['tokens']} tokens in {r['seconds']:.3f} s "
            f"({r['tokens_per_s']:.0f} tokens/s, median of {r['repeats']})")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.encode:  # one process: run_job would initialise MPI
        return run_alone(lambda: _encode(args))

    def job(comm):
        results = run(comm, args)
        if comm.rank == 0:
            for result in results.values():
                print(json.dumps(result) if args.json else table(result), flush=True)
        return 0

    return run_job(job)


def _encode(args) -> int:
    for result in run_encode(args):
        print(json.dumps(result) if args.json else encode_table(result), flush=True)
    return 0


MAX_ENCODE_KIB = 100 * 1024  # the text is built in memory: 100 MiB is far beyond any prompt


def _encode_kib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= MAX_ENCODE_KIB:  # nan fails too
        raise argparse.ArgumentTypeError(f"must be a number of KiB above 0 and at most {MAX_ENCODE_KIB}, got {text!r}")
    return value


def depth(text: str) -> int:
    """argparse type of a depth: tokens already in the KV cache, a whole number of at least 0."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number of tokens, at least 0, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dllama_mpi bench", allow_abbrev=False,
        description="Measure decode and prefill speed of a model shape with random weights, under any "
                    "`mpirun -n N ... --memory-budget ...`; or, with --encode, how fast tokenizers encode a long text "
                    "(one process, no mpirun).")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b",
                       help="model shape to measure, with random weights (default: %(default)s)")
    add_job_options(p, "the random weights of --shape", model_in=which, measure_buffer_types=True)
    p.add_argument("--prompt-lengths", nargs="+", type=positive_int, default=[128, 512], metavar="N",
                   help="prompt lengths whose prefill speed is measured (default: 128 512)")
    p.add_argument("--decode-steps", type=positive_int, default=32, metavar="N",
                   help="tokens decoded per decode measurement (default: %(default)s)")
    p.add_argument("--depths", nargs="+", type=depth, default=[0], metavar="N",
                   help="also measure decode after a prompt of N tokens already in the KV cache, for each N "
                        f"(llama-bench's -d; 0 is the usual decode measurement, after {SHORT_PROMPT} tokens; "
                        "default: 0)")
    p.add_argument("--repeat", type=positive_int, default=3, metavar="N",
                   help="runs of each measurement; medians are reported (default: %(default)s)")
    p.add_argument("--rows", nargs="+", type=positive_int, metavar="R",
                   help="also time forward passes of R tokens at one position, --decode-steps of them per run, for "
                        "each R (R sequences decoding together; the logits of one row) and report R x steps / time "
                        "(default: off)")
    p.add_argument("--encode", nargs="+", metavar="VOCAB",
                   help="measure encoding with these vocabularies instead (model .h5, GGUF or llama2.c tokenizer.bin; "
                        "default: off)")
    p.add_argument("--encode-kib", type=_encode_kib, default=100, metavar="KIB",
                   help="size of the --encode text in KiB (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per buffer type (per vocabulary with --encode) instead of tables "
                        "(default: tables)")
    return p


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
