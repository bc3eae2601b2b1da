#!/usr/bin/env python3
"""A home cluster on one machine: ranks talk TCP over a rate-limited link instead of
shared memory, and an alpha-beta cost model fitted to what that measures.

    python tools/netsim.py run --rate 1gbit -- mpirun -n 4 python -m dllama_mpi --memory-budget 3 2 2 1
    python tools/netsim.py sweep --shape tinyllama-1.1b --out netsim.json   # 2 and 4 ranks x 3 rates
    python tools/netsim.py model netsim.json                               # fit, check, project

`run` starts the command in a network namespace of its own (needs root, or unprivileged
user namespaces), brings its loopback up with Ethernet's MTU (1500), puts a token-bucket
filter (tc tbf) of the given rate on it, and forces MPICH off shared memory onto TCP
(MPIR_CVAR_NOLOCAL=1, MPIR_CVAR_CH4_NETMOD=ofi, FI_PROVIDER=tcp). Every byte between ranks
then crosses that one loopback queue: one shared link, both directions together. Delay
can't be added here (no netem in this kernel), hence the model.

The model, per decoded token, at N ranks:
    t = compute + collectives * rounds(N) * (alpha_N + latency) + wire * gamma + phi * header * wire * 8 / rate
compute: the slowest rank's compute time in that run (the bench's compute_s_per_token);
collectives and wire: the plan's Traffic (4 Allgatherv per layer + 2; the bytes that must
cross); rounds(N) = ceil(log2 N) message rounds per collective; alpha_N: per-round cost on
this machine at N ranks (4 ranks on 2 cores pay for the oversubscription here); gamma:
per-byte cost of the TCP stack; header: link bytes per payload byte, measured (loopback
bytes / wire bytes, median over the sweep); phi: the part of the link time that is not
hidden behind other ranks' compute (a rank that finishes early sends while the others still
compute). alpha_N, gamma and phi are fitted by least squares on relative error; `latency`
(one way) is the projection's added term.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

TCP_ENV = {"MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}
RATES = ("100mbit", "1gbit", "unlimited")
PROJECTED_LATENCIES_MS = (0.1, 0.5, 2.0)


def rate_bits(rate: str) -> float:
    """'100mbit' -> 1e8; 'unlimited' -> inf."""
    if rate == "unlimited":
        return math.inf
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k|m|g)bit", rate.lower())
    if not m:
        raise ValueError(f"rate {rate!r}: give e.g. 100mbit, 1gbit or unlimited")
    return float(m[1]) * {"k": 1e3, "m": 1e6, "g": 1e9}[m[2]]


def rate_arg(text: str) -> str:
    try:
        rate_bits(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def unavailable() -> str | None:
    """Why a network namespace with tc can't be made here, or None."""
    for tool in ("unshare", "ip", "tc"):
        if not shutil.which(tool):
            return f"{tool} is not installed (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "--net", "--map-root-user", "tc", "qdisc", "show", "dev", "lo"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"can't make a network namespace: {probe.stderr.strip()}"
    return None


def run(rate: str, command: list[str]) -> int:
    """`command` in a new network namespace whose loopback is limited to `rate`."""
    bits = rate_bits(rate)
    setup = ["ip link set lo mtu 1500 up"]
    if bits != math.inf:
        burst = 2 * 1600  # two Ethernet frames: messages pay the rate from their first byte, as on a real link
        setup.append(f"tc qdisc add dev lo root tbf rate {int(bits)}bit burst {burst} latency 400ms")
    script = " && ".join(setup) + ' && exec "$@"'
    env = {**os.environ, **TCP_ENV}
    return subprocess.run(["unshare", "--net", "--map-root-user", "sh", "-c", script, "netsim", *command],
                          env=env).returncode


def sweep(shape: str, ranks: list[int], rates: list[str], args: list[str], out: Path) -> None:
    """The bench at each (rate, world size), equal budgets, f32 and q80 buffers -> out (JSON)."""
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec"
    points = json.loads(out.read_text()) if out.exists() else []
    for rate in rates:
        for n in ranks:
            if any(p["rate"] == rate and p["world_size"] == n for p in points):
                continue
            print(f"netsim: {n} ranks at {rate}", file=sys.stderr, flush=True)
            command = [mpiexec, "-n", str(n), sys.executable, "-m", "dllama_mpi", "bench", "--shape", shape,
                       "--memory-budget", *["1"] * n, "--buffer-float-type", "f32", "q80", *args, "--json"]
            result = subprocess.run([sys.executable, __file__, "run", "--rate", rate, "--", *command],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"netsim: {n} ranks at {rate} failed:\n{result.stderr[-3000:]}")
            for line in result.stdout.splitlines():
                if line.startswith("{"):
                    points.append({**json.loads(line), "rate": rate})
            out.write_text(json.dumps(points, indent=1))  # kept after each point: a sweep resumes


# ------------------------------------------------------------------ the cost model
def traffic_of(point: dict):
    from dllama_mpi.commands.bench import SHAPES
    from dllama_mpi.parallel.plan import make_plan

    return make_plan(SHAPES[point["shape"]], point["budgets"]).traffic(point["buffer_float_type"])


def header_ratio(points: list[dict]) -> float:
    """Bytes on the loopback per byte the plan says must cross (TCP/IP, MPI headers, acks)."""
    ratios = [p["loopback_bytes_per_token"] / traffic_of(p).wire for p in points if p.get("loopback_bytes_per_token")]
    return statistics.median(ratios) if ratios else 1.0


def model_terms(point: dict, header: float) -> tuple[float, float, dict]:
    """(measured seconds per token, compute seconds, {term: coefficient of its parameter})."""
    n = point["world_size"]
    traffic = traffic_of(point)
    bits = rate_bits(point["rate"])
    return 1 / point["decode_tokens_per_s"], max(point["compute_s_per_token"]), {
        f"alpha_{n}": traffic.collectives * math.ceil(math.log2(n)),
        "gamma": traffic.wire,
        "phi": 0.0 if bits == math.inf else 8 * header * traffic.wire / bits,
    }


def fit(points: list[dict]) -> dict:
    """{alpha_N (s per message round), gamma (s per byte), phi, header}: least squares on
    the relative error of the communication part."""
    import numpy as np

    header = header_ratio(points)
    names = sorted({f"alpha_{p['world_size']}" for p in points}) + ["gamma", "phi"]
    rows, rhs = [], []
    for p in points:
        t, compute, coef = model_terms(p, header)
        rows.append([coef.get(name, 0.0) / t for name in names])
        rhs.append((t - compute) / t)
    solution, *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    return {**dict(zip(names, (float(v) for v in solution))), "header": header}


def predict(point: dict, params: dict, latency_s: float = 0.0) -> float:
    """Seconds per token for `point`, optionally with a one-way latency added to every round."""
    _, compute, coef = model_terms(point, params["header"])
    alpha = f"alpha_{point['world_size']}"
    return compute + coef[alpha] * (params[alpha] + latency_s) + sum(coef[k] * params[k] for k in ("gamma", "phi"))


def report(points: list[dict]) -> str:
    params = fit(points)
    alphas = ", ".join(f"{k[6:]} ranks {v * 1e6:.0f} us" for k, v in params.items() if k.startswith("alpha_"))
    lines = [f"fitted: alpha (per message round) {alphas}; gamma {params['gamma'] * 1e9:.2f} ns per byte; "
             f"phi {params['phi']:.2f}; header {params['header']:.3f} link bytes per payload byte (measured)",
             "", "| ranks | buffers | link | measured tok/s | model tok/s | error | wire KiB/token: plan / loopback |",
             "|---|---|---|---|---|---|---|"]
    worst = 0.0
    for p in sorted(points, key=lambda p: (p["world_size"], p["buffer_float_type"], rate_bits(p["rate"]))):
        measured, modelled = p["decode_tokens_per_s"], 1 / predict(p, params)
        error = modelled / measured - 1
        worst = max(worst, abs(error))
        loop = p.get("loopback_bytes_per_token")
        lines.append(f"| {p['world_size']} | {p['buffer_float_type']} | {p['rate']} | {measured:.2f} | {modelled:.2f} | "
                     f"{error:+.0%} | {traffic_of(p).wire / 1024:.0f} / {'-' if loop is None else f'{loop / 1024:.0f}'} |")
    lines += ["", f"largest model error: {worst:.0%}", "",
              "projected decode tok/s on a 1 Gbit/s link at one-way latency:", "",
              "| ranks | buffers | " + " | ".join(f"{ms} ms" for ms in PROJECTED_LATENCIES_MS) + " |",
              "|---|---|" + "---|" * len(PROJECTED_LATENCIES_MS)]
    for p in sorted(points, key=lambda p: (p["world_size"], p["buffer_float_type"])):
        if p["rate"] == "1gbit":
            cells = [f"{1 / predict(p, params, ms / 1e3):.2f}" for ms in PROJECTED_LATENCIES_MS]
            lines.append(f"| {p['world_size']} | {p['buffer_float_type']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/netsim.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run", help="run a command with its ranks on a rate-limited TCP link")
    r.add_argument("--rate", type=rate_arg, default="1gbit", help="e.g. 100mbit, 1gbit, unlimited (default 1gbit)")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    s = sub.add_parser("sweep", help="the bench at 2 and 4 ranks x 100mbit, 1gbit, unlimited")
    s.add_argument("--shape", default="tinyllama-1.1b")
    s.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    s.add_argument("--rates", nargs="+", type=rate_arg, default=list(RATES))
    s.add_argument("--out", type=Path, required=True, help="JSON file (a sweep resumes from it)")
    s.add_argument("--bench-args", default="--repeat 3 --decode-steps 16 --prompt-lengths 8",
                   help="more options for the bench (default: %(default)s)")
    m = sub.add_parser("model", help="fit the cost model to a sweep, check it, project latencies")
    m.add_argument("sweep_file", type=Path)
    args = p.parse_args(argv)
    if args.verb == "model":
        print(report(json.loads(args.sweep_file.read_text())))
        return 0
    if problem := unavailable():
        print(f"netsim: {problem}", file=sys.stderr)
        return 2
    if args.verb == "run":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            p.error("run: give the command after --")
        return run(args.rate, command)
    sweep(args.shape, args.ranks, args.rates, args.bench_args.split(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
