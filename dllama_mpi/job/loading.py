"""A loaded job: validated model, plan, local weights, engine and (rank 0) tokenizer. It
serves any number of requests (scheduler.py); loading is not a request.

open_job is collective: rank 0 opens and validates the model, every rank learns the
outcome from one broadcast, so bad input stops every rank at once, before anything is
loaded.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, UsageError
from ..files.modelfile import ModelFile, ModelFileError, open_model
from ..files.tokenizer import Tokenizer
from ..kernels import vector
from ..model import quant
from ..parallel.budgets import Budgets, available_memory
from ..parallel.comm import Comm
from ..parallel.plan import Plan
from . import autobudget
from .autobudget import AutoChoice
from .engine import Engine
from .launch import check_fit, plan_launch
from .weights import LocalWeights, load


@dataclass
class Job:
    comm: Comm
    plan: Plan
    weights: LocalWeights
    engine: Engine
    tokenizer: Tokenizer | None  # rank 0 only
    stop_ids: tuple[int, ...]  # the model's end-of-generation tokens
    model_id: str  # the model's content hash (shards check theirs against it)
    name: str  # what clients call it by default: the file's (or shard directory's) name
    load_s: float  # wall time of loading the weights (all ranks)
    auto: AutoChoice | None = None  # with --memory-budget auto: the measurement and its prediction


def _prepare(model_path, max_seq_len: int | None, budgets: Budgets, n_slots: int, kv_type: str, check):
    """Rank 0: open and validate the model (or its shard 0), decide the launch and run
    `check(tokenizer, launch)`, which refuses what it must with InputError."""
    from ..files.synthetic import synthetic_model_path

    world_size = len(budgets.ratios)
    model = open_model(model_path if model_path is not None else synthetic_model_path(), 0, world_size)
    launch = plan_launch(model.spec, model.shard, model_path, budgets, max_seq_len, n_slots, kv_type=kv_type)
    tokenizer = model.tokenizer()
    if check is not None:
        check(tokenizer, launch)
    # a tokenizer builds its decode tables at its first decode (Llama 3's 128k vocabulary: about
    # 3 s): here, as part of starting, not inside the first request's time to its first text
    tokenizer.decode(0, 0)
    tokenizer.min_tokens("")  # likewise its longest entry, which bounds a prompt before encoding it
    stop_ids = tuple(sorted(set(tokenizer.eos_ids)))
    return (launch, stop_ids, model.model_id, model.shard), model, tokenizer


def _check_shards(comm: Comm, model_path, plan: Plan, model_id: str, model: ModelFile | None) -> ModelFile:
    """Collective: every rank's own shard is of the same model and split as shard 0 and
    complete (that shard 0's split is this launch's plan, plan_launch checked). Returns this
    rank's shard, open."""
    problem = None
    try:
        if model is None:
            model = open_model(model_path, comm.rank, comm.size)
        model.check_shard(comm.rank, plan, model_id)
    except ModelFileError as exc:
        problem = str(exc)
    problems = [p for p in comm.allgather_obj(problem) if p]
    if problems:
        raise UsageError("; ".join(problems))
    return model


def open_job(comm: Comm, model_path: str | Path | None, budgets: Budgets | tuple[int, ...], *,
             max_seq_len: int | None = None, buffer_type: str = "q80", n_slots: int = 1,
             check=None, announce=None, max_logits: int | None = None, kv_type: str = quant.DEFAULT_KV_TYPE) -> Job:
    """Collective. `model_path` None means the built-in synthetic model; a directory means
    per-rank shards. Plain tuples are ratios without caps. `n_slots`: sequences the KV cache
    holds at once; `kv_type`: what it holds them in (quant.KV_TYPES). Before anything is
    loaded, every rank's need (the KV cache of every slot included) is checked against its cap
    and its node's available memory. On rank 0, `check(tokenizer, launch)` may refuse the
    launch with InputError (the CLI checks its prompt there) and `announce(launch)` runs once
    the launch is decided, before loading. `max_logits`: rows of one step that may return
    logits (Engine's; default one per slot)."""
    if not isinstance(budgets, Budgets):
        budgets = Budgets(tuple(budgets), None)
    auto = None
    if budgets.auto:
        auto = autobudget.choose(comm, model_path, budgets, max_seq_len, buffer_type, n_slots, kv_type)
        budgets = auto.budgets
    setup, model, tokenizer = None, None, None
    if comm.rank == 0:
        try:
            setup, model, tokenizer = _prepare(model_path, max_seq_len, budgets, n_slots, kv_type, check)
        except InputError as exc:
            setup = str(exc)
    comm.sleeping_barrier()  # the others sleep while rank 0 reads the model (a collective would spin)
    setup = comm.bcast_obj(setup)
    if isinstance(setup, str):
        raise UsageError(setup)
    launch, stop_ids, model_id, shard = setup
    plan = launch.plan
    if shard is not None:
        model = _check_shards(comm, model_path, plan, model_id, model)
    check_fit(launch, budgets, comm.hosts, comm.allgather_obj(available_memory()))
    if comm.rank == 0 and announce is not None:
        announce(launch)
    # numba compiles once, on rank 0, into its cache; the other ranks then load it
    if comm.rank == 0:
        with SaidIfSlow(f"compiling kernels (once; cached in {vector.cache_dir()})"):
            vector.warm_up(plan.spec.weight_types(), (launch.kv_type,), plan.spec.moe)
    comm.sleeping_barrier()  # a spinning wait would take cores from the compiler
    if comm.rank != 0:
        vector.warm_up(plan.spec.weight_types(), (launch.kv_type,), plan.spec.moe)
    t_load = time.perf_counter()
    with SaidIfSlow(f"loading the weights ({plan.weight_bytes(0) / 2**20:.0f} MiB on rank 0)", comm.rank == 0):
        weights = load(comm, plan, model)
    if model is not None:
        model.close()
    comm.barrier()
    load_s = time.perf_counter() - t_load
    engine = Engine(comm, plan, weights, launch.max_seq_len, buffer_type, n_slots=n_slots, max_logits=max_logits,
                    kv_type=kv_type)
    name = Path(model_path).stem if model_path is not None else "synthetic"
    return Job(comm, plan, weights, engine, tokenizer, stop_ids, model_id, name, load_s, auto)


class SaidIfSlow:
    """On the rank that `speaks` (rank 0 owns the terminal), tell what a wait is for when it
    lasts (loading cached kernels takes well under `after_s`; compiling them takes about a
    minute on 2 cores; a long prompt or a big model can take longer). A context manager, or
    start() and done() (done() may come early, e.g. at the first generated token)."""

    def __init__(self, doing: str, speaks: bool = True, after_s: float = 2.0):
        self.doing, self.speaks, self.after_s = doing, speaks, after_s
        self._timer: threading.Timer | None = None
        self._said = threading.Event()

    def _say(self) -> None:
        print(f"{self.doing} ...", file=sys.stderr, flush=True)
        self._said.set()

    def start(self) -> SaidIfSlow:
        if self.speaks:
            self._t0 = time.perf_counter()
            self._timer = threading.Timer(self.after_s, self._say)
            self._timer.start()
        return self

    def done(self) -> None:
        if self._timer is None:
            return
        self._timer.cancel()
        self._timer.join()  # a notice being printed finishes first
        self._timer = None
        if self._said.is_set():
            print(f"done in {time.perf_counter() - self._t0:.0f} s", file=sys.stderr)

    def __enter__(self) -> SaidIfSlow:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.done()
