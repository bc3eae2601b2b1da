"""The start-up rules shared by a launch and --dry-run (pure)."""

from __future__ import annotations

import pytest

from dllama_mpi.errors import UsageError
from dllama_mpi.files.modelfile import largest_tensor_bytes
from dllama_mpi.job.launch import DEFAULT_MAX_SEQ_LEN, check_fit, plan_launch
from dllama_mpi.model.spec import ModelSpec
from dllama_mpi.parallel.budgets import Budgets, rank_need
from dllama_mpi.parallel.plan import make_plan

SPEC = ModelSpec(dim=256, hidden_dim=768, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=32, vocab_size=1024,
                 seq_len=8192, weight_type="q40")
RATIOS = Budgets((3, 1), None)


def test_context_defaults_to_the_trained_length_capped_and_a_longer_one_gets_a_note():
    assert plan_launch(SPEC, None, None, RATIOS, None, kv_type="f16").max_seq_len == DEFAULT_MAX_SEQ_LEN
    short = ModelSpec(**{**SPEC.to_attrs(), "seq_len": 512})
    assert plan_launch(short, None, None, RATIOS, None, kv_type="f16").max_seq_len == 512
    assert plan_launch(SPEC, None, None, RATIOS, 8192, kv_type="f16").notes == ()
    (note,) = plan_launch(SPEC, None, None, RATIOS, 8193, kv_type="f16").notes
    assert note.startswith("--max-seq-len 8193 is beyond the 8192 tokens the model was trained for")


def test_an_unsplit_file_costs_rank_0_its_largest_tensor_and_shards_nothing():
    plan = make_plan(SPEC, (3, 1))
    assert plan_launch(SPEC, None, "m.h5", RATIOS, None, kv_type="f16").load_buffer == largest_tensor_bytes(SPEC)
    shard = (0, 2, (3, 1), plan.plan_hash())
    assert plan_launch(SPEC, shard, "shards", RATIOS, None, kv_type="f16").load_buffer == 0


def test_shards_of_another_plan_and_a_lone_shard_file_are_refused(tmp_path):
    plan = make_plan(SPEC, (3, 1))
    with pytest.raises(UsageError, match=r"split for 2 rank\(s\) with budgets 1 1"):
        plan_launch(SPEC, (0, 2, (1, 1), "other"), "shards", RATIOS, None, kv_type="f16")
    lone = tmp_path / "shard-0-of-2.h5"
    lone.write_bytes(b"")
    with pytest.raises(UsageError, match=f"pass the directory that holds all 2 shards: --model {tmp_path}"):
        plan_launch(SPEC, (0, 2, (3, 1), plan.plan_hash()), lone, RATIOS, None, kv_type="f16")


def test_the_fit_check_raises_with_every_problem():
    launch = plan_launch(SPEC, None, None, Budgets((2**20, 2**20), (2**20, 2**20)), None, kv_type="f16")
    with pytest.raises(UsageError, match=r"(?s)the plan does not fit in memory:\n  rank 0 needs .*\n  rank 1 needs"):
        check_fit(launch, Budgets((2**20, 2**20), (2**20, 2**20)), ["a", "b"], [None, None])
    check_fit(plan_launch(SPEC, None, None, RATIOS, None, kv_type="f16"), RATIOS, ["a", "b"], [None, None])  # fits: no error


def test_the_fit_check_counts_the_kv_cache_in_the_launch_s_type():
    """A cap that holds the f16 cache but not the f32 one: the launch's kv_type decides."""
    budgets = Budgets((1,), None)
    f16, f32 = (plan_launch(SPEC, None, None, budgets, 4096, kv_type=t) for t in ("f16", "f32"))
    assert (f16.kv_type, f32.kv_type) == ("f16", "f32")
    need = sum(rank_need(f16.plan, 0, 4096, f16.load_buffer, kv_type="f16").values())
    room = need + f16.plan.kv_cache_bytes(0, 4096, "f16") // 2
    check_fit(f16, budgets, ["a"], [room])
    with pytest.raises(UsageError, match=r"the plan does not fit in memory:\n  rank 0 on a needs .*f32 KV cache for 4096 tokens"):
        check_fit(f32, budgets, ["a"], [room])
