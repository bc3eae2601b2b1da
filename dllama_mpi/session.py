"""A ready-to-run job: validated model, plan, local weights and engine; and generation.

open_session is collective: rank 0 opens and validates the model and tokenizes the prompt,
every rank learns the outcome from one broadcast, so bad input stops every rank at once,
before anything is loaded.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import kernels
from .budgets import Budgets, available_memory
from .comm import Comm
from .engine import Engine
from .errors import InputError, UsageError
from .launch import check_fit, plan_launch
from .modelfile import ModelFile, ModelFileError, open_model
from .plan import Plan
from .tokenizer import Tokenizer
from .weights import LocalWeights, load


@dataclass
class Session:
    comm: Comm
    plan: Plan
    weights: LocalWeights
    engine: Engine
    prompt: str  # as the user typed it
    prompt_tokens: list[int]
    stop_ids: tuple[int, ...]
    tokenizer: Tokenizer | None  # rank 0 only
    load_s: float  # wall time of loading the weights (all ranks)


def _prepare(model_path, prompt: str, max_seq_len: int | None, budgets: Budgets):
    """Rank 0: open and validate the model (or its shard 0), decide the launch and tokenize
    the prompt."""
    from .synthetic import synthetic_model_path

    world_size = len(budgets.ratios)
    model = open_model(model_path if model_path is not None else synthetic_model_path(), 0, world_size)
    launch = plan_launch(model.spec, model.shard, model_path, budgets, max_seq_len)
    tokenizer = model.tokenizer()
    if (at_least := tokenizer.min_tokens(prompt)) > launch.max_seq_len:  # refused before the encoding work
        raise InputError(f"the prompt is at least {at_least} tokens ({len(prompt.encode())} bytes) but the context "
                         f"(--max-seq-len) holds {launch.max_seq_len}; shorten the prompt or raise --max-seq-len "
                         f"(model trained for {model.spec.seq_len})")
    prompt_tokens = tokenizer.encode(prompt, bos=True)
    if len(prompt_tokens) > launch.max_seq_len:
        raise InputError(f"the prompt is {len(prompt_tokens)} tokens but the context (--max-seq-len) holds "
                         f"{launch.max_seq_len}; shorten the prompt or raise --max-seq-len "
                         f"(model trained for {model.spec.seq_len})")
    if not prompt_tokens:
        raise InputError("the prompt is empty and this model's tokenizer adds no BOS token; give --prompt TEXT")
    stop_ids = tuple(sorted(set(tokenizer.eos_ids)))
    return (launch, prompt_tokens, stop_ids, model.model_id, model.shard), model, tokenizer


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


def open_session(comm: Comm, model_path: str | Path | None, budgets: Budgets | tuple[int, ...], *,
                 prompt: str = "", max_seq_len: int | None = None, buffer_type: str = "q80",
                 announce=None) -> Session:
    """Collective. `model_path` None means the built-in synthetic model; a directory means
    per-rank shards. Plain tuples are ratios without caps. Before anything is loaded, every
    rank's need is checked against its cap and its node's available memory.
    `announce(launch)` runs on rank 0 once the launch is decided, before loading."""
    if not isinstance(budgets, Budgets):
        budgets = Budgets(tuple(budgets), None)
    setup, model, tokenizer = None, None, None
    if comm.rank == 0:
        try:
            setup, model, tokenizer = _prepare(model_path, prompt, max_seq_len, budgets)
        except InputError as exc:
            setup = str(exc)
    comm.sleeping_barrier()  # the others sleep while rank 0 reads and tokenizes (a collective would spin)
    setup = comm.bcast_obj(setup)
    if isinstance(setup, str):
        raise UsageError(setup)
    launch, prompt_tokens, stop_ids, model_id, shard = setup
    plan = launch.plan
    if shard is not None:
        model = _check_shards(comm, model_path, plan, model_id, model)
    check_fit(launch, budgets, comm.hosts, comm.allgather_obj(available_memory()))
    if comm.rank == 0 and announce is not None:
        announce(launch)
    # numba compiles once, on rank 0, into its cache; the other ranks then load it
    if comm.rank == 0:
        with _said_if_slow(f"compiling kernels (once; cached in {kernels.cache_dir()})"):
            kernels.warm_up()
    comm.sleeping_barrier()  # a spinning wait would take cores from the compiler
    if comm.rank != 0:
        kernels.warm_up()
    t_load = time.perf_counter()
    with _said_if_slow(f"loading the weights ({plan.weight_bytes(0) / 2**20:.0f} MiB on rank 0)", comm.rank == 0):
        weights = load(comm, plan, model)
    if model is not None:
        model.close()
    comm.barrier()
    load_s = time.perf_counter() - t_load
    engine = Engine(comm, plan, weights, launch.max_seq_len, buffer_type)
    return Session(comm, plan, weights, engine, prompt, prompt_tokens, stop_ids, tokenizer, load_s)


@contextlib.contextmanager
def _said_if_slow(doing: str, speaks: bool = True, after_s: float = 2.0):
    """On the rank that `speaks` (rank 0 owns the terminal), tell what a wait is for when it
    lasts (loading cached kernels takes well under `after_s`; compiling them takes about a
    minute on 2 cores; a long prompt or a big model can take longer)."""
    if not speaks:
        yield
        return
    t0, said = time.perf_counter(), threading.Event()

    def say():
        print(f"{doing} ...", file=sys.stderr, flush=True)
        said.set()

    timer = threading.Timer(after_s, say)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()  # a notice being printed finishes first
        if said.is_set():
            print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def generate(session: Session, steps: int, sampler, stop_ids=None, stream: bool = False) -> dict:
    """Feed the prompt in blocks (batched prefill), then sample `steps` tokens one at a time
    (fewer at a stop token or the end of the context). `sampler` (rank 0 only) maps logits
    to a token id. With `stream`, rank 0 writes the text to stdout as it is produced.
    Returns the generated ids (every rank) and timings."""
    comm, engine, prompt_tokens = session.comm, session.engine, session.prompt_tokens
    stop_ids = session.stop_ids if stop_ids is None else tuple(stop_ids)
    token_buf = np.zeros(1, np.int64)
    n_prompt = len(prompt_tokens)
    decoder = session.tokenizer.stream() if stream and session.tokenizer is not None else None
    generated: list[int] = []
    t0 = time.perf_counter()
    logits = None
    with _said_if_slow(f"processing the prompt ({n_prompt} tokens)", decoder is not None):
        for start in range(0, n_prompt if steps else 0, engine.max_batch):
            block = np.asarray(prompt_tokens[start : start + engine.max_batch], np.int64)
            logits = engine.forward_block(block, start, logits=start + len(block) == n_prompt)
    t_first = time.perf_counter()
    if decoder is not None:  # the prompt as typed, whatever the tokenizer added to it (BOS) or not
        sys.stdout.write(session.prompt)
        sys.stdout.flush()
    token, pos = prompt_tokens[-1], n_prompt
    while steps:
        if comm.rank == 0:
            token_buf[0] = sampler(logits)
        comm.bcast(token_buf, 0)
        nxt = int(token_buf[0])
        generated.append(nxt)
        if nxt in stop_ids:
            break
        if decoder is not None:
            sys.stdout.write(decoder.feed(token, nxt))
            sys.stdout.flush()
        if len(generated) == steps or pos == engine.max_seq_len:
            break
        token = nxt
        logits = engine.forward(token, pos)
        pos += 1
    t_end = time.perf_counter()
    if decoder is not None:
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
    stopped = bool(generated) and generated[-1] in stop_ids
    n_decode = max(0, len(generated) - 1)  # forward passes after the prompt's (the last token is not fed back)
    return {
        "generated": generated, "n_prompt": n_prompt, "hit_context": bool(steps) and len(generated) < steps and not stopped,
        "prompt_s": t_first - t0 if steps else None, "decode_s": t_end - t_first, "n_decode": n_decode,
        "n_forward": (n_prompt + n_decode) if steps else 0,
    }
