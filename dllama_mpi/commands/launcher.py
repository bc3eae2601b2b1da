"""What every command that runs a job shares: the options that say how it runs (declared once,
add_job_options), a parser whose mistakes reach the user once (UsageError), and the abort
guard that turns any rank's failure into the job's exit code."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback

from ..errors import InputError, UsageError
from ..model import quant
from ..parallel.mpi_runtime import launcher_rank

log = logging.getLogger("dllama_mpi")
REFUSAL_GRACE_S = 0.5  # the other processes' pause when MPI can't start, as comm.ABORT_GRACE_S before an abort


class Parser(argparse.ArgumentParser):
    """A mistake is a UsageError, which run_guarded prints once, from rank 0 (argparse itself
    would print it on every rank and exit)."""

    def error(self, message):
        raise UsageError(f"{message}\n{self.format_usage().strip()}")


def parse_args(parser: argparse.ArgumentParser, argv: list[str], rank: int) -> argparse.Namespace:
    """`argv` parsed on every rank; --help and usage text are printed once, by rank 0."""
    if rank != 0:
        parser.print_help = parser.print_usage = lambda file=None: None
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


MODEL_FILE = "model file (.h5) made by dllama-mpi-convert, or a directory of per-rank shards"


def add_job_options(parser: argparse.ArgumentParser, model_default: str | None, model_in=None,
                    measure_buffer_types: bool = False) -> None:
    """--model, --memory-budget, --buffer-float-type, --kv-type and --nthreads, as every command
    that loads a model takes them. model_default: what leaving out --model means (None: it is
    required); model_in: the group --model belongs to (bench: beside --shape);
    measure_buffer_types: bench measures each buffer type given, one run each."""
    (model_in or parser).add_argument(
        "--model", required=model_default is None,
        help=f"{MODEL_FILE} (dllama-mpi-convert --memory-budget)" + (f"; default: {model_default}" if model_default else ""))
    parser.add_argument("--memory-budget", nargs="+", metavar="B",
                        help="one per rank: ratios (3 2 2 1) or sizes (6GiB 2GiB 2GiB 1GiB, also MB/GB/MiB: the ratio "
                             "and a hard cap); or auto (auto 6GiB 2GiB ... with caps): each rank measures its speed at "
                             "start and the model is split by it; each rank's need is checked against its cap and its "
                             "node's memory (default: equal)")
    if measure_buffer_types:
        parser.add_argument("--buffer-float-type", nargs="+", choices=quant.BUFFER_TYPES, default=["q80"],
                            help="activation buffer types to measure, one run each (default: q80)")
    else:
        parser.add_argument("--buffer-float-type", choices=quant.BUFFER_TYPES, default="q80",
                            help="activations and what travels between ranks: f32 or q80 (default q80)")
    parser.add_argument("--kv-type", choices=list(quant.KV_TYPES), default=quant.DEFAULT_KV_TYPE,
                        help="what the KV cache holds keys and values in: f32 (4 bytes a value), f16 (2, the default, "
                             "as llama.cpp's), q8_0 (8-bit codes with an fp16 scale per 32 values, or per gcd(head_dim, 32), about "
                             "1.06); "
                             "counted in the memory check and --dry-run")
    parser.add_argument("--nthreads", type=positive_int, metavar="N",
                        help="numba threads per rank (default: the rank's share of the node's cores)")


def parse_budgets(given, world_size: int):
    """--memory-budget as Budgets, one per rank (equal shares when not given)."""
    from ..parallel.budgets import parse_budgets as parse

    try:
        return parse(given or [1] * world_size, world_size)
    except InputError as exc:
        raise UsageError(str(exc)) from None


def run_job(job) -> int:
    """job(comm) on every rank of the MPI job, under run_guarded. A job MPI can't start (no
    library, a launcher it can't join) is refused by every process alone: the launcher's rank 0
    says so, once."""
    try:
        from ..parallel.comm import Comm

        comm = Comm()
    except UsageError as exc:
        setup_logging(0)
        if launcher_rank() == 0:
            print(f"error: {exc}", file=sys.stderr)
        else:  # the first process to end makes the launcher end the rest: rank 0's line goes out first
            time.sleep(REFUSAL_GRACE_S)
        return 2
    return run_guarded(comm, lambda: job(comm))


def run_alone(job) -> int:
    """job() as one process without MPI (a dry run, the encoding bench): a mistake is one
    `error:` line, printed once even where mpirun started it on several ranks, and code 2; a
    reader that went away (`| head`) ends it quietly."""
    setup_logging(0)
    try:
        return job()
    except BrokenPipeError:
        silence_stdout()
        return 141
    except InputError as exc:
        if launcher_rank() == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2


def run_guarded(comm, job) -> int:
    """The abort guard: bad input found on every rank (UsageError) -> rank 0 prints it once,
    every rank returns 2 through the normal exit. Bad input found by one rank alone
    (InputError) -> that rank logs it and aborts the job, code 2; anything else raised on one
    rank -> that rank logs its traceback and aborts the whole job, code 1, so no rank is left
    waiting in a collective."""
    setup_logging(comm.rank)
    try:
        return job()
    except UsageError as exc:
        if comm.rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        # every rank raised it: none leaves before rank 0's line is out (Open MPI's mpirun ends
        # the whole job when the first process exits with an error, its output maybe unsent)
        comm.sleeping_barrier()
        return 2
    except SystemExit:
        raise
    except InputError as exc:
        log.error("rank %d: %s", comm.rank, exc)
        comm.abort(2)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, forwarded to every rank: the first to see it ends the job
        log.error("rank %d interrupted: stopping every rank", comm.rank)
        comm.abort(130)
        return 130
    except BrokenPipeError:  # rank 0's reader went away (`| head`): end quietly, as Unix tools do
        silence_stdout()
        comm.abort(141)
        return 141
    except BaseException:
        log.error("rank %d failed:\n%s", comm.rank, traceback.format_exc().rstrip())
        comm.abort(1)
        return 1


def setup_logging(rank: int) -> None:
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


def silence_stdout() -> None:
    """After a broken pipe: stdout goes to /dev/null, so flushing at exit can't fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
