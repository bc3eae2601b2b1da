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
cross; at a point marked greedy, which sweep marks, each rank's greedy token of a row in place
of its logits); rounds(N) = ceil(log2 N) message rounds per collective; alpha_N: per-round cost on
this machine at N ranks (4 ranks on 2 cores pay for the oversubscription here); gamma:
per-byte cost of the TCP stack; header: link bytes per payload byte, measured (loopback
bytes / wire bytes, median over the sweep); phi: the part of the link time that is not
hidden behind other ranks' compute (a rank that finishes early sends while the others still
compute). alpha_N, gamma and phi are fitted by least squares on relative error; `latency`
(one way) is the projection's added term.

With speculation (`model --speculation A,R`), a step verifies r rows (1 + the drafts) and
yields a tokens (the drafts accepted + 1), both measured (the CLI's `speculation:` line:
a = tokens / steps, r = 1 + drafted / steps). A step of r rows starts the same collectives as
one row, moves r times the bytes (every row's activations, and every row's logits to rank 0
for the check, or at a greedy point each row's greedy token: see wire_of), and computes r rows:
    t = (compute(r) + collectives * rounds(N) * (alpha_N + latency) + r * wire * (gamma + phi * header * 8 / rate)) / a
compute(r) = compute + (1 + c) * extra(r): extra(R) is what a forward pass of R rows took
beyond one row in the bench's `--rows 1 ... R` (seconds a pass, at the point's rate, less the
model's cost of the extra R - 1 rows' wire), linear between the row counts measured; c is the
classifier's share of the slowest rank's weight bytes against its layers' (the bench's
passes compute one row's logits, a verification every row's; its extra rows are taken to cost
what the layers' cost per weight byte). With a = r = 1 it is the model above.
"""

from __future__ import annotations

import argparse
import functools
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


def sweep(shape: str, ranks: list[int], rates: list[str], args: list[str], out: Path, model: str | None = None) -> None:
    """The bench at each (rate, world size), equal budgets, f32 and q80 buffers -> out (JSON);
    of the model file `model` in place of the shape's random weights when given."""
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or "mpiexec"
    points = json.loads(out.read_text()) if out.exists() else []
    for rate in rates:
        for n in ranks:
            if any(p["rate"] == rate and p["world_size"] == n for p in points):
                continue
            print(f"netsim: {n} ranks at {rate}", file=sys.stderr, flush=True)
            which = ["--model", model] if model else ["--shape", shape]
            command = [mpiexec, "-n", str(n), sys.executable, "-m", "dllama_mpi", "bench", *which,
                       "--memory-budget", *["1"] * n, "--buffer-float-type", "f32", "q80", *args, "--json"]
            result = subprocess.run([sys.executable, __file__, "run", "--rate", rate, "--", *command],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"netsim: {n} ranks at {rate} failed:\n{result.stderr[-3000:]}")
            for line in result.stdout.splitlines():
                if line.startswith("{"):
                    points.append({**json.loads(line), "rate": rate, "greedy": True})  # see wire_of
            out.write_text(json.dumps(points, indent=1))  # kept after each point: a sweep resumes


# ------------------------------------------------------------------ the cost model
@functools.cache
def _spec(shape: str, model: str | None):
    """A bench shape's spec, or a model file's (the bench's --model: its "shape" is the path)."""
    from dllama_mpi.commands.bench import SHAPES

    if shape in SHAPES:
        return SHAPES[shape]
    from dllama_mpi.files.modelfile import open_model

    handle = open_model(model or shape)
    try:
        return handle.spec
    finally:
        handle.close()


def plan_of(point: dict):
    from dllama_mpi.parallel.plan import make_plan

    return make_plan(_spec(point["shape"], point.get("model")), point["budgets"])


def traffic_of(point: dict):
    return plan_of(point).traffic(point["buffer_float_type"])


def logits_wire(point: dict) -> int:
    """Bytes of one row's logits that cross to rank 0 (f32, every other rank's vocabulary part)."""
    return sum(4 * (b - a) for a, b in plan_of(point).segments("vocab")[1:])


def wire_of(point: dict) -> int:
    """Bytes that must cross a decoded token: the plan's Traffic.wire, whose logits travel as f32;
    at a greedy point (point["greedy"], which sweep sets: the bench decodes greedily, and a greedy
    step gathers each rank's best (value, id) of a row, 8 bytes, in place of its logits) those instead."""
    wire = traffic_of(point).wire
    return wire - logits_wire(point) + 8 * (point["world_size"] - 1) if point.get("greedy") else wire


def header_ratio(points: list[dict]) -> float:
    """Bytes on the loopback per byte the plan says must cross (TCP/IP, MPI headers, acks)."""
    ratios = [p["loopback_bytes_per_token"] / wire_of(p) for p in points if p.get("loopback_bytes_per_token")]
    return statistics.median(ratios) if ratios else 1.0


def model_terms(point: dict, header: float) -> tuple[float, float, dict]:
    """(measured seconds per token, compute seconds, {term: coefficient of its parameter})."""
    n = point["world_size"]
    traffic, wire = traffic_of(point), wire_of(point)
    bits = rate_bits(point["rate"])
    return 1 / point["decode_tokens_per_s"], max(point["compute_s_per_token"]), {
        f"alpha_{n}": traffic.collectives * math.ceil(math.log2(n)),
        "gamma": wire,
        "phi": 0.0 if bits == math.inf else 8 * header * wire / bits,
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


# ------------------------------------------------------------------ with speculation
def classifier_share(point: dict) -> float:
    """c: the classifier's weight bytes against the layers' on the slowest rank (compute_s_per_token)."""
    plan = plan_of(point)
    spec, rank = plan.spec, max(range(point["world_size"]), key=lambda r: point["compute_s_per_token"][r])
    a, b = plan.rows("output", rank)
    classifier = (b - a) * spec.resident_row_bytes("tok_embeddings" if spec.shared_classifier else "output")
    embedding = 0 if spec.shared_classifier else (b - a) * spec.resident_row_bytes("tok_embeddings")
    return classifier / (plan.weight_bytes(rank) - classifier - embedding)


def byte_cost(point: dict, params: dict) -> float:
    """The model's seconds per byte of wire at the point's rate: gamma + phi * header * 8 / rate."""
    return params["gamma"] + params["phi"] * 8 * params["header"] / rate_bits(point["rate"])


def extra_rows_s(point: dict, params: dict, rows: float) -> float:
    """extra(rows): the compute seconds a pass of `rows` rows took beyond one row's, from the
    bench's rows_per_step (--rows 1 ... R) at the point's rate, less the model's cost of the extra
    rows' wire (the bench's passes gather one row's logits); linear between the counts measured."""
    if rows == 1:
        return 0.0
    step = {m["rows"]: m["rows"] / m["tok_s"] for m in point.get("rows_per_step") or []}  # seconds a pass
    counts = sorted(step)
    if 1 not in step or rows < 1 or rows > counts[-1]:
        raise ValueError(f"{rows:g} rows a step: the point needs the bench's --rows 1 ... {math.ceil(rows)} "
                         f"(it has {counts or 'none'})")
    per_row_wire = traffic_of(point).wire - logits_wire(point)
    extra = {r: step[r] - step[1] - (r - 1) * per_row_wire * byte_cost(point, params) for r in counts}
    lo = max(r for r in counts if r <= rows)
    hi = min(r for r in counts if r >= rows)
    return extra[lo] if hi == lo else extra[lo] + (extra[hi] - extra[lo]) * (rows - lo) / (hi - lo)


def compute_rows(point: dict, params: dict, rows: float) -> float:
    """compute(r): the slowest rank's compute seconds for a step of r rows whose logits all go to rank 0."""
    compute = max(point["compute_s_per_token"])
    return compute if rows == 1 else compute + (1 + classifier_share(point)) * extra_rows_s(point, params, rows)


def predict_speculative(point: dict, params: dict, a: float, r: float, latency_s: float = 0.0) -> float:
    """Seconds per decoded token when each step verifies r rows (1 + drafts) and yields a tokens
    (accepted drafts + 1): the step's collectives are one row's, its wire r rows'. a = r = 1 is predict."""
    if not 1 <= a <= r:
        raise ValueError(f"a = {a:g}, r = {r:g}: a step yields 1 to r tokens (1 <= a <= r)")
    _, _, coef = model_terms(point, params["header"])
    alpha = f"alpha_{point['world_size']}"
    wire = sum(coef[k] * params[k] for k in ("gamma", "phi"))
    return (compute_rows(point, params, r) + coef[alpha] * (params[alpha] + latency_s) + r * wire) / a


def speculation_arg(text: str) -> tuple[str, float, float]:
    """'A,R' or 'LABEL=A,R' -> (label, a, r)."""
    label, _, pair = text.rpartition("=")
    try:
        a, r = (float(v) for v in pair.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give A,R (tokens a step, rows a step) or LABEL=A,R") from None
    if not 1 <= a <= r:
        raise argparse.ArgumentTypeError(f"{text!r}: a step yields 1 to r tokens (1 <= A <= R)")
    return label or f"{a:g},{r:g}", a, r


def speculation_rows(points: list[dict], params: dict, speculation) -> list[dict]:
    """Per 1 Gbit/s point and (label, a, r): projected tok/s without and with speculation at
    PROJECTED_LATENCIES_MS, and the collectives a token; None where the point lacks the rows."""
    out = []
    for p in sorted(points, key=lambda p: (p["world_size"], p["buffer_float_type"])):
        if p["rate"] != "1gbit":
            continue
        collectives = traffic_of(p).collectives
        for label, a, r in speculation:
            row = {"ranks": p["world_size"], "buffers": p["buffer_float_type"], "label": label, "a": a, "r": r,
                   "collectives_per_token_off": collectives, "collectives_per_token_on": collectives / a}
            try:
                row["compute_ms_off"] = 1e3 * compute_rows(p, params, 1)
                row["compute_ms_on_per_step"] = 1e3 * compute_rows(p, params, r)
                for ms in (0.0, *PROJECTED_LATENCIES_MS):
                    row[f"tok_s_off_{ms:g}ms"] = 1 / predict(p, params, ms / 1e3)
                    row[f"tok_s_on_{ms:g}ms"] = 1 / predict_speculative(p, params, a, r, ms / 1e3)
            except ValueError as exc:
                row["missing"] = str(exc)
            out.append(row)
    return out


def speculation_report(points: list[dict], params: dict, speculation) -> str:
    lines = ["projected decode tok/s on a 1 Gbit/s link, without / with speculation (a tokens and r rows a step, "
             "measured); collectives a token: 4 a layer + 2, / a with speculation:", "",
             "| ranks | buffers | task | a | r | collectives/token | no latency | "
             + " | ".join(f"{ms} ms" for ms in PROJECTED_LATENCIES_MS) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(PROJECTED_LATENCIES_MS)]
    for row in speculation_rows(points, params, speculation):
        head = f"| {row['ranks']} | {row['buffers']} | {row['label']} | {row['a']:.2f} | {row['r']:.2f} | "
        if "missing" in row:
            lines.append(head + f"{row['collectives_per_token_off']} / - | {row['missing']} |")
            continue
        cells = [f"{row[f'tok_s_off_{ms:g}ms']:.2f} / {row[f'tok_s_on_{ms:g}ms']:.2f}"
                 for ms in (0.0, *PROJECTED_LATENCIES_MS)]
        lines.append(head + f"{row['collectives_per_token_off']} / {row['collectives_per_token_on']:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(points: list[dict], params: dict | None = None, speculation=()) -> str:
    """The fit (of `points`, or `params` fitted elsewhere), its check and the latency projection;
    with `speculation` ((label, a, r), ...) the projection with speculation too."""
    params = params or fit(points)
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
                     f"{error:+.0%} | {wire_of(p) / 1024:.0f} / {'-' if loop is None else f'{loop / 1024:.0f}'} |")
    lines += ["", f"largest model error: {worst:.0%}", "",
              "projected decode tok/s on a 1 Gbit/s link at one-way latency:", "",
              "| ranks | buffers | " + " | ".join(f"{ms} ms" for ms in PROJECTED_LATENCIES_MS) + " |",
              "|---|---|" + "---|" * len(PROJECTED_LATENCIES_MS)]
    for p in sorted(points, key=lambda p: (p["world_size"], p["buffer_float_type"])):
        if p["rate"] == "1gbit":
            cells = [f"{1 / predict(p, params, ms / 1e3):.2f}" for ms in PROJECTED_LATENCIES_MS]
            lines.append(f"| {p['world_size']} | {p['buffer_float_type']} | " + " | ".join(cells) + " |")
    if speculation:
        lines += ["", speculation_report(points, params, speculation)]
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
    s.add_argument("--model", help="a model file (.h5) to bench in place of --shape's random weights")
    m.add_argument("sweep_file", type=Path)
    m.add_argument("--speculation", type=speculation_arg, action="append", default=[], metavar="[LABEL=]A,R",
                   help="also project with speculation: A tokens a step (accepted drafts + 1), R rows a step "
                        "(1 + drafts), as measured (the CLI's speculation: line); repeatable. The 1 Gbit/s "
                        "points need the bench's rows_per_step up to R (sweep --bench-args '... --rows 1 2 4 8 9')")
    m.add_argument("--fit-on", type=Path, metavar="SWEEP_FILE",
                   help="fit the parameters on this sweep instead (another model's) and apply them to sweep_file's")
    m.add_argument("--json", type=Path, metavar="FILE", help="also write the parameters and projections as JSON")
    args = p.parse_args(argv)
    if args.verb == "model":
        points = json.loads(args.sweep_file.read_text())
        params = fit(json.loads(args.fit_on.read_text())) if args.fit_on else fit(points)
        if args.fit_on:
            print(f"(the parameters fitted on {args.fit_on}, applied to {args.sweep_file}'s points)\n")
        print(report(points, params, args.speculation))
        if args.json:
            args.json.write_text(json.dumps({
                "params": params, "fitted_on": str(args.fit_on or args.sweep_file),
                "model_tok_s": [{"ranks": q["world_size"], "buffers": q["buffer_float_type"], "rate": q["rate"],
                                 "measured": q["decode_tokens_per_s"], "model": 1 / predict(q, params)} for q in points],
                "speculation": speculation_rows(points, params, args.speculation)}, indent=1))
        return 0
    if problem := unavailable():
        print(f"netsim: {problem}", file=sys.stderr)
        return 2
    if args.verb == "run":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            p.error("run: give the command after --")
        return run(args.rate, command)
    sweep(args.shape, args.ranks, args.rates, args.bench_args.split(), args.out, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
