"""`--memory-budget auto`: the pure split (property tests), the budget syntax, the measurement
on a clock that counts work (tests/work_clock.py: no verdict here depends on the machine's
speed; tools/auto_budget_bench.py measures that), and real unequal ranks on one machine
(taskset and a cgroup: rank 0 alone on core 0, rank 1 alone on core 1 under a CPU quota of
half a core)."""

from __future__ import annotations

import os
import re
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO, run_mpiexec, write_random_model
from hypothesis import example, given, settings
from hypothesis import strategies as st
from work_clock import WorkClock

from dllama_mpi.errors import InputError
from dllama_mpi.files.modelfile import largest_tensor_bytes
from dllama_mpi.job.autobudget import plan_shares, solve
from dllama_mpi.job.speed import RankSpeed, fit
from dllama_mpi.model.spec import ModelSpec
from dllama_mpi.parallel.budgets import (
    RUNTIME_BYTES,
    Budgets,
    fastest_shares,
    parse_budgets,
    rank_need,
    share_ratios,
)
from dllama_mpi.parallel.plan import make_plan

MiB = 2**20
SPEC = ModelSpec(dim=1024, hidden_dim=2816, n_layers=6, n_heads=16, n_kv_heads=4, head_dim=64, vocab_size=4096,
                 seq_len=256, weight_type="q40")

speeds = st.lists(st.tuples(st.floats(1e-4, 1.0), st.floats(0.0, 0.05), st.floats(0.05, 1.0)), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(speeds)
def test_the_split_sums_to_one_keeps_caps_and_is_never_slower_than_equal(ranks):
    a, o, cap = zip(*ranks)
    shares = fastest_shares(a, o, cap)
    assert abs(sum(shares) - 1) < 1e-9 and all(s >= 0 for s in shares)
    if sum(cap) >= 1:
        assert all(s <= c + 1e-9 for s, c in zip(shares, cap))
    n = len(a)
    slowest = max(ai * s + oi for ai, oi, s in zip(a, o, shares))
    if all(c >= 1 / n for c in cap):  # equal shares are allowed: the split is at least as fast
        assert slowest <= max(ai / n + oi for ai, oi in zip(a, o)) + 1e-9
    if sum(cap) > 1 + 1e-6:  # optimal: no rank with room to take more finishes before the last working one
        last = max(ai * s + oi for ai, oi, s in zip(a, o, shares) if s > 1e-12)
        for ai, oi, s, c in zip(a, o, shares, cap):
            if s < c - 1e-6:
                assert ai * s + oi >= last - 1e-6 * max(1.0, last), (ai, oi, s, c, last)


def test_a_rank_at_half_speed_gets_half_the_share():
    shares = fastest_shares([1.0, 2.0], [0.0, 0.0], [1.0, 1.0])
    assert shares == pytest.approx((2 / 3, 1 / 3))
    assert share_ratios(shares) == (667, 333)


def test_a_cap_binds_and_the_rest_goes_to_the_others():
    shares = fastest_shares([1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [0.3, 1.0, 1.0])
    assert shares == pytest.approx((0.3, 0.35, 0.35))


def test_a_rank_whose_fixed_cost_exceeds_the_others_time_gets_no_share():
    shares = fastest_shares([1.0, 1.0], [0.0, 2.0], [1.0, 1.0])
    assert shares == pytest.approx((1.0, 0.0))
    assert share_ratios(shares) == (1000, 1)  # the plan's least


def test_fit_finds_the_line_through_the_measured_points():
    assert fit([(0.25, 3.5), (0.5, 6.0), (1.0, 11.0)]) == pytest.approx((10.0, 1.0))
    assert fit([(0.25, 2.0), (0.5, 4.5), (1.0, 9.0)])[1] == 0.0  # a negative intercept is noise: through the origin
    a, o = fit([(0.25, 5.0), (0.5, 4.5), (1.0, 4.0)])  # noise hid the slope: still a positive one
    assert a > 0 and o == 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1e-3, 0.1), min_size=2, max_size=5), st.data())
@example([0.0625, 0.0625], [None, 400 * MiB])  # rounded up to a head, the share once stayed over its cap
@example([0.0625, 0.0625], [423064789, 423635755])  # caps that hold the model with less than a granule to spare
@example([0.0625, 0.0625], [423503872, 425783808])  # caps that hold the weights but not the KV cache too
def test_the_solved_plan_respects_granules_and_caps(per_share, data):
    n = len(per_share)
    caps = data if isinstance(data, list) else data.draw(
        st.lists(st.one_of(st.none(), st.integers(400 * MiB, 460 * MiB)), min_size=n, max_size=n))
    ranks = [RankSpeed(a, 0.001, ()) for a in per_share]
    ratios, plan = solve(SPEC, ranks, caps, 256, 1, 0, kv_type="f32")  # the examples' caps were found for f32
    assert len(ratios) == n and plan == make_plan(SPEC, ratios)  # the plan rounds the ratios to its granules
    for s in plan.ranks:
        assert s.dim_rows[0] % 32 == 0 and s.ffn_rows[0] % 32 == 0  # whole 32-row blocks
    room = sum(1.0 if c is None else c for c in caps)
    for rank, cap in enumerate(caps):
        if cap is not None and room > 0:
            need = sum(rank_need(plan, rank, 256, 0, kv_type="f32").values())
            # within the cap, unless the caps together can't hold the model and its KV cache with a granule to
            # spare per rank (a head is 1/16 of the attention rows, about 1/32 of this model): the memory check
            # then says so
            held = sum(rank_need(plan, r, 256, 0, kv_type="f32")[part] for r in range(n) for part in ("weights", "kv"))
            assert need <= cap or held + n * held // 32 > sum((c or 2**40) - 384 * MiB for c in caps)
    assert abs(sum(plan_shares(plan)) - 1) < 1e-9


def test_the_kv_cache_is_counted_in_its_type():
    """A rank capped below half the model: a smaller KV type leaves room for a larger share."""
    ranks = [RankSpeed(0.01, 0.001, ())] * 2
    load = largest_tensor_bytes(SPEC)
    cap = RUNTIME_BYTES + load + 22 * MiB  # 0.43 of the weights and an f32 cache of 1024 tokens; 0.48 with f16
    shares = {}
    for kv_type in ("f32", "f16"):
        _, plan = solve(SPEC, ranks, [cap, None], 1024, 1, load, kv_type=kv_type)
        assert sum(rank_need(plan, 0, 1024, load, kv_type=kv_type).values()) <= cap
        shares[kv_type] = plan_shares(plan)[0]
    assert shares["f32"] < shares["f16"] < 0.5


def test_one_rank_times_each_share_of_the_model_on_the_kernels_and_fits_the_line(monkeypatch):
    """On a clock that moves only by the products run, each sample is what the share's rows of
    every layer and the classifier cost, and the line through them predicts other shares."""
    from dllama_mpi.job import speed
    from dllama_mpi.parallel.comm import self_comm

    clock = WorkClock(s_per_weight=1e-8, s_per_product=1e-4)
    monkeypatch.setattr(speed, "matmul", clock.counting(speed.matmul))
    measured = speed.measure(self_comm(), SPEC, "q80", clock)
    assert [s for s, _ in measured.samples] == list(speed.SHARES)
    assert [t for _, t in measured.samples] == pytest.approx([clock.token_s(SPEC, s) for s in speed.SHARES], rel=1e-9)
    assert (measured.per_share_s, measured.fixed_s) == pytest.approx(
        (clock.token_s(SPEC, 1) - clock.token_s(SPEC, 0), clock.token_s(SPEC, 0)), rel=1e-6)
    assert measured.token_s(0.3) == pytest.approx(clock.token_s(SPEC, 0.3), rel=1e-6)


def test_auto_budgets_are_written_auto_or_auto_and_one_size_per_rank():
    assert parse_budgets(["auto"], 3) == Budgets((1, 1, 1), None, auto=True)
    assert parse_budgets(["auto", "6GiB", "2GiB"], 2) == Budgets((1, 1), (6 * 2**30, 2 * 2**30), auto=True)
    with pytest.raises(InputError, match="auto takes sizes after it"):
        parse_budgets(["auto", "3", "1"], 2)
    with pytest.raises(InputError, match="has 1 value"):
        parse_budgets(["auto", "6GiB"], 2)


def test_the_converter_refuses_auto_and_says_how_to_pre_split(tmp_path):
    from dllama_mpi.files.convert import ConvertError, convert

    with pytest.raises(ConvertError, match="--memory-budget auto chose 667 333"):
        convert(tmp_path / "none.bin", tmp_path / "out", None, "q40", budgets=["auto"])


def test_dry_run_sizes_auto_as_it_splits_ranks_of_equal_speed_within_the_caps(tmp_path):
    from test_cli import dry_run

    result = dry_run("--memory-budget", "auto", "2GiB", "1GiB")
    assert result.returncode == 0, result.stderr
    assert "note: --memory-budget auto measures each rank when the job starts" in result.stderr
    assert "2 rank(s)" in result.stdout


# ------------------------------------------------------------- real unequal ranks


@pytest.fixture(scope="module")
def cpus():
    """Two CPUs to pin ranks to."""
    problem = None
    if not shutil.which("taskset"):
        problem = "taskset is not installed"
    elif len(os.sched_getaffinity(0)) < 2:
        problem = "fewer than 2 CPUs to pin ranks to"
    if problem:
        if os.environ.get("DLLAMA_REQUIRE_PINNING") == "1":
            pytest.fail(f"DLLAMA_REQUIRE_PINNING=1 but {problem}")
        pytest.skip(problem)
    return [str(c) for c in sorted(os.sched_getaffinity(0))[:2]]


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("auto") / "mid-q40.h5", SPEC)


def _auto_run(cpus, model, budgets: list[str]):
    result = run_mpiexec(3, [str(REPO / "tools" / "pinned"), cpus[0], cpus[1], cpus[1], "--", sys.executable, "-m",
                             "dllama_mpi", "--model", str(model), "--memory-budget", *budgets, "--nthreads", "1",
                             "--steps", "8"], timeout=240)
    assert result.returncode == 0, result.stderr
    chosen = re.search(r"--memory-budget auto chose (\d+) (\d+) (\d+) \(shares ([\d.]+)% ([\d.]+)% ([\d.]+)%\)",
                       result.stderr)
    assert chosen, result.stderr
    measured = re.findall(r"rank (\d): ([\d.]+) x share \+ ([\d.]+)", result.stderr)
    return result, [float(chosen[i]) / 100 for i in (4, 5, 6)], measured


@pytest.fixture(scope="module")
def half_core(cpus):
    """A cgroup with a CPU quota of half a core (tools/auto_budget_bench.py's), for the module's tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("auto_budget_bench", REPO / "tools" / "auto_budget_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    problem, made = None, None
    if bench.quota_parent() is None:
        problem = "no writable cgroup with the cpu controller (cgroup v1 cpu, or v2 with cpu enabled) to make a quota in"
    else:
        made = bench.quota_cgroup()
        try:
            path = made.__enter__()
        except OSError as exc:  # writable on paper, refused in fact (a rootless or namespaced cgroupfs)
            problem, made = f"could not make a cgroup with a CPU quota: {exc}", None
    if problem:
        if os.environ.get("DLLAMA_REQUIRE_PINNING") == "1":
            pytest.fail(f"DLLAMA_REQUIRE_PINNING=1 but {problem}")
        pytest.skip(problem)
    try:
        yield path
    finally:
        made.__exit__(None, None, None)


@pytest.mark.jobs
def test_a_rank_under_a_cpu_quota_reads_it_and_sleeps_at_gathers(cpus, half_core):
    probe = run_mpiexec(2, [str(REPO / "tools" / "pinned"), cpus[0], f"{cpus[1]}@{half_core}", "--", sys.executable,
                            "-c", "import sys; from dllama_mpi.cgroups import cpu_quota; "
                                  "from dllama_mpi.parallel.comm import Comm; "
                                  "c = Comm(); q = cpu_quota(); "  # one write per rank: the ranks' lines don't interleave
                                  "sys.stdout.write(f'{c.rank} {q and q[0]} {c.wait} {c.nonblocking_gathers}\\n')"],
                        timeout=60)
    assert probe.returncode == 0, probe.stderr
    lines = sorted(probe.stdout.splitlines())
    # rank 0 has one core for the node's two ranks: it yields; rank 1 reads its quota, below one rank's core: it sleeps
    assert len(lines) == 2 and lines[0].startswith("0 ") and lines[0].endswith(" yield True"), probe.stdout
    assert lines[1] == "1 0.5 sleep True", probe.stdout


@pytest.mark.parametrize("mode", ["block", "yield", "sleep"])
def test_a_gather_waits_the_way_its_rank_was_told(monkeypatch, mode):
    """How a nonblocking gather is waited for (not how long): sleeping between tests, yielding
    between tests, or MPI's own wait."""
    from dllama_mpi.parallel import comm

    class Request:  # completes at its third test
        tests, waited = 0, False

        def Test(self):
            self.tests += 1
            return self.tests == 3

        def Wait(self):
            self.waited = True

    request, waits = Request(), []
    monkeypatch.setattr(comm.time, "sleep", lambda s: waits.append(("sleep", s)))
    monkeypatch.setattr(comm.os, "sched_yield", lambda: waits.append(("yield",)))
    rank = SimpleNamespace(rank=0, size=2, wait=mode, nonblocking_gathers=True, collective_s=0.0, bytes_sent=0, rounds=0,
                           _comm=SimpleNamespace(Iallgatherv=lambda *_: request))
    comm.Gatherer(rank, np.zeros(4, np.float32), ((0, 2), (2, 4)))()
    assert waits == {"block": [], "yield": [("yield",)] * 2, "sleep": [("sleep", comm.SLEEP_WAIT_S)] * 2}[mode]
    assert request.waited == (mode == "block")


@pytest.mark.jobs
def test_the_split_is_the_solvers_for_what_each_rank_measured(cpus, half_core, mid_model):
    """Rank 1, under the quota, measures 4x rank 0's time per weight on its work clock: the job
    prints those figures and chooses the solver's budgets for them."""
    clocks = [WorkClock(s_per_weight=1e-8, s_per_product=1e-4), WorkClock(s_per_weight=4e-8, s_per_product=1e-4)]
    result = run_mpiexec(2, [str(REPO / "tools" / "pinned"), cpus[0], f"{cpus[1]}@{half_core}", "--", sys.executable,
                             str(REPO / "tests" / "work_clock.py"), "--model", str(mid_model), "--memory-budget", "auto",
                             "--nthreads", "1", "--steps", "8"], timeout=240,
                         env={"WORK_CLOCK": " ".join(f"{c.s_per_weight},{c.s_per_product}" for c in clocks)})
    assert result.returncode == 0, result.stderr
    a = [c.token_s(SPEC, 1) - c.token_s(SPEC, 0) for c in clocks]
    o = [c.token_s(SPEC, 0) for c in clocks]
    measured = re.findall(r"rank (\d): ([\d.]+) x share \+ ([\d.]+)", result.stderr)
    assert measured == [(str(r), f"{1e3 * a[r]:.1f}", f"{1e3 * o[r]:.1f}") for r in range(2)], result.stderr
    ratios = share_ratios(fastest_shares(a, o, [1.0, 1.0]))
    assert ratios == (800, 200)  # equal fixed costs: a quarter of rank 0's share
    shares = " ".join(f"{100 * x:.1f}%" for x in plan_shares(make_plan(SPEC, ratios)))
    assert f"--memory-budget auto chose 800 200 (shares {shares})" in result.stderr, result.stderr


@pytest.mark.jobs
def test_a_small_cap_holds_the_fast_rank_back_and_says_so(cpus, mid_model):
    cap = 400 * MiB  # the runtime's 384 MiB, the load buffer, and a part of the model
    result, shares, measured = _auto_run(cpus, mid_model, ["auto", f"{cap // MiB}MiB", "4GiB", "4GiB"])
    assert "rank 0: " in result.stderr and "memory 400.0MiB" in result.stderr
    assert shares[0] < 0.34, f"the fast rank was not held back by its cap: {shares}\n{result.stderr}"


@pytest.mark.jobs
def test_auto_refuses_shards_split_for_fixed_budgets(tmp_path):
    from conftest import STORIES, assert_refused, need_stories

    from dllama_mpi.files.convert import convert

    need_stories()
    convert(STORIES / "stories260K.bin", tmp_path / "sh", STORIES / "tok512.bin", "q40", budgets=["1", "1"])
    result = run_mpiexec(2, [sys.executable, "-m", "dllama_mpi", "--model", str(tmp_path / "sh"), "--memory-budget",
                             "auto"], timeout=120)
    assert_refused(result, "holds shards already split for fixed budgets; run auto on the unsplit model file")


def test_wait_modes_block_on_own_cores_yield_when_oversubscribed_and_sleep_under_a_small_quota():
    from dllama_mpi.parallel.comm import wait_modes

    # (host, pid, usable cores, the cgroup whose CPU quota binds the rank, that quota in CPUs)
    assert wait_modes([("a", 1, 2, None, None), ("a", 2, 2, None, None)]) == ["block", "block"]
    assert wait_modes([("a", 1, 1, None, None), ("a", 2, 1, None, None), ("b", 3, 1, None, None)]) == \
        ["yield", "yield", "block"]
    # one rank alone in a cgroup of half a core; its neighbour pinned to one core of its own
    assert wait_modes([("a", 1, 1, None, None), ("a", 2, 1, "cgroup /half", 0.5)]) == ["yield", "sleep"]
    # a container of 2 CPUs: 4 ranks sleep, 2 ranks don't need to
    assert wait_modes([("a", p, 2, "cgroup /ctr", 2.0) for p in range(4)]) == ["sleep"] * 4
    assert wait_modes([("a", p, 2, "cgroup /ctr", 2.0) for p in range(2)]) == ["block"] * 2
    # the same cgroup path on another node is another cgroup
    assert wait_modes([("a", 1, 4, "cgroup /ctr", 1.0), ("b", 2, 4, "cgroup /ctr", 1.0)]) == ["block", "block"]


def test_a_mixture_of_experts_token_is_timed_with_the_experts_it_uses():
    """A token of a mixture of experts runs the FFN of each expert it uses (each expert's own
    matrices, read from memory) and the replicated router."""
    from dllama_mpi.job.speed import _Workload, layer_shapes
    from dllama_mpi.parallel import threads

    spec = ModelSpec(dim=256, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, vocab_size=512,
                     seq_len=64, architecture="qwen3moe", n_experts=8, n_experts_used=3, expert_weights_norm=True)
    shapes = layer_shapes(spec)
    assert [kind for *_, kind in shapes] == ["wq", "wo"] + ["w1", "w2"] * 3
    work = _Workload(spec, "q80", 0.5, threads.Pool(1))
    assert work.router.rows == 8 and work.router.cols == 256  # whatever the share
    assert [m.rows for m, _ in work.layers[0]][2:] == [64, 128] * 3  # half of each expert's 128 w1/w3 rows, 256 w2 rows
