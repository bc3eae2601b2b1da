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
from pathlib import Path

import numpy as np

from .. import cgroups
from ..errors import InputError
from ..model import quant
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
    ratios: tuple[int, ...]  # what the plan splits by (bytes when sizes were given; equal until measured with auto)
    caps: tuple[int, ...] | None  # bytes per rank, when sizes were given
    auto: bool = False  # `auto`: the ratios are to be chosen by measuring each rank (autobudget.py)

    def text(self, rank: int) -> str:
        return format_bytes(self.caps[rank]) if self.caps else str(self.ratios[rank])


def parse_budgets(values, world_size: int) -> Budgets:
    """--memory-budget as written, one value per rank (the converter's too); InputError says
    what was wrong and what to do."""
    values = [str(v).strip() for v in values]
    if values and values[0].lower() == "auto":
        return _auto(values[1:], world_size)
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


def _auto(caps: list[str], world_size: int) -> Budgets:
    """`auto` alone, or `auto` and one size per rank (the caps)."""
    if not caps:
        return Budgets((1,) * world_size, None, auto=True)
    given = parse_budgets(caps, world_size)
    if given.caps is None:
        raise InputError(f"--memory-budget auto takes sizes after it, one per rank (e.g. auto 6GiB 2GiB), got "
                         f"{' '.join(caps)}; auto chooses the ratios itself")
    return Budgets((1,) * world_size, given.caps, auto=True)


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


def rank_need(plan: Plan, rank: int, max_seq_len: int, load_buffer: int, n_slots: int = 1, *,
              kv_type: str) -> dict[str, int]:
    """Bytes rank `rank` holds at its peak: weights, KV cache (of every slot: a server holds
    n_slots sequences; in `kv_type`), runtime, (rank 0 loading an unsplit file) the largest
    tensor as read before it is scattered, and (a mixture of experts) one layer's experts held
    twice while loading packs them."""
    need = {"weights": plan.weight_bytes(rank), "kv": n_slots * plan.kv_cache_bytes(rank, max_seq_len, kv_type),
            "runtime": RUNTIME_BYTES}
    if plan.spec.moe:
        need["experts"] = plan.expert_layer_bytes(rank)
    if rank == 0 and load_buffer:
        need["load"] = load_buffer
    return need


def fit_problems(plan: Plan, budgets: Budgets, max_seq_len: int, load_buffer: int,
                 hosts: list[str], available: list[int | None], n_slots: int = 1, *, kv_type: str) -> list[str]:
    """Why the plan does not fit, one line per rank or node (empty when it fits). `hosts` and
    `available` (bytes, None if unknown): each rank's node and that node's available memory;
    the KV cache is counted in `kv_type`."""
    needs = [rank_need(plan, r, max_seq_len, load_buffer, n_slots, kv_type=kv_type) for r in range(plan.world_size)]
    totals = [sum(n.values()) for n in needs]
    kv_per_token = [n_slots * plan.kv_cache_bytes(r, 1, kv_type) for r in range(plan.world_size)]  # per token of context
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

    # the smallest KV type (q8_0: a little precision for memory), suggested where it alone makes the need fit
    smallest_kv = min(quant.KV_TYPES, key=lambda t: quant.KV_TYPES[t].row_bytes(plan.spec.head_dim))

    def kv_saving(ranks) -> int:
        return sum(needs[r]["kv"] - n_slots * plan.kv_cache_bytes(r, max_seq_len, smallest_kv) for r in ranks)

    if budgets.caps:
        for r, (total, cap) in enumerate(zip(totals, budgets.caps)):
            if total > cap:
                seq = longest_context(total - needs[r]["kv"], kv_per_token[r], cap)
                problems.append(f"rank {r} needs {format_bytes(total)} ({_parts(needs[r], max_seq_len, n_slots, kv_type)}) "
                                f"but its budget caps it at {format_bytes(cap)}; give it at least {format_bytes(total)}"
                                + context_hint(seq, ", or {}")
                                + (f", or --kv-type {smallest_kv}" if total - kv_saving([r]) <= cap else ""))
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
        parts = "; ".join(f"rank {r}: {_parts(needs[r], max_seq_len, n_slots, kv_type)}" for r in ranks)
        kv = sum(kv_per_token[r] for r in ranks)
        seq = longest_context(need - sum(needs[r]["kv"] for r in ranks), kv, room) if kv else 0
        # the split decides how much lands here: a smaller share helps only if other nodes take the rest
        share = ("give the ranks there a smaller share of --memory-budget (the ranks on other nodes more)"
                 if len(ranks) < len(hosts) else "")
        # only from float weights: re-quantizing a quantized model to q40 damages it (issue 14)
        smaller_type = "convert the model to q40 weights" if not quant.WEIGHTS[plan.spec.weight_type].quantized else ""
        fewer_slots = "serve fewer sequences at once (--slots)" if n_slots > 1 else ""
        kv_way = f"store the KV cache in {smallest_kv} (--kv-type {smallest_kv})" if need - kv_saving(ranks) <= room else ""
        ways = [w for w in (share, context_hint(seq, "use a shorter context ({})"), kv_way, fewer_slots, smaller_type,
                            "run some of the ranks on other nodes") if w]
        problems.append(f"{names} on {host} need{'s' * (len(ranks) == 1)} {format_bytes(need)} ({parts}) but the node has "
                        f"{format_bytes(room)} available; " + ", ".join(ways[:-1]) + ", or " * (len(ways) > 1) + ways[-1])
    return problems


def _parts(need: dict[str, int], max_seq_len: int, n_slots: int, kv_type: str) -> str:
    kv = f"{n_slots} slots x {max_seq_len} tokens" if n_slots > 1 else f"{max_seq_len} tokens"
    names = {"weights": "weights", "kv": f"{kv_type} KV cache for {kv}", "runtime": "runtime",
             "load": "load buffer", "experts": "a layer's experts packed at load"}
    return " + ".join(f"{names[k]} {format_bytes(v)}" for k, v in need.items())


def available_memory(root: Path = Path("/")) -> int | None:
    """Bytes this rank may still allocate (Linux), or None where nothing can be read: the
    smaller of the node's MemAvailable and the room its memory cgroup leaves (limit minus
    usage, the tightest of the cgroup and its ancestors; cgroup v2 or v1). Under Slurm with
    --mem (or in a container with a memory limit) the job's cgroup, not the node, is what
    the kernel enforces: a rank that fits the node's MemAvailable but not its cgroup is
    OOM-killed mid-load. `root` is the filesystem root (a fake one in tests); unreadable or
    malformed files are skipped, never raised."""
    sources = _memory_sources(root)
    return min(sources, key=lambda s: s[0])[0] if sources else None


def memory_limit_source(root: Path = Path("/")) -> str:
    """What bound available_memory(): "MemAvailable", "cgroup <path>" (the binding cgroup,
    e.g. cgroup /slurm/uid_0/job_12), or "unknown" where nothing could be read."""
    sources = _memory_sources(root)
    return min(sources, key=lambda s: s[0])[1] if sources else "unknown"


def _memory_sources(root: Path) -> list[tuple[int, str]]:
    """(bytes, name) of each limit that could be read, MemAvailable first (so it wins a tie)."""
    sources = []
    meminfo = _meminfo_available(root)
    if meminfo is not None:
        sources.append((meminfo, "MemAvailable"))
    room = cgroups.memory_room(root)
    if room is not None:
        sources.append(room)
    return sources


def _meminfo_available(root: Path) -> int | None:
    try:
        with open(root / "proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def fastest_shares(per_share_s, fixed_s, max_share) -> tuple[float, ...]:
    """The shares s_i (summing to 1, each in [0, max_share_i]) that minimise the slowest
    rank's time max_i(a_i s_i + o_i), a_i = per_share_s[i] > 0, o_i = fixed_s[i] >= 0.

    At the optimum every rank with a share in (0, max) finishes at the same time T, a rank
    whose fixed cost alone reaches T gets 0 and a capped rank its cap: s_i(T) =
    clip((T - o_i) / a_i, 0, max_i), and T is where they sum to 1 (bisection: the sum grows
    with T). When even the caps sum to less than 1, the caps' proportions are returned (the
    memory check then says what does not fit)."""
    a, o, cap = (np.asarray(v, np.float64) for v in (per_share_s, fixed_s, max_share))
    cap = np.clip(cap, 0.0, 1.0)
    if cap.sum() <= 1.0:
        return tuple(float(c) for c in cap / cap.sum()) if cap.sum() > 0 else tuple([1.0 / len(a)] * len(a))

    def shares(t: float) -> np.ndarray:
        return np.clip((t - o) / a, 0.0, cap)

    lo, hi = float(o.min()), float((o + a * cap).max())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if shares(mid).sum() < 1.0 else (lo, mid)
    s = shares(hi)
    return tuple(float(v) for v in s / s.sum())


def share_ratios(shares, resolution: int = 1000) -> tuple[int, ...]:
    """Shares as the plan's integer ratios (per mille); a rank with no share keeps 1, the
    least a ratio can be (the plan may then give it no rows at all)."""
    return tuple(max(1, round(s * resolution)) for s in shares)
