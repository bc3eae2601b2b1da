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

from .errors import InputError
from .plan import Plan

UNITS = {"mb": 10**6, "gb": 10**9, "mib": 2**20, "gib": 2**30}
MAX_BUDGET = 2**60  # a ratio or a size in bytes (1 EiB): anything larger is a typo
_RATIO = re.compile(r"[0-9]+")
_NEGATIVE = re.compile(r"-[0-9]+")
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(mb|gb|mib|gib)", re.IGNORECASE | re.ASCII)
_UNIT = re.compile(r"[0-9]+(?:\.[0-9]+)?\s*[a-z]+", re.IGNORECASE | re.ASCII)  # a number with some unit

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
    """--memory-budget as written, one value per rank (the converter's too); InputError says
    what was wrong and what to do."""
    values = [str(v).strip() for v in values]
    if len(values) != world_size:
        raise InputError(f"--memory-budget has {len(values)} value(s) {' '.join(values)} but the job has {world_size} "
                         f"rank(s); give exactly one budget per rank (or launch with mpirun -n {len(values)})")
    sizes = [_SIZE.fullmatch(v) for v in values]
    for rank, (v, size) in enumerate(zip(values, sizes)):
        if not size and _UNIT.fullmatch(v):
            raise InputError(f"the budget for rank {rank} is {v!r}: unknown unit; sizes take MB, GB, MiB or GiB "
                             "(e.g. 6GiB), ratios none (e.g. 3)")
    if any(sizes) and not all(sizes):
        plain = [v for v, m in zip(values, sizes) if not m]
        raise InputError(f"--memory-budget mixes sizes with plain ratios ({' '.join(plain)}); give every rank a "
                         "size (e.g. 6GiB 2GiB 2GiB 1GiB) or every rank a ratio (e.g. 3 2 2 1)")
    if all(sizes):
        caps = tuple(_size_bytes(rank, v, m) for rank, (v, m) in enumerate(zip(values, sizes)))
        return Budgets(caps, caps)
    return Budgets(tuple(_ratio(rank, v) for rank, v in enumerate(values)), None)


_RATIOS_OR_SIZES = "budgets must be positive integers such as 3 2 2 1 (or sizes such as 6GiB)"


def _ratio(rank: int, text: str) -> int:
    if not _RATIO.fullmatch(text):  # digits only: int() would also take '1_000', '+3' or other scripts' digits
        shown = text if _NEGATIVE.fullmatch(text) else repr(text)
        raise InputError(f"the budget for rank {rank} is {shown}; {_RATIOS_OR_SIZES}")
    ratio = int(text)
    if ratio == 0:
        raise InputError(f"the budget for rank {rank} is 0; {_RATIOS_OR_SIZES}")
    if ratio > MAX_BUDGET:
        raise InputError(f"the budget for rank {rank} is {ratio}, larger than any machine; budgets are ratios "
                         "such as 3 2 2 1, or sizes such as 6GiB")
    return ratio


def _size_bytes(rank: int, text: str, match: re.Match) -> int:
    size = round(float(match[1]) * UNITS[match[2].lower()])
    if not 0 < size <= MAX_BUDGET:
        raise InputError(f"the budget for rank {rank} is {text}; a size must be more than 0 and at most "
                         f"{format_bytes(MAX_BUDGET)}")
    return size


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n / 2**20:.2f}MiB"


def rank_need(plan: Plan, rank: int, max_seq_len: int, load_buffer: int, n_slots: int = 1) -> dict[str, int]:
    """Bytes rank `rank` holds at its peak: weights, KV cache (of every slot: a server holds
    n_slots sequences), runtime, and (rank 0 loading an unsplit file) the largest tensor as
    read before it is scattered."""
    need = {"weights": plan.weight_bytes(rank), "kv": n_slots * plan.kv_cache_bytes(rank, max_seq_len),
            "runtime": RUNTIME_BYTES}
    if rank == 0 and load_buffer:
        need["load"] = load_buffer
    return need


def fit_problems(plan: Plan, budgets: Budgets, max_seq_len: int, load_buffer: int,
                 hosts: list[str], available: list[int | None], n_slots: int = 1) -> list[str]:
    """Why the plan does not fit, one line per rank or node (empty when it fits). `hosts` and
    `available` (bytes, None if unknown): each rank's node and that node's available memory."""
    needs = [rank_need(plan, r, max_seq_len, load_buffer, n_slots) for r in range(plan.world_size)]
    totals = [sum(n.values()) for n in needs]
    kv_per_token = [n_slots * plan.kv_cache_bytes(r, 1) for r in range(plan.world_size)]  # per token of context
    problems = []

    def longest_context(fixed: int, kv_per_token: int, room: int) -> int:
        return max(0, (room - fixed) // kv_per_token) if kv_per_token else max_seq_len

    def context_hint(seq: int, text: str) -> str:
        """`text` naming a --max-seq-len that fits, if a shorter context helps at all; never
        beyond what the model was trained for."""
        if not 0 < seq < max_seq_len:
            return ""
        if seq >= plan.spec.seq_len:
            return text.format(f"--max-seq-len {plan.spec.seq_len}, the length the model was trained for")
        return text.format(f"--max-seq-len {seq}")

    if budgets.caps:
        for r, (total, cap) in enumerate(zip(totals, budgets.caps)):
            if total > cap:
                seq = longest_context(total - needs[r]["kv"], kv_per_token[r], cap)
                problems.append(f"rank {r} needs {format_bytes(total)} ({_parts(needs[r], max_seq_len, n_slots)}) but its budget "
                                f"caps it at {format_bytes(cap)}; give it at least {format_bytes(total)}"
                                + context_hint(seq, ", or {}"))
        scale = max(t / c for t, c in zip(totals, budgets.caps))
        if scale > 1:  # the same ratios give the same plan, so scaling every cap keeps the needs
            fitting = " ".join(f"{-(-int(c * scale) // 2**20)}MiB" for c in budgets.caps)
            problems.append(f"budgets that keep this split and fit: --memory-budget {fitting}")
    for host in dict.fromkeys(hosts):
        ranks = [r for r, h in enumerate(hosts) if h == host]
        room = available[ranks[0]]
        need = sum(totals[r] for r in ranks)
        if room is None or need <= room:
            continue
        names = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        parts = "; ".join(f"rank {r}: {_parts(needs[r], max_seq_len, n_slots)}" for r in ranks)
        kv = sum(kv_per_token[r] for r in ranks)
        seq = longest_context(need - sum(needs[r]["kv"] for r in ranks), kv, room) if kv else 0
        # the split decides how much lands here: a smaller share helps only if other nodes take the rest
        share = ("give the ranks there a smaller share of --memory-budget (the ranks on other nodes more)"
                 if len(ranks) < len(hosts) else "")
        smaller_type = "convert the model to q40 weights" if plan.spec.weight_type != "q40" else ""
        fewer_slots = "serve fewer sequences at once (--slots)" if n_slots > 1 else ""
        ways = [w for w in (share, context_hint(seq, "use a shorter context ({})"), fewer_slots, smaller_type,
                            "run some of the ranks on other nodes") if w]
        problems.append(f"{names} on {host} need{'s' * (len(ranks) == 1)} {format_bytes(need)} ({parts}) but the node has "
                        f"{format_bytes(room)} available; " + ", ".join(ways[:-1]) + ", or " * (len(ways) > 1) + ways[-1])
    return problems


def _parts(need: dict[str, int], max_seq_len: int, n_slots: int = 1) -> str:
    kv = f"{n_slots} slots x {max_seq_len} tokens" if n_slots > 1 else f"{max_seq_len} tokens"
    names = {"weights": "weights", "kv": f"KV cache for {kv}", "runtime": "runtime",
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
