"""Run the engine on a model and token ids under any mpiexec; rank 0 saves what it produced.

    mpiexec -n 3 python tests/engine_dump.py MODEL OUT.npz --budgets 2 1 1 --tokens 1 5 9 \
        [--steps 32] [--buffer f32|q80]

OUT.npz holds `logits` (one row per prompt token) and `greedy` (ids of a greedy
continuation of `steps` tokens). Used by serial tests to compare the engine, run on any
split, with an independent implementation (transformers) or with another file of the model.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from dllama_mpi.commands.launcher import run_guarded
from dllama_mpi.job.loading import open_job
from dllama_mpi.model import quant
from dllama_mpi.parallel.comm import Comm
from dllama_mpi.parallel.threads import set_threads
from dllama_mpi.serving.scheduler import generate


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--budgets", nargs="+", type=int, required=True)
    p.add_argument("--tokens", nargs="+", type=int, required=True)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--buffer", default="f32")
    p.add_argument("--kv-type", default=quant.DEFAULT_KV_TYPE, choices=quant.KV_TYPES)
    args = p.parse_args()
    comm = Comm()
    set_threads(1)

    def job():
        job = open_job(comm, args.model, tuple(args.budgets), buffer_type=args.buffer,
                       max_seq_len=len(args.tokens) + args.steps + 1, kv_type=args.kv_type)
        rows = []
        for pos, t in enumerate(args.tokens):
            out = job.engine.forward(t, pos)
            rows.append(None if out is None else out.copy())  # the engine reuses its logits buffer
        logits = np.stack(rows) if comm.rank == 0 else None
        greedy = []
        if args.steps:
            job = open_job(comm, args.model, tuple(args.budgets), buffer_type=args.buffer,
                           max_seq_len=len(args.tokens) + args.steps + 1, kv_type=args.kv_type)
            greedy = generate(job, list(args.tokens) if comm.rank == 0 else None, args.steps, stop_ids=())["generated"]
        if comm.rank == 0:
            np.savez(args.out, logits=logits, greedy=np.array(greedy, dtype=np.int64))
        return 0

    return run_guarded(comm, job)


if __name__ == "__main__":
    sys.exit(main())
