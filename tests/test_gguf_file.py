"""dllama_mpi.files.gguf_file reads what gguf-py's GGUFReader reads: every metadata value with its
types, every tensor's type, shape and bytes (the fuzzing of damaged files is in test_fuzz.py)."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

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
