"""Runs the pytest-mpi suites under mpiexec -n 2, 3 and 4, each under a hard timeout: 2 and 4
under the venv's MPI, 3 under Open MPI (tests/test_mpi_runtimes.py runs this file with
DLLAMA_TEST_MPIEXEC naming Open MPI's mpiexec), so each size runs once in the suite."""

from __future__ import annotations

import os
import sys

import pytest
from conftest import REPO, run_mpiexec

pytestmark = pytest.mark.jobs  # every test here starts MPI jobs


@pytest.mark.parametrize("n", [3] if os.environ.get("DLLAMA_TEST_MPIEXEC") else [2, 4])
def test_mpi_suite_passes_under_mpiexec(n):
    result = run_mpiexec(n, [sys.executable, "-m", "pytest", "-q", "--only-mpi", "-p", "no:cacheprovider",
                             str(REPO / "tests" / "test_mpi_engine.py")], timeout=600)
    summary = result.stdout.strip().splitlines()[-1:] or ["(no output)"]
    assert result.returncode == 0, f"{summary}\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert " passed" in result.stdout and " failed" not in result.stdout
