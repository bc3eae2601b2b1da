"""tools/auto_budget_bench.py: its pure parts on fixed numbers (no MPI run)."""

from __future__ import annotations

import json

import pytest

import auto_budget_bench as ab

pytestmark = pytest.mark.tools  # every test here runs a tool of tools/


def test_memory_budgets_split_the_available_memory_evenly_in_mib_as_common_sh_does():
    from dllama_mpi.parallel.budgets import available_memory

    before = available_memory() // 2**20
    assert abs(ab.available_mib() - before) < 256  # what common.sh's python line prints, give or take other processes
    assert ab.memory_budgets(22119, 2) == ["11059MiB", "11059MiB"]
    assert ab.memory_budgets(1000, 3) == ["333MiB"] * 3
    assert ab.config_budgets(22119) == {"equal": ["1", "1"], "memory": ["11059MiB", "11059MiB"], "auto": ["auto"]}


def test_schedule_interleaves_the_configs_round_by_round():
    assert ab.schedule(2) == [(0, "equal"), (0, "memory"), (0, "auto"), (1, "equal"), (1, "memory"), (1, "auto")]


def test_bench_command_pins_two_single_thread_ranks():
    command = ab.bench_command("/x/mpiexec", ["--shape", "tiny"], ["auto"], 16)
    assert command[:7] == ["/x/mpiexec", "-n", "2", str(ab.TOOLS / "pinned"), "0", "1", "--"]
    tail = command[7:]
    assert tail[1:4] == ["-m", "dllama_mpi", "bench"]
    for flag, value in (("--memory-budget", "auto"), ("--nthreads", "1"), ("--decode-steps", "16"), ("--repeat", "1"),
                        ("--shape", "tiny"), ("--prompt-lengths", "8")):
        assert tail[tail.index(flag) + 1] == value
    assert "--json" in tail


def test_parse_bench_keeps_the_first_json_line_and_auto_report_its_account():
    first = {"decode_tokens_per_s": 12.5, "budgets_chosen": [667, 333], "auto_predicted_ms_per_token": 70.0,
             "auto_equal_predicted_ms_per_token": 95.0, "kernel_isa": "avx2", "compute_s_per_token": [0.04, 0.03],
             "collective_s_per_token": [0.01, 0.02]}
    out = "noise\n" + json.dumps(first) + "\n" + json.dumps({**first, "decode_tokens_per_s": 1.0}) + "\n"
    assert ab.parse_bench(out) == {"decode_tok_s": 12.5, "budgets_chosen": [667, 333], "auto_predicted_ms": 70.0,
                                   "auto_equal_predicted_ms": 95.0, "kernel_isa": "avx2",
                                   "compute_ms_per_rank": [40.0, 30.0], "collective_ms_per_rank": [10.0, 20.0]}
    assert ab._per_rank(ab.parse_bench(out)) == "rank 0 40.0 / 10.0, rank 1 30.0 / 20.0"
    with pytest.raises(ValueError):
        ab.parse_bench("no json here\n")
    err = ("loading\nmeasured, ms per token: a x share + o\n  rank 0: 50.0 x share + 1.0\n  collectives: 0.5 ms per token\n"
           "--memory-budget auto chose 667 333 (shares 66.7% 33.3%): predicted 23.0 ms per token, against 33.1\nplan x\n")
    assert ab.auto_report(err) == err.splitlines()[1:5]
    assert ab.auto_report("plan x\n") == []


def _row(config, tok_s, chosen=(1, 1), predicted=None, equal_predicted=None):
    budgets = {"equal": ["1", "1"], "memory": ["100MiB", "100MiB"], "auto": ["auto"]}[config]
    return {"config": config, "budgets": budgets, "decode_tok_s": tok_s, "budgets_chosen": list(chosen),
            "auto_predicted_ms": predicted, "auto_equal_predicted_ms": equal_predicted}


ROWS = [_row("equal", 10.0), _row("memory", 9.0), _row("auto", 14.0, (667, 333), 70.0, 100.0),
        _row("equal", 12.0), _row("memory", 11.0), _row("auto", 16.0, (667, 333), 60.0, 90.0),
        _row("equal", 11.0), _row("memory", 10.0), _row("auto", 15.0, (2, 1), 65.0, 95.0)]


def test_summarize_medians_ratios_and_the_prediction_error():
    equal, memory, auto = ab.summarize(ROWS)
    assert [s["config"] for s in (equal, memory, auto)] == ["equal", "memory", "auto"]
    assert equal["decode_tok_s"] == {"median": 11.0, "min": 10.0, "max": 12.0} and equal["ratio_to_equal"] == 1.0
    assert memory["ratio_to_equal"] == pytest.approx(10.0 / 11.0) and memory["chosen"] == [[1, 1]]
    assert "predicted_ms" not in equal and "prediction_error" not in memory
    assert auto["ratio_to_equal"] == pytest.approx(15.0 / 11.0)
    assert auto["chosen"] == [[667, 333], [2, 1]]
    assert (auto["predicted_ms"], auto["equal_predicted_ms"]) == (65.0, 95.0)
    assert auto["measured_ms"] == pytest.approx(1000 / 15.0)
    assert auto["prediction_error"] == pytest.approx((65.0 - 1000 / 15.0) / (1000 / 15.0))


def test_summarize_without_equal_has_no_ratios():
    (auto,) = ab.summarize([_row("auto", 14.0, (667, 333), 70.0, 100.0)])
    assert auto["ratio_to_equal"] is None
    assert ab.goal_line([auto]).startswith("goal: not measured")


def test_markdown_table_and_goal_lines():
    summary = ab.summarize(ROWS)
    assert ab.markdown_table(summary).splitlines() == [
        "| budgets | chosen ratios | decode tok/s median (min-max) | ratio to equal |",
        "|---|---|---|---|",
        "| equal: `1 1` | 1 1 (50.0% 50.0%) | 11.00 (10.00-12.00) | 1.00 |",
        "| memory: `100MiB 100MiB` | 1 1 (50.0% 50.0%) | 10.00 (9.00-11.00) | 0.91 |",
        "| auto: `auto` | 667 333 (66.7% 33.3%), 2 1 (66.7% 33.3%) | 15.00 (14.00-16.00) | 1.36 |",
    ]
    assert ab.prediction_line(summary[2]) == ("auto predicted 65.0 ms per token (equal budgets: 95.0, medians of its "
                                              "runs), measured 66.7 (1000 / median tok/s): error -2.5%")
    assert ab.goal_line(summary) == ("goal: auto / equal = 1.36 (goal >= 1.3: met); prediction error -2.5% (goal within "
                                     "20%: met) -> PASS")
    slow = ab.summarize([_row("equal", 10.0), _row("auto", 11.0, (6, 4), 50.0, 60.0)])
    assert ab.goal_line(slow) == ("goal: auto / equal = 1.10 (goal >= 1.3: NOT met); prediction error -45.0% (goal "
                                  "within 20%: NOT met) -> FAIL")


def test_report_says_the_setup_and_that_memory_is_the_equal_split():
    facts = {"cpu": "Test CPU", "model": "shape tiny (random Q40 weights)", "repeat": 3, "decode_steps": 32,
             "hog": "taskset -c 1 python -c 'while True: pass'", "idle": True, "disturbed_runs": 1,
             "mem_available_mib": 200, "layout": "hog", "ranks": 2}
    text = ab.report(ab.summarize(ROWS), facts)
    assert "CPU: Test CPU" in text and "beside a CPU hog (taskset -c 1 python" in text
    assert "on one node that is the equal split" in text and "1 run(s) had another process" in text
    assert "NOT IDLE" not in text and "| auto: `auto` |" in text
    assert text.splitlines()[-2].startswith("auto predicted") and text.splitlines()[-1].startswith("goal: ")
    assert "MACHINE NOT IDLE" in ab.report(ab.summarize(ROWS), {**facts, "idle": False})
    shared = ab.report(ab.summarize(ROWS), {**facts, "layout": "shared", "ranks": 3, "hog": None})
    assert "1 and 2 sharing core 1" in shared and "/ 3 ranks per rank" in shared


def test_quota_parent_finds_a_v1_cpu_hierarchy_or_a_v2_root_with_cpu_enabled(tmp_path):
    v1 = tmp_path / "v1"
    (v1 / "sys/fs/cgroup/cpu,cpuacct").mkdir(parents=True)
    (v1 / "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us").write_text("-1\n")
    assert ab.quota_parent(v1) == (v1 / "sys/fs/cgroup/cpu,cpuacct", "v1")
    v2 = tmp_path / "v2"
    (v2 / "sys/fs/cgroup").mkdir(parents=True)
    (v2 / "sys/fs/cgroup/cgroup.subtree_control").write_text("memory pids\n")
    assert ab.quota_parent(v2) is None  # cpu not enabled for the children
    (v2 / "sys/fs/cgroup/cgroup.subtree_control").write_text("cpu memory pids\n")
    assert ab.quota_parent(v2) == (v2 / "sys/fs/cgroup", "v2")
    assert ab.quota_parent(tmp_path / "none") is None


def test_the_quota_layout_puts_rank_1_in_the_cgroup_through_pinned():
    command = ab.bench_command("/x/mpiexec", ["--shape", "tiny"], ["1", "1"], 16, ["0", "1@/sys/fs/cgroup/cpu/half"])
    assert command[:7] == ["/x/mpiexec", "-n", "2", str(ab.TOOLS / "pinned"), "0", "1@/sys/fs/cgroup/cpu/half", "--"]
    facts = {"cpu": "Test CPU", "model": "shape tiny (random Q40 weights)", "repeat": 3, "decode_steps": 32,
             "hog": None, "idle": True, "disturbed_runs": 0, "mem_available_mib": 200, "layout": "quota", "ranks": 2}
    assert "1 alone on core 1 under a CPU quota of 1000 us per 2000 us (half a core)" in ab.report(ab.summarize(ROWS),
                                                                                                  facts)
