"""Pre-split per-rank shards: same logits as the unsplit file, and clear refusals."""

from __future__ import annotations

import shutil
import sys

import h5py
import numpy as np
import pytest
from conftest import REPO, STORIES, assert_refused, need_stories, run_mpiexec

from dllama_mpi.files.convert import convert, info
from dllama_mpi.model.spec import ModelSpec
from dllama_mpi.parallel.plan import make_plan

pytestmark = pytest.mark.jobs  # every test here starts MPI jobs

TOKENS = [1, 403, 407, 261, 378, 29, 300, 12]
PLANS = [["3", "1"], ["2", "1", "1"], ["3", "2", "2", "1"]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    need_stories()
    d = tmp_path_factory.mktemp("shards")
    src, tok = STORIES / "stories260K.bin", STORIES / "tok512.bin"
    out = {"whole": d / "whole.h5"}
    convert(src, out["whole"], tok, "q40")
    for budgets in PLANS:
        out[" ".join(budgets)] = d / f"shards-{'-'.join(budgets)}"
        convert(src, out[" ".join(budgets)], tok, "q40", budgets=budgets)
    return out


def _dump(path, budgets, out):
    return run_mpiexec(len(budgets), [sys.executable, str(REPO / "tests" / "engine_dump.py"), str(path), str(out),
                                      "--budgets", *budgets, "--tokens", *map(str, TOKENS), "--buffer", "q80"],
                       timeout=180)


@pytest.mark.parametrize("budgets", PLANS, ids=lambda b: "-".join(b))
def test_shards_give_the_same_logits_as_the_whole_file(models, budgets, tmp_path):
    whole, shards = _dump(models["whole"], budgets, tmp_path / "a.npz"), _dump(models[" ".join(budgets)], budgets,
                                                                              tmp_path / "b.npz")
    assert whole.returncode == 0 and shards.returncode == 0, whole.stderr + shards.stderr
    a, b = np.load(tmp_path / "a.npz")["logits"], np.load(tmp_path / "b.npz")["logits"]
    assert a.shape == (len(TOKENS), 512)
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_each_shard_holds_only_its_rows(models):
    directory = models["3 2 2 1"]
    with h5py.File(directory / "shard-0-of-4.h5", "r") as f:
        plan = make_plan(ModelSpec.from_attrs(f.attrs), [3, 2, 2, 1])
    for r in range(4):
        with h5py.File(directory / f"shard-{r}-of-4.h5", "r") as f:
            a, b = plan.rows("wq", r)
            assert f["layers/0/wq"].shape[0] == b - a
            a, b = plan.rows("w1", r)
            assert f["layers/4/w1"].shape[0] == b - a
            assert f.attrs["plan_hash"] == plan.plan_hash() and f.attrs["shard_rank"] == r


def _cli(n, *args):
    return run_mpiexec(n, [sys.executable, "-m", "dllama_mpi", *args, "--steps", "4"], timeout=60)


def test_other_budgets_are_refused_naming_both_plans_and_the_ways_out(models):
    result = _cli(2, "--model", str(models["3 1"]), "--memory-budget", "1", "1")
    assert result.returncode == 2
    err = result.stderr
    assert "budgets 3 1" in err and "budgets 1 1" in err and "--memory-budget 3 1" in err and "unsplit" in err
    assert err.count("error:") == 1


def test_other_world_size_is_refused(models):
    result = _cli(2, "--model", str(models["3 2 2 1"]), "--memory-budget", "3", "2")
    assert result.returncode == 2 and "split for 4 rank(s)" in result.stderr


def test_missing_shard_is_named(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models["2 1 1"], broken)
    (broken / "shard-2-of-3.h5").unlink()
    result = _cli(3, "--model", str(broken), "--memory-budget", "2", "1", "1")
    assert result.returncode == 2 and "shard-2-of-3.h5 is missing" in result.stderr


def test_shard_of_another_model_is_refused(models, tmp_path):
    other = tmp_path / "other"
    convert(STORIES / "stories260K.bin", other, STORIES / "tok512.bin", "f32", budgets=["2", "1", "1"])
    mixed = tmp_path / "mixed"
    shutil.copytree(models["2 1 1"], mixed)
    shutil.copy(other / "shard-1-of-3.h5", mixed / "shard-1-of-3.h5")
    assert_refused(_cli(3, "--model", str(mixed), "--memory-budget", "2", "1", "1"),
                   "shard-1-of-3.h5 is a shard of another model")


def test_a_renamed_shard_is_refused(models, tmp_path):
    swapped = tmp_path / "swapped"
    shutil.copytree(models["2 1 1"], swapped)
    (swapped / "shard-1-of-3.h5").rename(swapped / "x")
    (swapped / "shard-2-of-3.h5").rename(swapped / "shard-1-of-3.h5")
    (swapped / "x").rename(swapped / "shard-2-of-3.h5")
    assert_refused(_cli(3, "--model", str(swapped), "--memory-budget", "2", "1", "1"),
                   "shard-1-of-3.h5 holds the rows of shard 2, not of shard 1")


def test_shard_files_of_two_splits_in_one_directory_are_refused_by_name(models, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(models["3 1"], mixed)
    shutil.copy(models["whole"], mixed / "shard-0-of-1.h5")  # a stray unsplit file named as a shard
    for n in (1, 2):
        assert_refused(_cli(n, "--model", str(mixed), *(["--memory-budget", "3", "1"] if n == 2 else [])),
                       f"{mixed} holds shard files of 2 different splits (for 1 rank(s): shard-0-of-1.h5; "
                       "for 2 rank(s): shard-0-of-2.h5, shard-1-of-2.h5)")


def test_files_that_only_look_like_shards_are_not_shards(models, tmp_path):
    copied = tmp_path / "copied"
    shutil.copytree(models["3 1"], copied)
    shutil.copy(copied / "shard-0-of-2.h5", copied / "shard-0-of-2 (copy).h5")  # a file manager's copy
    result = _cli(2, "--model", str(copied), "--memory-budget", "3", "1")
    assert result.returncode == 0, result.stderr


def test_one_shard_file_as_the_model_is_refused_naming_the_directory(models):
    shard = models["3 1"] / "shard-0-of-2.h5"
    for n, budgets in ((2, ["3", "1"]), (1, [])):
        assert_refused(_cli(n, "--model", str(shard), *(["--memory-budget", *budgets] if budgets else [])),
                       f"{shard} is shard 0 of 2, one rank's part of the model; pass the directory that holds all 2 "
                       f"shards: --model {models['3 1']}")


def test_info_prints_attributes_tensors_and_plan(models):
    text = info(models["3 2 2 1"])
    assert "shards" in text.splitlines()[0] and "plan_budgets" in text
    assert "weights MiB" in text and "layers/0/wq" in text and "q40" in text
    assert "source_sha256" in info(models["whole"])


def test_a_mixture_of_experts_in_shards_gives_the_whole_file_s_logits(tmp_path):
    """Each shard holds its rows of every expert (and every router): the same bits as the
    unsplit file on the same split."""
    from dllama_mpi.files.modelfile import write_model
    from dllama_mpi.files.synthetic import synthetic_tensors
    from dllama_mpi.files.tokenizer import Tokenizer

    spec = ModelSpec(dim=128, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=512,
                     seq_len=64, architecture="qwen3moe", qk_norm=True, n_experts=6, n_experts_used=2,
                     expert_weights_norm=True, weight_type="q40")
    budgets = ["2", "1"]
    plan = make_plan(spec, [2, 1])
    whole, shards = tmp_path / "whole.h5", tmp_path / "shards"
    for path, split in ((whole, None), (shards, plan)):
        write_model(path, spec, synthetic_tensors(spec, 3), Tokenizer.synthetic(512), {"source": "test"}, plan=split)
    for r in range(2):
        with h5py.File(shards / f"shard-{r}-of-2.h5", "r") as f:
            assert f["layers/1/experts/5/w3"].shape[0] == plan.rows("w1", r)[1] - plan.rows("w1", r)[0]
            assert f["layers/1/experts/5/w2"].shape[0] == plan.rows("w2", r)[1] - plan.rows("w2", r)[0]
            assert f["layers/1/router"].shape == (6, 128)
    a, b = _dump(whole, budgets, tmp_path / "a.npz"), _dump(shards, budgets, tmp_path / "b.npz")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    a, b = np.load(tmp_path / "a.npz")["logits"], np.load(tmp_path / "b.npz")["logits"]
    assert a.shape == (len(TOKENS), 512)
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
