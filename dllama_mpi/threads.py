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
