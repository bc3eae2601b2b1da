"""A ready-to-run job: validated model, plan, local weights and engine; and generation.

open_session is collective: rank 0 opens and validates the model and tokenizes the prompt,
every rank learns the outcome from one broadcast, so bad input stops every rank at once,
before anything is loaded.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import kernels
from .budgets import Budgets, available_memory, fit_problems
from .comm import Comm
from .engine import Engine
from .modelfile import ModelFile, ModelFileError, largest_tensor_bytes, open_model
from .plan import Plan, make_plan
from .tokenizer import Tokenizer
from .weights import LocalWeights, load

DEFAULT_MAX_SEQ_LEN = 4096  # KV cache length unless --max-seq-len says otherwise (<= the model's)


class UsageError(Exception):
    """Bad input, detected identically on every rank (or agreed on through rank 0): every
    rank exits with code 2 and rank 0 prints the message once."""


@dataclass
class Session:
    comm: Comm
    plan: Plan
    weights: LocalWeights
    engine: Engine
    prompt_tokens: list[int]
    stop_ids: tuple[int, ...]
    tokenizer: Tokenizer | None  # rank 0 only
    load_s: float  # wall time of loading the weights (all ranks)


def _prepare(model_path, prompt: str, max_seq_len: int | None, world_size: int):
    """Rank 0: open and validate the model (or its shard 0) and tokenize the prompt."""
    from .synthetic import synthetic_model_path

    model = open_model(model_path if model_path is not None else synthetic_model_path(), 0, world_size)
    tokenizer = model.tokenizer()
    spec = model.spec
    max_seq_len = max_seq_len or min(spec.seq_len, DEFAULT_MAX_SEQ_LEN)
    prompt_tokens = tokenizer.encode(prompt, bos=True)
    if len(prompt_tokens) > max_seq_len:
        raise ValueError(f"the prompt is {len(prompt_tokens)} tokens but the context (--max-seq-len) holds "
                         f"{max_seq_len}; shorten the prompt or raise --max-seq-len (model trained for {spec.seq_len})")
    if not prompt_tokens:
        raise ValueError("the prompt is empty and this model's tokenizer adds no BOS token; give --prompt TEXT")
    stop_ids = tuple(sorted(set(tokenizer.eos_ids)))
    return (spec, max_seq_len, prompt_tokens, stop_ids, model.model_id, model.shard), model, tokenizer


def shard_mismatch(model_path, shard, plan: Plan) -> str | None:
    """Why shards split by another plan can't serve `plan`, or None."""
    _, count, budgets, plan_hash = shard
    if count == plan.world_size and plan_hash == plan.plan_hash():
        return None
    return (f"the shards in {model_path} were split for {count} rank(s) with budgets {' '.join(map(str, budgets))} "
            f"(plan {plan_hash}); this launch has {plan.world_size} rank(s) with budgets "
            f"{' '.join(map(str, plan.budgets))} (plan {plan.plan_hash()}). Relaunch with "
            f"mpirun -n {count} ... --memory-budget {' '.join(map(str, budgets))}, or run the unsplit model file")


def _check_shards(comm: Comm, model_path, plan: Plan, shard, model_id: str, model: ModelFile | None) -> ModelFile:
    """Collective: the shards were split by this launch's plan, and every rank's own shard is
    of the same model and complete. Returns this rank's shard, open."""
    if problem := shard_mismatch(model_path, shard, plan):
        raise UsageError(problem)
    problem = None
    try:
        if model is None:
            model = open_model(model_path, comm.rank, comm.size)
        if model.model_id != model_id or model.shard is None or model.shard[0] != comm.rank:
            raise ModelFileError(f"{model.path} is not shard {comm.rank} of the model in shard 0 "
                                 f"(model {model.model_id} vs {model_id}); convert the shards again")
        model.check_tensors(plan, comm.rank)
    except ModelFileError as exc:
        problem = str(exc)
    problems = [p for p in comm.allgather_obj(problem) if p]
    if problems:
        raise UsageError("; ".join(problems))
    return model


def _check_fit(comm: Comm, plan: Plan, budgets: Budgets, max_seq_len: int, load_buffer: int) -> None:
    """Collective: every rank's need within its cap and its node's available memory."""
    available = comm.allgather_obj(available_memory())
    problems = fit_problems(plan, budgets, max_seq_len, load_buffer, comm.hosts, available)
    if problems:
        raise UsageError("the plan does not fit in memory:\n  " + "\n  ".join(problems))


def open_session(comm: Comm, model_path: str | Path | None, budgets: Budgets | tuple[int, ...], *,
                 prompt: str = "", max_seq_len: int | None = None, buffer_type: str = "q80",
                 announce=None) -> Session:
    """Collective. `model_path` None means the built-in synthetic model; a directory means
    per-rank shards. Plain tuples are ratios without caps. Before anything is loaded, every
    rank's need is checked against its cap and its node's available memory.
    `announce(plan, max_seq_len)` runs on rank 0 once the plan is known, before loading."""
    if not isinstance(budgets, Budgets):
        budgets = Budgets(tuple(budgets), None)
    setup, model, tokenizer = None, None, None
    if comm.rank == 0:
        try:
            setup, model, tokenizer = _prepare(model_path, prompt, max_seq_len, comm.size)
        except (ModelFileError, ValueError) as exc:
            setup = str(exc)
    setup = comm.bcast_obj(setup)
    if isinstance(setup, str):
        raise UsageError(setup)
    spec, max_seq_len, prompt_tokens, stop_ids, model_id, shard = setup
    plan = make_plan(spec, budgets.ratios)
    if shard is not None:
        model = _check_shards(comm, model_path, plan, shard, model_id, model)
    _check_fit(comm, plan, budgets, max_seq_len, load_buffer=0 if shard is not None else largest_tensor_bytes(spec))
    if comm.rank == 0 and announce is not None:
        announce(plan, max_seq_len)
    # numba compiles once, on rank 0, into its cache; the other ranks then load it
    if comm.rank == 0:
        kernels.warm_up()
    comm.barrier()
    if comm.rank != 0:
        kernels.warm_up()
    t_load = time.perf_counter()
    weights = load(comm, plan, model)
    if model is not None:
        model.close()
    comm.barrier()
    load_s = time.perf_counter() - t_load
    engine = Engine(comm, plan, weights, max_seq_len, buffer_type)
    return Session(comm, plan, weights, engine, prompt_tokens, stop_ids, tokenizer, load_s)


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
    if decoder is not None:
        for prev, tok in zip(prompt_tokens, prompt_tokens[1:]):
            sys.stdout.write(decoder.feed(prev, tok))
        sys.stdout.flush()
    generated: list[int] = []
    t0 = time.perf_counter()
    logits = None
    if steps:
        for start in range(0, n_prompt, engine.max_batch):
            block = np.asarray(prompt_tokens[start : start + engine.max_batch], np.int64)
            logits = engine.forward_block(block, start, logits=start + len(block) == n_prompt)
    t_first = time.perf_counter()
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
    return {
        "generated": generated, "n_prompt": n_prompt, "hit_context": bool(steps) and len(generated) < steps and not stopped,
        "prompt_s": t_first - t0, "decode_s": t_end - t_first, "n_decode": max(0, len(generated) - 1),
    }
