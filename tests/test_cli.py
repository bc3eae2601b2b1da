"""The command line as a user meets it: the main job, bad input, a failing rank."""

from __future__ import annotations

import sys
import time

import pytest
from conftest import run_mpiexec

PY = sys.executable


def _cli(n, *args, timeout=180):
    return run_mpiexec(n, [PY, "-m", "dllama_mpi", *args], timeout=timeout)


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


def test_stories260k_text_is_the_same_at_every_world_size(stories_models):
    outputs = {}
    for n, budgets in ((1, ["1"]), (2, ["3", "1"]), (3, ["2", "1", "1"]), (4, ["5", "1", "1", "1"])):
        result = _cli(n, "--model", str(stories_models["q40"]), "--memory-budget", *budgets,
                      "--steps", "60", "--prompt", "Once upon a time", "--temperature", "0")
        assert result.returncode == 0, result.stderr
        outputs[n] = result.stdout
    assert len(set(outputs.values())) == 1, outputs
    assert outputs[1].startswith("Once upon a time") and len(outputs[1].split()) > 30


def test_sampling_is_reproducible_with_a_seed(stories_models):
    args = ["--model", str(stories_models["f32"]), "--steps", "40", "--temperature", "0.9", "--top-p", "0.9"]
    a = _cli(2, *args, "--seed", "7").stdout
    b = _cli(2, *args, "--seed", "7").stdout
    c = _cli(2, *args, "--seed", "8").stdout
    assert a == b and a != c


@pytest.mark.parametrize("args, message", [
    (["--memory-budget", "1", "2", "3"], "has 3 value(s) 1 2 3 but the job has 2 rank(s)"),
    (["--memory-budget", "1", "x"], "the budget for rank 1 is 'x'"),
    (["--memory-budget", "1", "0"], "the budget for rank 1 is 0"),
    (["--memory-budget", "1", "-1"], "the budget for rank 1 is -1"),
    (["--model", "/nonexistent/model.h5"], "does not exist"),
    (["--model", __file__], "is not an HDF5 file"),
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_input_stops_every_rank_with_one_message(args, message):
    start = time.monotonic()
    result = _cli(2, *args, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.count("error:") == 1, result.stderr  # once, from rank 0
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 30


def test_an_exception_on_one_rank_ends_the_job_promptly():
    script = (
        "from dllama_mpi.comm import Comm\n"
        "from dllama_mpi.cli import run_guarded\n"
        "comm = Comm()\n"
        "def job():\n"
        "    if comm.rank == 1:\n"
        "        raise RuntimeError('injected fault')\n"
        "    comm.barrier()\n"  # the other ranks wait in a collective that never completes
        "    return 0\n"
        "raise SystemExit(run_guarded(comm, job))\n"
    )
    start = time.monotonic()
    result = run_mpiexec(3, [PY, "-c", script], timeout=60)
    assert result.returncode != 0
    assert time.monotonic() - start < 20
    assert "[rank 1] ERROR: rank 1 failed" in result.stderr and "injected fault" in result.stderr
    assert result.stderr.count("Traceback") == 1, result.stderr
