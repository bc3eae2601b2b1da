"""The whole engine gives the same bits with 1 thread and with 2, at TinyLlama-1.1B's shape.

With one thread the engine runs every product through the serial rows kernel; with two,
products big enough go through the kernel's parallel driver (threads.Pool.parallel). The
kernels promise the same bits either way, and test_kernels.py checks that on 17 x 416
matrices; but at 2048-wide rows LLVM, free to contract and reassociate (fastmath), compiled
the same Python loop differently in the two contexts, and greedy text changed with
--nthreads (issue 11). So here the real shape runs: one full TinyLlama layer (dim 2048,
hidden 5632, 32 heads over 4 KV heads of 64) and the 32000 x 2048 classifier, on a prompt
block of several tokens (prefill, T > 1) then single-token decode steps, for every weight
type x buffer type, and the logits are compared bit for bit.

The engine runs in a child process that loads the kernels from numba's on-disk cache, as
every run of the program but the first does: issue 11's divergence showed only there (a
process that compiled the parallel driver itself got the serial kernel's bits), so a check
in the process that compiles would pass on a cold cache, after any edit of the kernels
included. When the child had to compile some kernel, it is run once more.

The weights are random blocks written straight in their stored type (no quantization
pass), so the four models take a few seconds to write; values only need to be in range.

    python tests/test_thread_identity.py DIR N   (a child: reads DIR/*.h5, writes DIR/logits-N.npz)
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from conftest import compiled_kernels

import dllama_mpi
from dllama_mpi.files.modelfile import tensor_layout, write_model
from dllama_mpi.files.tokenizer import Tokenizer
from dllama_mpi.model import quant
from dllama_mpi.model.spec import ModelSpec

# TinyLlama-1.1B (bench.SHAPES["tinyllama-1.1b"]), one layer of its 22. The classifier is the
# embedding table here (TinyLlama has its own): the same 32000 x 2048 product, a third less to
# write and load.
TINYLLAMA_1_LAYER = ModelSpec(dim=2048, hidden_dim=5632, n_layers=1, n_heads=32, n_kv_heads=4, head_dim=64,
                              vocab_size=32000, seq_len=2048, shared_classifier=True)
PROMPT = [1, 15043, 29892, 590, 1024, 338, 31999]  # prefilled as one block (tiles of 4 and 3 tokens)
DECODE = [306, 763, 2]  # then one token at a time
STEPS = ["prefill"] + [f"decode {i}" for i in range(len(DECODE))]
# the k-quants run through q40's tiles (the same intrinsic, other scales and codes): test_kernels.py checks
# their products with 1 and 2 threads; a TinyLlama-layer model more here would cost the suite ~20 s each
WEIGHTS = quant.QUANTIZABLE  # what a model can be made of from random floats (the k-quants and q50 come from GGUF files)
CASES = [(w, b) for w in WEIGHTS for b in quant.BUFFER_TYPES]

needs_two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="numba has a single thread")


def _random_tensors(spec: ModelSpec, seed: int):
    """(name, array) for every tensor, matrices already in their stored type: Q40/Q80 blocks
    of random quants with fp16 scales near 1/sqrt(fan-in) per value, f16/f32 uniform values
    of that scale; norms near 1."""
    rng = np.random.default_rng(seed)
    for name, info in tensor_layout(spec).items():
        if not info.matrix:
            yield name, (1 + 0.1 * rng.standard_normal(info.shape, dtype=np.float32)).astype(np.float32)
            continue
        rows, cols = info.shape
        scale = 1 / np.sqrt(cols)
        kind = spec.tensor_type(info.split)
        if kind in ("q40", "q80"):
            dtype = quant.Q40 if kind == "q40" else quant.Q80
            nb = cols // quant.BLOCK
            blocks = np.frombuffer(rng.bytes(rows * nb * dtype.itemsize), dtype).reshape(rows, nb).copy()
            if kind == "q80":
                blocks["qs"][blocks["qs"] == -128] = -127  # llama.cpp's Q8_0 range
            spread = 4.6 if kind == "q40" else 73.0  # std of a uniform nibble - 8, of a uniform int8
            blocks["d"] = (rng.uniform(0.5, 1.5, (rows, nb)) * (scale / spread)).astype(np.float16)
            yield name, blocks
        else:
            w = rng.random(info.shape, dtype=np.float32)  # uniform: 4x faster than normal, as good here
            w -= np.float32(0.5)
            w *= np.float32(scale * np.sqrt(12))
            yield name, w.astype(np.float16) if kind == "f16" else w


# ---------------------------------------------------------------- the child process


def _compiled_here() -> int:
    """How many specializations of the package's cached kernels this process compiled rather
    than loaded from numba's cache (kernels without cache=True don't count: they never load)."""
    from numba.core.dispatcher import Dispatcher

    kernels = {id(f): f for name, module in list(sys.modules.items()) if name.startswith("dllama_mpi")
               for f in vars(module).values() if isinstance(f, Dispatcher)}
    return sum(f.stats.cache_misses.total() for f in kernels.values() if f.stats.cache_path)


def _child(directory: Path, n_threads: int) -> None:
    """For every case, with `n_threads` threads: the logits after the prompt block and after
    each decode token, on one rank; saved with the count of kernels compiled here."""
    from dllama_mpi.job.loading import open_job
    from dllama_mpi.parallel import threads
    from dllama_mpi.parallel.comm import Comm

    assert threads.set_threads(n_threads) == n_threads  # before any engine: it sizes its pool then
    comm, found = Comm(), {}
    for weights, buffer_type in CASES:
        job = open_job(comm, directory / f"{weights}.h5", (1,), buffer_type=buffer_type,
                               max_seq_len=len(PROMPT) + len(DECODE))
        engine = job.engine
        rows = [engine.forward_block(np.array(PROMPT, np.int64), 0).copy()]  # the logits buffer is reused
        for i, t in enumerate(DECODE):
            rows.append(engine.forward(t, len(PROMPT) + i).copy())
        found[f"{weights}-{buffer_type}"] = np.stack(rows)
        del job, engine
        gc.collect()  # the f32 model's weights are 430 MB: one copy at a time
    np.savez(directory / f"logits-{n_threads}.npz", compiled_here=_compiled_here(), **found)


# ---------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def logits(tmp_path_factory) -> dict[int, dict[str, np.ndarray]]:
    """threads -> 'weights-buffer' -> (steps, vocab) logits, from child processes that loaded
    the kernels from numba's cache."""
    out = tmp_path_factory.mktemp("tinyllama")
    compiled_kernels()  # a cold cache would have both children compile them, and run again
    tokenizer = Tokenizer.synthetic(TINYLLAMA_1_LAYER.vocab_size)
    for weights in WEIGHTS:
        spec = ModelSpec(**{**TINYLLAMA_1_LAYER.to_attrs(), "weight_type": weights})
        write_model(out / f"{weights}.h5", spec, _random_tensors(spec, seed=11), tokenizer)
    # the children import this very package, wherever it is (a worktree, an unpacked sdist)
    root = str(Path(dllama_mpi.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    for _ in range(2):
        # the 1- and 2-thread runs at once: mostly loading weights, one core each
        children = {n: subprocess.Popen([sys.executable, __file__, str(out), str(n)], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=env) for n in (1, 2)}
        try:
            for n, child in children.items():
                output = child.communicate(timeout=600)[0]
                assert child.returncode == 0, f"the {n}-thread run failed:\n{output}"
        finally:
            for child in children.values():
                if child.poll() is None:
                    child.kill()
                    child.wait()
        found = {n: dict(np.load(out / f"logits-{n}.npz")) for n in children}
        if sum(int(f.pop("compiled_here")) for f in found.values()) == 0:
            break  # else: once more, from the cache just written
    return found


@pytest.mark.jobs
@needs_two_threads
@pytest.mark.parametrize(("weights", "buffer_type"), CASES)
def test_tinyllama_layer_logits_bit_identical_for_one_and_two_threads(logits, weights, buffer_type):
    one, two = logits[1][f"{weights}-{buffer_type}"], logits[2][f"{weights}-{buffer_type}"]
    for step, a, b in zip(STEPS, one, two):
        assert np.isfinite(a).all() and np.abs(a).max() > 0.1, f"{step}: degenerate logits, the check would be void"
        differ = np.flatnonzero(a.view(np.uint32) != b.view(np.uint32))
        assert differ.size == 0, (
            f"{weights} weights, {buffer_type} buffer, {step}: {differ.size} of {a.size} logits differ between "
            f"1 and 2 threads (first at id {differ[0]}: {a[differ[0]]!r} vs {b[differ[0]]!r}; "
            f"max |diff| {np.abs(a - b).max():.3g}; argmax {a.argmax()} vs {b.argmax()})")


if __name__ == "__main__":
    _child(Path(sys.argv[1]), int(sys.argv[2]))
