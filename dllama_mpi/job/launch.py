"""The start-up rules of a launch, decided before anything is loaded. Pure: no MPI here.

The job (job.open_job) and `--dry-run` both derive the plan, the context length,
the load buffer and the memory check from these functions, so a dry run tells exactly what
a launch would do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..files.modelfile import largest_tensor_bytes
from ..model.spec import ModelSpec
from ..parallel.budgets import Budgets, fit_problems
from ..parallel.plan import Plan, make_plan

DEFAULT_MAX_SEQ_LEN = 4096  # KV cache length unless --max-seq-len says otherwise (<= the model's)


@dataclass(frozen=True)
class Launch:
    plan: Plan
    max_seq_len: int  # KV cache length in tokens, per slot
    n_slots: int  # sequences the KV cache holds at once
    kv_type: str  # what the KV cache holds its keys and values in (quant.KV_TYPES)
    load_buffer: int  # bytes rank 0 holds at once while scattering an unsplit file (0 for shards)
    notes: tuple[str, ...]  # what rank 0 tells the user before loading


def plan_launch(spec: ModelSpec, shard, model_path, budgets: Budgets, max_seq_len: int | None,
                n_slots: int = 1, *, kv_type: str) -> Launch:
    """The plan and context of a launch over len(budgets.ratios) ranks, its KV cache in
    `kv_type`. `shard` is the model file's (rank, count, budgets, plan_hash), or None for a
    whole model file. UsageError when shards can't serve this launch."""
    plan = make_plan(spec, budgets.ratios)
    if shard is not None:
        if model_path is not None and Path(model_path).is_file() and shard[1] > 1:
            raise UsageError(f"{model_path} is shard {shard[0]} of {shard[1]}, one rank's part of the model; pass the "
                             f"directory that holds all {shard[1]} shards: --model {Path(model_path).parent}")
        if problem := shard_mismatch(model_path, shard, plan):
            raise UsageError(problem)
    notes = []
    if max_seq_len is None:
        max_seq_len = min(spec.seq_len, DEFAULT_MAX_SEQ_LEN)
    elif max_seq_len > spec.seq_len:
        notes.append(f"--max-seq-len {max_seq_len} is beyond the {spec.seq_len} tokens the model was trained for; "
                     "what it writes past that length is undefined")
    return Launch(plan, max_seq_len, n_slots, kv_type, 0 if shard is not None else largest_tensor_bytes(spec),
                  tuple(notes))


def shard_mismatch(model_path, shard, plan: Plan) -> str | None:
    """Why shards split by another plan can't serve `plan`, or None."""
    _, count, budgets, plan_hash = shard
    if count == plan.world_size and plan_hash == plan.plan_hash():
        return None
    return (f"the shards in {model_path} were split for {count} rank(s) with budgets {' '.join(map(str, budgets))} "
            f"(plan {plan_hash}); this launch has {plan.world_size} rank(s) with budgets "
            f"{' '.join(map(str, plan.budgets))} (plan {plan.plan_hash()}). Relaunch with "
            f"mpirun -n {count} ... --memory-budget {' '.join(map(str, budgets))}, or run the unsplit model file")


def check_fit(launch: Launch, budgets: Budgets, hosts: list[str], available: list[int | None]) -> None:
    """UsageError naming every rank and node whose need exceeds its cap or memory."""
    problems = fit_problems(launch.plan, budgets, launch.max_seq_len, launch.load_buffer, hosts, available,
                            launch.n_slots, kv_type=launch.kv_type)
    if problems:
        raise UsageError("the plan does not fit in memory:\n  " + "\n  ".join(problems))
