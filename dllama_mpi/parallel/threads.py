"""Thread pool policy for numba kernels.

Ranks oversubscribe cores (4 ranks on 2 cores is normal), so an idle worker thread must
sleep, not spin. Each rank's pool is sized to its share of the node's cores. When the
node's ranks x threads fit its cores, OpenMP workers spin briefly (GOMP_SPINCOUNT 20000,
about the gap between two kernels of one token) before sleeping, which saves a futex wake-up
per kernel; when they don't fit, workers sleep at once (a spinning worker holds the core that
another rank's thread is waiting for). libgomp reads this when numba first starts its pool,
which set_threads does.
"""

from __future__ import annotations

import os

import numba

from .. import cgroups

# the OpenMP layer honours the passive policy; set here, not by environment, so it holds
# even when numba was imported before this module
numba.config.THREADING_LAYER = os.environ.get("NUMBA_THREADING_LAYER", "omp")


def node_cores() -> int:
    """The cores this process may use: its CPU affinity, or fewer where its cgroup's CPU
    quota allows less time (a container's --cpus 2 on a 64-core host is 2; at least one)."""
    cores = len(os.sched_getaffinity(0))
    quota = cgroups.cpu_quota()
    return cores if quota is None else max(1, min(cores, int(quota[0])))


def share_of_cores(local_rank: int, local_size: int, cores: int | None = None) -> int:
    """This rank's share of the node's cores: cores split as evenly as possible over the
    ranks on the node, at least one thread each."""
    cores = node_cores() if cores is None else cores
    base, extra = divmod(cores, local_size)
    return max(1, base + (1 if local_rank < extra else 0))


SPIN_WHEN_CORES_SUFFICE = 20000


def set_threads(n: int, ranks_on_node: int = 1) -> int:
    """Size numba's pool for this process (first call: also choose how its workers wait);
    returns the count in effect. A GOMP_SPINCOUNT set by the user is kept."""
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    fits = n * ranks_on_node <= node_cores()
    os.environ.setdefault("GOMP_SPINCOUNT", str(SPIN_WHEN_CORES_SUFFICE if fits else 0))
    numba.set_num_threads(n)
    return n


# A parallel region wakes sleeping workers, which costs as much time as a small product's
# multiply-adds; a product with less work than this runs serially on the calling thread (no
# parallel region at all). Which thread computes a row never changes its value, only the time.
PARALLEL_MIN_WORK = 2**18


class Pool:
    """Whether a kernel call goes to the rank's thread pool, by the size of its work."""

    def __init__(self, n_threads: int | None = None):
        self.n_threads = numba.get_num_threads() if n_threads is None else n_threads

    def parallel(self, work: int) -> bool:
        return self.n_threads > 1 and work >= PARALLEL_MIN_WORK


def for_rank(local_rank: int, local_size: int, requested: int | None = None) -> int:
    """Size this rank's pool: `requested` (--nthreads) or its share of the node's cores."""
    return set_threads(requested or share_of_cores(local_rank, local_size), local_size)
