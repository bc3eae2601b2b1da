"""`python tools/auto_budget_bench.py`: does `--memory-budget auto` pay off when ranks differ in speed?

On one machine of at least 2 cores it makes ranks of unequal speed for real (--layout):

  quota   (default) two ranks: rank 0 alone on core 0, rank 1 alone on core 1 in a cgroup whose CPU quota is half a
          core (1 ms per 2 ms period, the kernel's smallest quota; made for the run and removed after it, which
          needs a writable cgroup v1 cpu hierarchy or v2 root: run as root). The issue's "one of two ranks at half
          speed".
  shared  three ranks: rank 0 alone on core 0, ranks 1 and 2 sharing core 1, so each of them at about
          half the speed of rank 0 (`mpiexec -n 3 tools/pinned 0 1 1 -- ...`);
  hog     two ranks: rank 0 alone on core 0, rank 1 on core 1 beside a CPU hog (a pure-Python busy loop pinned to
          core 1 for the whole run, killed after it, also on error or Ctrl-C). Measured 2026-11-30: rank 1's
          kernels ran at full speed between the hog's time slices, and the slowdown landed in every rank's waits
          at the collectives, which no split can move: a poor model of a slower machine.

Each run is `python -m dllama_mpi bench --nthreads 1 --memory-budget ...` on those ranks (a random TinyLlama-1.1B-
shape model by default, or --model), and three budget configurations are measured, interleaved over --repeat rounds
(equal, memory, auto, equal, ...):

  equal   `1 1 1` (`1 1` with the hog);
  memory  what jobs/common.sh's DLLAMA_BUDGETS=memory gives: each node's available memory (MemAvailable, or the
          cgroup's room where smaller) split evenly over its tasks,
          as sizes in MiB; on one node both ranks get the same size, so it splits as equal does (the hog is not
          memory);
  auto    `auto`: each rank times the kernels at start and the model is split by measured speed.

It prints a markdown table of decode tok/s (median, min-max, ratio to equal's median), auto's predicted ms per token
against the measured one (1000 / its median tok/s), and the goal line: auto / equal >= 1.3 and prediction within
20 %. It waits first for an idle machine (no process above 10 % CPU for 20 s; --no-idle-wait skips it).

    python tools/auto_budget_bench.py --repeat 3 --json docs/auto-budget-tinyllama-1.1b.json
    python tools/auto_budget_bench.py --model model.h5 --repeat 1 --no-idle-wait

Not run in CI (a run takes minutes); tests/test_auto_budget_bench.py tests its pure parts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dllama_mpi.commands.launcher import positive_int
from dllama_mpi.parallel.budgets import available_memory
from llamacpp_compare import busy_processes, cpu_model_name, cpu_sample, run_capture, wait_for_idle

TOOLS = Path(__file__).resolve().parent
CONFIGS = ("equal", "memory", "auto")  # run order within a round; equal is the ratios' base
CPU_FAST, CPU_SLOW = "0", "1"  # rank 0 alone on core 0; the slow ranks (or rank 1 and the hog) on core 1
LAYOUTS = {"quota": [CPU_FAST, CPU_SLOW], "shared": [CPU_FAST, CPU_SLOW, CPU_SLOW], "hog": [CPU_FAST, CPU_SLOW]}  # each rank's core
QUOTA_US, PERIOD_US = 1000, 2000  # the quota layout's half core: v1's and v2's smallest quota is 1 ms
HOG = [sys.executable, "-c", "while True: pass"]
IDLE_SECONDS, IDLE_CPU_PCT, IDLE_TIMEOUT_S = 20.0, 10.0, 1800.0  # as tools/llamacpp_compare.py's defaults
GOAL_RATIO, GOAL_ERROR = 1.3, 0.2


def log(message: str) -> None:
    print(f"auto_budget_bench: {message}", file=sys.stderr, flush=True)


def check_machine() -> None:
    """Exit with a message unless cores 0 and 1 are ours and taskset exists."""
    cpus = os.sched_getaffinity(0)
    if not {int(CPU_FAST), int(CPU_SLOW)} <= cpus:
        sys.exit(f"auto_budget_bench: needs CPUs {CPU_FAST} and {CPU_SLOW} (one rank on each), but this process may run "
                 f"on {sorted(cpus)} only ({os.cpu_count()} CPU(s) on the machine)")
    if not shutil.which("taskset"):
        sys.exit("auto_budget_bench: taskset not found on PATH (util-linux); it pins the ranks and the hog to their cores")


def available_mib() -> int:
    """This process's available memory in MiB as jobs/common.sh reads it for DLLAMA_BUDGETS=memory: MemAvailable,
    or less where its cgroup leaves less (dllama_mpi.parallel.budgets.available_memory)."""
    available = available_memory()
    if available is None:
        sys.exit("auto_budget_bench: could not read the available memory (/proc/meminfo, the memory cgroup)")
    return available // 2**20


def memory_budgets(available_mib: int, ranks: int) -> list[str]:
    """DLLAMA_BUDGETS=memory on one node: its available memory split evenly over its `ranks` tasks, in MiB."""
    return [f"{available_mib // ranks}MiB"] * ranks


def config_budgets(available_mib: int, ranks: int = 2) -> dict[str, list[str]]:
    return {"equal": ["1"] * ranks, "memory": memory_budgets(available_mib, ranks), "auto": ["auto"]}


def schedule(repeat: int) -> list[tuple[int, str]]:
    """(round, config) in run order: every config once per round."""
    return [(i, name) for i in range(repeat) for name in CONFIGS]


def bench_command(mpiexec: str, target: list[str], budgets: list[str], decode_steps: int,
                  cores: list[str] = LAYOUTS["hog"]) -> list[str]:
    """The ranks pinned by tools/pinned to `cores` (`CPUS@CGROUP` also puts the rank in that cgroup), one thread
    each; `target` is --shape S or --model PATH."""
    return [mpiexec, "-n", str(len(cores)), str(TOOLS / "pinned"), *cores, "--", sys.executable, "-m", "dllama_mpi", "bench",
            *target, "--memory-budget", *budgets, "--nthreads", "1", "--prompt-lengths", "8",
            "--decode-steps", str(decode_steps), "--repeat", "1", "--json"]


def parse_bench(stdout: str) -> dict:
    """What a row keeps of `python -m dllama_mpi bench --json` (its first JSON line); each rank's compute and
    collective ms are per forward pass, prompt ones included."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise ValueError("dllama_mpi.commands.bench printed no JSON line")
    r = json.loads(lines[0])
    return {"decode_tok_s": float(r["decode_tokens_per_s"]), "budgets_chosen": r["budgets_chosen"],
            "auto_predicted_ms": r["auto_predicted_ms_per_token"],
            "auto_equal_predicted_ms": r["auto_equal_predicted_ms_per_token"], "kernel_isa": r.get("kernel_isa"),
            "compute_ms_per_rank": [1e3 * x for x in r["compute_s_per_token"]],
            "collective_ms_per_rank": [1e3 * x for x in r["collective_s_per_token"]]}


def auto_report(stderr: str) -> list[str]:
    """auto's own account in a run's stderr: from its measured figures to the split it chose."""
    lines = stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("measured, ms per token")), None)
    end = next((i for i, line in enumerate(lines) if line.startswith("--memory-budget auto chose")), None)
    return lines[start:end + 1] if start is not None and end is not None else []


@contextlib.contextmanager
def hog(cpu: str):
    """A busy loop pinned to `cpu` while the block runs; killed after it, whatever happens (SIGTERM included)."""
    proc = subprocess.Popen(["taskset", "-c", cpu, *HOG], stdin=subprocess.DEVNULL)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` runs
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        signal.signal(signal.SIGTERM, previous)


def quota_parent(root: Path = Path("/")) -> tuple[Path, str] | None:
    """(the directory under which a CPU-quota cgroup can be made, "v1" or "v2"), or None: the v1 cpu hierarchy's
    root, else the v2 root where its cgroup.subtree_control enables cpu; either must be writable."""
    for mount in (root / "sys/fs/cgroup/cpu", root / "sys/fs/cgroup/cpu,cpuacct"):
        if (mount / "cpu.cfs_quota_us").exists():
            return (mount, "v1") if os.access(mount, os.W_OK) else None
    v2 = root / "sys/fs/cgroup"
    try:
        enabled = "cpu" in (v2 / "cgroup.subtree_control").read_text().split()
    except OSError:
        return None
    return (v2, "v2") if enabled and os.access(v2, os.W_OK) else None


@contextlib.contextmanager
def quota_cgroup(period_us: int = PERIOD_US):
    """A cgroup with a CPU quota of QUOTA_US per `period_us` (half a core by default) while the
    block runs (its path), removed after it."""
    found = quota_parent()
    if found is None:
        sys.exit("auto_budget_bench: --layout quota needs a writable cgroup v1 cpu hierarchy (/sys/fs/cgroup/cpu) or "
                 "the v2 root with the cpu controller enabled for its children (as root); use --layout shared instead")
    parent, version = found
    path = parent / f"dllama-bench-quota-{os.getpid()}"
    path.mkdir()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` runs
    try:
        if version == "v1":
            (path / "cpu.cfs_period_us").write_text(f"{period_us}\n")
            (path / "cpu.cfs_quota_us").write_text(f"{QUOTA_US}\n")
        else:
            (path / "cpu.max").write_text(f"{QUOTA_US} {period_us}\n")
        yield path
    finally:
        for _ in range(50):  # the ranks have exited; the kernel frees an emptied cgroup shortly after
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        signal.signal(signal.SIGTERM, previous)


def _stat(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per config, in CONFIGS order: decode tok/s median/min/max, the ratio of its median to equal's, the
    ratios chosen (each distinct one), and for auto the median predicted ms/token against the measured one
    (1000 / median tok/s) with the relative error (predicted - measured) / measured."""
    out = []
    for name in CONFIGS:
        runs = [r for r in rows if r["config"] == name]
        if not runs:
            continue
        s = {"config": name, "budgets": runs[0]["budgets"], "runs": len(runs),
             "chosen": [list(c) for c in dict.fromkeys(tuple(r["budgets_chosen"]) for r in runs)],
             "decode_tok_s": _stat([r["decode_tok_s"] for r in runs])}
        predicted = [r["auto_predicted_ms"] for r in runs if r["auto_predicted_ms"] is not None]
        if predicted:
            s["predicted_ms"] = statistics.median(predicted)
            s["equal_predicted_ms"] = statistics.median(r["auto_equal_predicted_ms"] for r in runs)
            s["measured_ms"] = 1e3 / s["decode_tok_s"]["median"]
            s["prediction_error"] = (s["predicted_ms"] - s["measured_ms"]) / s["measured_ms"]
        out.append(s)
    base = next((s for s in out if s["config"] == "equal"), None)
    for s in out:
        s["ratio_to_equal"] = s["decode_tok_s"]["median"] / base["decode_tok_s"]["median"] if base else None
    return out


def ratios_text(chosen: list[list[int]]) -> str:
    """'667 333 (66.7% 33.3%)' per distinct choice, ', ' between them."""
    return ", ".join(" ".join(map(str, c)) + " (" + " ".join(f"{100 * x / sum(c):.1f}%" for x in c) + ")" for c in chosen)


def markdown_table(summary: list[dict]) -> str:
    lines = ["| budgets | chosen ratios | decode tok/s median (min-max) | ratio to equal |", "|---|---|---|---|"]
    for s in summary:
        d, ratio = s["decode_tok_s"], s["ratio_to_equal"]
        lines.append(f"| {s['config']}: `{' '.join(s['budgets'])}` | {ratios_text(s['chosen'])} | "
                     f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f}) | {'-' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def prediction_line(s: dict) -> str:
    return (f"auto predicted {s['predicted_ms']:.1f} ms per token (equal budgets: {s['equal_predicted_ms']:.1f}, "
            f"medians of its runs), measured {s['measured_ms']:.1f} (1000 / median tok/s): error "
            f"{100 * s['prediction_error']:+.1f}%")


def goal_line(summary: list[dict]) -> str:
    by = {s["config"]: s for s in summary}
    auto = by.get("auto")
    if auto is None or auto["ratio_to_equal"] is None or "prediction_error" not in auto:
        return "goal: not measured (auto and equal both needed)"
    ratio, error = auto["ratio_to_equal"], auto["prediction_error"]
    ok = ratio >= GOAL_RATIO and abs(error) <= GOAL_ERROR
    return (f"goal: auto / equal = {ratio:.2f} (goal >= {GOAL_RATIO}: {'met' if ratio >= GOAL_RATIO else 'NOT met'}); "
            f"prediction error {100 * error:+.1f}% (goal within {100 * GOAL_ERROR:.0f}%: "
            f"{'met' if abs(error) <= GOAL_ERROR else 'NOT met'}) -> {'PASS' if ok else 'FAIL'}")


def report(summary: list[dict], facts: dict) -> str:
    by = {s["config"]: s for s in summary}
    head = [
        f"CPU: {facts['cpu']}; {facts['model']}; {facts['repeat']} interleaved round(s) of {', '.join(CONFIGS)}; "
        f"decode of {facts['decode_steps']} tokens per run",
        {"hog": f"ranks: 0 alone on core {CPU_FAST}, 1 on core {CPU_SLOW} beside a CPU hog ({facts['hog']}); one thread each",
         "quota": f"ranks: 0 alone on core {CPU_FAST}, 1 alone on core {CPU_SLOW} under a CPU quota of {QUOTA_US} us per "
                  f"{PERIOD_US} us (half a core); one thread each",
         "shared": f"ranks: 0 alone on core {CPU_FAST}, 1 and 2 sharing core {CPU_SLOW}; one thread each"}[facts["layout"]]
        + ("" if facts["idle"] is not False else "; MACHINE NOT IDLE before the runs")
        + (f"; {facts['disturbed_runs']} run(s) had another process above {IDLE_CPU_PCT:g}% CPU beside them"
           if facts["disturbed_runs"] else ""),
        f"memory = DLLAMA_BUDGETS=memory: available {facts['mem_available_mib']} MiB / {facts['ranks']} ranks per rank; "
        "on one node that is the equal split",
        "",
        markdown_table(summary),
        "",
    ]
    if "prediction_error" in by.get("auto", {}):
        head.append(prediction_line(by["auto"]))
    return "\n".join(head + [goal_line(summary)])


def measure(args, mpiexec: str, configs: dict[str, list[str]]) -> list[dict]:
    """Every run of the schedule (with the hog on core 1 throughout, in that layout)."""
    target = ["--model", str(args.model)] if args.model else ["--shape", args.shape]
    rows = []
    with contextlib.ExitStack() as stack:
        spinner = stack.enter_context(hog(CPU_SLOW)) if args.layout == "hog" else None
        cores = list(LAYOUTS[args.layout])
        if args.layout == "quota":
            cores[1] += f"@{stack.enter_context(quota_cgroup())}"
        exclude = {os.getpid()} | ({spinner.pid} if spinner else set())
        ticks = os.sysconf("SC_CLK_TCK")
        for i, name in schedule(args.repeat):
            command = bench_command(mpiexec, target, configs[name], args.decode_steps, cores)
            log(f"round {i + 1}/{args.repeat}: {name} ({' '.join(configs[name])})")
            before, t0 = cpu_sample(exclude), time.monotonic()
            out, err = run_capture(command, args.run_timeout, "auto_budget_bench")
            seconds = time.monotonic() - t0
            others = busy_processes(before, cpu_sample(exclude), seconds, IDLE_CPU_PCT, ticks)  # the run's own have ended
            row = {"round": i, "config": name, "budgets": configs[name], "seconds": seconds, "command": shlex.join(command),
                   "auto_report": auto_report(err), **parse_bench(out),
                   "disturbed_by": [f"{p_name} (pid {pid}) {pct:.0f}%" for pid, p_name, pct in others]}
            rows.append(row)
            log(f"  decode {row['decode_tok_s']:.2f} tok/s, budgets chosen {' '.join(map(str, row['budgets_chosen']))}; "
                f"ms per forward, compute / collective: {_per_rank(row)}"
                + (f", predicted {row['auto_predicted_ms']:.1f} ms/token" if row["auto_predicted_ms"] is not None else "")
                + (f"; disturbed by {', '.join(row['disturbed_by'][:3])}" if others else ""))
            for line in row["auto_report"]:
                log(f"  | {line}")
    return rows


def _per_rank(row: dict) -> str:
    return ", ".join(f"rank {i} {c:.1f} / {w:.1f}"
                     for i, (c, w) in enumerate(zip(row["compute_ms_per_rank"], row["collective_ms_per_rank"])))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python tools/auto_budget_bench.py", allow_abbrev=False,
        description="Ranks of unequal speed on cores 0 and 1 (see --layout): decode tok/s of --memory-budget auto "
                    "against equal and memory-proportional budgets, interleaved rounds.")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="quota",
                   help="quota: rank 1 under a CPU quota of half a core; shared: rank 0 alone on core 0, ranks 1 and 2 "
                        "on core 1; hog: rank 1 beside a busy loop (default: %(default)s)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--shape", default="tinyllama-1.1b",
                       help="random-weight model shape of dllama_mpi.commands.bench (default: %(default)s)")
    which.add_argument("--model", type=Path, help="measure this model file instead (default: off)")
    p.add_argument("--repeat", type=positive_int, default=3, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--decode-steps", type=positive_int, default=32, help="tokens decoded per run (default: %(default)s)")
    p.add_argument("--run-timeout", type=float, default=1200, help="limit of one run in seconds (default: %(default)s)")
    p.add_argument("--no-idle-wait", action="store_true", help="measure without waiting for an idle machine")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the rows, the summary and the facts to OUT")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check_machine()
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if not mpiexec:
        sys.exit("auto_budget_bench: mpiexec not found next to the Python interpreter or on PATH")
    available = available_mib()
    idle = None if args.no_idle_wait else wait_for_idle(IDLE_SECONDS, IDLE_CPU_PCT, IDLE_TIMEOUT_S)
    ranks = len(LAYOUTS[args.layout])
    rows = measure(args, mpiexec, config_budgets(available, ranks))
    summary = summarize(rows)
    facts = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_model_name(),
             "cores": os.cpu_count(), "command": shlex.join([sys.executable, *sys.argv]),
             "model": str(args.model) if args.model else f"shape {args.shape} (random Q40 weights)",
             "layout": args.layout, "ranks": ranks,
             "hog": f"taskset -c {CPU_SLOW} {shlex.join(HOG)}" if args.layout == "hog" else None, "repeat": args.repeat,
             "decode_steps": args.decode_steps, "mem_available_mib": available, "idle": idle,
             "disturbed_runs": sum(bool(r["disturbed_by"]) for r in rows), "runs": len(rows)}
    print(report(summary, facts))
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "summary": summary, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
