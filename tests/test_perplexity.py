"""python -m dllama_mpi perplexity: the same PPL on any number of ranks, the dense numpy
reference's PPL, KL of a model against its own saved logits exactly 0, a quantized model's
KL against the f32 base above 0; the refusals; the engine returning every row's logits."""

from __future__ import annotations

import json
import sys

import h5py
import numpy as np
import pytest
from conftest import REPO, assert_refused, numpy_bytes_kept, read_dense, run_mpiexec, write_random_model

from dllama_mpi.commands.perplexity import Chunks, log_softmax, make_chunks, mean_stderr
from dllama_mpi.model.spec import ModelSpec

TEXT = REPO / "tests" / "data" / "tinystories_sample.txt"
CTX = 128  # 9 chunks of the sample text (1257 tokens with stories260K's tokenizer), 63 tokens scored in each
PY = sys.executable


def _ppl(n: int, model, *args, text=TEXT, timeout: float = 120):
    argv = [PY, "-m", "dllama_mpi", "perplexity", "--model", str(model), "--text", str(text), *args]
    return run_mpiexec(n, argv, timeout=timeout)


def _json(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _final_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("Final estimate: PPL = "))


@pytest.fixture(scope="module")
def f32_base(stories_models, tmp_path_factory):
    """stories260K f32 with f32 buffers and an f32 KV cache on one rank, its logits saved: (results, logits
    file, stderr)."""
    path = tmp_path_factory.mktemp("logits") / "base-f32.h5"
    result = _ppl(1, stories_models["f32"], "--ctx", str(CTX), "--buffer-float-type", "f32", "--kv-type", "f32",
                  "--save-logits", str(path), "--json")
    return _json(result), path, result.stderr


# ------------------------------------------------------------------ end to end
@pytest.mark.jobs
def test_the_ppl_is_the_same_on_1_and_3_ranks_and_kl_against_its_own_logits_is_zero(stories_models, f32_base):
    one, base, one_err = f32_base
    assert one["n_chunks"] == 9 and one["ctx"] == CTX and one["n_scored"] == 9 * 63 and one["dropped_tokens"] == 105
    assert 1 < one["ppl"] < 20 and 0 < one["ppl_stderr"] < one["ppl"]
    result = _ppl(3, stories_models["f32"], "--ctx", str(CTX), "--buffer-float-type", "f32", "--kv-type", "f32",
                  "--memory-budget", "2", "1", "1", "--kl-base", str(base), "--json")
    three = _json(result)
    assert three["world_size"] == 3 and three["budgets"] == [2, 1, 1]
    assert one["kv_type"] == three["kv_type"] == "f32" and "f32 buffers, f32 KV cache, 3 rank(s)" in result.stderr
    with h5py.File(base, "r") as f:
        assert f.attrs["kv_type"] == "f32"
    # bit for bit: JSON floats round-trip exactly
    assert (three["ppl"], three["ppl_stderr"], three["n_scored"]) == (one["ppl"], one["ppl_stderr"], one["n_scored"])
    assert _final_line(result.stderr) == _final_line(one_err)
    kl = three["kl_base"]
    assert kl["kld_max"] == 0.0 and kl["kld_min"] == 0.0 and kl["kld_mean"] == 0.0
    assert kl["same_top"] == 1.0 and kl["ppl_base"] == one["ppl"] and kl["ppl_ratio"] == 1.0
    assert "Same top p: 100.000" in result.stderr


@pytest.mark.jobs
@pytest.mark.parametrize("weights", ["f32"])  # the engine against DenseModel for every type: test_engine.py
def test_the_ppl_is_the_dense_numpy_references(stories_models, f32_base, tmp_path, weights):
    """reference.DenseModel's float forward pass, position by position, on the chunks as fed
    (read back from the saved file). f32 buffers: the quantized products are bit-exact twins,
    the other kernels round differently from numpy (measured: nll within 6e-6, PPL within 1e-7
    relative)."""
    from dllama_mpi.kernels.reference import DenseModel

    if weights == "f32":
        found, path, _ = f32_base
    else:
        path = tmp_path / "q40.h5"
        found = _json(_ppl(1, stories_models["q40"], "--ctx", str(CTX), "--buffer-float-type", "f32",
                           "--save-logits", str(path), "--json"))
    with h5py.File(path, "r") as f:
        tokens, nll = f["tokens"][()], f["nll"][()]
        assert f.attrs["model_id"] == found["model_id"] and f.attrs["n_scored"] == len(nll) == found["n_scored"]
    assert tokens.shape == (9, CTX) and (tokens[:, 0] == 1).all()  # every chunk starts with BOS
    spec, tensors = read_dense(stories_models[weights])
    dense = DenseModel(spec, tensors, "f32", "f32")  # f32 buffers and KV cache, as the base was scored
    expected = []
    for row in tokens:
        for pos in range(CTX - 1):
            logits = dense.forward(int(row[pos]), pos)
            if pos >= CTX // 2:
                expected.append(-log_softmax(logits[None])[0, row[pos + 1]])
    expected = np.array(expected)
    assert np.abs(nll - expected).max() < 1e-4
    assert abs(found["ppl"] / np.exp(expected.mean()) - 1) < 1e-5
    assert found["ppl"] == pytest.approx(np.exp(nll.mean()), rel=1e-12)


@pytest.mark.jobs
def test_q40_against_the_f32_base_on_1_and_3_ranks(stories_models, f32_base):
    base_result, base, _ = f32_base
    runs = [_ppl(n, stories_models["q40"], "--ctx", str(CTX), "--kl-base", str(base), "--json") for n in (1, 3)]
    one, three = map(_json, runs)
    timing = ("seconds", "tokens_per_s", "world_size", "budgets")
    assert {k: v for k, v in one.items() if k not in timing} == {k: v for k, v in three.items() if k not in timing}
    assert _final_line(runs[0].stderr) == _final_line(runs[1].stderr)
    kl = one["kl_base"]
    assert kl["ppl_base"] == base_result["ppl"] and kl["model_id"] == base_result["model_id"]
    assert one["ppl"] != base_result["ppl"]
    assert kl["kld_mean"] > 0 and kl["kld_min"] > -1e-12 and kl["kld_max"] >= kl["kld_p99"] >= kl["kld_median"] > 0
    assert 0.5 < kl["same_top"] < 1  # 4-bit weights change the top token at some positions
    assert "====== KL divergence statistics ======" in runs[0].stderr


def _write_llama_base(path, tokens: np.ndarray, logits: np.ndarray) -> None:
    """llama-perplexity --kl-divergence-base's file, as perplexity.cpp writes it: "_logits_", n_ctx, n_vocab,
    n_chunk, the token ids, then per scored position 2 floats (scale, min log-prob) and the log-probs as
    uint16 steps (its log_softmax: nearest_int of (logit - min_logit) / scale, min_logit >= max - 16)."""
    n_chunks, ctx = tokens.shape
    vocab = logits.shape[1]
    nv = 2 * ((vocab + 1) // 2) + 4
    rows = np.zeros((len(logits), nv), np.uint16)
    for i, x in enumerate(logits.astype(np.float32)):
        top, low = np.float32(x.max()), np.float32(max(x.min(), x.max() - 16))
        log_sum = np.float32(np.log(np.sum(np.exp((x - top).astype(np.float32)), dtype=np.float64)))
        scale = np.float32((top - low) / np.float32(65535))
        rows[i, :4] = np.array([scale, low - top - log_sum], np.float32).view(np.uint16)
        q = np.rint((np.float32(1) / scale) * (x - low)).astype(np.int64)
        rows[i, 4 : 4 + vocab] = np.where(x > low, q, 0)
    with open(path, "wb") as f:
        f.write(b"_logits_")
        f.write(np.array([ctx, vocab, n_chunks], "<i4").tobytes())
        f.write(tokens.astype("<i4").tobytes())
        f.write(rows.tobytes())


@pytest.mark.jobs
def test_a_llama_cpp_base_file_is_read_its_tokens_scored_and_gives_kl_near_zero_against_the_same_logits(
        stories_models, f32_base, tmp_path):
    _, base, _ = f32_base
    with h5py.File(base, "r") as f:  # our logits, written as llama.cpp would have: the same distributions
        logits, ctx, n_chunks = f["logits"][()], int(f.attrs["ctx"]), int(f.attrs["n_chunks"])
    from dllama_mpi.commands.perplexity import tokenize
    from dllama_mpi.files.modelfile import open_model

    model = open_model(stories_models["f32"], 0, 1)
    ids, bos = tokenize(model.tokenizer(), TEXT.read_text())
    model.close()
    tokens = make_chunks(ids, bos, ctx).tokens[:n_chunks]
    _write_llama_base(tmp_path / "llama.kld", tokens, logits)
    result = run_mpiexec(2, [PY, "-m", "dllama_mpi", "perplexity", "--model", str(stories_models["f32"]),
                             "--buffer-float-type", "f32", "--kl-base", str(tmp_path / "llama.kld"), "--json"],
                         timeout=120)
    r = _json(result)
    assert "llama.cpp's tokens in" in result.stderr and r["n_chunks"] == n_chunks and r["ctx"] == ctx
    kl = r["kl_base"]
    # llama.cpp's format is the only difference: uint16 steps of up to 16 / 65535 nats, and log-probs more
    # than 16 below the top left out (measured: mean 8.3e-7, max 5.3e-5)
    assert 0 <= kl["kld_mean"] < 1e-5 and kl["kld_max"] < 1e-3 and kl["same_top"] == 1.0, kl
    assert abs(kl["ppl_base"] - r["ppl"]) < 1e-4 * r["ppl"]
    # damaged: one byte short
    (tmp_path / "cut.kld").write_bytes((tmp_path / "llama.kld").read_bytes()[:-1])
    assert_refused(run_mpiexec(1, [PY, "-m", "dllama_mpi", "perplexity", "--model", str(stories_models["f32"]),
                                   "--kl-base", str(tmp_path / "cut.kld")], timeout=60), "truncated or damaged")
    # token ids beyond this model's vocabulary
    bad = tokens.copy()
    bad[0, 5] = 100000
    _write_llama_base(tmp_path / "bad.kld", bad, logits)
    refused = run_mpiexec(1, [PY, "-m", "dllama_mpi", "perplexity", "--model", str(stories_models["f32"]), "--kl-base",
                              str(tmp_path / "bad.kld")], timeout=60)
    assert_refused(refused, "..100000, but this model's vocabulary is 0..511")
    # without a llama.cpp base the text is required
    assert_refused(run_mpiexec(1, [PY, "-m", "dllama_mpi", "perplexity", "--model", str(stories_models["f32"])],
                               timeout=60), "--text is required")


@pytest.mark.jobs
def test_a_text_shorter_than_a_chunk_is_one_shorter_chunk(stories_models, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text(TEXT.read_text()[:300])
    result = _ppl(2, stories_models["q40"], "--json", text=text)
    found = _json(result)
    assert f"fewer than a chunk of 512: scoring it as one chunk of {found['ctx']}" in result.stderr
    assert found["n_chunks"] == 1 and found["ctx"] == found["n_text_tokens"] < 512
    assert found["n_scored"] == found["ctx"] - 1 - found["ctx"] // 2 and found["dropped_tokens"] == 0


# ------------------------------------------------------------------ refusals (before loading, one message, exit 2)
@pytest.mark.jobs
def test_a_missing_text_file_is_refused(stories_models, tmp_path):
    assert_refused(_ppl(2, stories_models["q40"], text=tmp_path / "nowhere.txt"),
                   f"error: text file {tmp_path / 'nowhere.txt'} does not exist")


@pytest.mark.jobs
def test_a_text_too_short_to_score_is_refused(stories_models, tmp_path):
    text = tmp_path / "empty.txt"
    text.write_text("")
    assert_refused(_ppl(2, stories_models["q40"], text=text), "the text is 1 token(s) with BOS; scoring needs at least 3")


@pytest.mark.jobs
def test_a_kl_base_of_another_vocabulary_or_text_is_refused(stories_models, f32_base, tmp_path):
    spec = ModelSpec(dim=64, hidden_dim=128, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=32, vocab_size=416,
                     seq_len=64, weight_type="f32")
    other = write_random_model(tmp_path / "other.h5", spec)
    other_base = tmp_path / "other-logits.h5"
    assert _ppl(1, other, "--ctx", "32", "--chunks", "2", "--save-logits", str(other_base)).returncode == 0
    assert_refused(_ppl(2, stories_models["q40"], "--kl-base", str(other_base)),
                   f"--kl-base {other_base} holds logits over a vocabulary of 416 tokens, but this model's has 512")
    _, base, _ = f32_base
    text = tmp_path / "other.txt"
    text.write_text(TEXT.read_text().replace("Mia", "Ann"))
    assert_refused(_ppl(2, stories_models["q40"], "--kl-base", str(base), text=text),
                   f"--kl-base {base} was saved for other tokens: 9 chunk(s) of {CTX}")
    assert_refused(_ppl(2, stories_models["q40"], "--kl-base", str(base), "--ctx", "100"),
                   f"--kl-base {base} was saved with chunks of {CTX} tokens, this run's are 100; pass --ctx {CTX}")


@pytest.mark.jobs
def test_save_logits_never_overwrites_without_force_nor_replaces_what_it_did_not_write(stories_models, f32_base, tmp_path):
    _, base, _ = f32_base
    saved = tmp_path / "saved.h5"
    saved.write_bytes(base.read_bytes())
    assert_refused(_ppl(2, stories_models["q40"], "--save-logits", str(saved)),
                   f"--save-logits {saved} exists; pass --force to overwrite it")
    assert saved.read_bytes() == base.read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    assert_refused(_ppl(2, stories_models["q40"], "--save-logits", str(notes), "--force"),
                   f"--save-logits {notes} exists and is not a logits file saved by python -m dllama_mpi perplexity; "
                   "--force replaces only a logits file this program wrote")
    assert notes.read_text() == "keep me"
    # --force replaces a logits file this program wrote, and leaves no temporary behind
    found = _json(_ppl(2, stories_models["q40"], "--ctx", "64", "--save-logits", str(saved), "--force", "--json"))
    with h5py.File(saved, "r") as f:
        assert f.attrs["model_id"] == found["model_id"] and f.attrs["ctx"] == 64
        assert f["logits"].shape == (found["n_scored"], 512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "saved.h5"]


# ------------------------------------------------------------------ pure parts
def test_chunks_start_with_bos_and_score_their_second_half():
    ids = list(range(1, 24))  # 23 tokens, the first BOS (1)
    chunks = make_chunks(ids, 1, 10)
    assert chunks.tokens.tolist() == [[1, *range(2, 11)], [1, *range(12, 21)]]  # token 11 overwritten with BOS
    assert (chunks.first, chunks.per_chunk, chunks.n_scored, chunks.dropped) == (5, 4, 8, 3)
    assert make_chunks(ids, 1, 10, max_chunks=1).n_chunks == 1 and make_chunks(ids, 1, 10, 1).dropped == 13
    short = make_chunks(ids[:7], 1, 10)
    assert short.short and short.n_ctx == 7 and short.n_scored == 3
    no_bos = make_chunks(list(range(5, 25)), None, 10)
    assert no_bos.tokens[1, 0] == 15
    assert make_chunks(ids, 1, 10).digest() != make_chunks(ids, 1, 11).digest()
    assert isinstance(make_chunks(ids[:3], 1, 10), Chunks)
    from dllama_mpi.errors import InputError

    with pytest.raises(InputError, match="scoring needs at least 3"):
        make_chunks(ids[:2], 1, 10)


def test_save_logits_wants_room_for_them_before_loading(monkeypatch, tmp_path):
    import shutil

    from dllama_mpi.commands import perplexity
    from dllama_mpi.errors import InputError

    chunks = make_chunks(list(range(1, 1001)), 1, 100)  # 10 chunks, 49 scored each
    assert perplexity.logits_bytes(chunks, 32000) == 490 * (4 * 32000 + 8) + 8 * 1000
    perplexity.check_room(tmp_path / "x.h5", chunks, 32000)
    monkeypatch.setattr(perplexity.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(InputError, match=r"would take about 59\.8 MiB \(490 scored positions x 32000 float32 logits\) "
                                         r"but .* has 1\.0 MiB free"):
        perplexity.check_room(tmp_path / "x.h5", chunks, 32000)


def test_a_text_that_is_not_utf8_names_the_byte_and_the_fix(tmp_path):
    from dllama_mpi.commands.perplexity import read_text
    from dllama_mpi.errors import InputError

    text = tmp_path / "latin1.txt"
    text.write_bytes("Mia's caf\u00e9".encode("latin-1"))
    with pytest.raises(InputError, match=rf"--text {text} is not valid UTF-8 \(byte 0xe9 at offset 9: .*\); "
                                         r"convert it \(e\.g\. iconv -t UTF-8\)"):
        read_text(str(text))


def test_saved_logits_are_not_renamed_over_what_was_put_there_meanwhile(tmp_path):
    """The final rename checks the target again: a file (or directory) put there while the
    logits were written is refused, left as it is, and the temporary is removed."""
    from dllama_mpi.commands.perplexity import LogitsWriter
    from dllama_mpi.errors import InputError

    chunks = make_chunks(list(range(1, 21)), 1, 10)
    path = tmp_path / "logits.h5"
    for meanwhile, message in ((lambda: path.write_text("keep me"), "exists and is not a logits file"),
                               (path.mkdir, "is a directory")):
        writer = LogitsWriter(path, chunks, 8, {"model_id": "m"})
        writer.write(0, np.zeros((chunks.n_scored, 8), np.float32))
        meanwhile()
        with pytest.raises(InputError, match=message):
            writer.finish(np.zeros(chunks.n_scored))
        assert [p.name for p in tmp_path.iterdir()] == ["logits.h5"]
        assert path.is_dir() or path.read_text() == "keep me"
        path.unlink() if path.is_file() else path.rmdir()


def test_saved_logits_whose_target_changes_after_the_last_check_replace_nothing(tmp_path, monkeypatch):
    """Between install's check and its rename: a directory put there then is refused as a race."""
    from dllama_mpi.commands.perplexity import LogitsWriter
    from dllama_mpi.errors import InputError
    from dllama_mpi.files import atomic_output

    chunks = make_chunks(list(range(1, 21)), 1, 10)
    path = tmp_path / "logits.h5"
    writer = LogitsWriter(path, chunks, 8, {"model_id": "m"})
    monkeypatch.setattr(atomic_output, "check_target", lambda *a, **k: path.mkdir())
    with pytest.raises(InputError, match=f"{path} changed while the logits were saved .* this run "
                                         "replaced nothing"):
        writer.finish(np.zeros(chunks.n_scored))
    assert [p.name for p in tmp_path.iterdir()] == ["logits.h5"] and path.is_dir()


def test_the_statistics():
    mean, err = mean_stderr(np.array([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and err == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert mean_stderr(np.array([2.0])) == (2.0, None)
    logits = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32) * 5
    logp = log_softmax(logits)
    assert np.allclose(np.exp(logp).sum(axis=1), 1, atol=1e-12)
    assert np.allclose(logp, logits - np.log(np.exp(logits.astype(np.float64)).sum(axis=1, keepdims=True)))


# ------------------------------------------------------------------ the engine's max_logits
def test_the_engine_returns_every_rows_logits_with_max_logits(tmp_path):
    """open_job(max_logits=...) lets one step return the logits of every row, each bit for bit
    the one of feeding the tokens one at a time, allocating nothing per step; the default
    stays one row per slot."""
    from dllama_mpi.job.engine import Batch
    from dllama_mpi.job.loading import open_job
    from dllama_mpi.parallel.comm import Comm

    spec = ModelSpec(dim=64, hidden_dim=96, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, vocab_size=300,
                     seq_len=64, weight_type="q40")
    path = write_random_model(tmp_path / "m.h5", spec)
    tokens = [1, 77, 200, 5, 260, 11, 9, 128, 1, 33, 64, 250, 17]
    default = open_job(Comm(), path, (1,), max_seq_len=32, n_slots=2)
    assert default.engine.max_logits == 2 and default.engine.new_batch().wire.size == Batch.HEADER + 3 * 32 + 2
    one = default.engine
    expected = [one.forward(t, pos).copy() for pos, t in enumerate(tokens)]
    engine = open_job(Comm(), path, (1,), max_seq_len=32, max_logits=1000).engine
    assert engine.max_logits == engine.max_rows == 32
    batch = Batch(engine.max_rows, engine.max_logits)

    def fill():
        batch.clear()
        for pos, t in enumerate(tokens):
            batch.add(t, 0, pos, True)

    fill()
    got = engine.step(batch)
    assert got.shape == (len(tokens), 300)
    for pos in range(len(tokens)):
        assert np.array_equal(got[pos].view(np.uint32), expected[pos].view(np.uint32)), pos
    fill()
    grown = numpy_bytes_kept(lambda: engine.step(batch))
    assert grown == 0, f"{grown} bytes of numpy arrays allocated by a step"
