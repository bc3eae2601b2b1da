"""Thread pool policy for numba kernels.

Ranks oversubscribe cores (4 ranks on 2 cores is normal), so an idle worker thread must
sleep, not spin: OpenMP's passive wait policy (read by the OpenMP runtime when numba first
starts its pool), and a pool sized to this rank's share of the node's cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "0")

import numba

# the OpenMP layer honours the passive policy; set here, not by environment, so it holds
# even when numba was imported before this module
numba.config.THREADING_LAYER = os.environ.get("NUMBA_THREADING_LAYER", "omp")


def node_cores() -> int:
    return len(os.sched_getaffinity(0))


def share_of_cores(local_rank: int, local_size: int, cores: int | None = None) -> int:
    """This rank's share of the node's cores: cores split as evenly as possible over the
    ranks on the node, at least one thread each."""
    cores = node_cores() if cores is None else cores
    base, extra = divmod(cores, local_size)
    return max(1, base + (1 if local_rank < extra else 0))


def set_threads(n: int) -> int:
    """Size numba's pool for this process; returns the count in effect."""
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


# Waking a sleeping worker costs tens of microseconds (about 45 us per parallel region
# measured on 2 cores), the time of roughly 2**17 Q40 multiply-adds; a kernel with less than
# twice that work runs on the calling thread alone. Which thread computes a row never changes
# its value, only the time.
PARALLEL_MIN_WORK = 2**18


class Pool:
    """The rank's thread budget, applied per kernel call by the size of its work."""

    def __init__(self, n_threads: int | None = None):
        self._current = numba.get_num_threads()
        self.n_threads = self._current if n_threads is None else n_threads

    def size_for(self, work: int) -> None:
        n = self.n_threads if work >= PARALLEL_MIN_WORK else 1
        if n != self._current:
            numba.set_num_threads(n)
            self._current = n
