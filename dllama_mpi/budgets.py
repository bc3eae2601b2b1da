"""--memory-budget as the user writes it, and whether each rank's share fits. No MPI here.

Budgets are either plain ratios (`3 2 2 1`) or sizes (`6GiB 2GiB 2GiB 1GiB`; MB, GB, MiB,
GiB), never a mix. Sizes are the split ratio and each rank's hard cap. Either way, before
anything is loaded, each rank's need (weights + KV cache + the runtime) is checked against
its cap and against the available memory of the node it runs on, shared with the other
ranks there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .plan import Plan, validate_budgets

UNITS = {"mb": 10**6, "gb": 10**9, "mib": 2**20, "gib": 2**30}
MAX_BUDGET = 2**60  # a ratio or a size in bytes (1 EiB): anything larger is a typo
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(mb|gb|mib|gib)", re.IGNORECASE)
_UNIT = re.compile(r"\d+(?:\.\d+)?\s*[a-z]+", re.IGNORECASE)  # a number with some unit

# Memory a rank holds beyond its weights and KV cache: Python, numpy, h5py, MPI, numba and
# LLVM (the kernels compiled or loaded from the cache), run-state buffers. Measured peak RSS
# minus planned bytes: 183-243 MiB (TinyLlama shape, 1 and 4 ranks), 320 MiB on a rank that
# compiled the kernels itself (cold numba cache).
RUNTIME_BYTES = 384 * 2**20


@dataclass(frozen=True)
class Budgets:
    ratios: tuple[int, ...]  # what the plan splits by (bytes when sizes were given)
    caps: tuple[int, ...] | None  # bytes per rank, when sizes were given

    def text(self, rank: int) -> str:
        return format_bytes(self.caps[rank]) if self.caps else str(self.ratios[rank])


def parse_budgets(values, world_size: int) -> Budgets:
    """Budgets from the command line; ValueError says what was wrong and what to do."""
    values = [str(v) for v in values]
    for rank, v in enumerate(values):
        if _UNIT.fullmatch(v.strip()) and not _SIZE.fullmatch(v.strip()):
            raise ValueError(f"the budget for rank {rank} is {v!r}: unknown unit; sizes take MB, GB, MiB or GiB "
                             "(e.g. 6GiB), ratios none (e.g. 3)")
    sizes = [_SIZE.fullmatch(v.strip()) for v in values]
    if any(sizes) and not all(sizes):
        plain = [v for v, m in zip(values, sizes) if not m]
        raise ValueError(f"--memory-budget mixes sizes with plain ratios ({' '.join(plain)}); give every rank a "
                         "size (e.g. 6GiB 2GiB 2GiB 1GiB) or every rank a ratio (e.g. 3 2 2 1)")
    if not all(sizes):
        ratios = validate_budgets(values, world_size)
        for rank, r in enumerate(ratios):
            if r > MAX_BUDGET:
                raise ValueError(f"the budget for rank {rank} is {r}, larger than any machine; budgets are ratios "
                                 "such as 3 2 2 1, or sizes such as 6GiB")
        return Budgets(ratios, None)
    if len(values) != world_size:
        validate_budgets(values, world_size)  # raises: the count, with the usual message
    caps = []
    for rank, m in enumerate(sizes):
        size = round(float(m[1]) * UNITS[m[2].lower()])
        if not 0 < size <= MAX_BUDGET:
            raise ValueError(f"the budget for rank {rank} is {values[rank]}; a size must be more than 0 and at most "
                             f"{format_bytes(MAX_BUDGET)}")
        caps.append(size)
    return Budgets(tuple(caps), tuple(caps))


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n / 2**20:.2f}MiB"


def rank_need(plan: Plan, rank: int, max_seq_len: int, load_buffer: int) -> dict[str, int]:
    """Bytes rank `rank` holds at its peak: weights, KV cache, runtime, and (rank 0 loading
    an unsplit file) the largest tensor as read before it is scattered."""
    need = {"weights": plan.weight_bytes(rank), "kv": plan.kv_cache_bytes(rank, max_seq_len), "runtime": RUNTIME_BYTES}
    if rank == 0 and load_buffer:
        need["load"] = load_buffer
    return need


def fit_problems(plan: Plan, budgets: Budgets, max_seq_len: int, load_buffer: int,
                 hosts: list[str], available: list[int | None]) -> list[str]:
    """Why the plan does not fit, one line per rank or node (empty when it fits). `hosts` and
    `available` (bytes, None if unknown): each rank's node and that node's available memory."""
    needs = [rank_need(plan, r, max_seq_len, load_buffer) for r in range(plan.world_size)]
    totals = [sum(n.values()) for n in needs]
    kv_per_token = [plan.kv_cache_bytes(r, 1) for r in range(plan.world_size)]
    problems = []

    def longest_context(rank: int, room: int) -> int:
        fixed = totals[rank] - needs[rank]["kv"]
        return max(0, (room - fixed) // kv_per_token[rank]) if kv_per_token[rank] else max_seq_len

    if budgets.caps:
        for r, (total, cap) in enumerate(zip(totals, budgets.caps)):
            if total > cap:
                seq = longest_context(r, cap)
                hint = f", or --max-seq-len {seq}" if 0 < seq < max_seq_len else ""
                problems.append(f"rank {r} needs {format_bytes(total)} ({_parts(needs[r], max_seq_len)}) but its budget "
                                f"caps it at {format_bytes(cap)}; give it at least {format_bytes(total)}{hint}")
        scale = max(t / c for t, c in zip(totals, budgets.caps))
        if scale > 1:  # the same ratios give the same plan, so scaling every cap keeps the needs
            fitting = " ".join(f"{-(-int(c * scale) // 2**20)}MiB" for c in budgets.caps)
            problems.append(f"budgets that keep this split and fit: --memory-budget {fitting}")
    for host in dict.fromkeys(hosts):
        ranks = [r for r, h in enumerate(hosts) if h == host]
        room = available[ranks[0]]
        need = sum(totals[r] for r in ranks)
        if room is not None and need > room:
            names = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
            parts = "; ".join(f"rank {r}: {_parts(needs[r], max_seq_len)}" for r in ranks)
            kv = sum(kv_per_token[r] for r in ranks)
            seq = max(0, (room - (need - sum(needs[r]["kv"] for r in ranks))) // kv) if kv else 0
            hint = f", a shorter context (--max-seq-len {seq})" if 0 < seq < max_seq_len else ""
            problems.append(f"{names} on {host} need {format_bytes(need)} ({parts}) but the node has "
                            f"{format_bytes(room)} available; give the ranks there smaller budgets{hint}, "
                            f"or run more ranks on other nodes")
    return problems


def _parts(need: dict[str, int], max_seq_len: int) -> str:
    names = {"weights": "weights", "kv": f"KV cache for {max_seq_len} tokens", "runtime": "runtime",
             "load": "load buffer"}
    return " + ".join(f"{names[k]} {format_bytes(v)}" for k, v in need.items())


def available_memory() -> int | None:
    """This node's MemAvailable in bytes (Linux), or None where it can't be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
