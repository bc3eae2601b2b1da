"""The engine on one rank against the dense numpy reference, and its no-allocation promise."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import numpy_bytes_kept, read_dense, write_random_model

from dllama_mpi.job.loading import open_job
from dllama_mpi.kernels.reference import DenseModel
from dllama_mpi.model.spec import ModelSpec
from dllama_mpi.parallel.comm import Comm
from dllama_mpi.serving.scheduler import generate

# head_dim 64 with q_dim (4 * 64) != dim (160): dims that are multiples of 32 but not of 64
RANDOM_SPEC = ModelSpec(dim=160, hidden_dim=288, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
                        vocab_size=416, seq_len=64)
TOKENS = [1, 77, 300, 5, 260, 411, 9, 128, 1, 33, 64, 200, 17]


VARIANTS = {  # the architecture features, each on top of RANDOM_SPEC
    "llama": {},
    "qwen2-bias": {"architecture": "qwen2", "qkv_bias": True},
    "qwen3-qknorm": {"architecture": "qwen3", "qk_norm": True, "shared_classifier": False},
    "llama3-rope": {"rope_scaling": "llama3", "rope_scaling_factor": 8.0, "rope_original_max_position": 16},
    # mixtures of experts: 2 of 6 experts a token (qwen3moe renormalises their weights), 3 of 4 (not)
    "qwen3moe": {"architecture": "qwen3moe", "qk_norm": True, "hidden_dim": 96, "n_experts": 6, "n_experts_used": 2,
                 "expert_weights_norm": True},
    "moe-unnormalised": {"architecture": "mixtral", "hidden_dim": 64, "n_experts": 4, "n_experts_used": 3},
    # experts whose w1 and w3 differ in type: two products a layer, each over every expert
    "moe-mixed-w13": {"architecture": "qwen3moe", "qk_norm": True, "hidden_dim": 96, "n_experts": 6, "n_experts_used": 2,
                      "expert_weights_norm": True, "tensor_types": "w3=q80"},
}


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("random")
    return {w: write_random_model(out / f"random-{w}.h5", ModelSpec(**{**RANDOM_SPEC.to_attrs(), "weight_type": w}))
            for w in ("f32", "f16", "q40", "q80")}


@pytest.fixture(scope="module")
def variant_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    return {v: write_random_model(out / f"{v}.h5", ModelSpec(**{**RANDOM_SPEC.to_attrs(), **extra, "weight_type": "q40"}))
            for v, extra in VARIANTS.items()}


def _engine_logits(path, buffer_type, tokens, kv_type="f32"):
    job = open_job(Comm(), path, (1,), buffer_type=buffer_type, max_seq_len=32, kv_type=kv_type)
    return [job.engine.forward(t, pos).copy() for pos, t in enumerate(tokens)]


def _check_against_dense(path, buffer_type, kv_type="f32"):
    spec, tensors = read_dense(path)
    dense = DenseModel(spec, tensors, buffer_type, kv_type)
    expected = [dense.forward(t, pos) for pos, t in enumerate(TOKENS)]
    got = _engine_logits(path, buffer_type, TOKENS, kv_type)
    # Quantized matrices multiply bit for bit as the engine does (reference.matvec_q_*_exact),
    # but the other kernels round differently from numpy; with q80 buffers such a last-bit
    # difference can flip one Q80 code, whose effect on the logits is up to about 1.5%
    # of their scale (seen with qwen3's head norms, 10 positions in). A key or value rounded
    # to fp16 or 8 bits can flip the same way.
    tolerance = 2e-2 if buffer_type == "q80" or kv_type == "q8_0" else 1e-3 if kv_type == "f16" else 1e-4
    for pos, (e, g) in enumerate(zip(expected, got)):
        scale = np.abs(e).max()
        assert scale > 0.1  # the test would be meaningless on vanishing logits
        assert np.abs(g - e).max() <= tolerance * scale, f"position {pos}"


@pytest.mark.parametrize("weights", ["f32", "f16", "q40", "q80"])
@pytest.mark.parametrize("buffer_type", ["f32", "q80"])
def test_engine_logits_match_the_dense_reference(random_models, weights, buffer_type):
    _check_against_dense(random_models[weights], buffer_type)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("buffer_type", ["f32", "q80"])
def test_architecture_features_match_the_dense_reference(variant_models, variant, buffer_type):
    _check_against_dense(variant_models[variant], buffer_type)


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_each_kv_type_matches_the_dense_reference_holding_keys_and_values_alike(random_models, kv_type):
    _check_against_dense(random_models["q40"], "f32", kv_type)


# the largest logit difference, relative to the logits' scale, that a KV cache in each type
# may make against the f32 cache over TOKENS (measured 2026-12-06: f16 4.4e-4, q8_0 1.1e-2)
KV_LOGIT_TOLERANCE = {"f16": 2e-3, "q8_0": 3e-2}


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_a_smaller_kv_cache_stays_within_its_tolerance_of_the_f32_cache(random_models, kv_type):
    exact = _engine_logits(random_models["q40"], "f32", TOKENS)
    got = _engine_logits(random_models["q40"], "f32", TOKENS, kv_type)
    worst = max(np.abs(g - e).max() / np.abs(e).max() for e, g in zip(exact, got))
    assert 0 < worst <= KV_LOGIT_TOLERANCE[kv_type]


def test_stories260k_greedy_matches_reference_and_tells_a_story(stories_models):
    spec, tensors = read_dense(stories_models["f32"])
    dense = DenseModel(spec, tensors, "f32")
    job = open_job(Comm(), stories_models["f32"], (1,), buffer_type="f32", max_seq_len=256)
    result = generate(job, [1], 200, stop_ids=())
    ids = [1] + result["generated"]
    for pos in range(200):
        logits = dense.forward(ids[pos], pos)
        top2 = np.sort(logits)[-2:]
        if top2[1] - top2[0] > 1e-3:  # a clear winner: the engine must pick it
            assert ids[pos + 1] == int(np.argmax(logits)), f"position {pos}"
    text = b"".join(job.tokenizer.decode(a, b) for a, b in zip(ids, ids[1:])).decode()
    assert text.startswith("Once upon a time")
    words = text.lower().replace(".", " ").replace(",", " ").split()
    common = {"the", "a", "and", "to", "was", "she", "he", "her", "his", "they", "it", "in", "with", "said",
              "day", "one", "of", "play", "lily", "tim", "big", "happy", "saw", "had", "there", "time", "upon",
              "once", "little", "girl", "boy", "named", "loved", "wanted", "mom", "ball", "so", "very", "went"}
    assert len(words) > 100
    assert sum(w in common for w in words) > 0.3 * len(words), text


@pytest.mark.parametrize("model", ["q40", "qwen3moe"])
def test_forward_allocates_no_array_memory(random_models, variant_models, model):
    job = open_job(Comm(), random_models.get(model) or variant_models[model], (1,), buffer_type="q80", max_seq_len=32)
    engine = job.engine
    engine.forward(1, 0)
    def decode() -> None:
        for pos in range(1, 9):
            engine.forward(TOKENS[pos], pos)

    grown = numpy_bytes_kept(decode)
    assert grown == 0, f"{grown} bytes of numpy arrays allocated by forward()"


def test_kv_cache_is_sized_by_max_seq_len(random_models):
    job = open_job(Comm(), random_models["f32"], (1,), max_seq_len=20, n_slots=3)
    assert job.engine.k_cache.shape == (2, 3, 2, 20, 64)  # (layers, slots, KV heads, positions, head_dim)
    assert job.engine.kv_cache_bytes == 3 * job.plan.kv_cache_bytes(0, 20, "f16") == 2 * 2 * 2 * 3 * 20 * 2 * 64  # f16


@pytest.mark.parametrize("model", ["q40", "qwen3moe", "moe-mixed-w13"])
@pytest.mark.parametrize("buffer_type", ["f32", "q80"])
def test_batched_prefill_equals_token_by_token(random_models, variant_models, buffer_type, model):
    """A block of tokens through forward_block gives the last token's logits bit for bit as
    feeding the tokens one at a time (and fills the same KV cache); in a mixture of experts
    the block's rows go to their experts expert by expert, each expert's rows in one product."""
    path = random_models.get(model) or variant_models[model]
    one = open_job(Comm(), path, (1,), buffer_type=buffer_type, max_seq_len=32)
    block = open_job(Comm(), path, (1,), buffer_type=buffer_type, max_seq_len=32)
    for pos, t in enumerate(TOKENS):
        expected = one.engine.forward(t, pos)
    got = block.engine.forward_block(np.array(TOKENS[:5]), 0, logits=False)
    got = block.engine.forward_block(np.array(TOKENS[5:]), 5)
    assert got is not None and np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    n = len(TOKENS)
    assert np.array_equal(block.engine.k_cache[:, :, :, :n], one.engine.k_cache[:, :, :, :n])


@pytest.mark.parametrize("model", ["q40", "qwen3moe"])
@pytest.mark.parametrize("buffer_type", ["f32", "q80"])
def test_rows_of_several_sequences_in_one_step_equal_each_sequence_alone(random_models, variant_models, buffer_type, model):
    """Three sequences in three KV slots, fed as a server feeds them (a prompt chunk next to
    other sequences' decoding rows, in any mix): every logits row is bit for bit the one the
    sequence gets alone in a one-slot engine."""
    from dllama_mpi.job.engine import Batch

    path = random_models.get(model) or variant_models[model]
    seqs = [TOKENS[:7], TOKENS[3:12], TOKENS[::2]]
    alone = []
    for tokens in seqs:
        engine = open_job(Comm(), path, (1,), buffer_type=buffer_type, max_seq_len=32).engine
        alone.append([engine.forward(t, pos).copy() for pos, t in enumerate(tokens)])
    engine = open_job(Comm(), path, (1,), buffer_type=buffer_type, max_seq_len=32, n_slots=3).engine
    batch = Batch(engine.max_rows, engine.max_logits)
    fed = [0, 0, 0]
    # (sequence, rows) per step: chunks of different lengths beside single rows
    schedule = [[(0, 4), (1, 2)], [(0, 1), (1, 1), (2, 3)], [(0, 1), (1, 4), (2, 1)], [(0, 1), (1, 1), (2, 2)],
                [(1, 1), (2, 1)]]
    for step in schedule:
        batch.clear()
        wanted = []
        for s, n in step:
            for pos in range(fed[s], fed[s] + n):
                batch.add(seqs[s][pos], s, pos, logits=pos == fed[s] + n - 1)
            wanted.append((s, fed[s] + n - 1))
            fed[s] += n
        logits = engine.step(batch)
        for row, (s, pos) in enumerate(wanted):
            assert np.array_equal(logits[row].view(np.uint32), alone[s][pos].view(np.uint32)), (step, s, pos)
    assert fed == [len(s) for s in seqs]
