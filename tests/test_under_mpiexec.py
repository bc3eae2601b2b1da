"""Runs the pytest-mpi suites under mpiexec -n 2, 3 and 4, each under a hard timeout."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO, run_mpiexec

pytestmark = pytest.mark.jobs  # every test here starts MPI jobs


@pytest.mark.parametrize("n", [2, 3, 4])
def test_mpi_suite_passes_under_mpiexec(n):
    result = run_mpiexec(n, [sys.executable, "-m", "pytest", "-q", "--only-mpi", "-p", "no:cacheprovider",
                             str(REPO / "tests" / "test_mpi_engine.py")], timeout=600)
    summary = result.stdout.strip().splitlines()[-1:] or ["(no output)"]
    assert result.returncode == 0, f"{summary}\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert " passed" in result.stdout and " failed" not in result.stdout
