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
