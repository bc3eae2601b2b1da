"""A clock for speed.measure that counts work instead of time, so that what a rank measures,
and the split chosen from it, are known exactly however fast or busy the machine is.

    WORK_CLOCK="S_PER_WEIGHT,S_PER_PRODUCT ..." mpiexec -n N python tests/work_clock.py ARGS...

runs `python -m dllama_mpi ARGS...` with rank r's measurement on a WorkClock of the r-th pair.
"""

from __future__ import annotations

import functools
import os
import sys


class WorkClock:
    """A clock that moves only when a timed matrix product runs: by s_per_weight per weight of
    its matrix, plus s_per_product. The products still run, on the real kernels."""

    def __init__(self, s_per_weight: float, s_per_product: float):
        self.s_per_weight, self.s_per_product = s_per_weight, s_per_product
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def counting(self, matmul):
        """`matmul` that advances this clock by the product it ran."""

        def counted(pool, lanes, m, x, n, out):
            matmul(pool, lanes, m, x, n, out)
            self.now += m.rows * m.cols * self.s_per_weight + self.s_per_product

        return counted

    def token_s(self, spec, share: float) -> float:
        """What one token at `share` of every matrix's rows costs on this clock (shares whose rows
        are whole numbers), counted from the model's shapes: per layer wq, wk, wv in one product,
        wo, w1 and w3 in one, w2; then the classifier."""
        kv_dim = spec.n_kv_heads * spec.head_dim
        layer = spec.dim * (spec.q_dim + 2 * kv_dim) + spec.q_dim * spec.dim + 3 * spec.hidden_dim * spec.dim
        weights = spec.n_layers * layer + spec.vocab_size * spec.dim
        return share * weights * self.s_per_weight + (4 * spec.n_layers + 1) * self.s_per_product


def main() -> int:
    from mpi4py import MPI

    from dllama_mpi.commands import cli
    from dllama_mpi.job import speed

    pairs = os.environ["WORK_CLOCK"].split()
    clock = WorkClock(*map(float, pairs[MPI.COMM_WORLD.Get_rank()].split(",")))
    speed.matmul = clock.counting(speed.matmul)
    speed.measure = functools.partial(speed.measure, clock=clock)
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
