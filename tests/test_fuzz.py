"""Fuzzing every header and attribute parser: random and mutated inputs give the project's own
clear error (InputError with a message; ConvertError and ModelFileError are InputErrors),
never another exception, a hang (hypothesis deadline) or a huge allocation (tracemalloc)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import dllama_writer as dw
import h5py
import numpy as np
import pytest
from conftest import STORIES, need_stories
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dllama_mpi.errors import InputError
from dllama_mpi.files.convert import dllama, read_source
from dllama_mpi.files.modelfile import ModelFile
from dllama_mpi.files.tokenizer import Tokenizer
from dllama_mpi.model.spec import ModelSpec

PEAK_BYTES = 64 * 2**20  # far above what these small inputs need, far below what a bad size field asks for
# 60 examples per parser in CI; DLLAMA_FUZZ_EXAMPLES=1500 for a longer campaign
FUZZ = settings(max_examples=int(os.environ.get("DLLAMA_FUZZ_EXAMPLES", "60")), deadline=5000,
                suppress_health_check=[HealthCheck.too_slow])


def refused_or_read(parse) -> str:
    """Run parse(); 'read' or 'refused' (our InputError). Anything else fails the test."""
    tracemalloc.start()
    try:
        parse()
        return "read"
    except InputError as exc:
        assert str(exc), "an error without a message"
        return "refused"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < PEAK_BYTES, f"allocated {peak / 2**20:.0f} MiB for a small malformed input"


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


edits = st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), max_size=8)
int32 = st.integers(-(2**31), 2**31 - 1)


@pytest.fixture(scope="module")
def work():
    with tempfile.TemporaryDirectory(prefix="dllama-fuzz-") as d:
        yield Path(d)


# ------------------------------------------------------------------ llama2.c checkpoint + tokenizer.bin
@FUZZ
@given(header=st.lists(int32, min_size=7, max_size=7) | st.lists(st.integers(-4, 600), min_size=7, max_size=7))
def test_llama2c_checkpoint_header(work, header):
    need_stories()
    path = work / "model.bin"
    body = (STORIES / "stories260K.bin").read_bytes()[28:]
    path.write_bytes(struct.pack("<7i", *header) + body)

    def parse():
        source = read_source(path, STORIES / "tok512.bin")
        ModelSpec(**source.spec_fields, weight_type="f32")

    refused_or_read(parse)


@FUZZ
@given(edits=edits, cut=st.none() | st.integers(0, 6000), vocab=st.none() | st.integers(-5, 2**31))
def test_llama2c_tokenizer(work, edits, cut, vocab):
    need_stories()
    path = work / "tok.bin"
    path.write_bytes(mutate((STORIES / "tok512.bin").read_bytes()[:6000], edits, cut))
    refused_or_read(lambda: Tokenizer.from_llama2c(path, vocab))


# ------------------------------------------------------------------ distributed-llama .m and .t
@FUZZ
@given(values=st.dictionaries(st.sampled_from(sorted(dw.MODEL_KEYS)), int32 | st.integers(0, 400), max_size=6),
       tail=st.binary(max_size=256))
def test_dllama_model_header(work, values, tail):
    tok = work / "model.t"
    tokens = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)] + [b"x%d" % i for i in range(41)]
    dw.write_tokenizer(tok, tokens, np.zeros(len(tokens)), bos_id=1, eos_ids=[2])
    params = {"version": 0, "dim": 64, "hidden_dim": 96, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
              "vocab_size": 300, "max_seq_len": 32, "hidden_act": 1, "arch_type": dw.LLAMA,
              "weights_float_type": dw.FLOAT_TYPES["f32"], **values}
    path = work / "model.m"
    path.write_bytes(dw.header_bytes(params) + tail)

    def parse():
        source = read_source(path, tok)
        ModelSpec(**source.spec_fields, weight_type="f32")

    refused_or_read(parse)


@FUZZ
@given(edits=edits, cut=st.none() | st.integers(0, 4000), header=st.dictionaries(st.integers(0, 12), int32, max_size=4))
def test_dllama_tokenizer(work, edits, cut, header):
    tokens = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)] + [b"x%d" % i for i in range(41)]
    path = work / "tok.t"
    dw.write_tokenizer(path, tokens, np.zeros(len(tokens)), bos_id=1, eos_ids=[2], chat_template=b"{{ m }}")
    data = path.read_bytes()
    if header:  # replace the header by random key/value pairs
        size = struct.unpack_from("<i", data, 4)[0]
        pairs = b"".join(struct.pack("<ii", k, v) for k, v in header.items())
        data = struct.pack("<ii", dllama.TOKENIZER_MAGIC, 8 + len(pairs)) + pairs + data[size:]
    path.write_bytes(mutate(data, edits, cut))
    refused_or_read(lambda: dllama.read_tokenizer(path))


# ------------------------------------------------------------------ HDF5 attributes
ATTR_NAMES = sorted({"format", "format_version", "model_id", "shard_rank", "shard_count", "plan_budgets", "plan_hash",
                     *ModelSpec.__dataclass_fields__})
attr_values = (int32 | st.integers(-(2**70), 2**70).map(float) | st.floats(allow_nan=True)
               | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8)  # as HDF5 stores
               | st.binary(max_size=8) | st.booleans() | st.lists(st.integers(-5, 5), max_size=3))


@pytest.fixture(scope="module")
def stories_h5(work):
    from conftest import convert_stories

    need_stories()
    return convert_stories(work, "q40")


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(ATTR_NAMES), attr_values | st.none(), min_size=1, max_size=3))
def test_hdf5_attributes(work, stories_h5, changes):
    path = work / "attrs.h5"
    shutil.copy(stories_h5, path)
    with h5py.File(path, "r+") as f:
        for name, value in changes.items():
            if value is None:
                if name in f.attrs:
                    del f.attrs[name]
            else:
                if isinstance(value, list):
                    value = np.array(value)
                elif isinstance(value, bytes):  # opaque bytes (NULs and all)
                    value = np.void(value) if value else np.void(b"\x00")
                f.attrs[name] = value

    def parse():
        model = ModelFile(path)
        model.close()

    refused_or_read(parse)


# ------------------------------------------------------------------ GGUF metadata (as the gguf package hands it over)
@pytest.fixture(scope="module")
def gguf_file(work):
    pytest.importorskip("gguf")
    from test_convert_gguf import hf_weights, ours_expected, write_gguf

    path = work / "base.gguf"
    write_gguf(path, "llama", ours_expected(hf_weights(np.random.default_rng(0), "llama")))
    return path


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 12000), st.integers(0, 255)), max_size=6),
       cut=st.none() | st.integers(0, 20000))
def test_gguf_metadata(work, gguf_file, edits, cut):
    path = work / "fuzz.gguf"
    path.write_bytes(mutate(gguf_file.read_bytes(), edits, cut))

    def parse():
        source = read_source(path, None)
        ModelSpec(**source.spec_fields, weight_type="f32")
        source.tokenizer.encode("once upon a time", bos=True)

    refused_or_read(parse)


# ------------------------------------------------------------------ Hugging Face config.json and safetensors header
@pytest.fixture(scope="module")
def hf_dir(work):
    from test_convert_gguf import hf_weights, write_hf_dir

    path = work / "hf-base"
    write_hf_dir(path, "llama", hf_weights(np.random.default_rng(0), "llama"))
    return path


json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)
HF_KEYS = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "head_dim",
           "rope_scaling", "rope_parameters", "hidden_act", "tie_word_embeddings", "attention_bias"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(HF_KEYS), json_values | st.just("<delete>"), min_size=1, max_size=3),
       header_edits=edits, cut=st.none() | st.integers(0, 400))
def test_hf_config_and_safetensors_header(work, hf_dir, changes, header_edits, cut):
    import json

    path = work / "hf"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(hf_dir, path)
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        config.pop(key, None) if value == "<delete>" else config.__setitem__(key, value)
    (path / "config.json").write_text(json.dumps(config))
    weights = (path / "model.safetensors").read_bytes()
    header_end = 8 + struct.unpack_from("<Q", weights)[0]
    mutated = mutate(weights[:header_end], [(p % header_end, v) for p, v in header_edits], None) if header_edits \
        else weights[:header_end]
    (path / "model.safetensors").write_bytes((mutated + weights[header_end:])[: None if cut is None else header_end + cut])

    def parse():
        source = read_source(path, None)
        spec = ModelSpec(**source.spec_fields, weight_type="f32")
        from dllama_mpi.files.modelfile import tensor_layout

        layout = tensor_layout(spec)
        for name, array in source.tensors():
            assert name in layout
            array[:1]  # a lazily read tensor reads its first row

    refused_or_read(parse)


# ------------------------------------------------------------------ damaged HDF5 metadata
SWEEP = """
import sys, traceback
from pathlib import Path
from dllama_mpi.errors import InputError
from dllama_mpi.files.modelfile import ModelFile, tensor_layout
source, work, offsets = Path(sys.argv[1]), Path(sys.argv[2]), map(int, sys.argv[3:])
data = source.read_bytes()
for offset in offsets:
    damaged = bytearray(data)
    damaged[offset] ^= 0xFF
    path = work / "damaged.h5"
    path.write_bytes(bytes(damaged))
    try:
        model = ModelFile(path)
        model.tokenizer()
        for name in tensor_layout(model.spec):
            model.read(name)
        model.close()
        verdict = "read"
    except InputError:
        verdict = "refused"
    except Exception:
        verdict = "BUG " + traceback.format_exc().replace(chr(10), " | ")
    print(offset, verdict, flush=True)
"""
HANG_S = 5  # an offset with no verdict for this long is a hang of the HDF5 library (each takes about 40 ms here, loaded)


def _lines_into(stream, lines) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@pytest.mark.jobs
def test_a_flipped_byte_in_the_metadata_is_refused_as_damaged(work, stories_h5):
    """Every 41st byte of the first 12 KB (attributes, object headers, the tokenizer) flipped:
    read or refused with InputError, never another exception. The HDF5 library itself loops
    forever on a few damaged headers (1 offset of the ~290 here, 2026-12-06): an offset that
    gives no verdict within HANG_S is counted as a hang and the sweep goes on after it, so the
    verdict covers every offset whatever the machine's speed."""
    import queue
    import threading

    offsets = list(range(0, min(stories_h5.stat().st_size, 12000), 41))
    verdicts: dict[int, str] = {}
    while len(verdicts) < len(offsets):
        todo = [o for o in offsets if o not in verdicts]
        proc = subprocess.Popen([sys.executable, "-c", SWEEP, str(stories_h5), str(work), *map(str, todo)],
                                stdout=subprocess.PIPE, text=True)
        lines: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=_lines_into, args=(proc.stdout, lines), daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=HANG_S)
            except queue.Empty:
                proc.kill()
                verdicts[todo[0]] = "hang"  # the one it was on
                break
            if line is None:
                if proc.wait() != 0 and todo:  # the HDF5 library crashed on the one it was on
                    verdicts[todo[0]] = f"crash (exit {proc.returncode})"
                break
            offset, verdict = line.rstrip("\n").split(" ", 1)
            verdicts[int(offset)] = verdict
            todo.remove(int(offset))
        proc.wait()
    bugs = [f"{o} {v}" for o, v in verdicts.items() if v.startswith("BUG")]
    assert not bugs, "\n".join(bugs[:3])
    failures = {o: v for o, v in verdicts.items() if v == "hang" or v.startswith("crash")}
    print(f"{len(offsets)} offsets; the HDF5 library hung or crashed at {failures}")
    assert len(failures) <= 3, f"the HDF5 library hung or crashed at {failures}"
    assert sum(v == "refused" for v in verdicts.values()) > 10  # the sweep does damage the file
