"""tools/netsim.py: the cost model's fit, and ranks on a rate-limited TCP loopback (tiny shape)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import MPIEXEC, REPO

import netsim

pytestmark = pytest.mark.tools  # every test here runs a tool of tools/


def test_rates_parse_and_bad_ones_say_how():
    assert netsim.rate_bits("100mbit") == 1e8 and netsim.rate_bits("1gbit") == 1e9
    assert netsim.rate_bits("unlimited") == math.inf
    with pytest.raises(ValueError, match="give e.g. 100mbit"):
        netsim.rate_bits("fast")


def test_the_fit_recovers_the_parameters_that_made_the_points():
    truth = {"alpha_2": 60e-6, "alpha_3": 120e-6, "alpha_4": 190e-6, "gamma": 4e-9, "phi": 0.7, "header": 1.04}
    points = []
    for n, budgets in ((2, [1, 1]), (4, [1, 1, 1, 1]), (3, [2, 1, 1])):
        for buffer_type in ("f32", "q80"):
            for rate in ("100mbit", "1gbit", "unlimited"):
                p = {"shape": "tinyllama-1.1b", "world_size": n, "budgets": budgets, "buffer_float_type": buffer_type,
                     "rate": rate, "compute_s_per_token": [0.05] * n, "decode_tokens_per_s": 1.0}
                p["decode_tokens_per_s"] = 1 / netsim.predict(p, truth)
                p["loopback_bytes_per_token"] = truth["header"] * netsim.traffic_of(p).wire
                points.append(p)
    assert netsim.fit(points) == pytest.approx(truth, rel=1e-6)
    assert "largest model error: 0%" in netsim.report(points)
    # a latency adds one term per message round: the collectives x ceil(log2 N)
    p = points[0]
    rounds = netsim.traffic_of(p).collectives * math.ceil(math.log2(p["world_size"]))
    assert netsim.predict(p, truth, 0.5e-3) - netsim.predict(p, truth) == pytest.approx(rounds * 0.5e-3)


def test_ranks_talk_tcp_over_the_limited_loopback():
    problem = netsim.unavailable()
    if problem:
        pytest.skip(f"netsim can't run here: {problem}")
    bench = [MPIEXEC, "-n", "2", sys.executable, "-m", "dllama_mpi", "bench", "--shape", "tiny", "--repeat", "1",
             "--decode-steps", "8", "--prompt-lengths", "8", "--buffer-float-type", "f32", "q80", "--json"]
    result = subprocess.run([sys.executable, str(REPO / "tools" / "netsim.py"), "run", "--rate", "100mbit", "--", *bench],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["buffer_float_type"] for r in rows] == ["f32", "q80"]
    for r in rows:
        wire = netsim.traffic_of({**r, "rate": "100mbit"}).wire
        # every byte between the ranks crossed the loopback (plus TCP/IP and MPI headers, acks)
        assert wire <= r["loopback_bytes_per_token"] < 1.6 * wire, (wire, r["loopback_bytes_per_token"])


# ------------------------------------------------------------------ with speculation
PARAMS = {"alpha_2": 60e-6, "gamma": 4e-9, "phi": 0.7, "header": 1.04}


def spec_point(rows_per_step=None):
    """A hand-made 2-rank q80 point at 1 Gbit/s; rows_per_step as the bench's --rows gives it."""
    p = {"shape": "tinyllama-1.1b", "world_size": 2, "budgets": [1, 1], "buffer_float_type": "q80",
         "rate": "1gbit", "compute_s_per_token": [0.04, 0.05], "decode_tokens_per_s": 1.0}
    if rows_per_step is not None:
        p["rows_per_step"] = rows_per_step
    return p


def bench_rows(p, extra_s_per_row: float, counts=(1, 2, 4, 8)):
    """rows_per_step whose passes cost one row's time plus `extra_s_per_row` compute and the bench's wire
    (one row's logits) for each further row: extra(R) is then (R - 1) x extra_s_per_row."""
    one = netsim.predict(p, PARAMS)
    per_row_wire = netsim.traffic_of(p).wire - netsim.logits_wire(p)
    out = []
    for r in counts:
        step = one + (r - 1) * (extra_s_per_row + per_row_wire * netsim.byte_cost(p, PARAMS))
        out.append({"rows": r, "tok_s": r / step})
    return out


def test_speculation_with_one_token_and_one_row_a_step_is_the_plain_projection():
    p = spec_point()  # one row needs no rows_per_step
    for latency in (0.0, 0.1e-3, 2e-3):
        assert netsim.predict_speculative(p, PARAMS, 1, 1, latency) == pytest.approx(netsim.predict(p, PARAMS, latency))


def test_speculation_divides_the_latency_by_the_tokens_a_step_and_pays_for_the_rows():
    p = spec_point()
    p["rows_per_step"] = bench_rows(p, 0.004)
    c = netsim.classifier_share(p)
    assert 0 < c < 1
    # extra(R) recovered from the bench's passes, linear between the counts measured, x (1 + c) for every row's logits
    assert netsim.extra_rows_s(p, PARAMS, 4) == pytest.approx(3 * 0.004)
    assert netsim.extra_rows_s(p, PARAMS, 5.5) == pytest.approx(4.5 * 0.004)
    assert netsim.compute_rows(p, PARAMS, 3) == pytest.approx(0.05 + (1 + c) * 2 * 0.004)
    a, r = 4.0, 5.0
    rounds = netsim.traffic_of(p).collectives  # ceil(log2 2) = 1 round a collective
    t0 = netsim.predict_speculative(p, PARAMS, a, r)
    assert netsim.predict_speculative(p, PARAMS, a, r, 2e-3) - t0 == pytest.approx(rounds * 2e-3 / a)
    wire = netsim.traffic_of(p).wire * netsim.byte_cost(p, PARAMS)
    assert t0 == pytest.approx((netsim.compute_rows(p, PARAMS, r) + rounds * PARAMS["alpha_2"] + r * wire) / a)
    # latency dominating: 4 tokens a step are several times faster; no draft accepted: slower than without
    assert netsim.predict(p, PARAMS, 2e-3) / netsim.predict_speculative(p, PARAMS, a, r, 2e-3) > 2.5
    assert netsim.predict_speculative(p, PARAMS, 1, r) > netsim.predict(p, PARAMS)


def test_speculation_needs_the_rows_measured_and_a_between_1_and_r():
    p = spec_point(bench_rows(spec_point(), 0.004, counts=(1, 2, 4)))
    with pytest.raises(ValueError, match="--rows 1 ... 6"):
        netsim.predict_speculative(p, PARAMS, 3, 5.5)
    with pytest.raises(ValueError, match="1 <= a <= r"):
        netsim.predict_speculative(p, PARAMS, 3, 2)
    assert netsim.speculation_arg("rewrite=4.2,5.1") == ("rewrite", 4.2, 5.1)
    assert netsim.speculation_arg("2,3") == ("2,3", 2.0, 3.0)
    with pytest.raises(Exception, match="1 <= A <= R"):
        netsim.speculation_arg("3,2")


def test_model_prints_and_writes_the_speculation_projection(tmp_path, capsys):
    points = []
    for buffer_type in ("f32", "q80"):
        for rate in ("100mbit", "1gbit", "unlimited"):
            p = {**spec_point(), "buffer_float_type": buffer_type, "rate": rate}
            p["decode_tokens_per_s"] = 1 / netsim.predict(p, PARAMS)
            p["loopback_bytes_per_token"] = PARAMS["header"] * netsim.traffic_of(p).wire
            p["rows_per_step"] = bench_rows(p, 0.004)
            points.append(p)
    assert netsim.fit(points) == pytest.approx(PARAMS, rel=1e-6)
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps(points))
    assert netsim.main(["model", str(sweep_file), "--speculation", "rewrite=4,5", "--json", str(tmp_path / "o.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(netsim.report(points) + "\n\n")  # what it printed before, then the speculation table
    assert "| 2 | q80 | rewrite | 4.00 | 5.00 | 90 / 22.5 |" in out and "| 2 | f32 | rewrite |" in out
    rows = json.loads((tmp_path / "o.json").read_text())["speculation"]
    assert [(r["buffers"], r["label"]) for r in rows] == [("f32", "rewrite"), ("q80", "rewrite")]
    assert all(r["tok_s_on_2ms"] > 2.5 * r["tok_s_off_2ms"] for r in rows)


def test_a_greedy_point_moves_each_rows_greedy_token_in_place_of_its_logits():
    p = spec_point()
    greedy = {**p, "greedy": True}
    assert netsim.wire_of(p) == netsim.traffic_of(p).wire  # the plan's, f32 logits
    assert netsim.wire_of(greedy) == netsim.traffic_of(p).wire - netsim.logits_wire(p) + 8
    assert netsim.logits_wire(p) == 4 * 32000 // 2  # TinyLlama's vocabulary, rank 1's half
    # the wire term scales with the rows a step: r x (activations + greedy tokens)
    a, r = 2.0, 3.0
    p["rows_per_step"] = greedy["rows_per_step"] = bench_rows(p, 0.004)
    saved = (r * (netsim.wire_of(p) - netsim.wire_of(greedy)) * netsim.byte_cost(p, PARAMS)) / a
    assert (netsim.predict_speculative(p, PARAMS, a, r) - netsim.predict_speculative(greedy, PARAMS, a, r)
            == pytest.approx(saved))
