"""Budgets as written (ratios or sizes) and the memory check before loading (pure)."""

from __future__ import annotations

import os
import re

import pytest

from dllama_mpi.errors import InputError
from dllama_mpi.model.spec import ModelSpec
from dllama_mpi.parallel.budgets import RUNTIME_BYTES, Budgets, fit_problems, parse_budgets, rank_need
from dllama_mpi.parallel.plan import make_plan

TINYLLAMA = ModelSpec(dim=2048, hidden_dim=5632, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64,
                      vocab_size=32000, seq_len=2048, weight_type="q40")
MiB, GiB = 2**20, 2**30


def test_sizes_are_ratios_and_caps_in_any_unit():
    b = parse_budgets(["6GiB", "2GiB", "2048MiB", "1.5GiB"], 4)
    assert b.caps == (6 * GiB, 2 * GiB, 2 * GiB, int(1.5 * GiB))
    assert make_plan(TINYLLAMA, b.ratios) == make_plan(TINYLLAMA, [12, 4, 4, 3])  # 6 : 2 : 2 : 1.5
    assert parse_budgets(["3000MB", "1GB"], 2).caps == (3 * 10**9, 10**9)
    assert parse_budgets(["3", "1"], 2) == Budgets((3, 1), None)


@pytest.mark.parametrize("values, message", [
    (["1GiB", "3"], "mixes sizes with plain ratios (3)"),
    (["1GiB", "2TB"], "the budget for rank 1 is '2TB': unknown unit"),
    (["0MiB", "1GiB"], "the budget for rank 0 is 0MiB"),
    (["2000000000GiB", "1GiB"], "a size must be more than 0 and at most"),
    (["1GiB"], "has 1 value(s) 1GiB but the job has 2 rank(s)"),
    (["1", "2", "3"], "has 3 value(s) 1 2 3 but the job has 2 rank(s)"),
    (["1", "x"], "the budget for rank 1 is 'x'; budgets must be positive integers"),
    (["1", "0"], "the budget for rank 1 is 0; budgets must be positive integers"),
    (["-3", "1"], "the budget for rank 0 is -3; budgets must be positive integers"),
    (["1.5", "1"], "the budget for rank 0 is '1.5'"),
    (["1_000", "1"], "the budget for rank 0 is '1_000'"),  # int() would take it
    (["+3", "1"], "the budget for rank 0 is '+3'"),
    (["\u0663", "1"], "the budget for rank 0 is '\u0663'"),  # an Arabic-Indic 3: int() would take it too
    (["1", "9" * 30], f"the budget for rank 1 is {'9' * 30}, larger than any machine"),
])
def test_bad_budgets_say_what_and_how(values, message):
    with pytest.raises(InputError, match=re.escape(message)):
        parse_budgets(values, 2)


def test_need_is_weights_kv_runtime_and_rank_0s_load_buffer():
    plan = make_plan(TINYLLAMA, [3, 1])
    need0, need1 = rank_need(plan, 0, 2048, 10 * MiB, kv_type="f16"), rank_need(plan, 1, 2048, 10 * MiB, kv_type="f16")
    assert need0 == {"weights": plan.weight_bytes(0), "kv": plan.kv_cache_bytes(0, 2048, "f16"), "runtime": RUNTIME_BYTES,
                     "load": 10 * MiB}
    assert "load" not in need1


def test_a_rank_over_its_cap_is_named_with_a_fitting_context_and_fitting_budgets():
    plan = make_plan(ModelSpec(**{**TINYLLAMA.to_attrs(), "seq_len": 10**6}), [1, 1])  # a context of 200k is no stretch
    budgets = Budgets((GiB, GiB), (GiB, GiB))
    assert fit_problems(plan, budgets, 2048, 0, ["a", "b"], [None, None], kv_type="f16") == []
    problems = fit_problems(plan, budgets, 200_000, 0, ["a", "b"], [None, None], kv_type="f16")
    assert len(problems) == 3 and problems[0].startswith("rank 0 needs") and problems[1].startswith("rank 1 needs")
    seq = int(problems[0].split("--max-seq-len ")[1].split(",")[0])
    assert not fit_problems(plan, budgets, seq, 0, ["a", "b"], [None, None], kv_type="f16")  # the suggested context fits
    assert fit_problems(plan, budgets, seq + 1, 0, ["a", "b"], [None, None], kv_type="f16")
    suggested = [int(s[:-3]) * MiB for s in problems[2].split("--memory-budget ")[1].split()]
    assert not fit_problems(plan, Budgets(tuple(suggested), tuple(suggested)), 200_000, 0, ["a", "b"], [None, None],
                            kv_type="f16")


def test_ranks_sharing_a_node_share_its_memory():
    plan = make_plan(TINYLLAMA, [1, 1, 1])
    need = [sum(rank_need(plan, r, 2048, 0, kv_type="f16").values()) for r in range(3)]
    ratios = Budgets((1, 1, 1), None)
    room = need[0] + need[1] - 1  # ranks 0 and 1 on node "a": one byte short
    problems = fit_problems(plan, ratios, 2048, 0, ["a", "a", "b"], [room, room, need[2]], kv_type="f16")
    assert len(problems) == 1 and problems[0].startswith("ranks 0, 1 on a need")
    assert not fit_problems(plan, ratios, 2048, 0, ["a", "a", "b"], [room + 1, room + 1, need[2]], kv_type="f16")


def test_a_full_node_is_told_only_what_can_help():
    plan = make_plan(TINYLLAMA, [1, 1, 1])
    need = [sum(rank_need(plan, r, 2048, 0, kv_type="q8_0").values()) for r in range(3)]
    ratios = Budgets((1, 1, 1), None)
    alone = fit_problems(plan, ratios, 2048, 0, ["a", "a", "a"], [sum(need) - 1] * 3, kv_type="q8_0")
    # one node, q40 already, the smallest KV cache already
    assert len(alone) == 1 and "smaller share" not in alone[0] and "q40" not in alone[0] and "--kv-type" not in alone[0]
    assert alone[0].endswith("use a shorter context (--max-seq-len 2047), or run some of the ranks on other nodes")
    shared = fit_problems(plan, ratios, 2048, 0, ["a", "a", "b"], [need[0] + need[1] - 1] * 2 + [None], kv_type="f16")
    assert "give the ranks there a smaller share of --memory-budget (the ranks on other nodes more)" in shared[0]
    f32 = make_plan(ModelSpec(**{**TINYLLAMA.to_attrs(), "weight_type": "f32"}), [1])
    assert "convert the model to q40 weights" in fit_problems(f32, Budgets((1,), None), 2048, 0, ["a"], [GiB], kv_type="f16")[0]


def test_a_context_beyond_the_trained_length_is_never_suggested():
    plan = make_plan(TINYLLAMA, [1])  # trained for 2048
    room = sum(rank_need(plan, 0, 4096, 0, kv_type="f16").values()) - 1  # 4095 tokens would fit
    problems = fit_problems(plan, Budgets((1,), None), 10**7, 0, ["a"], [room], kv_type="f16")
    assert "--max-seq-len 2048, the length the model was trained for" in problems[0]


def test_a_server_needs_the_kv_cache_of_every_slot():
    plan = make_plan(TINYLLAMA, [1])
    one, four = rank_need(plan, 0, 2048, 0, kv_type="f16"), rank_need(plan, 0, 2048, 0, n_slots=4, kv_type="f16")
    assert four["kv"] == 4 * one["kv"] and four["weights"] == one["weights"]
    room = sum(one.values())  # the node holds one slot's cache, not four
    assert not fit_problems(plan, Budgets((1,), None), 2048, 0, ["a"], [room], kv_type="f16")
    problems = fit_problems(plan, Budgets((1,), None), 2048, 0, ["a"], [room], n_slots=4, kv_type="f16")
    assert len(problems) == 1 and "KV cache for 4 slots x 2048 tokens" in problems[0]
    assert "serve fewer sequences at once (--slots)" in problems[0]


# available_memory(): the smaller of MemAvailable and the memory cgroup's room, on a fake root

from pathlib import Path  # noqa: E402

from dllama_mpi.parallel.budgets import available_memory, memory_limit_source  # noqa: E402

V1_UNLIMITED = 9223372036854771712  # PAGE_COUNTER_MAX in bytes (4 KiB pages)


def fake_root(tmp_path: Path, meminfo_kb: int | None = 8 * 2**20, cgroup: str | None = None,
              files: dict[str, str] | None = None) -> Path:
    """A root with proc/meminfo (MemAvailable in kB; 8 GiB unless told), proc/self/cgroup and
    `files` (paths under the root: contents)."""
    (tmp_path / "proc/self").mkdir(parents=True)
    if meminfo_kb is not None:
        (tmp_path / "proc/meminfo").write_text(f"MemTotal:       {2 * meminfo_kb} kB\nMemFree:          1000 kB\n"
                                               f"MemAvailable:   {meminfo_kb} kB\nBuffers:           100 kB\n")
    if cgroup is not None:
        (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for name, text in (files or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_a_v2_cgroup_limit_below_memavailable_binds(tmp_path):
    job = "sys/fs/cgroup/system.slice/slurmstepd.scope/job_12"
    root = fake_root(tmp_path, cgroup="0::/system.slice/slurmstepd.scope/job_12\n",
                     files={f"{job}/memory.max": f"{4 * GiB}\n", f"{job}/memory.current": f"{GiB}\n"})
    assert available_memory(root) == 3 * GiB
    assert memory_limit_source(root) == "cgroup /system.slice/slurmstepd.scope/job_12"


def test_a_v2_cgroup_without_a_limit_leaves_memavailable(tmp_path):
    root = fake_root(tmp_path, cgroup="0::/user.slice\n",
                     files={"sys/fs/cgroup/user.slice/memory.max": "max\n",
                            "sys/fs/cgroup/user.slice/memory.current": f"{GiB}\n"})
    assert available_memory(root) == 8 * GiB
    assert memory_limit_source(root) == "MemAvailable"


def test_a_v2_parent_with_a_tighter_limit_binds(tmp_path):
    root = fake_root(tmp_path, cgroup="0::/slurm/job_12/step_0\n", files={
        "sys/fs/cgroup/slurm/job_12/step_0/memory.max": "max\n",
        "sys/fs/cgroup/slurm/job_12/step_0/memory.current": f"{GiB}\n",
        "sys/fs/cgroup/slurm/job_12/memory.max": f"{3 * GiB}\n",  # the job's --mem
        "sys/fs/cgroup/slurm/job_12/memory.current": f"{2 * GiB}\n",
        "sys/fs/cgroup/slurm/memory.max": f"{6 * GiB}\n",
        "sys/fs/cgroup/slurm/memory.current": f"{2 * GiB}\n"})
    assert available_memory(root) == GiB
    assert memory_limit_source(root) == "cgroup /slurm/job_12"


def test_a_v1_memory_cgroup_limit_and_usage(tmp_path):
    job = "sys/fs/cgroup/memory/slurm/uid_0/job_12"
    root = fake_root(tmp_path, cgroup="10:cpuset:/slurm/uid_0/job_12\n9:memory:/slurm/uid_0/job_12\n0::/\n",
                     files={f"{job}/memory.limit_in_bytes": f"{2 * GiB}\n",
                            f"{job}/memory.usage_in_bytes": f"{512 * MiB}\n",
                            "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{V1_UNLIMITED}\n",
                            "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{100 * GiB}\n"})
    assert available_memory(root) == 2 * GiB - 512 * MiB
    assert memory_limit_source(root) == "cgroup /slurm/uid_0/job_12"


def test_a_v1_cgroup_limited_by_page_counter_max_is_unlimited(tmp_path):
    job = "sys/fs/cgroup/memory/docker/abc"
    root = fake_root(tmp_path, cgroup="4:memory:/docker/abc\n",
                     files={f"{job}/memory.limit_in_bytes": f"{V1_UNLIMITED}\n",
                            f"{job}/memory.usage_in_bytes": f"{GiB}\n"})
    assert available_memory(root) == 8 * GiB
    assert memory_limit_source(root) == "MemAvailable"


@pytest.mark.parametrize("cgroup, mount, limit, usage", [
    ("0::/\n", "sys/fs/cgroup", "memory.max", "memory.current"),  # a cgroup namespace: the path is /
    ("0::/kubepods/pod1/ctr\n", "sys/fs/cgroup", "memory.max", "memory.current"),  # not under the mount
    ("4:memory:/docker/abc\n", "sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"),
])
def test_a_cgroup_path_not_under_the_mount_falls_back_to_the_mount_root(tmp_path, cgroup, mount, limit, usage):
    root = fake_root(tmp_path, cgroup=cgroup, files={f"{mount}/{limit}": f"{2 * GiB}\n", f"{mount}/{usage}": f"{GiB}\n"})
    assert available_memory(root) == GiB
    assert memory_limit_source(root) == f"cgroup {cgroup.split(':')[2].strip()}"


@pytest.mark.parametrize("cgroup, files", [
    (None, {}),  # no /proc/self/cgroup
    ("garbage\n\x00\n::\n", {}),
    ("0::/job\n", {}),  # the cgroup's files are missing
    ("0::/job\n", {"sys/fs/cgroup/job/memory.max": "lots\n", "sys/fs/cgroup/job/memory.current": f"{GiB}\n"}),
    ("0::/job\n", {"sys/fs/cgroup/job/memory.max": f"{GiB}\n", "sys/fs/cgroup/job/memory.current": "-5\n"}),
    ("0::/job\n", {"sys/fs/cgroup/job/memory.max": f"{GiB}\n"}),  # no usage
    ("4:memory:/../../x\n", {"sys/fs/cgroup/memory/memory.limit_in_bytes": "\xff\xfe"}),
    ("4:memory:/job\n", {"sys/fs/cgroup/memory/job/memory.limit_in_bytes": "",
                         "sys/fs/cgroup/memory/job/memory.usage_in_bytes": "1.5e9"}),
])
def test_missing_or_garbled_cgroup_files_leave_memavailable(tmp_path, cgroup, files):
    root = fake_root(tmp_path, cgroup=cgroup, files=files)
    assert available_memory(root) == 8 * GiB
    assert memory_limit_source(root) == "MemAvailable"


def test_without_meminfo_the_cgroup_or_nothing(tmp_path):
    assert available_memory(tmp_path) is None and memory_limit_source(tmp_path) == "unknown"
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemAvailable: lots kB\n")
    assert available_memory(tmp_path) is None
    root = fake_root(tmp_path / "r", meminfo_kb=None, cgroup="0::/job\n",
                     files={"sys/fs/cgroup/job/memory.max": f"{2 * GiB}", "sys/fs/cgroup/job/memory.current": f"{3 * GiB}"})
    assert available_memory(root) == 0  # over its limit (reclaim pending): no room, not negative


def test_this_machine_has_some_memory_available_and_no_more_than_memavailable():
    def meminfo() -> int | None:
        try:
            return next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            return None

    before = meminfo()
    if before is None:
        pytest.skip("no /proc/meminfo here")
    available = available_memory()
    after = meminfo()
    assert isinstance(available, int) and available > 0
    assert available <= max(before, after) + 64 * MiB  # MemAvailable moves between the reads
    assert memory_limit_source() == "MemAvailable" or memory_limit_source().startswith("cgroup /")


def test_page_cache_the_kernel_can_reclaim_is_not_counted_as_used(tmp_path):
    # a model file read earlier in the job stays charged to its cgroup as inactive page cache
    job = "sys/fs/cgroup/slurm/job_12"
    root = fake_root(tmp_path, cgroup="0::/slurm/job_12\n",
                     files={f"{job}/memory.max": f"{4 * GiB}\n", f"{job}/memory.current": f"{3 * GiB}\n",
                            f"{job}/memory.stat": f"anon {GiB}\nfile {2 * GiB}\ninactive_file {2 * GiB}\n"})
    assert available_memory(root) == 3 * GiB
    v1 = "sys/fs/cgroup/memory/slurm/job_12"
    root = fake_root(tmp_path / "v1", cgroup="4:memory:/slurm/job_12\n",
                     files={f"{v1}/memory.limit_in_bytes": f"{4 * GiB}\n", f"{v1}/memory.usage_in_bytes": f"{3 * GiB}\n",
                            f"{v1}/memory.stat": f"cache {2 * GiB}\ntotal_inactive_file {GiB}\n"})
    assert available_memory(root) == 2 * GiB


# cgroups.cpu_quota(): the tightest CPU quota on the process's cgroup or an ancestor, on a fake root


def test_a_v2_cpu_max_gives_the_quota_in_cpus_and_the_tightest_ancestor_wins(tmp_path):
    from dllama_mpi import cgroups

    root = fake_root(tmp_path, cgroup="0::/kubepods/pod1/ctr\n", files={
        "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000\n",
        "sys/fs/cgroup/kubepods/pod1/cpu.max": "150000 100000\n",  # the pod's limit: 1.5 CPUs
        "sys/fs/cgroup/kubepods/cpu.max": "800000 100000\n"})
    assert cgroups.cpu_quota(root) == (1.5, "cgroup /kubepods/pod1")


def test_a_v1_cfs_quota_and_minus_one_for_none(tmp_path):
    from dllama_mpi import cgroups

    root = fake_root(tmp_path, cgroup="4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n", files={
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cgroups.cpu_quota(root) == (0.5, "cgroup /docker/abc")
    unlimited = fake_root(tmp_path / "u", cgroup="1:cpu:/\n", files={"sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
                                                                      "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroups.cpu_quota(unlimited) is None


@pytest.mark.parametrize("files", [{}, {"sys/fs/cgroup/job/cpu.max": "garbage\n"},
                                   {"sys/fs/cgroup/job/cpu.max": "50000 0\n"}])
def test_no_readable_cpu_quota_is_none(tmp_path, files):
    from dllama_mpi import cgroups

    assert cgroups.cpu_quota(fake_root(tmp_path, cgroup="0::/job\n", files=files)) is None


def test_node_cores_are_the_quota_where_it_allows_fewer_than_the_affinity(monkeypatch):
    from dllama_mpi import cgroups
    from dllama_mpi.parallel import threads

    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(cgroups, "cpu_quota", lambda root=None: None)
    assert threads.node_cores() == affinity
    monkeypatch.setattr(cgroups, "cpu_quota", lambda root=None: (0.5, "cgroup /x"))
    assert threads.node_cores() == 1  # at least one
    monkeypatch.setattr(cgroups, "cpu_quota", lambda root=None: (affinity + 0.9, "cgroup /x"))
    assert threads.node_cores() == affinity


def test_the_kv_cache_is_counted_in_its_type_and_a_smaller_one_suggested_where_it_fits():
    """A cap between the f16 and the f32 need: f16 fits, f32 is refused, the message naming the type
    of the KV cache it counted and the smallest type, which fits; a cap that not even q8_0 fits is
    not told to use it."""
    plan = make_plan(TINYLLAMA, [1])
    f16, f32 = (rank_need(plan, 0, 2048, 0, kv_type=t) for t in ("f16", "f32"))
    assert f32["kv"] == 2 * f16["kv"] and f32["weights"] == f16["weights"]
    cap = sum(f16.values()) + f16["kv"] // 2
    budgets = Budgets((cap,), (cap,))
    assert not fit_problems(plan, budgets, 2048, 0, ["a"], [None], kv_type="f16")
    problems = fit_problems(plan, budgets, 2048, 0, ["a"], [None], kv_type="f32")
    assert problems[0].startswith("rank 0 needs") and "f32 KV cache for 2048 tokens 88.0MiB" in problems[0]
    assert problems[0].endswith(", or --kv-type q8_0")
    node = fit_problems(plan, Budgets((1,), None), 2048, 0, ["a"], [cap], kv_type="f32")
    assert "store the KV cache in q8_0 (--kv-type q8_0)" in node[0]
    small = sum(f16.values()) - f16["kv"] // 2  # below q8_0's need (about 0.53 of f16's KV cache)
    assert "--kv-type" not in fit_problems(plan, Budgets((small,), (small,)), 2048, 0, ["a"], [small], kv_type="f32")[0]
    assert "--kv-type" not in " ".join(fit_problems(plan, Budgets((1,), None), 2048, 0, ["a"], [small], kv_type="f32"))
