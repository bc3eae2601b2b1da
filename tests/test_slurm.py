"""The job scripts in jobs/, submitted with `sbatch --wait` to a real Slurm.

.ci/run starts a single-node Slurm (../shared/tools/local-slurm.sh) and sets
DLLAMA_REQUIRE_SLURM=1, so there a missing Slurm fails these tests; elsewhere they are
skipped with the reason.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
from conftest import NUMBA_CACHE, REPO, STORIES, launcher_env, mpi_runtime_env, need_stories, run_mpiexec

pytestmark = pytest.mark.slurm  # every test here submits to Slurm

PROMPT = "Once upon a time"
GENERATE = ["--temperature", "0", "--steps", "60", "--prompt", PROMPT]


@pytest.fixture(scope="module")
def slurm():
    problem = None
    if not shutil.which("sbatch"):
        problem = "sbatch is not installed"
    else:
        probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
        if probe.returncode != 0 or "idle" not in probe.stdout and "mixed" not in probe.stdout:
            problem = f"no Slurm node is up (sinfo: {probe.stdout.strip() or probe.stderr.strip()})"
    if problem:
        if os.environ.get("DLLAMA_REQUIRE_SLURM") == "1":
            pytest.fail(f"DLLAMA_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(f"{problem}; `../shared/tools/local-slurm.sh start` starts one")


def job_env(**more: str) -> dict:
    """The environment a job script is submitted with: this checkout, this venv, the suite's numba cache."""
    return {**os.environ, "DLLAMA_HOME": str(REPO), "DLLAMA_VENV": sys.prefix, "DLLAMA_NUMBA_CACHE": NUMBA_CACHE, **more}


def sbatch(job: str, workdir, env: dict, *options: str, timeout: float = 400) -> tuple[int, str, str]:
    """Submit jobs/<job> with sbatch --wait; (exit code, job stdout, job stderr). On timeout the
    job is cancelled and the test fails."""
    name = f"dllama-test-{uuid.uuid4().hex[:8]}"
    out, err = workdir / f"{name}.out", workdir / f"{name}.err"
    full_env = job_env(**env)
    cmd = ["sbatch", "--wait", f"--job-name={name}", "--time=00:10:00", "-D", str(workdir), "-o", str(out), "-e", str(err),
           *options, str(REPO / "jobs" / job)]
    try:
        proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name={name}"], timeout=30)
        pytest.fail(f"{job} still running after {timeout} s")
    return proc.returncode, out.read_text() if out.exists() else "", err.read_text() if err.exists() else proc.stderr


@pytest.fixture(scope="module")
def mpirun_text(stories_models):
    """The text of a plain mpirun launch (4 ranks), to compare every job's with."""
    result = run_mpiexec(4, [sys.executable, "-m", "dllama_mpi", "--model", str(stories_models["q40"]),
                             "--memory-budget", "3", "2", "2", "1", *GENERATE], timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PROMPT)
    return result.stdout


@pytest.mark.parametrize("launcher, budgets", [("srun", "3 2 2 1"), ("mpirun", "memory")])
def test_generate_job_gives_the_same_text_as_plain_mpirun(slurm, stories_models, mpirun_text, tmp_path, launcher, budgets):
    rc, out, err = sbatch("generate.sbatch", tmp_path, {
        "DLLAMA_MODEL": str(stories_models["q40"]), "DLLAMA_BUDGETS": budgets, "DLLAMA_LAUNCHER": launcher,
        "DLLAMA_PROMPT": PROMPT, "DLLAMA_STEPS": "60", "DLLAMA_ARGS": "--temperature 0"}, "--ntasks=4")
    assert rc == 0, err
    assert out == mpirun_text
    assert "4 rank(s)" in err and "Traceback" not in err
    header = next(line for line in err.splitlines() if line.startswith("job "))
    mpirun = shutil.which("mpirun", path=f"{sys.prefix}/bin:{os.environ['PATH']}")  # the venv's bin/ first, as in the job
    assert header.split("; ")[-1] == "MPI MPICH, launcher " + (
        "srun --mpi=pmi2 --kill-on-bad-exit=1" if launcher == "srun" else str(mpirun)), header
    if budgets == "memory":  # one node: four equal shares of its available memory, as sizes (caps)
        shares = err.split("--memory-budget ", 1)[1].split(";")[0].split()
        assert len(shares) == 4 and len(set(shares)) == 1 and shares[0].endswith("MiB") and int(shares[0][:-3]) > 100
        assert all(row.split()[-1] == shares[0][:-3] for row in err.splitlines()[-4:])  # peak RSS next to the cap


def test_generate_job_on_open_mpi_says_its_launcher_and_gives_the_same_text(slurm, stories_models, mpirun_text, tmp_path):
    """The venv's mpi4py pointed at Open MPI (MPI4PY_LIBMPI, PATH): the job starts it with srun --mpi=pmix where this
    Slurm can, else with Open MPI's own mpirun, and says which in its header line."""
    env = {**mpi_runtime_env("openmpi"), **launcher_env(), "DLLAMA_MODEL": str(stories_models["q40"]), "DLLAMA_PROMPT": PROMPT,
           "DLLAMA_STEPS": "60", "DLLAMA_ARGS": "--temperature 0"}
    openmpi_prefix = pathlib.Path(env["MPI4PY_LIBMPI"]).parents[1]
    rc, out, err = sbatch("generate.sbatch", tmp_path, env, "--ntasks=3")
    assert rc == 0, err
    assert out == mpirun_text  # stories260K's text is the same for every split (docs/architecture.md, Numerics)
    assert "3 rank(s)" in err and "Traceback" not in err
    header = next(line for line in err.splitlines() if line.startswith("job "))
    pmix = subprocess.run(["srun", "--mpi=pmix", "--ntasks=1", "true"], capture_output=True, text=True, timeout=60)
    if pmix.returncode == 0:
        assert header.endswith("MPI Open MPI, launcher srun --mpi=pmix --kill-on-bad-exit=1"), header
    else:  # this Slurm lists pmix but can't start it (or lacks it): Open MPI's own mpirun, and why
        assert f"MPI Open MPI, launcher {openmpi_prefix / 'bin' / 'mpirun'} --bind-to none (" in header, header
        first = (pmix.stderr.splitlines() or [""])[0]
        assert f"(srun --mpi=pmix fails here: {first}" in header, (header, pmix.stderr)


def test_convert_job_writes_shards_the_generate_job_reads(slurm, mpirun_text, tmp_path):
    need_stories()
    shards = tmp_path / "shards"
    rc, _, err = sbatch("convert.sbatch", tmp_path, {
        "DLLAMA_SOURCE": str(STORIES / "stories260K.bin"), "DLLAMA_OUTPUT": str(shards), "DLLAMA_SPLIT_BUDGETS": "3 2 2 1",
        "DLLAMA_ARGS": f"--tokenizer {STORIES / 'tok512.bin'}"})
    assert rc == 0, err
    assert sorted(p.name for p in shards.iterdir()) == [f"shard-{r}-of-4.h5" for r in range(4)]
    budgets_file = tmp_path / "budgets.txt"
    budgets_file.write_text("# rank 0: the workstation\n3\n2 2  # two laptops\n1\n")
    rc, out, err = sbatch("generate.sbatch", tmp_path, {
        "DLLAMA_MODEL": str(shards), "DLLAMA_BUDGETS_FILE": str(budgets_file), "DLLAMA_PROMPT": PROMPT,
        "DLLAMA_STEPS": "60", "DLLAMA_ARGS": "--temperature 0"}, "--ntasks=4")
    assert rc == 0, err
    assert out == mpirun_text


def test_bench_job_writes_json_for_every_point_of_the_sweep(slurm, tmp_path):
    result_file = tmp_path / "bench.json"
    rc, _, err = sbatch("bench.sbatch", tmp_path, {
        "DLLAMA_SWEEP": "1 1-1 3-2-2-1", "DLLAMA_SHAPE": "tiny", "DLLAMA_BENCH_OUT": str(result_file),
        "DLLAMA_ARGS": "--repeat 1 --decode-steps 4 --prompt-lengths 8 --buffer-float-type q80"}, "--ntasks=4")
    assert rc == 0, err
    rows = json.loads(result_file.read_text())  # (the bench's own sweep of buffer types: tests/test_bench.py)
    assert [(r["world_size"], r["budgets"], r["buffer_float_type"]) for r in rows] == [
        (1, [1], "q80"), (2, [1, 1], "q80"), (4, [3, 2, 2, 1], "q80")]
    assert all(r["decode_tokens_per_s"] > 0 and len(r["peak_rss_mb"]) == r["world_size"] for r in rows)


@pytest.mark.parametrize("budgets, message", [
    ("3 2 1", "error: --memory-budget has 3 value(s) 3 2 1 but the job has 4 rank(s)"),
    ("3 2 0 1", "error: the budget for rank 2 is 0"),
])
def test_a_job_with_an_impossible_budget_fails_with_one_clear_message(slurm, stories_models, tmp_path, budgets, message):
    rc, out, err = sbatch("generate.sbatch", tmp_path, {
        "DLLAMA_MODEL": str(stories_models["q40"]), "DLLAMA_BUDGETS": budgets}, "--ntasks=4")
    assert rc != 0
    assert err.count(message) == 1, err
    assert "Traceback" not in err and out == ""


def test_a_job_without_a_model_says_what_to_set(slurm, tmp_path):
    rc, _, err = sbatch("generate.sbatch", tmp_path, {"DLLAMA_MODEL": ""}, "--ntasks=1")
    assert rc == 2 and "error: set DLLAMA_MODEL" in err


def test_a_rank_killed_mid_generation_is_named_by_srun(slurm, tmp_path):
    from conftest import assert_no_survivors, processes_marked, write_random_model

    from dllama_mpi.model.spec import ModelSpec

    spec = ModelSpec(dim=512, hidden_dim=1408, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64, vocab_size=512,
                     seq_len=4096, weight_type="q40")
    model = write_random_model(tmp_path / "slow.h5", spec)
    mark = uuid.uuid4().hex
    out = tmp_path / "killed.out"
    env = job_env(DLLAMA_TEST_MARK=mark, DLLAMA_MODEL=str(model), DLLAMA_STEPS="3000", DLLAMA_ARGS="--ignore-eos")
    job = subprocess.Popen(["sbatch", "--wait", "--ntasks=3", "--time=00:05:00", "-D", str(tmp_path), "-o", str(out),
                            str(REPO / "jobs" / "generate.sbatch")], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out.exists() and out.stat().st_size > 2000):
        time.sleep(0.2)  # until tokens are being written
    ranks = {int(r): pid for pid, r in processes_marked(mark).items() if r != "-"}
    assert len(ranks) == 3, f"ranks not found: {ranks}"
    os.kill(ranks[1], signal.SIGKILL)
    try:
        job.wait(timeout=60)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--full", job.stdout.readline().split()[-1]], timeout=30)
        pytest.fail("the job did not end after a rank was killed")
    assert job.returncode != 0
    assert "task 1: Killed" in out.read_text()
    assert_no_survivors(mark, "the killed job")


def test_serve_job_answers_and_stops_cleanly_on_scancel(slurm, stories_models, mpirun_text, tmp_path):
    import re

    import httpx2

    name = f"dllama-test-{uuid.uuid4().hex[:8]}"
    err = tmp_path / f"{name}.err"
    env = job_env(DLLAMA_MODEL=str(stories_models["q40"]), DLLAMA_BUDGETS="3 2 2 1", DLLAMA_PORT="0", DLLAMA_API_KEY="sesame")
    subprocess.run(["sbatch", f"--job-name={name}", "--time=00:10:00", "--ntasks=4", "-D", str(tmp_path),
                    "-o", str(tmp_path / f"{name}.out"), "-e", str(err), str(REPO / "jobs" / "serve.sbatch")],
                   env=env, check=True, capture_output=True, timeout=30)
    try:
        deadline, url = time.monotonic() + 180, None
        while url is None and time.monotonic() < deadline:
            text = err.read_text() if err.exists() else ""
            if m := re.search(r"serving \S+ at http://0\.0\.0\.0:(\d+)/v1", text):
                url = f"http://127.0.0.1:{m.group(1)}/v1"
            time.sleep(0.5)
        assert url, f"the serve job did not start:\n{err.read_text() if err.exists() else ''}"
        answer = httpx2.post(url + "/completions", headers={"Authorization": "Bearer sesame"}, timeout=60,
                             json={"prompt": PROMPT, "max_tokens": 60, "temperature": 0}).json()
        assert PROMPT + answer["choices"][0]["text"] + "\n" == mpirun_text  # the 4 ranks of `3 2 2 1` write the same
    finally:
        subprocess.run(["scancel", f"--name={name}"], timeout=30)
    deadline = time.monotonic() + 60
    while subprocess.run(["squeue", "-h", "-n", name], capture_output=True, text=True, timeout=30).stdout.strip():
        assert time.monotonic() < deadline, "the serve job still runs 60 s after scancel"
        time.sleep(0.5)
    log = err.read_text()
    assert "shutting down" in log and "Traceback" not in log, log


def test_generate_job_with_auto_budgets_measures_and_says_what_it_chose(slurm, stories_models, tmp_path):
    rc, out, err = sbatch("generate.sbatch", tmp_path, {
        "DLLAMA_MODEL": str(stories_models["q40"]), "DLLAMA_BUDGETS": "auto", "DLLAMA_PROMPT": PROMPT,
        "DLLAMA_STEPS": "20", "DLLAMA_ARGS": "--temperature 0"}, "--ntasks=2")
    assert rc == 0, err
    assert out.startswith(PROMPT) and "--memory-budget auto chose" in err and "Traceback" not in err
