"""tools/speculative_bench.py's pure parts (no llama.cpp, no MPI job): its parsers on outputs recorded from
llama-cpp-python 0.3.36's llama-completion and llama-lookup and from our command line, the generated texts cut
out of each engine's stdout, the run plan, and the summary's speedups and table."""

from __future__ import annotations

from pathlib import Path

import pytest

import speculative_bench as sb

# `llama-lookup -m qwen2.5-coder-0.5b-instruct-q4_k_m.gguf -p "def fibonacci(n):" -n 32 --temp 0 -t 2`, the tail
# of its stderr (captured 2026-12-06 on this project's 2-core AMD EPYC)
LOOKUP_STDERR = """\
0.01.307.303 I cmn          init: llama threadpool init, n_threads = 2
0.02.364.823 I encoded    4 tokens in    0.084 seconds, speed:  439.958 t/s
0.02.364.856 I decoded   33 tokens in    0.918 seconds, speed:   35.941 t/s
0.02.364.878 I 
0.02.364.899 I n_draft      = 3
0.02.364.919 I n_predict    = 33
0.02.364.940 I n_drafted    = 6
0.02.364.961 I t_draft_flat = 0.01 ms
0.02.364.983 I t_draft      = 0.33 ms, 54.83 us per token, 18237.08 tokens per second
0.02.365.005 I n_accept     = 2
0.02.365.029 I accept       = 33.333%
0.02.365.051 I 
target:

0.02.365.078 I common_perf_print:    sampling time =      12.57 ms
0.02.365.101 I common_perf_print:    samplers time =       6.77 ms /    33 tokens
0.02.365.124 I common_perf_print:        load time =     728.12 ms
0.02.365.148 I common_perf_print: prompt eval time =     153.24 ms /    12 tokens (   12.77 ms per token,    78.31 tokens per second)
0.02.365.173 I common_perf_print:        eval time =     758.60 ms /    28 runs   (   27.09 ms per token,    36.91 tokens per second)
0.02.365.197 I common_perf_print:       total time =    1003.00 ms /    40 tokens
"""  # noqa: E501 (recorded verbatim; llama.cpp's empty log lines end in a space)

# the same prompt through `llama-completion ... -n 32 --temp 0 -t 2 -no-cnv`
COMPLETION_STDERR = """\
0.01.358.297 I generate: n_ctx = 32768, n_batch = 2048, n_predict = 32, n_keep = 0
0.02.220.108 I common_perf_print:    sampling time =      10.28 ms
0.02.220.136 I common_perf_print:    samplers time =       4.37 ms /    36 tokens
0.02.220.158 I common_perf_print:        load time =     853.48 ms
0.02.220.180 I common_perf_print: prompt eval time =      59.57 ms /     4 tokens (   14.89 ms per token,    67.15 tokens per second)
0.02.220.201 I common_perf_print:        eval time =     789.43 ms /    31 runs   (   25.47 ms per token,    39.27 tokens per second)
0.02.220.221 I common_perf_print:       total time =     862.10 ms /    35 tokens
"""  # noqa: E501 (recorded verbatim)

# our stderr's end, without and with speculation (the speed line as recorded; the speculation line in the
# format of dllama_mpi.commands.cli.speculation_text)
OURS_PLAIN = """\
prompt: 4 tokens in 41.0 ms, 97.5 tokens/s; decode: 32 tokens, 40.8 tokens/s; startup 9.9 s
rank threads compute ms/tok collective ms/tok sent KiB/tok weights MiB kv MiB f16 peak RSS MiB  cap MiB
   0       2         22.528             0.000         0.00      523.66      48.00       1085.5        -
"""
OURS_SPEC = """\
prompt: 33 tokens in 290 ms, 113.7 tokens/s; decode: 128 tokens, 61.3 tokens/s; startup 9.7 s
speculation: 127 tokens in 52 steps (2.44 a step), 210 drafted, 75 accepted (35.7%), 40.1 collective rounds a token
rank threads compute ms/tok collective ms/tok sent KiB/tok weights MiB kv MiB f16 peak RSS MiB  cap MiB
"""


def test_parse_ours_without_speculation():
    r = sb.parse_ours(OURS_PLAIN)
    assert (r["tokens"], r["tokens_per_s"]) == (32, 40.8)
    assert r["tokens_per_step"] is r["acceptance_pct"] is r["rounds_per_token"] is None


def test_parse_ours_speculation_line():
    r = sb.parse_ours(OURS_SPEC)
    assert (r["tokens"], r["tokens_per_s"]) == (128, 61.3)
    assert (r["spec_tokens"], r["steps"], r["tokens_per_step"]) == (127, 52, 2.44)
    assert (r["drafted"], r["accepted"], r["acceptance_pct"], r["rounds_per_token"]) == (210, 75, 35.7, 40.1)


def test_parse_ours_nothing_drafted():
    """With no draft (nothing matched), the rate is a dash, not a number."""
    line = "speculation: 39 tokens in 39 steps (1.00 a step), 0 drafted, 0 accepted (-), 0.0 collective rounds a token\n"
    r = sb.parse_ours(OURS_PLAIN + line)
    assert (r["drafted"], r["acceptance_pct"], r["rounds_per_token"], r["tokens_per_step"]) == (0, None, 0.0, 1.0)


def test_parse_ours_refuses_a_run_without_speed_line():
    with pytest.raises(ValueError, match="speed line"):
        sb.parse_ours("error: something\n")


def test_parse_llama_completion():
    r = sb.parse_llama_completion(COMPLETION_STDERR)
    assert (r["tokens"], r["tokens_per_s"], r["eval_runs"], r["prompt_tokens"]) == (32, 39.27, 31, 4)
    assert r["drafted"] is None


def test_parse_llama_lookup():
    r = sb.parse_llama_lookup(LOOKUP_STDERR)
    assert (r["tokens"], r["n_draft"], r["drafted"], r["accepted"]) == (33, 3, 6, 2)
    assert r["steps"] == 31  # each step accepts a run of drafts, then adds one token
    assert r["tokens_per_s"] == pytest.approx(32 / 0.918)
    assert r["tool_tokens_per_s"] == 35.941
    assert r["acceptance_pct"] == pytest.approx(100 / 3)


def test_parse_llama_lookup_nothing_drafted():
    text = LOOKUP_STDERR.replace("n_drafted    = 6", "n_drafted    = 0").replace("n_accept     = 2", "n_accept     = 0")
    r = sb.parse_llama_lookup(text)
    assert (r["steps"], r["tokens_per_step"], r["acceptance_pct"]) == (33, 1.0, None)


def test_parse_llama_lookup_refuses_other_output():
    with pytest.raises(ValueError, match="decoded"):
        sb.parse_llama_lookup(COMPLETION_STDERR)


def test_generated_texts():
    chat = sb.qwen_chat("Hi")
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    assert sb.ours_generated(chat + "Hello there.\n", chat) == "Hello there."
    assert sb.completion_generated("Hello there.\n\n") == "Hello there."
    assert sb.completion_generated("Hello there. [end of text]\n\n\n") == "Hello there."
    assert sb.lookup_generated("\n\n" + chat + "Hello there.\n\n\n\n", chat) == "Hello there."
    # stories260K's vocabulary: llama-lookup echoes the BOS and the prompt's leading space
    assert sb.lookup_generated("\n\n<s> Once upon a time, there was\n\n\n\n", "Once upon a time") == ", there was"


def test_texts_agree_and_common_prefix():
    assert sb.texts_agree("a b c\n", "a b c d e")
    assert not sb.texts_agree("a b c", "a b x")
    assert sb.common_prefix("abcd", "abxd") == 2


def test_commands():
    ours = sb.ours_command("mpiexec", 2, Path("m.h5"), "hi", 128, 0, python="py")
    assert ours == ["mpiexec", "-n", "2", "py", "-m", "dllama_mpi", "--model", "m.h5", "--prompt", "hi", "--steps",
                    "128", "--temperature", "0", "--speculate", "0"]
    assert "--speculate" not in sb.ours_command("mpiexec", 1, Path("m.h5"), "hi", 128, None, python="py")
    lookup = sb.llama_lookup_command(Path("llama-lookup"), Path("m.gguf"), "hi", 128, 2, 4096, 8)
    assert lookup[lookup.index("-n") + 1] == "127"  # it stops once past -n
    assert lookup[-2:] == ["--spec-draft-n-max", "8"]
    completion = sb.llama_completion_command(Path("llama-completion"), Path("m.gguf"), "hi", 128, 2, None)
    assert "-no-cnv" in completion and "-c" not in completion


def test_configs():
    plan = sb.configs([1, 2], [4], supported=True)
    names = [(engine, config) for engine, config, _ in plan]
    assert names[:2] == [(sb.LLAMA, "plain"), (sb.LLAMA, "lookup")]
    assert (sb.LLAMA, f"lookup K={sb.DEFAULT_DRAFT}") in names and (sb.LLAMA, "lookup K=4") in names
    assert [c for e, c in names if e == sb.OURS] == ["n1 off", "n1 default", "n1 K=4", "n2 off", "n2 default", "n2 K=4"]
    assert [c for e, c, _ in sb.configs([1], [], supported=False) if e == sb.OURS] == ["n1 no flag"]
    assert sb.baseline_config(sb.OURS, "n2 K=4") == "n2 off"
    assert sb.baseline_config(sb.LLAMA, "lookup K=8") == "plain"


def test_summarize_and_table():
    def row(config, rate, engine=sb.OURS, ok=True, **extra):
        return {"task": "code", "engine": engine, "config": config, "ok": ok, "tokens": 128, "tokens_per_s": rate,
                **extra}

    rows = [row("n2 off", 10.0, text_identical=True), row("n2 off", 12.0, text_identical=True),
            row("n2 default", 20.0, tokens_per_step=2.0, acceptance_pct=50.0, rounds_per_token=49.0,
                text_identical=True),
            row("n2 default", 30.0, tokens_per_step=3.0, acceptance_pct=60.0, rounds_per_token=33.0,
                text_identical=False),
            row("plain", 40.0, engine=sb.LLAMA), row("lookup", None, engine=sb.LLAMA, ok=False)]
    summary = {(s["engine"], s["config"]): s for s in sb.summarize(rows)}
    off, spec = summary[(sb.OURS, "n2 off")], summary[(sb.OURS, "n2 default")]
    assert (off["median_tokens_per_s"], off["speedup"], off["text_identical"]) == (11.0, None, True)
    assert spec["speedup"] == pytest.approx(25.0 / 11.0)
    assert (spec["tokens_per_step"], spec["acceptance_pct"], spec["rounds_per_token"]) == (2.5, 55.0, 41.0)
    assert spec["text_identical"] is False
    failed = summary[(sb.LLAMA, "lookup")]
    assert (failed["failed"], failed["median_tokens_per_s"], failed["speedup"]) == (1, None, None)
    table = sb.markdown_table(sb.summarize(rows))
    assert "| code | dllama_mpi n2 default | 128 | 25.00 (20.00-30.00) | 2.27x | 2.50 | 55.0% | 41.0 | **NO** |" in table
    assert "| code | llama.cpp lookup | - | failed |" in table
