"""`--memory-budget auto`: budgets from each rank's measured speed, within its memory.

Collective, before anything is loaded: rank 0 reads the model's spec; every rank compiles
(or loads) the kernels and measures its speed at once (speed.py); rank 0 splits by speed
within each rank's memory (budgets.fastest_shares) and everyone gets the explicit budgets.
The split's prediction is printed next to the measured figures, and the job's report puts
each rank's predicted time per token beside the measured one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..errors import InputError, UsageError
from ..files.modelfile import largest_tensor_bytes, open_model
from ..kernels import vector
from ..model.spec import ModelSpec
from ..parallel.budgets import (
    RUNTIME_BYTES,
    Budgets,
    available_memory,
    fastest_shares,
    format_bytes,
    memory_limit_source,
    rank_need,
    share_ratios,
)
from ..parallel.comm import Comm
from ..parallel.plan import Plan, make_plan
from . import speed
from .launch import DEFAULT_MAX_SEQ_LEN

REFIT_ROUNDS = 6  # re-solves when rounding to the plan's granules pushes a rank over its memory


@dataclass(frozen=True)
class AutoChoice:
    budgets: Budgets  # the explicit budgets chosen (ratios; the caps as given)
    speeds: tuple[speed.RankSpeed, ...]  # per rank
    collective_s: float  # per token, in collectives alone
    rank_token_s: tuple[float, ...]  # predicted compute seconds per token of each rank, on the plan chosen
    equal_token_s: float  # predicted seconds per token with equal budgets

    @property
    def token_s(self) -> float:
        return max(self.rank_token_s) + self.collective_s


def plan_shares(plan: Plan) -> tuple[float, ...]:
    """Each rank's share of the model's matrix rows under `plan` (what its work scales with)."""
    rows = [plan.weight_bytes(r) for r in range(plan.world_size)]
    return tuple(r / sum(rows) for r in rows)


def _spec_of(comm: Comm, model_path) -> ModelSpec:
    """Rank 0 reads the model's spec; bad input stops every rank at once."""
    from ..files.synthetic import synthetic_model_path

    spec = None
    if comm.rank == 0:
        try:
            model = open_model(model_path if model_path is not None else synthetic_model_path())
            try:
                if model.shard is not None:
                    raise InputError(f"--memory-budget auto chooses the split at launch, but {model_path} holds shards "
                                     "already split for fixed budgets; run auto on the unsplit model file (it prints "
                                     "the budgets it chose, to pre-split with)")
                spec = model.spec
            finally:
                model.close()
        except InputError as exc:
            spec = str(exc)
    comm.sleeping_barrier()
    spec = comm.bcast_obj(spec)
    if isinstance(spec, str):
        raise UsageError(spec)
    return spec


def _max_shares(spec: ModelSpec, caps: list[int | None], max_seq_len: int, n_slots: int, kv_type: str) -> list[float]:
    """The largest share each rank's memory allows (need grows with the share: weights, KV
    cache and a mixture of experts' layer packed at load; the runtime and rank 0's load buffer
    do not)."""
    whole = make_plan(spec, (1,))
    per_share = whole.weight_bytes(0) + n_slots * whole.kv_cache_bytes(0, max_seq_len, kv_type) + whole.expert_layer_bytes(0)
    out = []
    for rank, cap in enumerate(caps):
        fixed = RUNTIME_BYTES + (largest_tensor_bytes(spec) if rank == 0 else 0)
        out.append(1.0 if cap is None else max(0.0, (cap - fixed) / per_share))
    return out


def _caps(budgets: Budgets, hosts: list[str], available: list[int | None]) -> list[int | None]:
    """Each rank's memory: its given cap and its node's available memory shared evenly by the
    ranks there, the smaller (None: unknown, no limit)."""
    caps = []
    for rank, host in enumerate(hosts):
        on_node = hosts.count(host)
        node = available[rank] // on_node if available[rank] is not None else None
        given = budgets.caps[rank] if budgets.caps else None
        known = [c for c in (given, node) if c is not None]
        caps.append(min(known) if known else None)
    return caps


def solve(spec: ModelSpec, speeds, caps: list[int | None], max_seq_len: int, n_slots: int,
          load_buffer: int, *, kv_type: str) -> tuple[tuple[int, ...], Plan]:
    """The budgets (integer ratios) and their plan: the fastest split of measured `speeds`
    within `caps` (the KV cache counted in `kv_type`), rounded to the plan's granules,
    re-solved with tighter limits while the rounding leaves a rank over its cap. Pure."""
    a = [s.per_share_s for s in speeds]
    o = [s.fixed_s for s in speeds]
    limits = _max_shares(spec, caps, max_seq_len, n_slots, kv_type)
    for _ in range(REFIT_ROUNDS):
        ratios = share_ratios(fastest_shares(a, o, limits))
        plan = make_plan(spec, ratios)
        over = False
        for rank, cap in enumerate(caps):
            need = sum(rank_need(plan, rank, max_seq_len, load_buffer, n_slots, kv_type=kv_type).values())
            if cap is not None and need > cap:
                # from the smaller of the limit and the share the plan rounded to: a plan that rounds a
                # share up to its granule (a head) takes a lower limit each round until it steps down
                limits[rank] = max(0.0, min(limits[rank], plan_shares(plan)[rank]) * cap / need - 0.01)
                over = True
        if not over:
            break
    return ratios, plan


def choose(comm: Comm, model_path, budgets: Budgets, max_seq_len: int | None, buffer_type: str,
           n_slots: int, kv_type: str) -> AutoChoice:
    """Collective: measure every rank, then the budgets for this launch, its KV cache in
    `kv_type` (see the module)."""
    spec = _spec_of(comm, model_path)
    max_seq_len = max_seq_len or min(spec.seq_len, DEFAULT_MAX_SEQ_LEN)
    if comm.rank == 0:  # numba compiles once, on rank 0, into its cache; the others then load it
        vector.warm_up(spec.weight_types(), (kv_type,), spec.moe)
    comm.sleeping_barrier()
    vector.warm_up(spec.weight_types(), (kv_type,), spec.moe)
    if comm.rank == 0:
        print(f"--memory-budget auto: measuring each rank's speed on this model's products ({spec.weights_text} weights, "
              f"{buffer_type} buffers) ...", file=sys.stderr, flush=True)
    mine = speed.measure(comm, spec, buffer_type)
    collective_s = speed.collective_seconds(comm, spec)
    speeds = comm.gather_obj(mine)
    memory = comm.gather_obj((available_memory(), memory_limit_source()))  # rank 0: each rank's
    choice = None
    if comm.rank == 0:
        available, limited_by = zip(*memory)
        caps = _caps(budgets, comm.hosts, list(available))
        load_buffer = largest_tensor_bytes(spec)
        ratios, plan = solve(spec, speeds, caps, max_seq_len, n_slots, load_buffer, kv_type=kv_type)
        shares = plan_shares(plan)
        equal = plan_shares(make_plan(spec, (1,) * comm.size))
        choice = AutoChoice(Budgets(ratios, budgets.caps), tuple(speeds), collective_s,
                            tuple(s.token_s(x) for s, x in zip(speeds, shares)),
                            max(s.token_s(x) for s, x in zip(speeds, equal)) + collective_s)
        _tell(choice, shares, caps, limited_by)
    return comm.bcast_obj(choice)


def _tell(choice: AutoChoice, shares, caps, limited_by) -> None:
    """Rank 0: the measured figures and the split chosen."""
    err = sys.stderr
    print("measured, ms per token: a x share + o (a: the whole model's products; o: what every rank does whatever "
          "its share)", file=err)
    for rank, (s, cap, source) in enumerate(zip(choice.speeds, caps, limited_by)):
        points = ", ".join(f"{share:g}: {1e3 * t:.1f}" for share, t in s.samples)
        print(f"  rank {rank}: {1e3 * s.per_share_s:.1f} x share + {1e3 * s.fixed_s:.1f}   (at share {points}; memory "
              f"{format_bytes(cap) if cap is not None else 'unknown'}, node's by {source})", file=err)
    print(f"  collectives: {1e3 * choice.collective_s:.1f} ms per token", file=err)
    ratios = " ".join(map(str, choice.budgets.ratios))
    print(f"--memory-budget auto chose {ratios} (shares {' '.join(f'{100 * x:.1f}%' for x in shares)}): predicted "
          f"{1e3 * choice.token_s:.1f} ms per token, against {1e3 * choice.equal_token_s:.1f} with equal budgets",
          file=err)
    for rank, x in enumerate(shares):
        if choice.budgets.ratios[rank] == 1:
            print(f"note: rank {rank} costs more than it adds: it keeps the least share the plan gives "
                  f"({100 * x:.1f}%)", file=err)
