"""Tests for the llama2.c score-BPE tokenizer."""

from __future__ import annotations

import functools
import re
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import STORIES
from hypothesis import given, settings
from hypothesis import strategies as st

from dllama_mpi.errors import InputError
from dllama_mpi.files.gguf_file import GGUFFile
from dllama_mpi.files.tokenizer import StreamDecoder, Tokenizer, load_tokenizer
from dllama_mpi.files.tokenizer.hdf5 import LLAMA2C_TYPE

TOK512 = STORIES / "tok512.bin"
needs_tok512 = pytest.mark.skipif(not TOK512.exists(), reason=f"llama2.c tokenizer not found at {TOK512}")

ROUND_TRIP_TEXTS = [
    "Once upon a time",
    "Hello, world!\nSecond line.\n\n  indented\ttab",
    " leading space",
    "café naïve résumé",
    "中文测试",
    "emoji 😀 and 👍🏽 mixed",
    "<0x41> <unk> <s>",
    "\x00\x7f",
    "",
]


@pytest.fixture(scope="module")
def tok512() -> Tokenizer:
    if not TOK512.exists():
        pytest.skip(f"llama2.c tokenizer not found at {TOK512}")
    return Tokenizer.from_llama2c(TOK512, 512)


@pytest.fixture(scope="module")
def synthetic() -> Tokenizer:
    return Tokenizer.synthetic(512)


@pytest.fixture(params=["tok512", "synthetic"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


def stream_decode(tok: Tokenizer, ids: list[int]) -> str:
    dec = tok.stream()
    out = [dec.feed(prev, cur) for prev, cur in zip(ids, ids[1:])]
    return "".join(out) + dec.flush()


def reference_encode(path: Path, text: str) -> list[int]:
    """Brute-force run.c encode: parse the file itself, rescan every pair after every merge."""
    data = path.read_bytes()
    vocab: list[bytes] = []
    scores: list[float] = []
    off = 4
    while off < len(data):
        score, n = struct.unpack_from("<fi", data, off)
        vocab.append(data[off + 8 : off + 8 + n])
        scores.append(score)
        off += 8 + n
    lookup = {p: i for i, p in enumerate(vocab) if i >= 259}
    ids: list[int] = []
    for ch in " " + text:
        b = ch.encode("utf-8")
        ids += [lookup[b]] if b in lookup else [x + 3 for x in b]
    while True:
        best, best_i, best_id = -1e10, -1, -1
        for i in range(len(ids) - 1):
            merged = lookup.get(vocab[ids[i]] + vocab[ids[i + 1]])
            if merged is not None and scores[merged] > best:
                best, best_i, best_id = scores[merged], i, merged
        if best_i < 0:
            return [1] + ids
        ids[best_i : best_i + 2] = [best_id]


def quadratic_encode(tok: Tokenizer, text: str) -> list[int]:
    """The twin of Tokenizer.encode: its O(n^2) merge loop as it was before the heap (after each
    merge, take the best cached pair score again by a scan; leftmost on ties)."""
    lookup: dict[bytes, int] = {}
    for i in range(259, tok.vocab_size):
        lookup.setdefault(tok.pieces[i], i)
    scores = tok.scores.tolist()

    def pair(left: int, right: int) -> tuple[float, int]:
        if left < 259 or right < 259:
            return -np.inf, -1
        tid = lookup.get(tok.pieces[left] + tok.pieces[right])
        return (-np.inf, -1) if tid is None else (scores[tid], tid)

    ids: list[int] = []
    for ch in " " + text if text and tok.add_dummy_prefix else text:
        b = ch.encode("utf-8")
        ids += [lookup[b]] if b in lookup else [x + 3 for x in b]
    pairs = [pair(a, b) for a, b in zip(ids, ids[1:])]
    while pairs:
        best = max(s for s, _ in pairs)
        if best == -np.inf:
            break
        i = [s for s, _ in pairs].index(best)
        ids[i] = pairs[i][1]
        del ids[i + 1], pairs[i]
        for j in (i - 1, i):
            if 0 <= j < len(pairs):
                pairs[j] = pair(ids[j], ids[j + 1])
    return [tok.bos_id, *ids]


# --------------------------------------------------------------- tok512.bin


@needs_tok512
def test_tok512_loads(tok512: Tokenizer) -> None:
    assert tok512.vocab_size == 512
    assert len(tok512.pieces) == 512 and tok512.scores.shape == (512,)
    assert tok512.scores.dtype == np.float32
    assert (tok512.bos_id, tok512.eos_id) == (1, 2)
    assert tok512.pieces[:3] == [b"<unk>", b"\n<s>\n", b"\n</s>\n"]
    assert tok512.pieces[3] == b"<0x00>" and tok512.pieces[258] == b"<0xFF>"
    assert tok512.add_dummy_prefix
    assert Tokenizer.from_llama2c(TOK512).pieces == tok512.pieces  # read-until-EOF agrees


@needs_tok512
def test_tok512_once_upon_a_time(tok512: Tokenizer) -> None:
    text = "Once upon a time"
    ids = tok512.encode(text)
    assert ids[0] == tok512.bos_id
    assert all(0 <= i < 512 for i in ids)
    assert len(ids) - 1 < len(text)  # merges beat one token per character
    # Each of these words is a single piece (with its leading space) in tok512.
    assert [tok512.pieces[i] for i in ids[1:]] == [b" Once", b" upon", b" a", b" time"]
    assert b"".join(tok512.decode(p, c) for p, c in zip(ids, ids[1:])) == text.encode()
    assert ids == reference_encode(TOK512, text)


@needs_tok512
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tok512_matches_reference(tok512: Tokenizer, text: str) -> None:
    expected = reference_encode(TOK512, text) if text else [1]
    assert tok512.encode(text) == expected


def test_bos_eos_flags(tokenizer: Tokenizer) -> None:
    body = tokenizer.encode("hi", bos=False)
    assert body[0] != tokenizer.bos_id
    assert tokenizer.encode("hi", bos=True, eos=True) == [tokenizer.bos_id, *body, tokenizer.eos_id]
    assert tokenizer.encode("", bos=False) == []


def test_decode_rules(tokenizer: Tokenizer) -> None:
    space_a = tokenizer.pieces.index(b" a")
    assert tokenizer.decode(tokenizer.bos_id, space_a) == b"a"
    assert tokenizer.decode(space_a, space_a) == b" a"
    assert tokenizer.decode(space_a, 0x41 + 3) == b"A"
    assert tokenizer.decode(tokenizer.bos_id, 0x20 + 3) == b" "  # a byte piece has no leading space to strip
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode(0, tokenizer.vocab_size)


# ------------------------------------------------------------- round trips


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    raw = b"".join(tokenizer.decode(p, c) for p, c in zip(ids, ids[1:]))
    assert raw.decode("utf-8") == text
    assert stream_decode(tokenizer, ids) == text


def test_non_ascii_uses_byte_fallback(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("中", bos=False)
    assert ids[-3:] == [b + 3 for b in "中".encode()]


def test_stream_never_emits_partial_character(tokenizer: Tokenizer) -> None:
    emoji = "😀"
    ids = tokenizer.encode("a" + emoji)
    byte_ids = [b + 3 for b in emoji.encode()]
    assert ids[-4:] == byte_ids
    dec = tokenizer.stream()
    assert isinstance(dec, StreamDecoder)
    prefix = "".join(dec.feed(p, c) for p, c in zip(ids[:-4], ids[1:-4]))
    assert prefix == "a"
    outs = [dec.feed(p, c) for p, c in zip(ids[-5:], ids[-4:])]
    assert outs == ["", "", "", emoji]
    assert dec.flush() == ""


def test_stream_flush_replaces_dangling_bytes(tokenizer: Tokenizer) -> None:
    dec = tokenizer.stream()
    assert dec.feed(0, 0xF0 + 3) == ""
    assert dec.flush() == "\ufffd"


# Hypothesis re-runs the test body per example, so tokenizers are cached at module level
# rather than taken from (function-scoped) fixtures.
@functools.cache
def _cached_tok512() -> Tokenizer:
    return Tokenizer.from_llama2c(TOK512, 512)


@functools.cache
def _cached_synthetic() -> Tokenizer:
    return Tokenizer.synthetic(512)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_property_stream_round_trip_tok512(text: str) -> None:
    if not TOK512.exists():
        pytest.skip(f"llama2.c tokenizer not found at {TOK512}")
    tok = _cached_tok512()
    assert stream_decode(tok, tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_property_stream_round_trip_synthetic(text: str) -> None:
    tok = _cached_synthetic()
    assert stream_decode(tok, tok.encode(text)) == text


def test_long_prompt_is_fast_enough(tokenizer: Tokenizer) -> None:
    text = "Once upon a time, there was a little girl named Lily. " * 80
    ids = tokenizer.encode(text)
    assert stream_decode(tokenizer, ids) == text


# The heap merge against its quadratic twin: the same ids on any text, ties included.

BYTE_PIECES = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % b for b in range(256)]
SMALL_ALPHABET = "ab c\u00e9"
TIE_VOCAB = Tokenizer(  # every merge scores the same: only the leftmost rule decides
    BYTE_PIECES + [p.encode() for p in (" ", "a", "b", "c", "aa", "ab", "ba", " a", "aaa", "aab", "bab", " aa", "abab")],
    [0.0] * 259 + [1.0] * 13,
)


def _texts_from_pieces(tok: Tokenizer) -> st.SearchStrategy[str]:
    """Texts made of a vocabulary's pieces, random characters and runs of one character."""
    pieces = [p.decode() for p in tok.pieces[259:] if p.isascii()]
    run = st.tuples(st.sampled_from(SMALL_ALPHABET + "xyz\n"), st.integers(1, 40)).map(lambda cn: cn[0] * cn[1])
    return st.lists(st.sampled_from(pieces) | st.text(max_size=4) | run, max_size=40).map("".join)


@st.composite
def _random_vocabularies(draw) -> Tokenizer:
    """Small vocabularies over a few letters with scores from a handful of values (many ties,
    -inf included), duplicates allowed; every letter is a piece, so merges start anywhere."""
    pieces = list(SMALL_ALPHABET) + draw(st.lists(st.text("ab ", min_size=2, max_size=4), max_size=30))
    scores = draw(st.lists(st.sampled_from([-np.inf, -1.0, 0.0, 0.5, 2.0]), min_size=len(pieces), max_size=len(pieces)))
    return Tokenizer(BYTE_PIECES + [p.encode() for p in pieces], [0.0] * 259 + scores)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_heap_merge_equals_quadratic_twin_tok512(data) -> None:
    if not TOK512.exists():
        pytest.skip(f"llama2.c tokenizer not found at {TOK512}")
    tok = _cached_tok512()
    text = data.draw(_texts_from_pieces(tok) | st.text())
    assert tok.encode(text) == quadratic_encode(tok, text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(SMALL_ALPHABET, max_size=60) | st.text())
def test_heap_merge_equals_quadratic_twin_on_ties(text: str) -> None:
    assert TIE_VOCAB.encode(text) == quadratic_encode(TIE_VOCAB, text)


@settings(max_examples=300, deadline=None)
@given(tok=_random_vocabularies(), text=st.text(SMALL_ALPHABET, max_size=60))
def test_heap_merge_equals_quadratic_twin_random_vocabulary(tok: Tokenizer, text: str) -> None:
    assert tok.encode(text) == quadratic_encode(tok, text)


def test_heap_merge_ties_go_leftmost() -> None:
    # " aaaa": every pair ties, so each step merges the leftmost: " "+a, " a"+a, then a+a (" aaa" is no piece)
    ids = TIE_VOCAB.encode("aaaa", bos=False)
    assert [TIE_VOCAB.pieces[i] for i in ids] == [b" aa", b"aa"] == [
        TIE_VOCAB.pieces[i] for i in quadratic_encode(TIE_VOCAB, "aaaa")[1:]]


@needs_tok512
def test_twin_agrees_with_run_c_reference(tok512: Tokenizer) -> None:
    for text in ROUND_TRIP_TEXTS[:-1]:
        assert quadratic_encode(tok512, text) == reference_encode(TOK512, text)


# ---------------------------------------------------------------- synthetic


def test_synthetic_layout() -> None:
    tok = Tokenizer.synthetic(512)
    assert tok.vocab_size == 512
    assert tok.pieces[:3] == [b"<unk>", b"\n<s>\n", b"\n</s>\n"]
    assert tok.pieces[3:259] == [b"<0x%02X>" % b for b in range(256)]
    assert len(set(tok.pieces)) == 512
    for p in (b" a", b" z", b"a", b"z", b" the", b" once", b" upon", b" time"):
        assert p in tok.pieces
    assert tok.pieces == Tokenizer.synthetic(512).pieces  # deterministic
    assert np.array_equal(tok.scores, Tokenizer.synthetic(512).scores)
    assert [tok.pieces[i] for i in tok.encode("once upon a time", bos=False)] == [b" once", b" upon", b" a", b" time"]


@pytest.mark.parametrize("size", [260, 300, 5000])
def test_synthetic_sizes(size: int) -> None:
    tok = Tokenizer.synthetic(size)
    assert tok.vocab_size == size and len(set(tok.pieces)) == size
    assert stream_decode(tok, tok.encode("xyz 😀")) == "xyz 😀"


def test_synthetic_minimal() -> None:
    # Only reserved pieces: everything, the dummy-prefix space included, falls back
    # to bytes, and a byte piece after BOS keeps its space (run.c decode rule).
    tok = Tokenizer.synthetic(259)
    ids = tok.encode("hi")
    assert ids == [1, 0x20 + 3, ord("h") + 3, ord("i") + 3]
    assert stream_decode(tok, ids) == " hi"


def test_synthetic_too_small() -> None:
    with pytest.raises(ValueError, match="259"):
        Tokenizer.synthetic(258)


# --------------------------------------------------------------------- HDF5


def test_hdf5_round_trip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tok.h5"
    with h5py.File(path, "w") as f:
        tokenizer.write_hdf5(f.create_group("tokenizer"))
    with h5py.File(path, "r") as f:
        g = f["tokenizer"]
        assert g.attrs["type"] == "llama2c-score-bpe"
        assert g["piece_offsets"].shape == (tokenizer.vocab_size + 1,)
        loaded = load_tokenizer(g)
    assert loaded.pieces == tokenizer.pieces
    assert np.array_equal(loaded.scores, tokenizer.scores)
    assert (loaded.bos_id, loaded.eos_id, loaded.add_dummy_prefix) == (
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.add_dummy_prefix,
    )
    for text in ROUND_TRIP_TEXTS:
        assert loaded.encode(text) == tokenizer.encode(text)


def _corrupt_offsets(g: h5py.Group) -> None:
    off = g["piece_offsets"][()]
    off[10], off[11] = off[11], off[10] - 1
    g["piece_offsets"][...] = off


def _offsets_past_end(g: h5py.Group) -> None:
    off = g["piece_offsets"][()]
    off[-1] += 5
    g["piece_offsets"][...] = off


def _short_offsets(g: h5py.Group) -> None:
    off = g["piece_offsets"][()]
    del g["piece_offsets"]
    g["piece_offsets"] = off[:-1]


def _missing_dataset(g: h5py.Group) -> None:
    del g["scores"]


def _wrong_type(g: h5py.Group) -> None:
    g.attrs["type"] = "gpt2-bpe"


def _missing_attr(g: h5py.Group) -> None:
    del g.attrs["bos_id"]


def _short_scores(g: h5py.Group) -> None:
    s = g["scores"][()]
    del g["scores"]
    g["scores"] = s[:-1]


def _array_type(g: h5py.Group) -> None:
    g.attrs["type"] = np.array([1, 2])


def _non_utf8_type(g: h5py.Group) -> None:
    g.attrs["type"] = np.bytes_(b"\xffbpe")


def _float_vocab_size(g: h5py.Group) -> None:
    g.attrs["vocab_size"] = 512.0


def _negative_vocab_size(g: h5py.Group) -> None:
    g.attrs["vocab_size"] = -1


def _string_bos(g: h5py.Group) -> None:
    g.attrs["bos_id"] = "1"


def _array_dummy_prefix(g: h5py.Group) -> None:
    g.attrs["add_dummy_prefix"] = np.array([True, False])


def _string_scores(g: h5py.Group) -> None:
    del g["scores"]
    g["scores"] = np.array([b"x"] * 512)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_array_type, "attribute 'type' must be a string, found a int64 array"),
        (_non_utf8_type, "attribute 'type' is not valid UTF-8"),
        (_float_vocab_size, "attribute 'vocab_size' must be an integer"),
        (_negative_vocab_size, "attribute 'vocab_size' must be >= 0"),
        (_string_bos, "attribute 'bos_id' must be an integer"),
        (_array_dummy_prefix, "attribute 'add_dummy_prefix' must be a boolean"),
        (_string_scores, "scores must be numbers with shape \\(512,\\), found \\|S1"),
        (_corrupt_offsets, "non-decreasing"),
        (_offsets_past_end, "end at len\\(piece_bytes\\)"),
        (_short_offsets, "piece_offsets must be integer with shape \\(513,\\)"),
        (_missing_dataset, "missing dataset 'scores'"),
        (_wrong_type, "expected attribute type='llama2c-score-bpe', found 'gpt2-bpe'"),
        (_missing_attr, "missing attribute 'bos_id'"),
        (_short_scores, "scores must be numbers with shape \\(512,\\)"),
    ],
)
def test_hdf5_corrupt_group(synthetic: Tokenizer, tmp_path: Path, corrupt, message: str) -> None:
    path = tmp_path / "tok.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("tokenizer")
        synthetic.write_hdf5(g)
        corrupt(g)
    with h5py.File(path, "r") as f, pytest.raises(InputError, match=message):
        load_tokenizer(f["tokenizer"], expected=LLAMA2C_TYPE)


# --------------------------------------------------------- llama2.c loading


@needs_tok512
@pytest.mark.parametrize("keep", [2, 4, 10, -1, -3])
def test_from_llama2c_truncated(tmp_path: Path, keep: int) -> None:
    data = TOK512.read_bytes()
    bad = tmp_path / "tok_truncated.bin"
    bad.write_bytes(data[:keep])
    with pytest.raises(InputError, match="expected|truncated"):
        Tokenizer.from_llama2c(bad, 512)


@needs_tok512
def test_from_llama2c_wrong_vocab_size(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="trailing bytes"):
        Tokenizer.from_llama2c(TOK512, 500)
    with pytest.raises(InputError, match="truncated at token 512"):
        Tokenizer.from_llama2c(TOK512, 513)


def test_from_llama2c_bad_byte_pieces(tmp_path: Path) -> None:
    path = tmp_path / "tok.bin"
    with path.open("wb") as f:
        f.write(struct.pack("<i", 8))
        for i in range(259):
            piece = b"x%d" % i
            f.write(struct.pack("<fi", 0.0, len(piece)) + piece)
    with pytest.raises(InputError, match="byte-fallback piece for id 3"):
        Tokenizer.from_llama2c(path, 259)


# ======================================================= other tokenizer kinds

import json  # noqa: E402

from dllama_mpi.files.tokenizer import HFTokenizer, SpmTokenizer, from_gguf, from_hf_dir  # noqa: E402

tokenizers = pytest.importorskip("tokenizers")

HF_SENTENCES = [
    "Once upon a time there was a little girl named Lily.",
    "She loved to play outside in the sun with her dog.",
    "Café, naïve, résumé — 中文 and emoji 😀 are fine too.",
    "The quick brown fox jumps over the lazy dog. 12345",
]
CHAT_TEMPLATE = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"


def _write_h5(tok, path: Path):
    with h5py.File(path, "w") as f:
        tok.write_hdf5(f.create_group("tokenizer"))
    with h5py.File(path, "r") as f:
        return load_tokenizer(f["tokenizer"])


def test_score_bpe_interface_and_load_tokenizer(synthetic: Tokenizer, tmp_path: Path) -> None:
    assert synthetic.eos_ids == (synthetic.eos_id, synthetic.bos_id)  # llama2.c models end a story with BOS
    assert synthetic.chat_template is None
    loaded = _write_h5(synthetic, tmp_path / "t.h5")
    assert type(loaded) is Tokenizer and loaded.pieces == synthetic.pieces
    assert loaded.encode("once upon a time") == synthetic.encode("once upon a time")


def test_load_tokenizer_unknown_type(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "t.h5", "w") as f:
        g = f.create_group("tokenizer")
        g.attrs["type"] = "wordpiece"
        with pytest.raises(InputError, match="unknown type='wordpiece'"):
            load_tokenizer(g)


# ------------------------------------------------------------ sentencepiece


def _tiny_spm() -> SpmTokenizer:
    """Byte tokens after the normal pieces (not at ids 3..258), a user-defined token, an unknown token."""
    pieces = ["<unk>", "<s>", "</s>", "▁", "h", "e", "l", "o", "▁h", "ll", "llo", "▁he", "▁hello", "w", "▁w", "<tool>"]
    scores = [0, 0, 0, -1, -5, -5, -5, -5, -2, -3, -2.5, -1.8, -1.5, -5, -2, 0]
    types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    scores += [0.0] * 256
    types += [6] * 256
    return SpmTokenizer(pieces, scores, types, bos_id=1, eos_id=2, chat_template=CHAT_TEMPLATE)


def _spm_ids(tok: SpmTokenizer, *texts: str) -> list[int]:
    return [tok.texts.index(t) for t in texts]


def test_spm_merges_and_bytes() -> None:
    tok = _tiny_spm()
    assert tok.encode("hello", bos=False) == _spm_ids(tok, "▁hello")
    assert tok.encode("hello", bos=True, eos=True) == [1, *_spm_ids(tok, "▁hello"), 2]
    # "é" is not a piece: its UTF-8 bytes map to the <0xXX> tokens wherever they sit.
    assert tok.encode("hé", bos=False) == [*_spm_ids(tok, "▁h"), *_spm_ids(tok, "<0xC3>", "<0xA9>")]
    # User-defined tokens match as a whole; like llama.cpp, the text after one gets the dummy prefix again.
    assert tok.encode("w<tool>w", bos=False) == _spm_ids(tok, "▁w", "<tool>", "▁w")
    assert stream_decode(tok, tok.encode("w<tool>w")) == "w<tool> w"
    assert tok.encode("<s>", bos=False) != [1] and tok.encode("<s>", bos=False, special=True) == [1]


def test_spm_decode_and_stream() -> None:
    tok = _tiny_spm()
    for text in ("hello", " hello  w", "hé 😀", "w<tool>", ""):
        ids = tok.encode(text)
        assert stream_decode(tok, ids) == text
    space_h = tok.texts.index("▁h")
    assert tok.decode(tok.bos_id, space_h) == b"h" and tok.decode(space_h, space_h) == b" h"
    assert tok.decode(0, 0) == "\u2585".encode() and tok.decode(0, 1) == b""


def test_spm_hdf5_round_trip(tmp_path: Path) -> None:
    tok = _tiny_spm()
    loaded = _write_h5(tok, tmp_path / "t.h5")
    assert isinstance(loaded, SpmTokenizer)
    assert loaded.pieces == tok.pieces and np.array_equal(loaded.token_types, tok.token_types)
    assert (loaded.chat_template, loaded.eos_ids, loaded.add_bos) == (CHAT_TEMPLATE, (2,), True)
    for text in ("hello", "hé w<tool>", "<s>"):
        assert loaded.encode(text) == tok.encode(text)


def _write_gguf(path: Path, model: str, tokens: list[str], types: list[int] | None = None,
                scores: list[float] | None = None, merges: list[str] | None = None, pre: str | None = None) -> None:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if types is not None:
        w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_from_gguf_spm(tmp_path: Path) -> None:
    pytest.importorskip("gguf")  # writes the file
    ref = _tiny_spm()
    path = tmp_path / "spm.gguf"
    _write_gguf(path, "llama", ref.texts, ref.token_types.tolist(), ref.scores.tolist())
    tok = from_gguf(GGUFFile(path))
    assert isinstance(tok, SpmTokenizer) and tok.chat_template == CHAT_TEMPLATE
    assert tok.encode("hé w<tool>") == ref.encode("hé w<tool>")


def test_from_gguf_rejects_other_vocab_types(tmp_path: Path) -> None:
    pytest.importorskip("gguf")  # writes the file
    path = tmp_path / "bert.gguf"
    _write_gguf(path, "bert", ["[PAD]", "[CLS]", "[SEP]"])
    with pytest.raises(InputError, match="tokenizer.ggml.model='bert' is not supported"):
        from_gguf(GGUFFile(path))
    path = tmp_path / "odd-pre.gguf"
    _write_gguf(path, "gpt2", ["a", "b", "c"], merges=["a b"], pre="no-such-pre")
    with pytest.raises(InputError, match="pre-tokenizer 'no-such-pre' is not supported"):
        from_gguf(GGUFFile(path))


def _gguf_with(path: Path, base: dict, changes: dict) -> None:
    """A vocab-only GGUF of `base` {key: (value, type, array element type)} with `changes` (None: key left out)."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    for key, kv in {**base, **changes}.items():
        if kv is not None:
            w.add_key_value(key, kv[0], getattr(gguf.GGUFValueType, kv[1]),
                            None if kv[2] is None else getattr(gguf.GGUFValueType, kv[2]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _spm_metadata() -> dict:
    ref = _tiny_spm()
    return {"tokenizer.ggml.model": ("llama", "STRING", None),
            "tokenizer.ggml.tokens": (ref.texts, "ARRAY", "STRING"),
            "tokenizer.ggml.scores": (ref.scores.tolist(), "ARRAY", "FLOAT32"),
            "tokenizer.ggml.token_type": (ref.token_types.tolist(), "ARRAY", "INT32"),
            "tokenizer.ggml.bos_token_id": (1, "UINT32", None),
            "tokenizer.ggml.add_bos_token": (True, "BOOL", None)}


def _bpe_metadata() -> dict:
    return {"tokenizer.ggml.model": ("gpt2", "STRING", None),
            "tokenizer.ggml.pre": ("gpt2", "STRING", None),
            "tokenizer.ggml.tokens": (["a", "b", "ab", "<eos>"], "ARRAY", "STRING"),
            "tokenizer.ggml.merges": (["a b"], "ARRAY", "STRING"),
            "tokenizer.ggml.eos_token_id": (3, "UINT32", None)}


GGUF_REFUSALS = [
    (_spm_metadata, {"tokenizer.ggml.model": (7, "UINT32", None)},
     "'tokenizer.ggml.model' must be a string, found type UINT32"),
    (_spm_metadata, {"tokenizer.ggml.model": (b"ll\xffama", "STRING", None)}, "'tokenizer.ggml.model' is not valid UTF-8"),
    (_spm_metadata, {"tokenizer.ggml.tokens": ([1, 2, 3], "ARRAY", "INT32")},
     "'tokenizer.ggml.tokens' must be an array of strings, found type ARRAY/INT32"),
    (_spm_metadata, {"tokenizer.ggml.tokens": ("<s>", "STRING", None)}, "'tokenizer.ggml.tokens' must be an array"),
    (_spm_metadata, {"tokenizer.ggml.tokens": None}, "lacks 'tokenizer.ggml.tokens'"),
    (_spm_metadata, {"tokenizer.ggml.scores": ([0.0, 1.0], "ARRAY", "FLOAT32")},
     "'tokenizer.ggml.scores' has 2 values for 272 tokens"),
    (_spm_metadata, {"tokenizer.ggml.scores": (["x"] * 272, "ARRAY", "STRING")}, "must be an array of numbers"),
    (_spm_metadata, {"tokenizer.ggml.token_type": ([1.0] * 272, "ARRAY", "FLOAT32")}, "must be an array of integers"),
    (_spm_metadata, {"tokenizer.ggml.bos_token_id": ("1", "STRING", None)},
     "'tokenizer.ggml.bos_token_id' must be an integer, found type STRING"),
    (_spm_metadata, {"tokenizer.ggml.bos_token_id": (999, "UINT32", None)}, "bos_id=999 is outside the vocabulary"),
    (_spm_metadata, {"tokenizer.ggml.add_bos_token": (1, "UINT8", None)}, "'tokenizer.ggml.add_bos_token' must be a boolean"),
    (_bpe_metadata, {"tokenizer.ggml.merges": (["a c"], "ARRAY", "STRING")}, "merge 'a c' names 'c', which is not in"),
    (_bpe_metadata, {"tokenizer.ggml.merges": (["b a"], "ARRAY", "STRING")}, "merge 'b a' names 'ba', which is not in"),
    (_bpe_metadata, {"tokenizer.ggml.merges": (["ab"], "ARRAY", "STRING")}, "merge 'ab' is not 'left right'"),
    (_bpe_metadata, {"tokenizer.ggml.tokens": (["a", b"\xff", "ab"], "ARRAY", "STRING")},
     "'tokenizer.ggml.tokens' item 1 is not valid UTF-8"),
    (_bpe_metadata, {"tokenizer.ggml.token_type": ([1, 1], "ARRAY", "INT32")}, "has 2 values for 4 tokens"),
    (_bpe_metadata, {"tokenizer.ggml.eos_token_id": (4, "UINT32", None)}, "eos id=4 is outside the vocabulary"),
]


@pytest.mark.parametrize(("base", "changes", "message"), GGUF_REFUSALS)
def test_from_gguf_refuses_malformed_metadata(tmp_path: Path, base, changes: dict, message: str) -> None:
    pytest.importorskip("gguf")  # writes the file
    path = tmp_path / "bad.gguf"
    _gguf_with(path, base(), changes)
    with pytest.raises(InputError, match=re.escape(message)):
        from_gguf(GGUFFile(path))


def test_from_gguf_metadata_bases_load(tmp_path: Path) -> None:
    pytest.importorskip("gguf")  # writes the file
    for base in (_spm_metadata, _bpe_metadata):
        _gguf_with(tmp_path / "ok.gguf", base(), {})
        tok = from_gguf(GGUFFile(tmp_path / "ok.gguf"))
        assert tok.encode("hello" if base is _spm_metadata else "ab", bos=False)


def _spm_group_with(tmp_path: Path, **attrs) -> h5py.File:
    f = h5py.File(tmp_path / "spm.h5", "w")
    g = f.create_group("tokenizer")
    _tiny_spm().write_hdf5(g)
    for name, value in attrs.items():
        if name == "token_types":
            del g[name]
            g[name] = value
        else:
            g.attrs[name] = value
    return f


@pytest.mark.parametrize(("attrs", "message"), [
    ({"eos_ids": np.array([b"2"])}, "attribute 'eos_ids' must be integer token ids"),
    ({"unk_id": 0.5}, "attribute 'unk_id' must be an integer"),
    ({"add_space_prefix": "yes"}, "attribute 'add_space_prefix' must be a boolean"),
    ({"chat_template": 5}, "attribute 'chat_template' must be a string"),
    ({"token_types": np.zeros(272, np.float32)}, "token_types must be integer with shape (272,)"),
    ({"vocab_size": 3}, "piece_offsets must be integer with shape (4,)"),
])
def test_spm_hdf5_refuses_malformed_group(tmp_path: Path, attrs: dict, message: str) -> None:
    with _spm_group_with(tmp_path, **attrs) as f, pytest.raises(InputError, match=re.escape(message)):
        load_tokenizer(f["tokenizer"])


# ----------------------------------------------------------- HF directories


def _train_byte_level_bpe():
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|begin|>", "<|eos|>", "<|end|>", "<|user|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(HF_SENTENCES * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin|> $A", special_tokens=[("<|begin|>", tok.token_to_id("<|begin|>"))]
    )
    return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hf_model")
    raw = _train_byte_level_bpe()
    raw.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin|>", "eos_token": "<|eos|>", "chat_template": CHAT_TEMPLATE,
    }))
    (d / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    return d


def test_hf_dir_loads(hf_dir: Path) -> None:
    from tokenizers import Tokenizer as HFTok

    raw = HFTok.from_file(str(hf_dir / "tokenizer.json"))
    tok = from_hf_dir(hf_dir)
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id == raw.token_to_id("<|begin|>") == 0
    assert tok.eos_id == 1 and tok.eos_ids == (1, 2)  # <|eos|>, then generation_config's list
    assert tok.add_bos  # from the TemplateProcessing post-processor
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.vocab_size == raw.get_vocab_size()
    for text in [*HF_SENTENCES, "unseen wörds ÆØÅ 🦙", "<|user|>hi<|end|>", ""]:
        expected = raw.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, bos=False) == expected
        assert tok.encode(text) == [0, *expected]
        assert tok.encode(text, bos=True, eos=True) == [0, *expected, 1]
        assert stream_decode(tok, tok.encode(text)) == raw.decode(expected, skip_special_tokens=True)


def test_hf_dir_add_bos_flag_and_missing_json(hf_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "nobos"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "eos_token": "<|end|>"}))
    tok = from_hf_dir(d)
    assert not tok.add_bos and tok.eos_ids == (2,) and tok.chat_template is None
    assert tok.encode("hi") == tok.encode("hi", bos=False)
    with pytest.raises(InputError, match="no tokenizer.json"):
        from_hf_dir(tmp_path / "nowhere")


def test_hf_stream_holds_back_partial_characters(hf_dir: Path) -> None:
    tok = from_hf_dir(hf_dir)
    text = "🦙"  # unseen: split into byte-level tokens that end mid-character
    ids = tok.encode(text, bos=False)
    assert len(ids) >= 2
    dec = tok.stream()
    assert [dec.feed(0, i) for i in ids] == [""] * (len(ids) - 1) + [text] and dec.flush() == ""
    assert b"".join(tok.decode(0, i) for i in ids) == text.encode()
    assert tok.decode(5, tok.eos_id) == b""


def test_hf_hdf5_round_trip(hf_dir: Path, tmp_path: Path) -> None:
    tok = from_hf_dir(hf_dir)
    path = tmp_path / "t.h5"
    loaded = _write_h5(tok, path)
    with h5py.File(path, "r") as f:
        g = f["tokenizer"]
        assert g.attrs["type"] == "hf-tokenizers"
        assert g["tokenizer_json"].dtype == np.uint8
        assert list(g.attrs["eos_ids"]) == [1, 2] and g.attrs["chat_template"] == CHAT_TEMPLATE
        assert isinstance(load_tokenizer(g), HFTokenizer)
    assert isinstance(loaded, HFTokenizer)
    assert (loaded.bos_id, loaded.eos_id, loaded.eos_ids, loaded.add_bos, loaded.chat_template) == (
        tok.bos_id, tok.eos_id, tok.eos_ids, tok.add_bos, tok.chat_template
    )
    for text in HF_SENTENCES:
        assert loaded.encode(text) == tok.encode(text)
        assert stream_decode(loaded, loaded.encode(text)) == text


@pytest.mark.parametrize(("blob", "message"), [
    (b"\xff{}", "tokenizer_json is not valid UTF-8"),
    (b"{\"model\": ", "tokenizer_json is not valid JSON"),
    (b"[1, 2]", "expected a tokenizer.json object with a 'model' object"),
])
def test_hf_hdf5_refuses_malformed_json(hf_dir: Path, tmp_path: Path, blob: bytes, message: str) -> None:
    with h5py.File(tmp_path / "t.h5", "w") as f:
        g = f.create_group("tokenizer")
        from_hf_dir(hf_dir).write_hdf5(g)
        del g["tokenizer_json"]
        g["tokenizer_json"] = np.frombuffer(blob, np.uint8)
        with pytest.raises(InputError, match=re.escape(message)):
            load_tokenizer(g)


def test_hf_dir_refuses_malformed_json(hf_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "badcfg"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(InputError, match="tokenizer_config.json is not valid JSON"):
        from_hf_dir(d)
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(InputError, match="tokenizer.json: expected a tokenizer.json object with a 'model' object"):
        from_hf_dir(d)


def test_stream_gives_no_text_for_ids_beyond_the_tokenizer(tok512) -> None:
    # models often pad vocab_size past their tokenizer; such ids must not end generation
    stream = tok512.stream()
    assert stream.feed(1, 600) == ""
    assert stream.feed(600, 403) == " Once"  # (the leading space is stripped only right after BOS)


@needs_tok512
@settings(max_examples=200, deadline=None)
@given(text=st.text() | st.text("ab \u00e9\n", max_size=200))
def test_the_early_token_bound_never_exceeds_the_count(text: str) -> None:
    tok = _cached_tok512()
    assert tok.min_tokens(text) <= len(tok.encode(text, bos=False))
    assert TIE_VOCAB.min_tokens(text) <= len(TIE_VOCAB.encode(text, bos=False))
