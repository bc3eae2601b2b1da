"""The partition plan: coverage, proportionality, granularity, validation."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dllama_mpi.model.spec import ModelSpec
from dllama_mpi.parallel.plan import ROW_GRANULE, apportion, make_plan

STORIES = ModelSpec(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, head_dim=8, vocab_size=512, seq_len=512)
TINYLLAMA = ModelSpec(dim=2048, hidden_dim=5632, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64,
                      vocab_size=32000, seq_len=2048, weight_type="q40")


@st.composite
def specs(draw):
    n_kv = draw(st.integers(1, 8))
    n_heads = n_kv * draw(st.integers(1, 4))
    return ModelSpec(
        dim=draw(st.integers(1, 700)), hidden_dim=draw(st.integers(1, 900)), n_layers=draw(st.integers(1, 3)),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=2 * draw(st.integers(1, 40)),
        vocab_size=draw(st.integers(1, 3000)), seq_len=16,
    )


@st.composite
def spec_and_budgets(draw):
    spec = draw(specs())
    n = draw(st.integers(1, max(9, spec.n_heads + 2)))
    budgets = draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n))
    return spec, budgets


def _covers_exactly(spans, n):
    """Contiguous, ordered, disjoint spans covering [0, n)."""
    assert spans[0][0] == 0 and spans[-1][1] == n
    for (a, b), (c, _) in zip(spans, spans[1:]):
        assert a <= b == c


@settings(max_examples=300, deadline=None)
@given(spec_and_budgets())
def test_every_row_and_head_is_owned_by_exactly_one_rank(case):
    spec, budgets = case
    plan = make_plan(spec, budgets)
    for vector, n in (("att", spec.q_dim), ("dim", spec.dim), ("ffn", spec.hidden_dim), ("vocab", spec.vocab_size)):
        _covers_exactly(plan.segments(vector), n)
    _covers_exactly([s.q_heads for s in plan.ranks], spec.n_heads)


@settings(max_examples=300, deadline=None)
@given(spec_and_budgets())
def test_shares_are_within_one_granule_of_the_budget_share(case):
    spec, budgets = case
    plan = make_plan(spec, budgets)
    for s, budget in zip(plan.ranks, budgets):
        share = Fraction(budget, sum(budgets))
        assert abs((s.q_heads[1] - s.q_heads[0]) - share * spec.n_heads) < 1
        for span, n in ((s.dim_rows, spec.dim), (s.ffn_rows, spec.hidden_dim), (s.vocab_rows, spec.vocab_size)):
            assert abs((span[1] - span[0]) - share * n) < ROW_GRANULE
            assert span[0] % ROW_GRANULE == 0 or span[0] == n  # slices start on a granule (or are empty at the end)


@settings(max_examples=300, deadline=None)
@given(spec_and_budgets())
def test_kv_heads_are_those_the_query_heads_read(case):
    spec, budgets = case
    plan = make_plan(spec, budgets)
    g = spec.group_size
    for s in plan.ranks:
        needed = {h // g for h in range(*s.q_heads)}
        # exactly the KV heads its query heads read: a KV head is held by several ranks
        # only where its group of query heads is split between them
        assert set(range(*s.kv_heads)) == needed
        assert [s.kv_heads[0] + i for i in plan.kv_head_of(s.rank)] == [h // g for h in range(*s.q_heads)]


@given(st.integers(0, 10_000), st.lists(st.integers(1, 100), min_size=1, max_size=12))
def test_apportion_sums_and_is_scale_free(n, budgets):
    units = apportion(n, tuple(budgets))
    assert sum(units) == n
    assert units == apportion(n, tuple(4 * b for b in budgets))  # 12 4 == 3 1


def test_ratios_are_what_matter():
    assert make_plan(STORIES, [12, 4]) == make_plan(STORIES, [3, 1])
    assert make_plan(STORIES, [12, 4]).plan_hash() == make_plan(STORIES, [3, 1]).plan_hash()


def test_more_ranks_than_heads_get_no_attention_but_other_rows():
    plan = make_plan(STORIES, [1] * 10)
    no_heads = [s for s in plan.ranks if s.n_local_heads == 0]
    assert len(no_heads) == 2
    assert all(s.n_local_kv_heads == 0 for s in no_heads)
    assert sum(s.vocab_rows[1] - s.vocab_rows[0] for s in no_heads) > 0


def test_tinyllama_3221_example():
    plan = make_plan(TINYLLAMA, [3, 2, 2, 1])
    assert [s.n_local_heads for s in plan.ranks] == [12, 8, 8, 4]
    assert [s.kv_heads for s in plan.ranks] == [(0, 2), (1, 3), (2, 4), (3, 4)]
    assert [s.ffn_rows[1] - s.ffn_rows[0] for s in plan.ranks] == [2112, 1408, 1408, 704]
    assert [s.dim_rows[1] - s.dim_rows[0] for s in plan.ranks] == [768, 512, 512, 256]
    # KV head 1 serves query heads 8..15, split between ranks 0 and 1: it is cached on both
    assert plan.kv_cache_bytes(0, 100, "f32") == 2 * 4 * 22 * 100 * 2 * 64


def test_kv_bytes_are_each_types_row_per_head_layer_and_position():
    plan = make_plan(TINYLLAMA, [3, 2, 2, 1])  # head_dim 64: two Q8_0 blocks of 32 per row
    f32, f16, q80 = (plan.kv_cache_bytes(0, 100, t) for t in ("f32", "f16", "q8_0"))
    assert f16 == 2 * 2 * 22 * 100 * 2 * 64 and f32 == 2 * f16
    assert q80 == 2 * 22 * 100 * 2 * (64 + 2 * 64 // 32)  # int8 codes and an fp16 scale per 32 values
    assert plan.kv_cache_bytes(3, 100, "q8_0") == q80 // 2  # rank 3 caches one KV head
    # stories260K's heads are 8 wide: one block (and one scale) per row, so a block never spans two heads
    stories = make_plan(STORIES, [1])
    assert stories.kv_cache_bytes(0, 10, "q8_0") == 2 * 5 * 10 * 4 * (8 + 2)
    assert stories.kv_cache_bytes(0, 10, "f16") == 2 * 5 * 10 * 4 * 16


def test_plan_table_lists_every_rank_with_memory():
    plan = make_plan(TINYLLAMA, [3, 2, 2, 1])
    lines = plan.table(2048, 1, "f16").splitlines()
    assert len(lines) == 5 and "weights MiB" in lines[0] and lines[0].endswith(" kv MiB f16")
    assert lines[1].split()[:5] == ["0", "3", "37.5%", "12", "2"]
    assert float(lines[1].split()[-1]) == pytest.approx(plan.kv_cache_bytes(0, 2048, "f16") / 2**20, abs=0.005)
    q80 = plan.table(2048, 4, "q8_0").splitlines()
    assert q80[0].endswith(" kv MiB q8_0 (4 slots)")
    assert plan.table(2048) == plan.table(2048, 1, "f16")  # the converter's --info: a launch's default
    assert float(q80[1].split()[-1]) == pytest.approx(4 * plan.kv_cache_bytes(0, 2048, "q8_0") / 2**20, abs=0.005)


def test_weight_bytes_add_up_to_the_model():
    spec = TINYLLAMA
    plan = make_plan(spec, [3, 2, 2, 1])
    one = make_plan(spec, [1])
    kv_duplicated = sum(plan.ranks[r].n_local_kv_heads for r in range(4)) - spec.n_kv_heads
    dup_bytes = 2 * spec.n_layers * kv_duplicated * spec.head_dim * spec.resident_row_bytes("wk")
    replicated = (4 - 1) * (2 * spec.n_layers + 1) * 4 * spec.dim
    assert sum(plan.weight_bytes(r) for r in range(4)) == one.weight_bytes(0) + dup_bytes + replicated


def test_plan_hash_tells_plans_apart():
    assert make_plan(STORIES, [3, 1]).plan_hash() != make_plan(STORIES, [1, 1]).plan_hash()
    assert make_plan(STORIES, [1, 1]).plan_hash() != make_plan(STORIES, [1, 1, 1]).plan_hash()
    assert make_plan(STORIES, [1]).plan_hash() != make_plan(TINYLLAMA, [1]).plan_hash()


@pytest.mark.parametrize("budgets", [[], [1, 0], [2, -1], [1.5, 1], ["1", "1"], [True, 1]])
def test_a_plan_takes_positive_integer_ratios_only(budgets):
    with pytest.raises(ValueError, match="positive integer ratios"):
        make_plan(STORIES, budgets)


def test_q80_alignment_follows_head_dim_and_lengths():
    assert not make_plan(STORIES, [1]).q80_aligned("att")  # head_dim 8
    assert make_plan(STORIES, [1]).q80_aligned("dim")
    assert not make_plan(STORIES, [1]).q80_aligned("ffn")  # 172
    assert make_plan(TINYLLAMA, [1]).q80_aligned("att")


def test_traffic_of_tinyllama_on_two_ranks_by_hand():
    plan = make_plan(TINYLLAMA, [1, 1])
    # per layer the full att, dim, ffn, dim vectors: (2048 + 2048 + 5632 + 2048) values
    q80 = plan.traffic("q80")
    assert q80.gathered == 22 * (2048 + 2048 + 5632 + 2048) // 32 * 34
    assert q80.wire == q80.gathered + 4 * 2048 + 4 * 16000  # + the embedding row, + rank 1's logits
    assert q80.collectives == 4 * 22 + 2
    f32 = plan.traffic("f32")
    assert f32.gathered == 22 * (2048 + 2048 + 5632 + 2048) * 4
    # half of it and the whole embedding row (OR-combined: zero where the other rank holds the token)
    assert f32.payload[0] == pytest.approx(f32.gathered / 2 + 4 * 2048)
    assert f32.payload[1] == pytest.approx(f32.gathered / 2 + 4 * 2048 + 4 * 16000)


def test_a_k_quant_model_takes_q8k_activations_and_keeps_what_they_read_and_the_residual_whole():
    """With q80 buffers the k-quant products take Q8K activations (a scale per 256 values), so what
    they read travels whole, as f32; so does the residual's increment ("dim") in a model with
    k-quants (llama.cpp's arithmetic); the Q40 products of the same model still take Q80."""
    q4km = dataclasses.replace(TINYLLAMA, weight_type="q4k", tensor_types="output=q6k,wo=q40,layers/3/wv=q6k")
    plan = make_plan(q4km, [1, 1])
    assert plan.activation_forms("xb", "q80") == {"q8k"} and plan.activation_forms("att", "q80") == {"q80"}
    assert plan.activation_forms("ffn", "q80") == {"q8k"} and plan.activation_forms("dim", "q80") == frozenset()
    assert plan.activation_forms("xb", "f32") == {"f32"}
    assert [plan.travels_q80(v, "q80") for v in ("att", "dim", "ffn")] == [True, False, False]
    assert [make_plan(TINYLLAMA, [1, 1]).travels_q80(v, "q80") for v in ("att", "dim", "ffn")] == [True, True, True]
    a, b = plan.segments("ffn")[1]
    assert plan.transit_bytes("ffn", "q80", 1) == 4 * (b - a)


def test_traffic_falls_back_to_f32_where_q80_would_cut_blocks():
    att_q80 = make_plan(STORIES, [1, 1]).traffic("q80")
    att_f32 = make_plan(STORIES, [1, 1]).traffic("f32")
    # stories260K: att (head_dim 8) and ffn (172) travel as f32 even with q80 buffers, dim as Q80
    saved_on_dim = 2 * STORIES.n_layers * (4 * STORIES.dim - STORIES.dim // 32 * 34)
    assert att_f32.gathered - att_q80.gathered == saved_on_dim


@given(spec_and_budgets())
@settings(max_examples=50, deadline=None)
def test_wire_bytes_are_what_each_rank_lacks(case):
    spec, budgets = case
    plan = make_plan(spec, budgets)
    for buffer_type in ("f32", "q80"):
        t = plan.traffic(buffer_type)
        n = len(budgets)
        if n == 1:
            assert t.wire == t.gathered == t.collectives == 0
            continue
        logits = sum(4 * (s.vocab_rows[1] - s.vocab_rows[0]) for s in plan.ranks[1:])
        assert sum(t.payload) == pytest.approx(t.gathered + logits + n * 4 * spec.dim)
        assert t.wire == (n - 1) * (t.gathered + 4 * spec.dim) + logits


def test_planned_weight_bytes_equal_what_a_rank_loads(tmp_path):
    from conftest import write_random_model

    from dllama_mpi.job.loading import open_job
    from dllama_mpi.parallel.comm import Comm

    spec = ModelSpec(dim=96, hidden_dim=160, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=32, vocab_size=320,
                     seq_len=16, weight_type="q40", qkv_bias=True, qk_norm=True, shared_classifier=False)
    path = write_random_model(tmp_path / "m.h5", spec)
    job = open_job(Comm(), path, (1,), max_seq_len=8)
    assert job.weights.nbytes == job.plan.weight_bytes(0)


@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
def test_planned_kv_bytes_equal_what_the_engine_allocates(tmp_path, kv_type):
    """open_job's kv_type reaches the engine, whose cache (codes and scales, every slot) is what the plan counts."""
    from conftest import write_random_model

    from dllama_mpi.job.loading import open_job
    from dllama_mpi.parallel.comm import Comm

    path = write_random_model(tmp_path / "m.h5", dataclasses.replace(STORIES, n_layers=2))  # heads 8 wide: q8_0 blocks of 8
    job = open_job(Comm(), path, (1,), max_seq_len=12, n_slots=2, kv_type=kv_type)
    assert job.engine.kv_cache_bytes == 2 * job.plan.kv_cache_bytes(0, 12, kv_type)


def test_tensor_types_override_the_weight_type_per_matrix_and_count_in_the_plans_bytes():

    from dllama_mpi.errors import InputError

    mixed = dataclasses.replace(TINYLLAMA, tensor_types="output=q80,w2=q80")
    assert [mixed.tensor_type(k) for k in ("wq", "w2", "output")] == ["q40", "q80", "q80"]
    assert mixed.weights_text == "q40 (output=q80, w2=q80)"
    assert (TINYLLAMA.resident_row_bytes("w2"), mixed.resident_row_bytes("w2")) == (176 * 18, 176 * 34)  # 5632 / 32 blocks
    uniform, plan = make_plan(TINYLLAMA, (1, 1)), make_plan(mixed, (1, 1))
    assert plan.plan_hash() != uniform.plan_hash() and "tensor_types" not in TINYLLAMA.to_attrs()
    assert ModelSpec.from_attrs(mixed.to_attrs()) == mixed
    layered = dataclasses.replace(TINYLLAMA, tensor_types="layers/3/w2=q80,layers/21/wq=q80,layers/21/wk=q80,"
                                                          "layers/21/wv=q80")
    assert [layered.tensor_type("w2", i) for i in (2, 3)] == ["q40", "q80"] and layered.tensor_type("w2") == "q40"
    assert layered.weights_text == "q40 (4 per-layer)"
    rows = {k: make_plan(layered, (1,)).rows(k, 0) for k in ("w2", "wq", "wk", "wv")}
    extra = sum((b - a) * (layered.resident_row_bytes(k, layer) - TINYLLAMA.resident_row_bytes(k))
                for k, (a, b) in rows.items() for layer in range(22))
    assert extra > 0 and make_plan(layered, (1,)).weight_bytes(0) == make_plan(TINYLLAMA, (1,)).weight_bytes(0) + extra
    # a stack's parts may differ (the engine runs them as Parts): a Q4_K_M file's Q6_K wv beside Q4_K wq and wk
    assert dataclasses.replace(TINYLLAMA, tensor_types="layers/2/wv=q80,w1=q80").tensor_type("wv", 2) == "q80"
    for bad, says in (("w9=q80", "names 'w9'"), ("w2=q3k", "gives w2 the type 'q3k'"),
                      ("layers/22/w2=q80", "names 'layers/22/w2'"), ("layers/0/output=q80", "names 'layers/0/output'"),
                      ("layers/03/w2=q80", "names 'layers/03/w2'"), ("layers/\u0663/w2=q80", "names 'layers/"),
                      ("w2", "must read kind=type")):
        with pytest.raises(InputError, match=says):
            dataclasses.replace(TINYLLAMA, tensor_types=bad)


@pytest.mark.parametrize("budgets", [(1,), (1, 1), (3, 1), (1, 1, 1, 1)])
def test_a_mixture_of_experts_is_shared_out_whole(budgets):
    """Every expert's matrices are split among the ranks, nothing lost or held twice (splits on
    KV-head groups here); each rank holds every replicated vector, the routers among them."""
    from dllama_mpi.files.modelfile import tensor_layout

    spec = ModelSpec(dim=256, hidden_dim=96, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=32, vocab_size=512,
                     seq_len=64, architecture="qwen3moe", qk_norm=True, n_experts=8, n_experts_used=2,
                     expert_weights_norm=True, weight_type="q40")
    layout = tensor_layout(spec)
    assert sum(name.endswith("/router") for name in layout) == 2 and sum("/experts/" in name for name in layout) == 48
    matrices = sum(info.shape[0] * spec.resident_row_bytes(info.split, info.layer) for info in layout.values() if info.matrix)
    vectors = sum(4 * math.prod(info.shape) for info in layout.values() if not info.matrix)
    plan = make_plan(spec, budgets)
    assert sum(plan.weight_bytes(r) for r in range(len(budgets))) == matrices + len(budgets) * vectors
    # loading packs a layer's experts at a time: one layer's share of every expert, counted in the need
    experts = sum(info.shape[0] * spec.resident_row_bytes(info.split, info.layer) for name, info in layout.items()
                  if "/experts/" in name)
    assert sum(plan.expert_layer_bytes(r) for r in range(len(budgets))) == experts // spec.n_layers
