"""tools/constrained_bench.py's pure parts on stories260K's vocabulary with the chosen library (llguidance): the
vocabulary as the libraries get it, the answers' tokens, the walk that checks the library really constrains, the
feature probes and the medians' table."""

from __future__ import annotations

import pytest
from conftest import STORIES, need_stories

import constrained_bench as cb


@pytest.fixture(scope="module")
def vocab() -> cb.Vocab:
    need_stories()
    return cb.vocab_of(cb.load_tokenizer("stories260K", STORIES / "tok512.bin"))


def test_vocab_flags_bos_eos_and_keeps_byte_pieces(vocab):
    assert vocab.size == 512 and vocab.eos_ids == (2, 1)
    assert [vocab.special[i] for i in (1, 2)] == [True, True] and vocab.tokens[1] == vocab.tokens[2] == b""
    assert vocab.tokens[3 + ord("{")] == b"{" and not vocab.special[3 + ord("{")]


def test_answers_tokenize_without_the_dummy_prefix_space(vocab):
    for case in cb.CASES:
        ids = vocab.encode(case.answer)
        assert b"".join(vocab.tokens[i] for i in ids) == case.answer.encode()
    assert vocab.tokenizer.encode("{", bos=False) == [3 + ord("{")]  # not " {"


def test_every_case_walks_and_the_mask_narrows(vocab):
    lib = cb.LLGuidance(vocab)
    for case in cb.CASES:
        walked = cb.walk(lib, lib.compile(case), vocab, case.answer)
        assert walked["tokens"] == len(vocab.encode(case.answer)) + 1 == len(walked["times_us"])
        assert 0 < min(walked["allowed"]) and max(walked["allowed"]) < vocab.size


def test_walk_refuses_a_wrong_answer(vocab):
    lib = cb.LLGuidance(vocab)
    tool_call = cb.CASES[0]
    with pytest.raises(AssertionError, match="is refused"):
        cb.walk(lib, lib.compile(tool_call), vocab, tool_call.answer.replace("get_weather", "get_time"))
    with pytest.raises(AssertionError, match="is refused"):
        cb.walk(lib, lib.compile(tool_call), vocab, tool_call.answer.replace('"days": 3', '"days": 15'))


def test_probes_find_every_feature_enforced(vocab):
    assert cb.probe("llguidance", vocab) == {feature: "enforced" for feature, _, _ in cb.PROBES}


def test_summary_takes_medians_over_rounds_and_names_a_case_no_round_finished():
    def case(compile_ms, times):
        return {"compile_ms": compile_ms, "times_us": times, "tokens": len(times), "allowed": [5] * len(times)}

    rounds = [{"setup_ms": s, "peak_rss_added_mib": 10.0 * s, "cases": {"tool_call": case(c, [100.0, *ts])}}
              for s, c, ts in ((1.0, 3.0, [1.0, 2.0, 3.0]), (2.0, 5.0, [2.0, 4.0, 6.0]), (9.0, 4.0, [3.0, 3.0, 3.0]))]
    rounds[2]["error"] = "timeout: over 9 s"
    s = cb.summarize(rounds)
    assert (s["setup_ms"], s["peak_rss_added_mib"]) == (2.0, 20.0)
    t = s["cases"]["tool_call"]
    assert (t["compile_ms"], t["first_mask_us"], t["per_token_median_us"], t["rounds"]) == (4.0, 100.0, 3.0, 3)
    assert s["cases"]["json_object"] == {"error": "timeout: over 9 s"}
    text = cb.table({"stories260K": {"llguidance": s}})
    assert "| stories260K | tool_call | llguidance | 4.0 | 100 | 3.0 |" in text
    assert "| stories260K | json_object | llguidance | timeout: over 9 s |" in text
