"""llama.cpp's tokenizer test vectors (models/ggml-vocab-*.gguf{,.inp,.out}).

The ``.inp`` file is every test text followed by ``"\\n__ggml_vocab_test__\\n"``
(convert_hf_to_gguf_update.py writes ``text`` then the separator); llama.cpp's
``tests/test-tokenizer-0.cpp`` splits the raw file on that separator, so texts
keep their own leading/trailing newlines.  Line i of ``.out`` holds the ids HF
produced for text i with ``add_special_tokens=False``; llama.cpp compares them
with ``common_tokenize(ctx, text, add_special=false, parse_special=false)``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import h5py
import pytest
from conftest import SHARED_MODELS
from hypothesis import given, settings
from hypothesis import strategies as st

from dllama_mpi.files.tokenizer import HFTokenizer, SpmTokenizer, Tokenizer, from_gguf, load_tokenizer

VOCAB_DIR = SHARED_MODELS / "llamacpp-vocab"
NAMES = ("llama-spm", "llama-bpe")
SEP = "\n__ggml_vocab_test__\n"


def _paths(name: str) -> tuple[Path, Path, Path]:
    gguf_path = VOCAB_DIR / f"ggml-vocab-{name}.gguf"
    return gguf_path, gguf_path.with_name(gguf_path.name + ".inp"), gguf_path.with_name(gguf_path.name + ".out")


def _missing(name: str) -> str | None:
    absent = [p.name for p in _paths(name) if not p.is_file()]
    return f"llama.cpp vocab files {', '.join(absent)} not found in {VOCAB_DIR}" if absent else None


def read_cases(name: str) -> list[tuple[str, list[int]]]:
    """(text, expected ids) pairs, split exactly like test-tokenizer-0.cpp's read_tests."""
    _, inp, out = _paths(name)
    raw = inp.read_bytes().decode("utf-8")  # bytes: no newline translation
    texts: list[str] = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(SEP, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(SEP)
    lines = out.read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # getline: the final newline ends the last line
    assert len(texts) == len(lines), f"{inp.name}: {len(texts)} texts but {out.name} has {len(lines)} lines"
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def _params() -> list:
    params = []
    for name in NAMES:
        reason = _missing(name)
        if reason:
            params.append(pytest.param(name, -1, id=f"{name}-missing", marks=pytest.mark.skip(reason=reason)))
            continue
        params.extend(pytest.param(name, i, id=f"{name}-{i:02d}") for i in range(len(read_cases(name))))
    return params


CASES = _params()


@functools.cache
def load(name: str):
    from dllama_mpi.files.gguf_file import GGUFFile

    reason = _missing(name)
    if reason:
        pytest.skip(reason)
    return from_gguf(GGUFFile(_paths(name)[0]))


def decode_all(tok, ids: list[int]) -> str:
    """Incremental decode as if the ids followed BOS (strips the SPM dummy-prefix space)."""
    dec = tok.stream()
    seq = [tok.bos_id, *ids]
    return "".join(dec.feed(p, c) for p, c in zip(seq, seq[1:])) + dec.flush()


@pytest.mark.parametrize(("name", "index"), CASES)
def test_encode_matches_llamacpp(name: str, index: int) -> None:
    text, expected = read_cases(name)[index]
    assert load(name).encode(text, bos=False) == expected, repr(text)


@pytest.mark.parametrize(("name", "index"), CASES)
def test_decode_round_trip(name: str, index: int) -> None:
    text, expected = read_cases(name)[index]
    tok = load(name)
    assert decode_all(tok, expected) == text


@pytest.mark.parametrize("name", NAMES)
def test_vocab_metadata(name: str) -> None:
    tok = load(name)
    if name == "llama-spm":
        assert isinstance(tok, SpmTokenizer) and isinstance(tok, Tokenizer)
        assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.eos_ids) == (32000, 1, 2, (2,))
        assert tok.add_bos and tok.add_space_prefix
        assert tok.encode("Hello world") == [1, 15043, 3186]
        assert tok.encode("Hello world", bos=True, eos=True)[-1] == 2
        assert tok.encode("", bos=True) == [1] and tok.encode("", bos=False) == []
        assert tok.pieces[3] == b"<0x00>" and tok.decode(0, 3 + 0x41) == b"A"
        assert tok.encode("<s>", bos=False, special=True) == [1]  # control tokens only when asked
        assert tok.encode("<s>", bos=False) != [1]
    else:
        assert isinstance(tok, HFTokenizer)
        assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (128256, 128000, 128001)
        assert tok.eos_ids == (128001, 128009)  # <|end_of_text|>, <|eot_id|>
        assert tok.add_bos
        assert tok.encode("Hello world") == [128000, 9906, 1917]
        assert tok.decode(9906, 128009) == b""  # special tokens print nothing
    assert tok.chat_template is None  # these vocab-only files carry none


@pytest.mark.parametrize("name", NAMES)
def test_stream_splits_multibyte_characters(name: str) -> None:
    tok = load(name)
    text = "🦙 нещо 😀 Việt"
    ids = tok.encode(text)
    dec = tok.stream()
    outs = [dec.feed(p, c) for p, c in zip(ids, ids[1:])]
    assert "".join(outs) + dec.flush() == text
    assert all("\ufffd" not in o for o in outs)
    assert "" in outs  # some token ended mid-character and was held back


@pytest.mark.parametrize("name", NAMES)
def test_hdf5_round_trip(name: str, tmp_path: Path) -> None:
    tok = load(name)
    path = tmp_path / "tok.h5"
    with h5py.File(path, "w") as f:
        tok.write_hdf5(f.create_group("tokenizer"))
    with h5py.File(path, "r") as f:
        g = f["tokenizer"]
        assert g.attrs["type"] == ("llama-spm" if name == "llama-spm" else "hf-tokenizers")
        loaded = load_tokenizer(g)  # as model files read it
    assert type(loaded) is type(tok)
    assert (loaded.bos_id, loaded.eos_id, loaded.eos_ids, loaded.vocab_size, loaded.chat_template) == (
        tok.bos_id, tok.eos_id, tok.eos_ids, tok.vocab_size, tok.chat_template
    )
    for text, expected in read_cases(name):
        assert loaded.encode(text, bos=False) == expected
        assert loaded.encode(text) == tok.encode(text)
        assert decode_all(loaded, expected) == text


@pytest.mark.parametrize(("name", "index"), CASES)
def test_the_early_token_bound_never_exceeds_the_count(name: str, index: int) -> None:
    """Tokenizer.min_tokens lets a long prompt be refused before encoding: it must be a true
    lower bound, or a prompt that fits would be refused."""
    text, expected = read_cases(name)[index]
    tok = load(name)
    assert tok.min_tokens(text) <= len(tok.encode(text, bos=False))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=200, deadline=None, derandomize=True)
@given(text=st.text(alphabet=st.sampled_from(" \n\tabcxyzé日本😀<|>_0123456789'sT"), max_size=200))
def test_the_early_token_bound_holds_on_random_text(name: str, text: str) -> None:
    tok = load(name)
    assert tok.min_tokens(text) <= len(tok.encode(text, bos=False, special=True))


@pytest.mark.parametrize("name", NAMES)
def test_the_early_token_bound_refuses_a_mebibyte(name: str) -> None:
    """The bound is not vacuous: a prompt at the API's body limit is refused unencoded in the
    largest default context (4096; Llama 3's longest entry covers 128 bytes)."""
    assert load(name).min_tokens("Once upon a time. " * 58_000) > 4096


def test_a_prompt_under_the_size_bound_but_over_the_context_costs_a_context_of_encoding(monkeypatch) -> None:
    """Llama 2's longest piece is 48 bytes, so 20 KB of ordinary text passes the size bound for a
    context of 512: its first part alone is encoded, cut at a space, and shows it is too long."""
    from dllama_mpi.errors import InputError
    from dllama_mpi.serving.request import PREFIX_CHARS_PER_TOKEN, check_prompt_text

    tok = load("llama-spm")
    text = "Once upon a time, there was a little girl. " * 480  # 20,640 characters, 5,000+ tokens
    assert tok.min_tokens(text) <= 512
    encoded: list[int] = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda t, **kw: encoded.append(len(t)) or encode(t, **kw))
    with pytest.raises(InputError, match=r"the prompt is over 512 tokens \(its first \d+ characters alone are \d+\) "
                                         r"but the context holds 512; shorten it"):
        check_prompt_text(tok, text, 512, "shorten it")
    assert len(encoded) == 1 and encoded[0] <= PREFIX_CHARS_PER_TOKEN * (512 + 64 + 8)
    fits = "Once upon a time, there was a little girl. " * 40  # about 440 tokens
    check_prompt_text(tok, fits, 512, "shorten it")
    check_prompt_text(tok, fits + " " + "x" * 5000, 2048, "shorten it")  # long, and no more tokens than the context
