"""`python -m dllama_mpi which-mpi`: which MPI a job started here would use (the library mpi4py
loads, the runtime wheels installed, the mpiexec on PATH and whether they agree), without
starting MPI. `--family` prints one word for scripts (jobs/common.sh picks srun's plugin by it)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..parallel import mpi_runtime
from .launcher import Parser, run_alone


def report() -> list[str]:
    """The lines `which-mpi` prints; a line starting with `note:` is something to fix."""
    from ..parallel.comm import MPI4PY_VERSION, library

    lib = library()
    lines = [f"MPI library: {lib.describe()}, loaded by mpi4py {MPI4PY_VERSION}"
             + (f" (MPI4PY_LIBMPI={os.environ['MPI4PY_LIBMPI']})" if "MPI4PY_LIBMPI" in os.environ else "")]
    runtimes = mpi_runtime.installed_runtimes()
    lines.append("runtime wheels in this environment: " + (", ".join(f"{r.distribution} {r.version}" for r in runtimes)
                                                         or "none (a site MPI, or one on LD_LIBRARY_PATH)"))
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        lines.append("mpiexec on PATH: none")
    else:
        owner = mpi_runtime.launcher_owner(Path(mpiexec), runtimes)
        family = mpi_runtime.launcher_from_version(_version_text(mpiexec))
        what = f"{owner.distribution} {owner.version}'s wheel" if owner else "not from a wheel here"
        lines.append(f"mpiexec on PATH: {mpiexec} ({what}; {mpi_runtime.FAMILY_NAMES.get(family, 'an unknown MPI')}'s launcher)")
        if family is not None and mpi_runtime.mismatch_before_start(lib, _launch_by(family)):
            lines.append(f"note: this mpiexec is {mpi_runtime.FAMILY_NAMES[family]}'s, whose jobs {lib} can't join: a job "
                         f"it starts is refused before loading; use {mpi_runtime.launcher_for(lib)}")
    lines.append(f"launch with: {mpi_runtime.launcher_for(lib)}")
    for note in (mpi_runtime.shadowing(runtimes, lib),
                 mpi_runtime.hidden_site_library(lib, sys.prefix, os.environ.get("LD_LIBRARY_PATH", ""))):
        if note:
            lines.append(f"note: {note}")
    return lines


def _launch_by(family: str) -> mpi_runtime.Launch:
    """A process as that family's mpiexec starts it (the rules of mpi_runtime.mismatch_before_start)."""
    if family == "openmpi":
        return mpi_runtime.Launch("openmpi", "Open MPI's mpirun", "pmix", 0, None)
    return mpi_runtime.Launch("hydra", f"{mpi_runtime.FAMILY_NAMES[family]}'s mpiexec (Hydra)", "pmi", 0, None)


def srun_plugin() -> str:
    """srun's --mpi for the library mpi4py loads, or nothing for the site's default."""
    from ..parallel.comm import library

    lib = library()
    return mpi_runtime.srun_plugin(lib, mpi_runtime.from_environment(lib, sys.prefix)) or ""


def _version_text(mpiexec: str) -> str:
    try:
        return subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m dllama_mpi which-mpi", allow_abbrev=False,
                    description="Which MPI a job started from here would use, without starting MPI.")
    parser.add_argument("--family", action="store_true",
                        help="print only the library's family: mpich (MPICH and its ABI), openmpi, impi or other")
    parser.add_argument("--srun-mpi", action="store_true",
                        help="print only srun's --mpi for that library (pmi2, pmix), or an empty line for the site's "
                             "default; after --family's line where both are given (jobs/common.sh)")
    return parser


def main(argv=None) -> int:
    def job() -> int:
        from ..parallel.comm import library

        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        if args.family or args.srun_mpi:
            print("\n".join(([library().family] if args.family else []) + ([srun_plugin()] if args.srun_mpi else [])))
        else:
            print("\n".join(report()))
        return 0

    return run_alone(job)
