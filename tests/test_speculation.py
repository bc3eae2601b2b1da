"""Speculative decoding (serving/speculation.py, Sampler.verify), in one process: drafts are
checked by the model, so the text at temperature 0 is the model's own token for token, and
sampled text keeps the model's distribution (chi-square tests on fixed seeds, each with a
broken rule beside it that the same test rejects: the tests can fail)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import write_random_model

from dllama_mpi.job import sampler as sampler_module
from dllama_mpi.job.engine import Batch
from dllama_mpi.job.loading import open_job
from dllama_mpi.job.sampler import Sampler
from dllama_mpi.kernels import reference, vector
from dllama_mpi.model.spec import ModelSpec
from dllama_mpi.parallel.comm import Comm
from dllama_mpi.serving import scheduler as scheduler_module
from dllama_mpi.serving.request import Finished, GenRequest, Piece, Sampling
from dllama_mpi.serving.scheduler import Scheduler, generate
from dllama_mpi.serving.speculation import Drafting, DraftModel, PromptLookup, StepCost, draft_length, logit_rows

CONTEXT, SLOTS, MAX_DRAFT = 160, 3, 6
# stories260K's vocabulary size, random weights: a draft model that is mostly wrong
RANDOM_DRAFT_SPEC = ModelSpec(dim=64, hidden_dim=96, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32,
                              vocab_size=512, seq_len=CONTEXT, weight_type="f32")


@pytest.fixture(scope="module")
def stories(stories_models):
    """stories260K (f32) with room for every slot's drafts, its q40 conversion and a random
    model of its vocabulary as draft models."""
    job = open_job(Comm(), stories_models["f32"], (1,), max_seq_len=CONTEXT, n_slots=SLOTS,
                   max_logits=logit_rows(SLOTS, MAX_DRAFT))
    q40 = open_job(Comm(), stories_models["q40"], (1,), max_seq_len=CONTEXT, n_slots=SLOTS)
    path = write_random_model(stories_models["f32"].parent / "random-draft.h5", RANDOM_DRAFT_SPEC)
    random = open_job(Comm(), path, (1,), max_seq_len=CONTEXT, n_slots=SLOTS)
    return job, q40, random


def chi2_sf(x: float, df: int) -> float:
    """P(chi-square with df degrees > x), Wilson-Hilferty's normal approximation (ample for
    the thresholds here)."""
    if df <= 0:  # one cell: nothing differs
        return 1.0
    z = ((x / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def goodness_of_fit(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of counts drawn from probs (cells expecting fewer than 5 pooled)."""
    expected = counts.sum() * probs
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return chi2_sf(float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1)


def same_distribution(a: list[int], b: list[int]) -> float:
    """p-value of two equal-sized samples coming from one distribution (two-sample chi-square;
    values seen fewer than 10 times in both together pooled)."""
    values = sorted(set(a) | set(b))
    ca = np.array([a.count(v) for v in values], np.float64)
    cb = np.array([b.count(v) for v in values], np.float64)
    small = ca + cb < 10
    ca, cb = np.append(ca[~small], ca[small].sum()), np.append(cb[~small], cb[small].sum())
    keep = ca + cb > 0
    stat = float(((ca[keep] - cb[keep]) ** 2 / (ca[keep] + cb[keep])).sum())
    return chi2_sf(stat, int(keep.sum()) - 1)


def resample_from_p(p, q, out):
    """A broken vector.residual: the rejected draft's token drawn from p itself."""
    out[:] = p
    return 1.0


# --- the sampling kernels --------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 513])
def test_distribution_and_residual_equal_their_twins_and_sample_picks_from_it(n):
    rng = np.random.default_rng(n)
    logits = (3 * rng.standard_normal(n)).astype(np.float32)
    for temperature, top_p in ((0.8, 0.9), (1.3, 1.0), (0.5, 0.3)):
        probs = np.zeros(n)
        vector.distribution(logits, temperature, top_p, probs, np.zeros(n))
        np.testing.assert_allclose(probs, reference.distribution(logits, temperature, top_p), rtol=1e-12, atol=1e-15)
        for coin in (0.0, 0.3, 0.999999):  # the token sample draws is where the coin falls in this distribution
            assert vector.sample(logits, temperature, top_p, coin, np.zeros(n), np.zeros(n)) == vector.pick(probs, coin)
        q = rng.dirichlet(np.ones(n))
        out = np.zeros(n)
        mass = vector.residual(probs, q, out)
        np.testing.assert_allclose(out / mass, reference.residual(probs, q), rtol=1e-12, atol=1e-15)


def test_greedy_picks_across_vocabulary_spans_are_the_sampler_s_first_largest():
    """Each rank's (largest, first id) of its span, then the first rank's on a tie: the id
    `sample` picks from the whole row at temperature 0, ties to the lowest id."""
    rng = np.random.default_rng(3)
    rows = rng.integers(-3, 3, size=(6, 37)).astype(np.float32)  # many ties
    rows[5] = 1.0  # all equal: id 0
    spans = ((0, 10), (10, 11), (11, 37))
    parts = np.zeros((len(spans), len(rows), 2), np.float32)
    for r, (a, b) in enumerate(spans):
        vector.row_argmax(rows[:, a:b], a, parts[r])
    picks = np.zeros(len(rows), np.int64)
    vector.pick_best(parts, picks)
    expected = [vector.sample(row, 0.0, 1.0, 0.0, np.zeros(37), np.zeros(37)) for row in rows]
    assert picks.tolist() == expected == np.argmax(rows, axis=1).tolist()


def test_verify_at_temperature_0_keeps_the_drafts_equal_to_the_greedy_choices():
    logits = np.zeros((4, 9), np.float32)
    for row, best in enumerate((3, 5, 2, 8)):
        logits[row, best] = 1.0
    sampler = Sampler(9, 0.0, 1.0, 0)
    assert sampler.verify(logits, [3, 5, 2]) == (3, 8)  # every draft kept, then the last row's choice
    assert sampler.verify(logits, [3, 4, 2]) == (1, 5)  # the second draft wrong: the model's token instead
    assert sampler.verify(logits[:1], []) == (0, 3)


@pytest.mark.parametrize("draft", ["one-hot", "sampled"])
def test_verify_keeps_the_model_s_distribution_and_a_broken_rule_is_caught(draft, monkeypatch):
    """Leviathan et al.'s rule: whatever the drafts, the first token out is distributed as the
    model's first row, and the second (when the first draft is kept) as its second row. The
    same test rejects the rule that resamples a rejected draft's token from p instead of
    max(0, p - q)."""
    vocab, k, n = 12, 3, 8000
    rng = np.random.default_rng(7)
    logits = (2 * rng.standard_normal((k + 1, vocab))).astype(np.float32)
    temperature, top_p = 0.8, 0.9
    p = [reference.distribution(row, temperature, top_p) for row in logits]
    q = rng.dirichlet(np.full(vocab, 0.7), size=k)  # a poor draft: far from p
    firsts, seconds, broken = np.zeros(vocab), np.zeros(vocab), np.zeros(vocab)
    sampler, wrong = Sampler(vocab, temperature, top_p, 1), Sampler(vocab, temperature, top_p, 2)
    for _ in range(n):
        if draft == "one-hot":  # a lookup's drafts: any tokens, one-hot
            drafts, probs = [int(rng.integers(vocab)) for _ in range(k)], None
        else:
            drafts, probs = [int(rng.choice(vocab, p=q[j])) for j in range(k)], q
        kept, token = sampler.verify(logits, drafts, probs)
        out = [*drafts[:kept], token]
        firsts[out[0]] += 1
        if kept >= 1:
            seconds[out[1]] += 1
    assert goodness_of_fit(firsts, p[0]) > 1e-3
    assert seconds.sum() > 500 and goodness_of_fit(seconds, p[1]) > 1e-3
    if draft == "sampled":
        monkeypatch.setattr(sampler_module, "residual", resample_from_p)
        for _ in range(n):
            drafts = [int(rng.choice(vocab, p=q[j])) for j in range(k)]
            kept, token = wrong.verify(logits, drafts, q)
            broken[[*drafts[:kept], token][0]] += 1
        assert goodness_of_fit(broken, p[0]) < 1e-6


# --- how many drafts pay ---------------------------------------------------------------
def test_drafts_are_made_where_they_pay_for_their_rows():
    """Expected tokens per second decide: drafts rarely kept, or rows that cost much, make
    none; drafts usually kept make a few; free rows make as many as allowed."""
    assert draft_length(0.25, 1.0, 0.4, 8) == 0  # (1 + 0.25) / 1.4 < 1
    assert draft_length(0.87, 1.0, 0.4, 8) == 3
    assert draft_length(0.87, 1.0, 0.0, 8) == 8
    assert draft_length(0.5, 1.0, 0.25, 8) == 1  # nothing seen yet, the prior's row cost: one draft to learn from


def test_step_cost_fits_the_time_of_a_step_by_its_rows_and_a_sequence_s_rate_forgets():
    cost = StepCost()
    assert cost.line() == (1.0, 0.25)
    for _ in range(3):
        cost.step(0, 0.040)
    base, per_row = cost.line()
    assert base == pytest.approx(0.040 / 1.0) and per_row == pytest.approx(0.25 * 0.040)  # one size: the prior slope
    for _ in range(5):
        cost.step(4, 0.080)
        cost.step(0, 0.040)
    assert cost.line() == pytest.approx((0.040, 0.010))
    drafting = Drafting(8)
    assert drafting.alpha == 0.5
    for _ in range(20):
        drafting.verified(4, 1)  # one kept, then a rejection
    assert drafting.alpha < 0.55 and (drafting.drafted, drafting.accepted, drafting.steps) == (80, 20, 20)
    for _ in range(20):
        drafting.verified(4, 4)
    assert drafting.alpha > 0.9


# --- drafts from the text itself -------------------------------------------------------
def test_prompt_lookup_drafts_what_followed_the_longest_earlier_match():
    lookup = PromptLookup([1, 5, 6, 7, 8, 2, 6, 7, 9, 3, 5, 6, 7])
    assert lookup.propose(3) == [8, 2, 6]  # "5 6 7" matched (3 tokens), not "6 7" -> 9 (the later match of 2)
    lookup.extend([9])
    assert lookup.propose(2) == [3, 5]  # "6 7 9" occurred once, at 6..8
    assert PromptLookup([1, 2, 3]).propose(4) == []  # nothing repeats: no drafts
    assert PromptLookup([4, 4, 4]).propose(4) == [4]  # what follows stops at the end of the text


# --- the scheduler with drafts ------------------------------------------------------------
def run_requests(job, max_draft, draft, requests) -> dict[str, Finished | list]:
    """requests: name -> (prompt, max_tokens, Sampling, stop strings), all submitted together;
    returns each one's tokens and its Finished."""
    scheduler = Scheduler(job, max_draft=max_draft, draft=draft)
    out: dict[str, list] = {name: [] for name in requests}
    for name, (prompt, max_tokens, sampling, stop) in requests.items():
        req = GenRequest(prompt, max_tokens, sampling, stop=stop, stop_ids=())
        req.emit = out[name].append
        scheduler.submit(req)
    scheduler.run(until=lambda: all(events and isinstance(events[-1], Finished) for events in out.values()))
    return {name: ([e.token for e in events if isinstance(e, Piece)], "".join(e.text for e in events), events[-1])
            for name, events in out.items()}


def prompts(job) -> dict:
    tok = job.tokenizer
    story = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    return {  # a repeated story (lookup drafts), a limit inside a run of drafts, a stop string, the context's end
        "repeat": (tok.encode(story + " " + story[:40]), 57, Sampling(), ()),
        "short": (tok.encode("Lily and Ben"), 9, Sampling(), ()),
        "stop": (tok.encode(story), 80, Sampling(), ("park",)),
        "end": (tok.encode(story * 3), None, Sampling(), ()),
    }


@pytest.fixture(scope="module")
def plain_runs(stories) -> dict:
    """prompts()' requests without speculation (no drafting: draft_length is never asked), run
    once for every drafter's test to equal."""
    job = stories[0]
    return run_requests(job, 0, None, prompts(job))


@pytest.mark.parametrize("drafter", ["lookup", "q40 model", "random model"])
def test_temperature_0_text_is_the_model_s_own_with_every_drafter(stories, plain_runs, always_draft, drafter):
    """Four requests decoding together (3 slots: one waits), each ending another way: the
    same tokens, text and finish as without speculation, and drafts were made and kept."""
    job, q40, random = stories
    draft = {"lookup": None, "q40 model": DraftModel(q40, MAX_DRAFT), "random model": DraftModel(random, MAX_DRAFT)}[drafter]
    plain = plain_runs
    spec = run_requests(job, MAX_DRAFT, draft, prompts(job))
    for name in plain:
        tokens, text, end = spec[name]
        assert (tokens, text, end.reason, end.completion_tokens) == plain[name][:2] + (
            plain[name][2].reason, plain[name][2].completion_tokens), name
        assert plain[name][2].drafted == 0 and end.accepted <= end.drafted
    assert spec["end"][2].reason == "length" and len(spec["end"][0]) == CONTEXT - len(prompts(job)["end"][0]) + 1
    assert spec["short"][2].completion_tokens == 9
    drafted = sum(spec[n][2].drafted for n in spec)
    accepted = sum(spec[n][2].accepted for n in spec)
    assert drafted > 0
    if drafter != "random model":
        assert accepted > 0 and spec["repeat"][2].steps < spec["repeat"][2].completion_tokens - 1


@pytest.fixture
def always_draft(monkeypatch):
    """Every decoding row brings all the drafts it may, whatever they are worth: drafts of a
    random model, almost all rejected, are made every step."""
    monkeypatch.setattr(scheduler_module, "draft_length", lambda alpha, base_s, per_draft_s, k_max: k_max)


def test_rejected_rows_leave_the_kv_cache_as_if_never_run(stories, always_draft):
    """A random draft model's rows are mostly rejected: afterwards the slot's cache holds, for
    the positions it holds, the bits of a run without drafts (a rejected row's position is
    written again by the row kept there); what lies past them is never read (poisoned with
    NaN, the next request on the slot's prefix still gives the same text)."""
    job, _, random = stories
    engine = job.engine
    assert engine.kv_type.name == "f16"  # NaN below is fp16's bits
    prompt = job.tokenizer.encode("Once upon a time, there was a big dog.")
    caches, ends, texts = [], [], []
    for max_draft, draft in ((0, None), (MAX_DRAFT, DraftModel(random, MAX_DRAFT))):
        for cache in (engine.k_cache, engine.v_cache, engine.k_scales, engine.v_scales):
            cache[...] = 0
        scheduler = Scheduler(job, max_draft=max_draft, draft=draft)
        first = _run(scheduler, prompt, 40)
        slot = next(s for s in scheduler.slots if s.tokens)
        held = len(slot.tokens)
        assert held == len(prompt) + 40 - 1  # every token but the last is in the cache
        caches.append([c[:, slot.index, :, :held].copy() for c in (engine.k_cache, engine.v_cache,
                                                                    engine.k_scales, engine.v_scales)])
        ends.append(first)
        if draft is not None:
            assert first[1].drafted > first[1].accepted + 20  # rows were rejected, their positions written again later
            engine.k_cache[:, :, :, held:] = engine.v_cache[:, :, :, held:] = 0x7E00  # fp16 NaN
        # the next turn: the slot's cached prefix is taken, the rest fed after it
        texts.append(_run(scheduler, prompt + first[0] + prompt[1:6], 30)[0])
    assert ends[0][0] == ends[1][0]
    for plain, spec in zip(*caches, strict=True):
        assert np.array_equal(plain, spec)
    assert texts[0] == texts[1]


def _run(scheduler: Scheduler, prompt: list[int], max_tokens: int) -> tuple[list[int], Finished]:
    events = []
    req = GenRequest(prompt, max_tokens, Sampling(), stop_ids=())
    req.emit = events.append
    scheduler.submit(req)
    scheduler.run(until=lambda: bool(events) and isinstance(events[-1], Finished))
    return [e.token for e in events if isinstance(e, Piece)], events[-1]


def test_a_row_s_logits_do_not_depend_on_the_other_rows_of_its_step(stories):
    """The premise of exact speculation: one row alone, or after another sequence's rows and
    before its own drafts, gives the same logits bit for bit."""
    job, *_ = stories
    engine = job.engine
    story = job.tokenizer.encode("Once upon a time, there was a little girl")
    batch = Batch(engine.max_rows, engine.max_logits)

    def run(rows):
        batch.clear()
        for token, slot, position, logits in rows:
            batch.add(token, slot, position, logits)
        return engine.step(batch).copy()

    for slot in (0, 1):
        run([(t, slot, i, False) for i, t in enumerate(story[:-1])] + [(story[-1], slot, len(story) - 1, True)])
    n = len(story)
    alone = run([(story[-1], 0, n - 1, True)])
    crowded = run([(story[3], 1, n, True), (story[4], 1, n + 1, True), (story[-1], 0, n - 1, True),
                   (story[5], 0, n, True), (story[6], 0, n + 1, True)])
    assert np.array_equal(alone[0].view(np.uint32), crowded[2].view(np.uint32))


def test_sampled_text_keeps_the_model_s_distribution_on_stories260k(stories, always_draft, monkeypatch):
    """Temperature 0.8, top-p 0.9, the random model drafting (most drafts rejected, so the
    resampling carries the distribution): each of the 2nd to 4th tokens is distributed as
    without speculation (two-sample chi-square over fixed seeds). Keeping every draft, the
    same test fails."""
    job, _, random = stories
    prompt = job.tokenizer.encode("Lily")  # many likely continuations ("Once upon a time" has one)
    n = 300

    def samples(max_draft, draft, first_seed):
        runs = [generate(job, prompt, 4, Sampling(0.8, 0.9, seed), stop_ids=(), max_draft=max_draft, draft=draft)
                for seed in range(first_seed, first_seed + n)]
        assert not max_draft or all(r["drafted"] >= 2 for r in runs)  # 2 drafts at least (3 tokens left)
        return [r["generated"] for r in runs]

    plain = samples(0, None, 0)
    spec = samples(3, DraftModel(random, 3), 10_000)
    for position in (1, 2, 3):
        assert same_distribution([s[position] for s in plain], [s[position] for s in spec]) > 1e-3, position
    monkeypatch.setattr(Sampler, "verify", lambda self, logits, drafts, probs=None: (len(drafts), self(logits[len(drafts)])))
    broken = samples(3, DraftModel(random, 3), 20_000)
    assert min(same_distribution([s[p] for s in plain], [s[p] for s in broken]) for p in (1, 2, 3)) < 1e-6


def test_a_predicted_output_drafts_from_the_first_token_on():
    """OpenAI's prediction is taken as if it followed the prompt: the first drafts are its
    start (after the prompt's last tokens), and later ones follow it where the text does."""
    lookup = PromptLookup([1, 20, 21, 22], prediction=(30, 31, 32, 33, 34))
    assert lookup.propose(3) == [30, 31, 32]
    lookup.extend([30, 31])
    assert lookup.propose(2) == [32, 33]
    lookup.extend([40, 32, 33])  # off the prediction and back onto it
    assert lookup.propose(5) == [34]
