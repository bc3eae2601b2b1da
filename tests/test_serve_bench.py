"""tools/serve_bench.py: its percentiles, rows and table on fixed numbers, and one run end to end against a
stories260K server under mpiexec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
from conftest import REPO, assert_no_survivors, convert_stories, need_stories

import serve_bench as sb

pytestmark = pytest.mark.tools  # every test here runs a tool of tools/


def test_percentile_interpolates_linearly_as_numpy_does():
    assert sb.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert sb.percentile([10.0, 20.0, 30.0, 40.0, 50.0], 95) == pytest.approx(48.0)
    assert sb.percentile([7.0], 95) == 7.0
    assert (sb.percentile([1.0, 5.0], 0), sb.percentile([1.0, 5.0], 100)) == (1.0, 5.0)
    values = [0.3, 9.1, 2.2, 2.2, 7.5, 0.1, 4.4]
    for pct in (5, 25, 50, 90, 95, 99):
        assert sb.percentile(values, pct) == pytest.approx(np.percentile(values, pct))
    with pytest.raises(ValueError):
        sb.percentile([], 50)


def measured(sent: float, ttft: float, tpot: float | None, tokens: int, done: float) -> sb.Measured:
    return sb.Measured(ttft_s=ttft, tpot_s=tpot, latency_s=done - sent, prompt_tokens=8, cached_tokens=0,
                       completion_tokens=tokens, sent=sent, done=done)


def test_a_level_row_counts_tokens_over_its_wall_time():
    row = sb.level_row(2, [measured(10.0, 0.1, 0.02, 8, 10.5), measured(10.2, 0.3, 0.04, 8, 11.0),
                           measured(10.5, 0.2, None, 1, 10.7)])
    assert row["wall_s"] == pytest.approx(1.0) and row["output_tok_s"] == pytest.approx(17.0)
    assert (row["streams"], row["requests"], len(row["per_request"])) == (2, 3, 3)
    assert row["ttft_ms_p50"] == pytest.approx(200.0) and row["ttft_ms_p95"] == pytest.approx(290.0)
    assert row["tpot_ms_p50"] == pytest.approx(30.0)  # the one-token request has no TPOT


def test_table_and_scaling_line():
    rows = [{"streams": 1, "output_tok_s": 10.04, "ttft_ms_p50": 120.0, "ttft_ms_p95": 130.55, "tpot_ms_p50": 98.76,
             "tpot_ms_p95": 101.0, "requests": 8, "idle": None},
            {"streams": 4, "output_tok_s": 25.1, "ttft_ms_p50": 300.0, "ttft_ms_p95": 420.0, "tpot_ms_p50": None,
             "tpot_ms_p95": None, "requests": 8, "idle": None}]
    assert sb.markdown_table(rows) == "\n".join([
        "| streams | output tok/s | TTFT p50 | TTFT p95 | TPOT p50 | TPOT p95 | requests |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        "| 1 | 10.0 | 120.0 | 130.6 | 98.8 | 101.0 | 8 |",
        "| 4 | 25.1 | 300.0 | 420.0 | - | - | 8 |",
    ])
    assert sb.scaling_line(rows) == "4 streams: 2.50x the output tok/s of 1 stream"
    text = sb.report(2, ["3", "1"], 8, rows)
    assert text.startswith("2 rank(s), memory budgets 3 1, 8 slots; TTFT and TPOT in ms\n") and "NOT IDLE" not in text
    assert "MACHINE NOT IDLE" in sb.report(1, None, 8, [{**r, "idle": False} for r in rows])


def test_requests_and_rank_counts():
    assert [sb.requests_per_stream(c, None) for c in (1, 2, 4, 8, 16)] == [8, 4, 2, 2, 2]
    assert sb.requests_per_stream(4, 1) == 1
    assert sb.parse_args(["--model", "m.h5"]).ranks == [1]
    assert sb.parse_args(["--model", "m.h5", "--memory-budget", "3", "1"]).ranks == [2]
    with pytest.raises(SystemExit):
        sb.parse_args(["--model", "m.h5", "--ranks", "1", "2", "--memory-budget", "1", "1"])


def test_end_to_end_on_stories(tmp_path):
    need_stories()
    model = convert_stories(tmp_path, "q40")
    out = tmp_path / "rows.json"
    mark = uuid.uuid4().hex  # the servers' processes inherit it: none may outlive the tool
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "serve_bench.py"), "--model", str(model), "--ranks", "1", "--concurrency",
         "1", "2", "--requests", "1", "--prompt-tokens", "8", "--max-tokens", "8", "--no-idle-wait", "--json", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "DLLAMA_TEST_MARK": mark})
    assert_no_survivors(mark, "serve_bench")
    assert result.returncode == 0, result.stderr
    assert "| streams | output tok/s |" in result.stdout and "2 streams:" in result.stdout
    data = json.loads(out.read_text())
    assert data["facts"]["cpu"] and "--max-tokens 8" in data["facts"]["command"]
    rows = data["rows"]
    assert [(r["ranks"], r["streams"], r["requests"], r["server_exit_code"]) for r in rows] == [(1, 1, 1, 0), (1, 2, 2, 0)]
    for r in rows:
        assert r["output_tok_s"] > 0 and r["ttft_ms_p50"] > 0 and r["tpot_ms_p50"] > 0
        for m in r["per_request"]:
            assert (m["completion_tokens"], m["prompt_tokens"], m["cached_tokens"]) == (8, 8, 0)
            assert m["ttft_s"] > 0 and m["tpot_s"] > 0


def test_shapes_ask_for_completions_or_chats_with_and_without_a_format():
    path, body = sb.Shape(16).request([5, 6, 7])
    assert (path, body["prompt"], body["ignore_eos"], body["max_tokens"]) == ("/v1/completions", [5, 6, 7], True, 16)
    form = {"type": "json_object"}
    path, body = sb.Shape(16, "Say hi.", form, ignore_eos=False).request([5, 6, 7])
    assert path == "/v1/chat/completions" and body["messages"] == [{"role": "user", "content": "Request 5. Say hi."}]
    assert body["response_format"] == form and "ignore_eos" not in body
    assert "response_format" not in sb.Shape(16, "Say hi.").request([5])[1]
    args = sb.parse_args(["--model", "m.h5", "--response-format", '{"type": "json_object"}', "--chat-prompt"])
    assert [(sb.format_name(s), s.ignore_eos, s.chat) for s in sb.shapes(args)] == [
        ("text", False, sb.CHAT_PROMPT), ("json_object", False, sb.CHAT_PROMPT)]
    assert [(sb.format_name(s), s.ignore_eos, s.chat) for s in sb.shapes(sb.parse_args(["--model", "m.h5"]))] == [
        ("text", True, None)]


def test_response_format_is_read_from_json_or_a_file(tmp_path):
    form = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    (tmp_path / "f.json").write_text(json.dumps(form))
    assert sb.response_format(f"@{tmp_path / 'f.json'}") == form
    for bad in ('{"type": "text"}', "[1]", "{oops"):
        with pytest.raises(Exception, match="expected"):
            sb.response_format(bad)


def test_format_medians_and_their_cost_per_token():
    def row(streams, form, rnd, tpot, tok_s):
        return {"ranks": 1, "streams": streams, "format": form, "round": rnd, "tpot_ms_p50": tpot, "output_tok_s": tok_s,
                "per_request": [{"completion_tokens": 64}, {"completion_tokens": 32}]}

    rows = [row(1, "text", r, t, 10.0) for r, t in ((1, 50.0), (2, 70.0), (3, 60.0))]
    rows += [row(1, "json_schema", r, t, 9.0) for r, t in ((1, 65.0), (2, 61.5), (3, 90.0))]
    medians = sb.format_rows(rows)
    assert [(m["format"], m["rounds"], m["tpot_ms"], m["tokens_per_answer"]) for m in medians] == [
        ("text", 3, 60.0, 48.0), ("json_schema", 3, 65.0, 48.0)]
    assert sb.format_table(medians).splitlines()[2:] == ["| 1 | 1 | text | 60.0 | - | 10.0 | 48 |",
                                                         "| 1 | 1 | json_schema | 65.0 | +5.0 | 9.0 | 48 |"]


def test_end_to_end_with_a_response_format_on_stories(tmp_path):
    need_stories()
    model = convert_stories(tmp_path, "q40")
    out = tmp_path / "rows.json"
    mark = uuid.uuid4().hex
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "serve_bench.py"), "--model", str(model), "--concurrency", "1", "2",
         "--requests", "1", "--max-tokens", "8", "--rounds", "2", "--response-format", '{"type": "json_object"}',
         "--no-idle-wait", "--json", str(out)],
        capture_output=True, text=True, timeout=180, env={**os.environ, "DLLAMA_TEST_MARK": mark})
    assert_no_survivors(mark, "serve_bench")
    assert result.returncode == 0, result.stderr
    assert "| ranks | streams | format | ms per token per stream |" in result.stdout and "mask work" in result.stdout
    data = json.loads(out.read_text())
    assert [(r["round"], r["streams"], r["format"]) for r in data["rows"]] == [  # the order turned every other round
        (1, 1, "text"), (1, 1, "json_object"), (1, 2, "text"), (1, 2, "json_object"),
        (2, 1, "json_object"), (2, 1, "text"), (2, 2, "json_object"), (2, 2, "text")]
    for r in data["rows"]:
        for m in r["per_request"]:
            assert 1 <= m["completion_tokens"] <= 8
            assert m["text"].startswith("{") if r["format"] == "json_object" else m["text"] == ""
    assert sorted((m["streams"], m["format"], m["rounds"]) for m in data["format_medians"]) == [
        (1, "json_object", 2), (1, "text", 2), (2, "json_object", 2), (2, "text", 2)]
    assert data["mask_work"]["tokens"] >= 6 * 2 and data["mask_work"]["us_p50"] > 0
