"""The command line as a user meets it: the main job, bad input, a failing rank."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_refused, run_mpiexec

PY = sys.executable


def _cli(n, *args, timeout=180):
    return run_mpiexec(n, [PY, "-m", "dllama_mpi", *args], timeout=timeout)


@pytest.mark.jobs
def test_main_job_on_the_builtin_model():
    result = _cli(4, "--memory-budget", "3", "2", "2", "1", "--steps", "12", "--prompt", "Once upon a time")
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "built-in synthetic model" in err and "meaningless" in err
    table = [line.split() for line in err.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"], ["3"])]
    assert [row[1] for row in table[:4]] == ["3", "2", "2", "1"]  # the plan: budgets per rank
    assert "decode: 12 tokens" in err and "tokens/s" in err and "peak RSS MiB" in err
    assert result.stdout.startswith("Once upon a time")
    assert err.count("Traceback") == 0


@pytest.mark.jobs
def test_stories260k_text_is_the_same_at_every_world_size(stories_models):
    outputs = {}
    for n, budgets in ((1, ["1"]), (2, ["3", "1"]), (3, ["2", "1", "1"]), (4, ["5", "1", "1", "1"])):
        result = _cli(n, "--model", str(stories_models["q40"]), "--memory-budget", *budgets,
                      "--steps", "60", "--prompt", "Once upon a time", "--temperature", "0")
        assert result.returncode == 0, result.stderr
        outputs[n] = result.stdout
    assert len(set(outputs.values())) == 1, outputs
    assert outputs[1].startswith("Once upon a time") and len(outputs[1].split()) > 30


@pytest.mark.jobs
def test_sampling_is_reproducible_with_a_seed(stories_models):
    args = ["--model", str(stories_models["f32"]), "--steps", "40", "--temperature", "0.9", "--top-p", "0.9"]
    a = _cli(2, *args, "--seed", "7").stdout
    b = _cli(2, *args, "--seed", "7").stdout
    c = _cli(2, *args, "--seed", "8").stdout
    assert a == b and a != c


@pytest.mark.jobs
@pytest.mark.parametrize("args, message", [
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--temperature", "nan"], "argument --temperature: expected a finite number such as 0.8, got 'nan'"),
    (["--top-p", "inf"], "argument --top-p: expected a finite number such as 0.8, got 'inf'"),
    (["--temperature", "warm"], "argument --temperature: expected a finite number such as 0.8, got 'warm'"),
    (["--speculate", "33"], "--speculate must be at most 32 (a step's rows are 64), got 33"),
    (["--speculate", "-1"], "argument --speculate: must be a whole number of at least 0, got '-1'"),
    (["--speculate", "4", "--draft-min", "5"], "--draft-min 5 is more than --speculate 4, the most drafts a step verifies"),
    (["serve", "--queue-timeout", "0"], "--queue-timeout must be positive seconds, got 0; leave it out"),
    (["serve", "--max-queue", "-1"], "argument --max-queue: must be a whole number of at least 0, got '-1'"),
])
def test_bad_options_stop_every_rank_with_one_message(args, message):
    # budgets, model files, prompts and faults: tests/test_failures.py
    result = _cli(2, *args, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.count("error:") == 1, result.stderr  # once, from rank 0
    assert "Traceback" not in result.stderr


def dry_run(*args, process=False):
    """The dry run's exit code, stdout and stderr. It runs as one process without MPI, so it runs
    here, in this one, through the same main() as `python -m dllama_mpi` (a fresh interpreter
    costs about a second of imports per run); `process=True` runs that command itself."""
    import contextlib
    import io
    import logging
    import subprocess

    from dllama_mpi.commands.cli import main

    argv = [*args, "--dry-run"]  # --dry-run last: a command (serve) must come first
    if process:
        return subprocess.run([PY, "-m", "dllama_mpi", *argv], capture_output=True, text=True, timeout=120)
    log = logging.getLogger("dllama_mpi")
    handlers, level, propagate = log.handlers[:], log.level, log.propagate  # main() sets up the log: undone after
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        log.handlers[:], log.propagate = handlers, propagate
        log.setLevel(level)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def _table(stdout):
    return [line.split() for line in stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]


@pytest.mark.parametrize("budgets", [["1"], ["3", "1"], ["3", "2", "2", "1"], ["1", "1", "1", "1", "1", "1", "1"]])
def test_dry_run_prints_the_plan_traffic_and_memory_without_mpirun(stories_models, budgets):
    from dllama_mpi.files.modelfile import open_model
    from dllama_mpi.parallel.plan import make_plan

    result = dry_run("--model", str(stories_models["q40"]), "--memory-budget", *budgets, "--max-seq-len", "200")
    assert result.returncode == 0, result.stderr
    plan = make_plan(open_model(stories_models["q40"]).spec, [int(b) for b in budgets])
    rows = _table(result.stdout)
    assert len(rows) == 2 * len(budgets)  # the plan table, then traffic and memory per rank
    plan_rows, traffic_rows = rows[: len(budgets)], rows[len(budgets) :]
    assert [int(r[1]) for r in plan_rows] == list(plan.budgets)
    assert [int(r[7]) for r in plan_rows] == [s.vocab_rows[1] - s.vocab_rows[0] for s in plan.ranks]
    for r, row in enumerate(traffic_rows):
        assert float(row[1]) == pytest.approx(plan.traffic("f32").payload[r] / 1024, abs=0.05)
        assert float(row[2]) == pytest.approx(plan.traffic("q80").payload[r] / 1024, abs=0.05)
        memory = (plan.weight_bytes(r) + plan.kv_cache_bytes(r, 200, "f16")) / 2**20  # f16: the default
        assert float(row[3]) == pytest.approx(memory, abs=0.05)
    assert f"plan {plan.plan_hash()}" in result.stdout
    assert f"{plan.traffic('q80').wire / 1024:.1f} KiB cross between ranks" in result.stdout


def test_serve_dry_run_counts_every_slot_s_kv_cache_and_says_so(stories_models):
    from dllama_mpi.files.modelfile import open_model
    from dllama_mpi.parallel.plan import make_plan

    result = dry_run("serve", "--model", str(stories_models["q40"]), "--memory-budget", "3", "1",
                      "--max-seq-len", "200", "--slots", "4")
    assert result.returncode == 0, result.stderr
    plan = make_plan(open_model(stories_models["q40"]).spec, [3, 1])
    assert "KV cache 4 slots x 200 tokens in f16" in result.stdout
    header = next(line for line in result.stdout.splitlines() if line.startswith("rank budget"))
    assert header.endswith(" kv MiB f16 (4 slots)"), header
    rows = _table(result.stdout)
    plan_rows, memory_rows = rows[:2], rows[2:]
    for r in range(2):
        kv = 4 * plan.kv_cache_bytes(r, 200, "f16") / 2**20
        assert float(plan_rows[r][9]) == pytest.approx(kv, abs=0.006)
        # the memory table's total holds the same KV cache
        assert float(memory_rows[r][3]) == pytest.approx(plan.weight_bytes(r) / 2**20 + kv, abs=0.06)


def test_dry_run_counts_and_names_the_kv_type_and_refuses_an_unknown_one():
    """--kv-type: the plan line, the table's KV column and the memory table count the cache in
    that type; the default f16 is half of f32; a cap between the two refuses f32 alone."""
    from dllama_mpi.files.modelfile import largest_tensor_bytes
    from dllama_mpi.files.synthetic import SYNTHETIC_SPEC
    from dllama_mpi.parallel.budgets import rank_need
    from dllama_mpi.parallel.plan import make_plan

    plan = make_plan(SYNTHETIC_SPEC, [3, 1])
    runs = {t: dry_run("--memory-budget", "3", "1", "--max-seq-len", "4096", *(["--kv-type", t] if t else []))
            for t in ("f32", "q8_0", None)}
    for kv_type, result in runs.items():
        assert result.returncode == 0, result.stderr
        kv_type = kv_type or "f16"
        assert "KV cache 4096 tokens in " + kv_type in result.stdout
        header = next(line for line in result.stdout.splitlines() if line.startswith("rank budget"))
        assert header.endswith(f" kv MiB {kv_type}"), header
        rows = _table(result.stdout)
        for r in range(2):
            kv = plan.kv_cache_bytes(r, 4096, kv_type) / 2**20
            assert float(rows[r][9]) == pytest.approx(kv, abs=0.006)
            assert float(rows[2 + r][3]) == pytest.approx(plan.weight_bytes(r) / 2**20 + kv, abs=0.06)
    f16_kv, f32_kv = (float(_table(runs[t].stdout)[0][9]) for t in (None, "f32"))
    assert f16_kv == pytest.approx(f32_kv / 2, abs=0.006)
    row = SYNTHETIC_SPEC.head_dim + 2 * SYNTHETIC_SPEC.head_dim // 32  # int8 codes, an fp16 scale per 32
    assert f"x {row} bytes (a head's row of {SYNTHETIC_SPEC.head_dim} values in q8_0" in runs["q8_0"].stdout
    # one rank capped between its f16 and its f32 need: f16 fits, f32 is refused naming its KV cache
    one = make_plan(SYNTHETIC_SPEC, [1])
    need = [sum(rank_need(one, 0, 4096, largest_tensor_bytes(SYNTHETIC_SPEC), kv_type=t).values()) for t in ("f16", "f32")]
    cap = f"{(need[0] + need[1]) / 2 / 2**20:.0f}MiB"
    assert dry_run("--memory-budget", cap, "--max-seq-len", "4096").returncode == 0
    refused = dry_run("--memory-budget", cap, "--max-seq-len", "4096", "--kv-type", "f32")
    assert refused.returncode == 2 and "f32 KV cache for 4096 tokens" in refused.stderr, refused.stderr
    bad = dry_run("--kv-type", "q4")
    assert bad.returncode == 2 and bad.stderr.startswith(
        "error: argument --kv-type: invalid choice: 'q4' (choose from 'f32', 'f16', 'q8_0')"), bad.stderr


def test_dry_run_reads_no_weights_and_refuses_bad_budgets(tmp_path):
    result = dry_run("--memory-budget", "3", "2", "2", "1", process=True)  # the built-in model, never written
    assert result.returncode == 0 and "4 rank(s)" in result.stdout, result.stderr
    bad = dry_run("--memory-budget", "3", "x")
    assert bad.returncode == 2 and bad.stderr.startswith("error: the budget for rank 1 is 'x'")
    missing = dry_run("--model", str(tmp_path / "nothing.h5"), "--memory-budget", "1", "1")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_dry_run_checks_shards_against_the_budgets(tmp_path):
    from conftest import STORIES, need_stories

    from dllama_mpi.files.convert import convert

    need_stories()
    shards = tmp_path / "shards"
    convert(STORIES / "stories260K.bin", shards, STORIES / "tok512.bin", "q40", budgets=["3", "1"])
    assert dry_run("--model", str(shards), "--memory-budget", "3", "1").returncode == 0
    wrong = dry_run("--model", str(shards), "--memory-budget", "1", "1")
    assert wrong.returncode == 2 and "split for 2 rank(s) with budgets 3 1" in wrong.stderr


@pytest.mark.jobs
def test_the_prompt_is_echoed_exactly_on_a_model_without_bos(tmp_path):
    """A BOS-less tokenizer (Qwen-style): the first prompt token is text, not BOS."""
    import numpy as np
    from test_convert_gguf import hf_weights, write_hf_dir

    from dllama_mpi.files.convert import convert

    hf_dir = tmp_path / "hf"
    write_hf_dir(hf_dir, "qwen2", hf_weights(np.random.default_rng(0), "qwen2"))
    model = tmp_path / "m.h5"
    convert(hf_dir, model, None, "f32")
    from dllama_mpi.files.modelfile import open_model

    tokenizer = open_model(model).tokenizer()
    prompt = "The capital of France is"
    assert tokenizer.encode(prompt, bos=True)[0] != tokenizer.bos_id  # the case under test: no BOS added
    for n in (1, 2):
        result = _cli(n, "--model", str(model), "--prompt", prompt, "--steps", "3", "--ignore-eos")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(prompt), result.stdout


@pytest.mark.jobs
def test_the_prompt_is_echoed_exactly_with_bos(stories_models):
    prompt = "Once upon a time, in a land"
    result = _cli(1, "--model", str(stories_models["q40"]), "--prompt", prompt, "--steps", "0")
    assert result.returncode == 0 and result.stdout == prompt + "\n", result.stdout


@pytest.mark.jobs
def test_zero_steps_print_no_rate(stories_models):
    result = _cli(2, "--model", str(stories_models["q40"]), "--prompt", "Once", "--steps", "0")
    assert result.returncode == 0, result.stderr
    summary = next(line for line in result.stderr.splitlines() if line.startswith("prompt:"))
    assert summary.startswith("prompt: 2 tokens; decode: 0 tokens; startup") and "tokens/s" not in summary
    assert "nan" not in result.stderr


def _summary(result) -> str:
    return next(line for line in result.stderr.splitlines() if line.startswith("prompt:"))


@pytest.mark.jobs
def test_the_seed_is_printed_only_when_sampling(stories_models):
    greedy = _cli(1, "--model", str(stories_models["q40"]), "--steps", "3")
    sampled = _cli(1, "--model", str(stories_models["q40"]), "--steps", "3", "--temperature", "0.8")
    assert greedy.returncode == 0 and sampled.returncode == 0, greedy.stderr + sampled.stderr
    assert "seed" not in greedy.stderr, _summary(greedy)  # greedy uses none
    assert re.search(r"; seed [0-9]+$", _summary(sampled)), _summary(sampled)  # from the clock: to repeat the text


@pytest.fixture(scope="module")
def llama3_vocab_model(tmp_path_factory) -> Path:
    """A tiny random model with Llama 3's 128k vocabulary, whose decode tables take seconds to build."""
    from test_llamacpp_vocab import load  # skips where the vocabulary is missing

    from dllama_mpi.files.modelfile import write_model
    from dllama_mpi.files.synthetic import synthetic_tensors
    from dllama_mpi.model.spec import ModelSpec

    tokenizer = load("llama-bpe")
    spec = ModelSpec(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                     vocab_size=tokenizer.vocab_size, seq_len=512, rope_theta=500000.0, weight_type="q40")
    path = tmp_path_factory.mktemp("cli") / "tiny-llama3.h5"
    write_model(path, spec, synthetic_tensors(spec, 3), tokenizer)
    return path


@pytest.mark.jobs
def test_the_prompt_notice_and_the_speed_line_time_the_same_work(llama3_vocab_model):
    """`processing the prompt (N tokens) ... done in X s` and `prompt: N tokens in T, R tokens/s` agree: the
    tokenizer's decode tables (seconds for this vocabulary) are built while starting, not inside the first text's
    time (which once read `done in 3 s` beside 0.02 s). The notice is forced: it waits 2 s otherwise."""
    forced = ("import sys, dllama_mpi.job.loading as job; job.SaidIfSlow.__init__.__defaults__ = (True, 0.0); "
              "from dllama_mpi.commands.cli import main; sys.exit(main())")
    result = run_mpiexec(2, [PY, "-c", forced, "--model", str(llama3_vocab_model), "--prompt", "Once upon a time",
                             "--steps", "4"], timeout=180)
    assert result.returncode == 0, result.stderr
    notice = re.search(r"processing the prompt \(([0-9]+) tokens\) \.\.\.\n(?:.*\n)*?done in ([0-9]+) s", result.stderr)
    speed = re.search(r"prompt: ([0-9]+) tokens in ([0-9.]+) (m?s), ([0-9.]+) tokens/s", _summary(result))
    assert notice and speed, result.stderr
    n, seconds, rate = int(speed[1]), float(speed[2]) / (1e3 if speed[3] == "ms" else 1), float(speed[4])
    assert int(notice[1]) == n
    assert n / seconds == pytest.approx(rate, rel=0.01, abs=0.05)  # the rate shown is n over the time shown
    # whole seconds against the same interval, with room for a busy machine; the decode tables once made it 3 s
    assert abs(int(notice[2]) - seconds) <= 0.5 + 1.0, result.stderr


@pytest.mark.jobs
def test_what_is_adjusted_or_doubtful_is_said(stories_models):
    result = _cli(2, "--model", str(stories_models["q40"]), "--nthreads", "999", "--max-seq-len", "1024", "--steps", "2")
    assert result.returncode == 0, result.stderr
    cores = len(__import__("os").sched_getaffinity(0))
    assert f"note: --nthreads 999 is more than this node's cores allow; threads per rank: {cores} {cores}" in result.stderr
    assert ("note: --max-seq-len 1024 is beyond the 512 tokens the model was trained for; what it writes past that "
            "length is undefined") in result.stderr
    assert result.stderr.count("note: --max-seq-len") == 1


def test_a_long_wait_says_what_it_is_for(capsys):
    import time

    from dllama_mpi.job.loading import SaidIfSlow

    with SaidIfSlow("compiling kernels (once; cached in X)", after_s=0.2):
        time.sleep(0.5)
    with SaidIfSlow("never said", after_s=5):
        pass
    with SaidIfSlow("not this rank's to say", speaks=False, after_s=0.1):
        time.sleep(0.3)
    err = capsys.readouterr().err
    assert err.startswith("compiling kernels (once; cached in X) ...\ndone in ") and "never said" not in err
    assert "not this rank's" not in err


@pytest.mark.jobs
def test_dry_run_under_mpirun_says_so_once():
    result = _cli(2, "--dry-run", "--memory-budget", "1", "1", timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("error: --dry-run runs as one process: start it without mpirun") == 1, result.stderr


@pytest.mark.jobs
def test_options_are_never_abbreviated(stories_models):
    result = _cli(1, "--dry", "--model", str(stories_models["q40"]), timeout=60)  # must not start a real run
    assert result.returncode == 2 and "unrecognized arguments: --dry" in result.stderr and result.stdout == ""


def test_dry_run_checks_every_shard_not_only_shard_0(tmp_path):
    from conftest import STORIES, need_stories

    from dllama_mpi.files.convert import convert

    need_stories()
    shards = tmp_path / "shards"
    convert(STORIES / "stories260K.bin", shards, STORIES / "tok512.bin", "q40", budgets=["2", "1"])
    convert(STORIES / "stories260K.bin", tmp_path / "other", STORIES / "tok512.bin", "q40", budgets=["1", "1"])
    (tmp_path / "other" / "shard-1-of-2.h5").replace(shards / "shard-1-of-2.h5")
    result = dry_run("--model", str(shards), "--memory-budget", "2", "1")
    assert result.returncode == 2 and "shard-1-of-2.h5 is a shard of another split (budgets 1 1" in result.stderr


@pytest.mark.parametrize("seconds, shown", [(0.00158, "1.58 ms"), (0.011, "11.0 ms"), (0.09996, "100 ms"), (0.224, "224 ms"),
                                            (0.9994, "999 ms"), (0.9995, "1.00 s"), (2.0712, "2.07 s"), (31.5, "31.5 s")])
def test_the_prompt_time_has_three_digits_and_its_unit(seconds, shown):
    from dllama_mpi.commands.cli import speed_text

    assert speed_text(5, 0, seconds, 1, 0.0) == f"prompt: 5 tokens in {shown}, {5 / seconds:.1f} tokens/s; decode: 1 tokens"


@pytest.mark.parametrize("budgets", [["3", "2", "2", "1"], ["auto", "12GiB", "6GiB", "6GiB"]])
def test_dry_run_of_a_mixture_of_experts_still_to_convert_shows_each_rank_s_experts_and_memory(budgets):
    """Qwen3-30B-A3B's own config.json (no weights): each rank's share of the 128 experts and
    its memory, as the converter's defaults would make the model (q40), before anything is
    downloaded or converted."""
    from dllama_mpi.files.convert import source_spec
    from dllama_mpi.parallel.plan import make_plan

    config = REPO / "tests" / "data" / "qwen3-30b-a3b"
    result = dry_run("--model", str(config), "--memory-budget", *budgets, "--max-seq-len", "4096")
    assert result.returncode == 0, result.stderr
    assert "is not converted yet" in result.stderr
    spec = source_spec(config)
    assert (spec.architecture, spec.n_experts, spec.n_experts_used, spec.hidden_dim) == ("qwen3moe", 128, 8, 768)
    chosen = re.search(r"budgets ([\d ]+), KV cache", result.stdout)[1].split()
    if budgets[0] != "auto":
        assert chosen == budgets
    plan = make_plan(spec, [int(b) for b in chosen])
    assert "of each of the 128 experts' w1/w3" in result.stdout and "a token uses 8 experts" in result.stdout
    rows = _table(result.stdout)
    for r, row in enumerate(rows[: plan.world_size]):
        assert float(row[8]) == pytest.approx(plan.weight_bytes(r) / 2**20, abs=0.006)
    assert sum(plan.weight_bytes(r) for r in range(plan.world_size)) > 16 * 2**30  # 30.5B weights at 4.5 bits and more
    if budgets[0] == "auto":  # ranks of equal speed, but the 6 GiB ranks can't take a third each: rank 0 takes more
        caps = [12, 6, 6]
        assert all(float(row[4]) <= 1024 * cap for row, cap in zip(rows[plan.world_size :], caps, strict=True))
        assert plan.weight_bytes(0) > max(plan.weight_bytes(1), plan.weight_bytes(2))


def test_dry_run_of_a_source_it_cannot_size_says_to_convert_it_first(tmp_path):
    source = tmp_path / "model.m"
    source.write_bytes(b"\x00" * 256)
    result = dry_run("--model", str(source), "--memory-budget", "1")
    assert result.returncode == 2, result.stderr
    assert "convert it first (dllama-mpi-convert INPUT OUTPUT.h5)" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------ speculative decoding

REPEATING_PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to play outside. "
                    "Once upon a time")  # text that repeats: prompt lookup finds drafts from the first step
SPECULATION_LINE = re.compile(r"^speculation: (\d+) tokens in (\d+) steps \(([\d.]+) a step\), (\d+) drafted, "
                              r"(\d+) accepted \((?:[\d.]+%|-)\), ([\d.]+) collective rounds a token$", re.M)
SPECULATION_BUDGETS = {1: ["1"], 2: ["3", "1"], 3: ["2", "1", "1"]}


def _speculation(result) -> dict:
    """The numbers of the `speculation:` line of a run's stderr."""
    found = SPECULATION_LINE.findall(result.stderr)
    assert len(found) == 1, result.stderr
    tokens, steps, per_step, drafted, accepted, rounds = found[0]
    return {"tokens": int(tokens), "steps": int(steps), "per_step": float(per_step), "drafted": int(drafted),
            "accepted": int(accepted), "rounds": float(rounds)}


def _decoded(result) -> int:
    return int(re.search(r"; decode: (\d+) tokens", _summary(result))[1])


@pytest.fixture(scope="module", params=[(1, "q40", "f32"), (2, "q40", "f32"), (3, "f32", "q40")],
                ids=["n1-f32-drafts-for-q40", "n2-f32-drafts-for-q40", "n3-q40-drafts-for-f32"])
def speculation_runs(request, stories_models) -> dict:
    """One model at temperature 0 on n ranks, three ways: `--speculate 0`, prompt lookup and
    `--draft-model` (stories260K in the other weight type drafting for it), both with
    `--draft-min` so that they draft whatever this machine's step times say (the default's
    count of drafts depends on them); 200 tokens with --ignore-eos, so that every run ends at
    --steps."""
    from dllama_mpi.files.modelfile import open_model

    n, main, draft = request.param
    args = ["--model", str(stories_models[main]), "--memory-budget", *SPECULATION_BUDGETS[n], "--prompt",
            REPEATING_PROMPT, "--steps", "200", "--temperature", "0", "--ignore-eos"]
    runs = {"plain": _cli(n, *args, "--speculate", "0"), "lookup": _cli(n, *args, "--draft-min", "3"),
            "draft": _cli(n, *args, "--draft-model", str(stories_models[draft]), "--draft-min", "4")}
    for name, result in runs.items():
        assert result.returncode == 0, f"{name}:\n{result.stderr}"
    return {**runs, "n": n, "n_layers": open_model(stories_models[main]).spec.n_layers}


@pytest.mark.jobs
def test_speculation_writes_the_greedy_text_of_no_speculation(speculation_runs):
    """Speculation only decides how many tokens a step verifies: at temperature 0 the text with
    prompt lookup and with a draft model (of the other weight type: its drafts are often
    wrong) is the text without it, at 1, 2 and 3 ranks; and both did draft, and keep drafts."""
    plain, lookup, draft = (speculation_runs[k] for k in ("plain", "lookup", "draft"))
    assert plain.stdout.startswith(REPEATING_PROMPT) and len(plain.stdout.split()) > 100, plain.stdout
    assert lookup.stdout == plain.stdout
    assert draft.stdout == plain.stdout
    assert "speculation:" not in plain.stderr  # --speculate 0: off
    assert re.search(r"^draft model \S+: \d+ layers, ", draft.stderr, re.M), draft.stderr  # loaded on rank 0
    assert _decoded(plain) == _decoded(lookup) == _decoded(draft) == 200
    looked, drafted = _speculation(lookup), _speculation(draft)
    for spec in (looked, drafted):
        assert spec["tokens"] == 199  # after the first token, which the prompt's step gives
        assert 0 < spec["accepted"] <= spec["drafted"], spec
        assert spec["steps"] < spec["tokens"], spec
    assert drafted["per_step"] > 1.5, drafted  # a model of the same weights drafts well


@pytest.mark.jobs
def test_speculation_costs_fewer_collective_rounds_a_token(speculation_runs):
    """Each step costs the job 4 collectives a layer and 3 more (its broadcast, the embeddings'
    Allreduce, the logits' Gatherv) whatever its rows: without speculation that is every
    token's cost; a step that keeps drafts spreads it over several tokens. One rank has no
    collectives."""
    rounds = {k: _speculation(speculation_runs[k])["rounds"] for k in ("lookup", "draft")}
    if speculation_runs["n"] == 1:
        assert rounds == {"lookup": 0.0, "draft": 0.0}
        return
    per_step = 4 * speculation_runs["n_layers"] + 3  # --speculate 0: one token a step
    assert 0 < rounds["draft"] < rounds["lookup"] < per_step, rounds
    assert rounds["draft"] < per_step / 1.5, rounds


@pytest.mark.jobs
def test_speculation_line_counts_every_step_of_the_run(speculation_runs):
    """The line's counts cover the whole run, its last step included: each step gives its
    sequence's token and the drafts it kept (the run ends at --steps, never inside a step's
    drafts), so tokens = steps + accepted; and at n >= 2 the rounds are those of the steps
    counted (4 a layer and 3 more each)."""
    for name in ("lookup", "draft"):
        spec = _speculation(speculation_runs[name])
        assert spec["tokens"] == spec["steps"] + spec["accepted"], (name, spec)
        if speculation_runs["n"] > 1:
            per_step = 4 * speculation_runs["n_layers"] + 3
            assert spec["rounds"] == pytest.approx(spec["steps"] * per_step / spec["tokens"], abs=0.051), (name, spec)


@pytest.fixture(scope="module")
def foreign_vocab_models(tmp_path_factory) -> dict[str, Path]:
    """Random models whose vocabulary is not stories260K's: of another size, and of its size
    (512) with other tokens."""
    from conftest import write_random_model

    from dllama_mpi.model.spec import ModelSpec

    out = tmp_path_factory.mktemp("drafts")
    return {str(v): write_random_model(out / f"vocab{v}.h5", ModelSpec(
        dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=v, seq_len=512,
        weight_type="q40"), seed=v) for v in (300, 512)}


@pytest.mark.jobs
@pytest.mark.parametrize("draft, extra, message", [
    ("300", [], "its vocabulary has 300 tokens, the model's 512; a draft model must share the model's vocabulary"),
    ("512", [], "in it and"),
    ("512", ["--speculate", "0"], "--draft-model drafts tokens for speculation, which --speculate 0 turns off"),
    ("missing", [], "no such file; give a model file (.h5) made by dllama-mpi-convert"),
], ids=["other-vocab-size", "other-tokens", "speculation-off", "missing-file"])
def test_a_draft_model_that_cannot_draft_is_refused_before_any_text(stories_models, foreign_vocab_models, tmp_path,
                                                                    draft, extra, message):
    """A draft model must mean the same bytes by every token id: one that doesn't (or isn't
    there, or has no speculation to draft for) stops every rank with one message naming
    --draft-model, before the model is loaded and any text written."""
    path = foreign_vocab_models.get(draft, tmp_path / "no-such-draft.h5")
    result = _cli(2, "--model", str(stories_models["q40"]), "--steps", "8", "--draft-model", str(path), *extra,
                  timeout=120)
    assert_refused(result, message)
    assert not re.search(r"^plan ", result.stderr, re.M), result.stderr  # before the model is loaded
    if not extra:  # the file is named
        assert f"--draft-model {path}" in result.stderr
