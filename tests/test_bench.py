"""The benchmark command runs under mpiexec and reports what it promises (tiny shape)."""

from __future__ import annotations

import json
import sys

from conftest import run_mpiexec

KEYS = ("shape", "world_size", "budgets", "buffer_float_type", "decode_tokens_per_s", "prefill_tokens_per_s",
        "bandwidth_gb_s", "roofline_fraction", "bytes_sent_per_token", "compute_s_per_token",
        "collective_s_per_token", "peak_rss_mb", "time_to_first_token_s", "load_gb_s", "wait_s_per_token")


def test_bench_json_under_mpiexec(tmp_path):
    result = run_mpiexec(3, [sys.executable, "-m", "dllama_mpi.bench", "--shape", "tiny", "--memory-budget", "2", "1", "1",
                             "--buffer-float-type", "q80", "f32", "--prompt-lengths", "16", "40", "--decode-steps", "4",
                             "--repeat", "1", "--json"], timeout=300, env={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["buffer_float_type"] for r in lines] == ["q80", "f32"]
    for r in lines:
        assert all(k in r for k in KEYS), set(KEYS) - set(r)
        assert r["world_size"] == 3 and r["budgets"] == [2, 1, 1] and r["shape"] == "tiny"
        assert r["decode_tokens_per_s"] > 0 and set(r["prefill_tokens_per_s"]) == {"16", "40"}
        assert 0 < r["roofline_fraction"] < 1 and r["bandwidth_gb_s"] > 0
        assert len(r["bytes_sent_per_token"]) == len(r["peak_rss_mb"]) == len(r["collective_s_per_token"]) == 3
        assert all(b > 0 for b in r["bytes_sent_per_token"])
    # q80 buffers send fewer bytes than f32 (the tiny shape's vectors are whole blocks)
    assert sum(lines[0]["bytes_sent_per_token"]) < sum(lines[1]["bytes_sent_per_token"])
