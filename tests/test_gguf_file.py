"""dllama_mpi.files.gguf_file reads what gguf-py's GGUFReader reads: every metadata value with its
types, every tensor's type, shape and bytes (the fuzzing of damaged files is in test_fuzz.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from dllama_mpi.errors import InputError  # noqa: E402
from dllama_mpi.files.gguf_file import GGUFError, GGUFFile  # noqa: E402


def _reference_value(field):
    """A GGUFReader field's value in GGUFFile's terms."""
    names = [t.name for t in field.types]
    if names == ["STRING"]:
        return bytes(field.parts[field.data[0]])
    if names[0] != "ARRAY":
        value = field.parts[field.data[0]][0].item()
        return bool(value) if names == ["BOOL"] else value
    if names[1:] == ["STRING"]:
        return [bytes(field.parts[i]) for i in field.data]
    return np.array([field.parts[i][0] for i in field.data])


def assert_same_as_gguf_py(path) -> GGUFFile:
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}  # its own header entries
    assert list(ours.fields) == list(fields)
    for key, field in fields.items():
        assert ours.fields[key].types == tuple(t.name for t in field.types), key
        expected, got = _reference_value(field), ours.fields[key].value
        if isinstance(expected, np.ndarray):
            assert got.dtype == expected.dtype and np.array_equal(got, expected), key
        else:
            assert got == expected and type(got) is type(expected), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors):
        assert mine.tensor_type == ref.tensor_type and mine.shape == tuple(int(d) for d in ref.shape), mine.name
        assert mine.data.dtype == ref.data.dtype and mine.data.shape == ref.data.shape, mine.name
        assert mine.data.tobytes() == np.asarray(ref.data).tobytes(), mine.name
    return ours


def test_a_q4_k_m_like_model_file_reads_as_gguf_py_reads_it(tmp_path):
    from test_convert_gguf import q4km_like

    path, *_ = q4km_like(tmp_path, np.random.default_rng(3))
    ours = assert_same_as_gguf_py(path)
    kinds = {t.tensor_type.name for t in ours.tensors}
    assert {"F32", "Q4_K", "Q6_K"} <= kinds and "tokenizer.ggml.tokens" in ours.fields


def test_llama_cpps_vocabulary_files_read_as_gguf_py_reads_them():
    from conftest import SHARED_MODELS

    path = SHARED_MODELS / "llamacpp-vocab" / "ggml-vocab-llama-spm.gguf"  # 32000 tokens: gguf-py takes ~1 s
    if not path.exists():
        pytest.skip(f"{path} not found")
    ours = assert_same_as_gguf_py(path)
    assert ours.tensors == [] and len(ours.fields["tokenizer.ggml.tokens"].value) == 32000


def test_what_is_not_a_gguf_is_refused_by_name(tmp_path):
    path = tmp_path / "x.gguf"
    for data, says in ((b"GGML" + bytes(20), "does not start with 'GGUF'"),
                       (b"GGUF" + (1).to_bytes(4, "little") + bytes(16), "version 1"),
                       (b"GGUF" + (3).to_bytes(4, "little") + bytes(4), "header runs past the end of the file (12 bytes)")):
        path.write_bytes(data)
        with pytest.raises(GGUFError, match=says.replace("(", r"\(").replace(")", r"\)")):
            GGUFFile(path)


def test_metadata_is_read_by_kind_and_a_key_of_another_type_is_refused_by_name(tmp_path):
    path = tmp_path / "kinds.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("count", 7)
    w.add_float32("scale", 0.5)
    w.add_bool("flag", True)
    w.add_string("name", "llama")
    w.add_key_value("heads", [8, 8, 4], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
    w.add_key_value("words", ["a", "b"], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(path)
    assert f.scalar("count", "integer") == 7 and f.scalar("scale", "number") == 0.5 and f.scalar("flag", "boolean") is True
    assert f.scalar("absent", "integer", 3) == 3 and f.string("absent") is None
    assert f.string("name") == "llama" and f.strings("words") == ["a", "b"]
    assert f.per_token("heads", "integer", 3).tolist() == [8, 8, 4]
    assert f.field("heads", "number", array=None).types == ("ARRAY", "INT32")
    assert f.field("count", "number", array=None).value == 7
    refusals = [
        (lambda: f.scalar("scale", "integer"), "GGUF metadata 'scale' must be an integer, found type FLOAT32"),
        (lambda: f.scalar("count", "boolean"), "GGUF metadata 'count' must be a boolean, found type UINT32"),
        (lambda: f.string("heads"), "GGUF metadata 'heads' must be a string, found type ARRAY/INT32"),
        (lambda: f.strings("name"), "GGUF metadata 'name' must be an array of strings, found type STRING"),
        (lambda: f.field("words", "number", array=None),
         "GGUF metadata 'words' must be a number or an array of numbers, found type ARRAY/STRING"),
        (lambda: f.per_token("heads", "integer", 4), "GGUF metadata 'heads' has 3 values for 4 tokens"),
    ]
    for read, message in refusals:
        with pytest.raises(InputError, match=re.escape(message)):
            read()
