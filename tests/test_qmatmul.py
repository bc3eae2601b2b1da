"""Every instruction set of the quantized products this host can run, each in a fresh
process (DLLAMA_ISA picks it; numba's cache is bypassed so the assembly can be read): the
same bits as the exact numpy twins, on lopsided shapes, padded lane groups and every
token-tile remainder; the instructions that are supposed to do the work are there; and the
portable instruction set compiles every other kernel for its CPU too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dllama_mpi.kernels import qmatmul
from dllama_mpi.model import quant

CHECK = r"""
import json, re, sys
import numpy as np
from dllama_mpi.job.weights import Matrix
from dllama_mpi.kernels import qmatmul, reference, resolve
from dllama_mpi.kernels import vector as kernels
from dllama_mpi.model import quant

rng = np.random.default_rng(7)
lanes = np.full((qmatmul.CHUNKS, 16), 12345, np.int32), np.full((qmatmul.CHUNKS, 16), 1e30, np.float32)
checked = 0
SHAPES = ((13, 7, 1), (5, 16, 6), (7, 33, 3), (1, 17, 9), (3, 2, 4))  # (rows, blocks of 32, tokens)
SUPER_SHAPES = ((13, 8, 1), (5, 16, 6), (7, 40, 3), (1, 24, 9), (3, 8, 4))  # whole 256-value super-blocks
LARGEST = (3, 16, 2)  # the shape of the largest codes' case
QUANTIZED = [t for t in quant.WEIGHTS.values() if t.quantized]
FIRST = QUANTIZED[0].name  # the type whose products also run through the parallel driver


def weights(t, rows, nb):
    if t.encode is not None:
        w = (rng.standard_normal((rows, nb * 32)) * 10.0 ** rng.uniform(-2, 2, (rows, 1))).astype(np.float32)
        return t.encode(w)
    # weights kept from GGUF files, never quantized here: random blocks, small finite fp16 scales
    n = nb * 32 // t.block_values
    stored = np.frombuffer(rng.bytes(rows * n * t.dtype.itemsize), t.dtype).reshape(rows, n).copy()
    for field in (f for f in t.dtype.names if t.dtype[f] == np.float16):
        stored[field] = (rng.uniform(0.5, 1.5, stored.shape) * 10.0 ** rng.uniform(-3, -1, (rows, 1))).astype(np.float16)
    return stored


def largest(t, rows, nb):
    # every byte but the fp16 scales' 0xFF: the nibble types' largest codes (Q40's 15, Q50's 31), where
    # avx2's int16 sums of pmaddubsw pairs come nearest to overflowing
    stored = weights(t, rows, nb)
    raw = stored.view(np.uint8).reshape(*stored.shape, t.dtype.itemsize)
    for field, at in t.dtype.fields.values():
        if field != np.float16:
            raw[..., at : at + field.itemsize] = 0xFF
    return stored


for t in QUANTIZED:
    kind, serial, act = t.name, resolve(t.kernels.rows_8bit), quant.ACTIVATIONS[t.activation]
    shapes = SHAPES if t.block_values == 32 else SUPER_SHAPES
    for make, (rows, nb, n_tok) in [(weights, shape) for shape in shapes] + [(largest, LARGEST)]:
        stored = make(t, rows, nb)
        m = Matrix.from_stored(stored, nb * 32)
        x = (rng.standard_normal((n_tok, nb * 32)) * 10.0 ** rng.uniform(-2, 2, (n_tok, 1))).astype(np.float32)
        if make is largest:  # every activation code 127 (Q8K: -127) with them
            x = np.ones((n_tok, nb * 32), np.float32)
        xb = act.quantize(x)  # Q80, or Q8K for the k-quants (the engine's)
        g = qmatmul.groups(nb)
        xq, xsum = np.zeros((n_tok, 512 * g), np.int8), np.zeros((n_tok, 16 * g), np.int32)
        xd = np.zeros((n_tok, 16 * g), np.float32)
        if act.pack:
            resolve(act.pack)(x, xq, xsum, xd)
        else:
            qmatmul.pack_q80(np.ascontiguousarray(quant.as_bytes(xb)), xq, xsum, xd)
        expected = reference.twin_8bit(stored, x)
        # the parallel driver once (compiling one costs seconds per weight kind; test_kernels runs every kind's
        # on the native instruction set)
        for parallel in (False, True) if kind == FIRST else (False,):
            out = np.full((n_tok, rows), np.nan, np.float32)
            if parallel:
                kernels.PARALLEL[serial](m.qs, m.d, xq, xsum, xd, *lanes, out)
            else:
                serial(0, rows, 0, m.qs, m.d, xq, xsum, xd, *lanes, out)
            assert np.array_equal(out.view(np.uint32), expected.view(np.uint32)), (kind, rows, nb, n_tok, parallel)
            checked += 1
if qmatmul.ISA == "portable":  # the rest of the suite compiles for the native CPU; x86-64 stands for haswell too
    kernels.warm_up()  # every other kernel compiles for the least x86 CPU (f16 decoding included)
f16 = np.array([0x3C00, 0x0001, 0x8400, 0x7BFF, 0xC000, 0x3555, 0x0400, 0x03FF, 0x5A5A], np.uint16)
x = np.arange(1, 10, dtype=np.float32)
assert kernels.dot(f16, x) == np.float32(kernels.dot(f16.view(np.float16).astype(np.float32), x))
asm = "".join(f.inspect_asm(sig) for f in {resolve(t.kernels.rows_8bit) for t in QUANTIZED} for sig in f.signatures)
counts = {op: len(re.findall(rf"\b{op}\b", asm)) for op in ("vpdpbusd", "vpmaddubsw", "vpmaddwd", "vfmadd231ps")}
print(json.dumps({"isa": qmatmul.ISA, "checked": checked, "asm": counts}))
"""


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict[str, subprocess.Popen]:
    """The CHECK process of every instruction set this host runs, all started at once: each
    compiles every kernel afresh (most of its time, one core each), side by side."""
    started = {}
    for isa in qmatmul.host_isas():
        env = {**os.environ, "DLLAMA_ISA": isa, "NUMBA_CACHE_DIR": str(tmp_path_factory.mktemp(isa))}
        started[isa] = subprocess.Popen([sys.executable, "-c", CHECK], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
    yield started
    for proc in started.values():
        if proc.poll() is None:  # a test that failed before reading it
            proc.kill()
            proc.communicate()


@pytest.mark.jobs
@pytest.mark.parametrize("isa", qmatmul.ISAS)
def test_each_instruction_set_equals_the_exact_twin(isa, checks):
    if isa not in checks:
        pytest.skip(f"this CPU can't run {isa}")
    stdout, stderr = checks[isa].communicate(timeout=300)
    assert checks[isa].returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["isa"] == isa
    quantized = sum(t.quantized for t in quant.WEIGHTS.values())
    assert result["checked"] == 6 * quantized + 6  # 5 shapes and the largest codes a type; the first type's in parallel too
    asm = result["asm"]
    if isa == "avx512vnni":
        assert asm["vpdpbusd"] > 0
    elif isa == "avx2":  # compiled as for a plain AVX2 machine: no VNNI slipped in
        assert asm["vpmaddubsw"] > 0 and asm["vpmaddwd"] > 0 and asm["vpdpbusd"] == 0
    else:
        assert asm["vpdpbusd"] == 0 and asm["vpmaddubsw"] == 0
    assert asm["vfmadd231ps"] == 0  # the lanes multiply and add separately: no fused rounding


def test_the_best_instruction_set_is_the_default():
    assert qmatmul.ISA == qmatmul.host_isas()[0] or os.environ.get("DLLAMA_ISA")
    assert qmatmul.host_isas()[-1] == "portable"


@pytest.mark.parametrize("value, message", [
    ("sse9", "DLLAMA_ISA must be one of avx512vnni, avx2, portable; got 'sse9'"),
    ("avx512vnni", "DLLAMA_ISA=avx512vnni needs CPU features this machine lacks"),
])
def test_an_instruction_set_the_host_lacks_is_refused_with_what_it_can_run(value, message):
    if value in qmatmul.host_isas():
        pytest.skip(f"this CPU runs {value}")
    env = {**os.environ, "DLLAMA_ISA": value}
    done = subprocess.run([sys.executable, "-c", "import dllama_mpi.kernels.qmatmul"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert message in done.stderr
