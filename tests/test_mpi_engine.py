"""Bit-identity across splits and thread counts, run under mpiexec -n 2/3/4 (pytest-mpi).

Launched by test_under_mpiexec.py; run directly with
`mpiexec -n 3 python -m pytest --only-mpi tests/test_mpi_engine.py`. Each test compares the
distributed run with a one-rank run of the same model on rank 0 (a Comm of that process
alone), and every assertion is collective: all ranks reach the same verdict.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import STORIES, convert_stories, write_random_model

from dllama_mpi.job.loading import open_job
from dllama_mpi.model.spec import ModelSpec
from dllama_mpi.parallel.comm import Comm, self_comm
from dllama_mpi.parallel.threads import PARALLEL_MIN_WORK, set_threads
from dllama_mpi.serving.scheduler import generate

pytestmark = pytest.mark.mpi(min_size=2)

BUDGETS = {
    2: [(1, 1), (3, 1), (7, 1)],
    3: [(2, 1, 1), (1, 1, 1), (1, 5, 2)],
    4: [(3, 2, 2, 1), (5, 1, 1, 1), (1, 1, 1, 1)],
    5: [(1, 1, 1, 1, 1), (4, 3, 2, 1, 1)],
}
GREEDY_STEPS = 80  # enough for a split that differs in any bit to show (the random model checks bits)
RANDOM_SPEC = ModelSpec(dim=192, hidden_dim=320, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=64,
                        vocab_size=416, seq_len=64, weight_type="q40")
TOKENS = [1, 77, 300, 5, 260, 411, 9, 128]


@pytest.fixture(scope="module")
def comm():
    comm = Comm()
    set_threads(1, comm.local_size)
    return comm


@pytest.fixture(scope="module")
def shared_dir(comm):
    """A directory every rank sees (one node), made by rank 0."""
    path = tempfile.mkdtemp(prefix="dllama-mpi-test-") if comm.rank == 0 else None
    return Path(comm.bcast_obj(path))


def agree(comm, ok: bool, message: str) -> None:
    """Collective assertion: fails on every rank if it fails on any."""
    verdicts = comm.allgather_obj((bool(ok), message))
    failed = [f"rank {r}: {m}" for r, (good, m) in enumerate(verdicts) if not good]
    assert not failed, "; ".join(failed)


def on_rank_0(comm, compute):
    """compute() on rank 0 alone, its result on every rank. The others wait asleep: a rank
    waiting in an MPICH collective spins a whole core, which on an oversubscribed node
    halves rank 0's speed (the one-rank references, writing the test models)."""
    value = compute() if comm.rank == 0 else None
    comm.sleeping_barrier()
    return comm.bcast_obj(value)


def budgets_for(comm):
    return BUDGETS.get(comm.size, [tuple([1] * comm.size)])


def greedy_ids(comm, path, budgets, buffer_type, steps=GREEDY_STEPS):
    job = open_job(comm, path, budgets, buffer_type=buffer_type, max_seq_len=256)
    return generate(job, [1] if comm.rank == 0 else None, steps, stop_ids=())["generated"]


# the two ends (f32 throughout; the default q40 weights with q80 buffers): the random model's logits test checks
# every buffer type's bits
@pytest.mark.parametrize(("weights", "buffer_type"), [("f32", "f32"), ("q40", "q80")])
def test_stories260k_greedy_ids_identical_for_every_split(comm, shared_dir, weights, buffer_type):
    if not (STORIES / "stories260K.bin").exists():
        pytest.skip(f"stories260K not found at {STORIES}")
    path = on_rank_0(comm, lambda: convert_stories(shared_dir, weights))
    expected = on_rank_0(comm, lambda: greedy_ids(self_comm(), path, (1,), buffer_type))
    for budgets in budgets_for(comm):
        got = greedy_ids(comm, path, budgets, buffer_type)
        agree(comm, comm.rank != 0 or got == expected,
              f"budgets {budgets}: first difference at step "
              f"{next((i for i, (a, b) in enumerate(zip(got, expected or got)) if a != b), None)}")
        agree(comm, len(got) == GREEDY_STEPS, f"budgets {budgets}: {len(got)} tokens")


def _logits(comm, path, budgets, buffer_type, kv_type="f16"):
    job = open_job(comm, path, budgets, buffer_type=buffer_type, max_seq_len=16, kv_type=kv_type)
    return [None if (out := job.engine.forward(t, pos)) is None else out.copy() for pos, t in enumerate(TOKENS)]


def _same_bits(a, b) -> bool:
    return all(x.view(np.uint32).tolist() == y.view(np.uint32).tolist() for x, y in zip(a, b))


@pytest.mark.parametrize(("buffer_type", "kv_type"), [("f32", "f16"), ("q80", "f16"), ("f32", "f32"), ("q80", "q8_0")])
def test_random_model_logits_bit_identical_for_every_split(comm, shared_dir, buffer_type, kv_type):
    path = on_rank_0(comm, lambda: write_random_model(shared_dir / "random-hd64.h5", RANDOM_SPEC))
    expected = on_rank_0(comm, lambda: _logits(self_comm(), path, (1,), buffer_type, kv_type))
    for budgets in budgets_for(comm):
        got = _logits(comm, path, budgets, buffer_type, kv_type)
        agree(comm, comm.rank != 0 or _same_bits(got, expected), f"budgets {budgets}: logits differ")


def test_logits_bit_identical_for_any_thread_count(comm, shared_dir):
    # big enough that every rank's w1/w3 and classifier rows run multi-threaded
    spec = ModelSpec(**{**RANDOM_SPEC.to_attrs(), "dim": 256, "hidden_dim": 4096, "vocab_size": 4096})
    budgets = (1,) * comm.size
    agree(comm, 4096 // comm.size * 256 >= PARALLEL_MIN_WORK, "the test model is too small to use threads")
    path = on_rank_0(comm, lambda: write_random_model(shared_dir / "random-threads.h5", spec))
    set_threads(2, comm.local_size)
    two = _logits(comm, path, budgets, "q80")
    set_threads(1, comm.local_size)
    one = _logits(comm, path, budgets, "q80")
    agree(comm, comm.rank != 0 or _same_bits(one, two), "1 and 2 threads give different logits")


# a mixture of experts: 3 of 8 experts a token, each expert's hidden rows split as a dense FFN's
MOE_SPEC = ModelSpec(**{**RANDOM_SPEC.to_attrs(), "architecture": "qwen3moe", "qk_norm": True, "hidden_dim": 96,
                        "n_experts": 8, "n_experts_used": 3, "expert_weights_norm": True})


def _block_logits(comm, path, budgets, buffer_type):
    """The last row's logits of TOKENS as one prefill block: its rows grouped by expert."""
    job = open_job(comm, path, budgets, buffer_type=buffer_type, max_seq_len=16)
    out = job.engine.forward_block(np.array(TOKENS), 0)
    return None if out is None else [out.copy()]


@pytest.mark.parametrize("buffer_type", ["f32", "q80"])
def test_mixture_of_experts_logits_bit_identical_for_every_split(comm, shared_dir, buffer_type):
    path = on_rank_0(comm, lambda: write_random_model(shared_dir / "random-moe.h5", MOE_SPEC))
    expected = on_rank_0(comm, lambda: _logits(self_comm(), path, (1,), buffer_type))
    expected_block = on_rank_0(comm, lambda: _block_logits(self_comm(), path, (1,), buffer_type))
    agree(comm, _same_bits(expected_block, expected[-1:]), "a prefill block differs from token by token")
    for budgets in budgets_for(comm):
        got = _logits(comm, path, budgets, buffer_type)
        agree(comm, comm.rank != 0 or _same_bits(got, expected), f"budgets {budgets}: logits differ")
        block = _block_logits(comm, path, budgets, buffer_type)
        agree(comm, comm.rank != 0 or _same_bits(block, expected_block), f"budgets {budgets}: prefill logits differ")


def test_mixture_of_experts_bit_identical_for_any_thread_count(comm, shared_dir):
    # big enough that every rank's rows of an expert run multi-threaded
    spec = ModelSpec(**{**MOE_SPEC.to_attrs(), "dim": 256, "hidden_dim": 2048, "n_experts": 4, "n_experts_used": 2})
    budgets = (1,) * comm.size
    agree(comm, 2 * 2048 // comm.size * 256 >= PARALLEL_MIN_WORK, "the test model is too small to use threads")
    path = on_rank_0(comm, lambda: write_random_model(shared_dir / "random-moe-threads.h5", spec))
    set_threads(2, comm.local_size)
    two = _logits(comm, path, budgets, "q80") + (_block_logits(comm, path, budgets, "q80") or [])
    set_threads(1, comm.local_size)
    one = _logits(comm, path, budgets, "q80") + (_block_logits(comm, path, budgets, "q80") or [])
    agree(comm, comm.rank != 0 or _same_bits(one, two), "1 and 2 threads give different logits")


@pytest.mark.parametrize("model", ["dense", "moe"])
@pytest.mark.parametrize("buffer_type", ["f32", "q80"])
def test_bytes_sent_per_token_match_the_plans_traffic(comm, shared_dir, buffer_type, model):
    spec = {"dense": RANDOM_SPEC, "moe": MOE_SPEC}[model]
    path = on_rank_0(comm, lambda: write_random_model(shared_dir / f"random-traffic-{model}.h5", spec))
    for budgets in budgets_for(comm):
        job = open_job(comm, path, budgets, buffer_type=buffer_type, max_seq_len=16)
        plan, spec = job.plan, job.plan.spec
        traffic = plan.traffic(buffer_type)
        for pos, token in enumerate(TOKENS[:4]):
            before = comm.bytes_sent
            job.engine.forward(token, pos)
            expected = traffic.payload[comm.rank]
            agree(comm, abs(comm.bytes_sent - before - expected) < 1e-6,
                  f"budgets {budgets}, token {token}: sent {comm.bytes_sent - before} bytes, the plan says {expected}")


def test_a_greedy_step_gathers_each_row_s_first_largest_logit(comm, shared_dir):
    """Rows whose next token is greedy send rank 0 each rank's best (value, id) instead of
    its logits: the token is the one the sampler picks from the whole row, for every split
    (ties: test_speculation)."""
    from dllama_mpi.job.engine import Batch

    path = on_rank_0(comm, lambda: write_random_model(shared_dir / "random-greedy.h5", RANDOM_SPEC))
    for budgets in budgets_for(comm):
        job = open_job(comm, path, budgets, max_seq_len=16, max_logits=4)
        engine = job.engine
        batch = Batch(engine.max_rows, engine.max_logits)
        chosen = []
        for greedy in (False, True):
            batch.clear()
            for pos, token in enumerate(TOKENS[:5]):
                batch.add(token, 0, pos, pos > 0)
            batch.greedy = greedy
            out = engine.step(batch)
            chosen.append(None if out is None else out.copy())
        if comm.rank == 0:
            logits, picks = chosen
            assert picks.tolist() == np.argmax(logits, axis=1).tolist()
