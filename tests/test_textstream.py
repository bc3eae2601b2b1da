"""Tests for TextStream: streamed text never shows any part of a stop string, nor half a UTF-8 character."""

from __future__ import annotations

import codecs

import pytest
from conftest import STORIES
from hypothesis import given, settings
from hypothesis import strategies as st

from dllama_mpi.files.tokenizer import StreamDecoder, Tokenizer
from dllama_mpi.serving.textstream import TextStream

TOK512 = STORIES / "tok512.bin"


class BytesTokenizer:
    """Token i decodes to pieces[i] whatever came before: exact control over how the bytes are cut."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.vocab_size = len(pieces)

    def decode(self, prev_token: int, token: int) -> bytes:
        return self.pieces[token]

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


def run(pieces: list[bytes], stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    """Feed every piece in turn until a stop string; then finish() unless stopped. Returns each call's text."""
    stream = TextStream(BytesTokenizer(pieces), stop)
    out = []
    for token in range(len(pieces)):
        out.append(stream.feed(token))
        if stream.stopped:
            return out, stream
    out.append(stream.finish())
    return out, stream


@pytest.fixture(scope="module")
def tok512() -> Tokenizer:
    if not TOK512.exists():
        pytest.skip(f"llama2.c tokenizer not found at {TOK512}")
    return Tokenizer.from_llama2c(TOK512, 512)


def run_real(tok: Tokenizer, text: str, stop: tuple[str, ...]) -> tuple[list[str], TextStream]:
    """Stream the tokens of `text` as if generated right after BOS."""
    ids = tok.encode(text)
    stream = TextStream(tok, stop, prev_token=ids[0])
    out = []
    for token in ids[1:]:
        out.append(stream.feed(token))
        if stream.stopped:
            return out, stream
    out.append(stream.finish())
    return out, stream


@pytest.mark.parametrize("stop", ["a time", " girl"])  # " a" + " time"; " g" + "ir" + "l"
def test_stop_over_several_real_tokens_never_leaks(tok512, stop):
    text = "Once upon a time there was a little girl named Lily."
    out, stream = run_real(tok512, text, (stop,))
    released = "".join(out)
    assert stream.stopped
    assert released == stream.text == text[: text.index(stop)]
    for i in range(len(out) + 1):
        so_far = "".join(out[:i])
        assert not any(so_far.endswith(stop[:n]) for n in range(1, len(stop))), (i, so_far)


def test_stop_at_the_very_start(tok512):
    out, stream = run_real(tok512, "Once upon a time", ("Once",))
    assert stream.stopped and out == [""] and stream.text == ""


def test_held_prefix_that_is_no_stop_is_released_in_order(tok512):
    text = "Once upon a time there was a little girl named Lily"
    out, stream = run_real(tok512, text, ("time to go", "Lily!"))
    assert not stream.stopped
    assert "".join(out) == stream.text == text
    assert out[3:5] == [" ", "time there"]  # "time" waited for " there"
    assert out[-2:] == [" ", "Lily"]  # finish() gives back the "Lily" held at the end of the tokens


def test_hold_back_is_the_longest_possible_stop_start():
    out, stream = run([b"xa", b"b", b"d", b"aa", b"a", b"b"], ("abc", "aab"))
    assert out == ["x", "", "abd", "", "a", ""]  # "aaa" keeps "aa", since "aab" may still come: it does
    assert stream.stopped and stream.text == "xabda"


def test_earliest_stop_wins():
    out, stream = run([b"hello world"], ("world", "o w"))
    assert stream.stopped and out == ["hell"]
    out, stream = run([b"ab", b"cd"], ("bcd", "abcd"))  # both complete with "cd": "abcd" starts first
    assert out == ["", ""] and stream.text == ""


def test_first_completed_stop_ends_generation():
    """Generation ends as soon as the text contains a stop string: a longer one that started
    earlier but is not complete yet never gets the chance."""
    out, stream = run([b"a", b"b", b"c", b"d"], ("abcd", "bc"))
    assert stream.stopped and "".join(out) == "a"


def test_feed_after_stop_or_finish_is_an_error():
    stream = TextStream(BytesTokenizer([b"stop"]), ("stop",))
    assert stream.feed(0) == "" and stream.stopped
    assert stream.finish() == ""
    with pytest.raises(RuntimeError):
        stream.feed(0)
    stream = TextStream(BytesTokenizer([b"x"]))
    assert stream.finish() == ""
    with pytest.raises(RuntimeError):
        stream.feed(0)


def test_empty_stop_string_is_refused():
    with pytest.raises(ValueError):
        TextStream(BytesTokenizer([b"x"]), ("x", ""))


def test_split_utf8_character_waits_until_complete(tok512):
    out, _ = run([b"caf", b"\xc3", b"\xa9!"])
    assert out == ["caf", "", "é!", ""]
    emoji = tok512.encode("😀", bos=False)[1:]  # after the dummy-prefix " ": one byte token per byte
    assert len(emoji) == 4
    stream = TextStream(tok512, ("😀!",), prev_token=tok512.bos_id)
    assert [stream.feed(t) for t in emoji] == ["", "", "", ""]  # the emoji may start the stop string
    assert stream.finish() == "😀" and stream.text == "😀"


def test_finish_releases_the_held_tail():
    out, stream = run([b"the end", b" of th"], (" of the story",))
    assert out == ["the end", "", " of th"] and not stream.stopped


def test_finish_turns_an_incomplete_utf8_tail_into_replacement_char():
    out, stream = run([b"ok", b"\xf0\x9f"])
    assert out == ["ok", "", "\ufffd"] and stream.text == "ok\ufffd"
    out, stream = run([b"ok\xf0"], ("\ufffd",))  # that U+FFFD is text like any other: it can be a stop
    assert out == ["ok", ""] and stream.stopped


def expected(pieces: list[bytes], stop: tuple[str, ...]) -> str:
    """The answer by definition: decode with 'replace'; after each token, if the text so far
    contains a stop string, cut it before the earliest match and end there."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = ""
    for piece in [*pieces, None]:
        text += utf8.decode(b"", final=True) if piece is None else utf8.decode(piece)
        starts = [i for i in (text.find(s) for s in stop) if i >= 0]
        if starts:
            return text[: min(starts)]
    assert text == b"".join(pieces).decode("utf-8", "replace")
    return text


PIECES = st.sampled_from([b"", b"a", b"b", b"ab", b"ba", b"aab", b"\xc3", b"\xa9", b"\xc3\xa9", b"\xf0\x9f", b"\x98\x80", b"\xff"])
STOPS = st.lists(st.text(alphabet="abé😀\ufffd", min_size=1, max_size=4), max_size=4).map(tuple)


@settings(derandomize=True, max_examples=400, deadline=None)
@given(st.lists(PIECES, max_size=16), STOPS)
def test_released_text_is_the_answer_and_never_shows_a_stop(pieces, stop):
    answer = expected(pieces, stop)
    stream = TextStream(BytesTokenizer(pieces), stop)
    released = ""
    for token in range(len(pieces)):
        released += stream.feed(token)
        assert answer.startswith(released)
        assert not any(s in released for s in stop)
        if stream.stopped:
            break
    else:
        released += stream.finish()
    assert released == stream.text == answer
    full = b"".join(pieces).decode("utf-8", "replace")
    assert stream.stopped == (answer != full)
    if len(stop) == 1:  # one stop string: matches complete in the order they start, so the first is the earliest
        assert answer == full[: full.find(stop[0])] if stop[0] in full else answer == full


def naive_held(pending: str, stop: tuple[str, ...]) -> int:
    """The longest suffix of `pending` that is a proper prefix of a stop string, by trying every prefix."""
    prefixes = {s[:i] for s in stop for i in range(1, len(s))}
    return max((n for n in range(1, len(pending) + 1) if pending[-n:] in prefixes), default=0)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="abc", max_size=5), max_size=24),
       st.lists(st.text(alphabet="abc", min_size=1, max_size=9), min_size=1, max_size=4).map(tuple))
def test_the_held_tail_is_the_naive_longest_stop_prefix(pieces, stop):
    """Over small alphabets (many partial matches, overlapping and self-overlapping stops), what is
    held back after each token is exactly the naive reference's longest proper prefix of a stop."""
    stream = TextStream(BytesTokenizer([p.encode() for p in pieces]), stop)
    text = ""
    for token, piece in enumerate(pieces):
        released = stream.feed(token)
        text += piece
        if stream.stopped:
            assert stream.text == expected([p.encode() for p in pieces[: token + 1]], stop)
            return
        assert len(text) - len(stream.text) == naive_held(text, stop), (text, stream.text)
        assert text.startswith(stream.text) and stream.text.endswith(released)


def test_a_stop_string_costs_memory_linear_in_its_length():
    """900,000 characters (inside the API's 1 MiB body): the per-prefix set this replaced took
    gigabytes and the OOM killer ended the job. Now a few bytes a character, and a text that
    nearly completes it is held back, then released whole."""
    import tracemalloc

    stop = "ab" * 450_000
    tracemalloc.start()
    stream = TextStream(BytesTokenizer([b"ab" * 1000, b"c"]), (stop, "zz"))
    assert stream.feed(0) == ""  # 2,000 characters of the stop string so far: all held
    assert stream.feed(1) == "ab" * 1000 + "c"
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 6 * len(stop), peak  # the stop string (1 byte a character) and its border table (4)
