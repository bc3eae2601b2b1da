"""Speculative decoding: guess a sequence's next tokens cheaply on rank 0, verify them all in one
step of the model, keep the longest prefix it agrees with (Sampler.verify decides).

Why it pays here: a step of several rows costs the same collectives as a step of one (4 per
layer and 3 more, whatever the rows), and on a real network a token's cost is mostly those
rounds. A row's result never depends on the other rows of its step (engine.py), so a step that
verifies k drafts yields 1 to k + 1 tokens, each what the model would have chosen alone.
Rejected rows leave nothing behind: their KV entries lie past what the slot holds
(scheduler.Slot.tokens) and are overwritten before any row attends that far.

Drafts come from
  PromptLookup: the tokens that followed the latest earlier occurrence of the sequence's last n
    tokens (n = MAX_NGRAM down to MIN_NGRAM) in its prompt and text so far, as vLLM's n-gram
    speculator and llama.cpp's lookup: free, and strong where text repeats (rewriting, code,
    quoting); where nothing matches a sequence drafts nothing and its step costs what it did;
  DraftModel: a smaller model of the same vocabulary on rank 0 alone (a one-rank Comm): its
    steps cost the job no collective, and the other ranks sleep meanwhile.
How many drafts a sequence's row brings is decided each step by what they are worth here
(draft_length): k drafts cost k more rows of the step, each drafted (a draft model's token, or
a lookup), run and verified, as measured on this job's own steps (StepCost); they are expected
to give alpha + alpha^2 + ... + alpha^k more tokens, alpha being the sequence's recent rate of
drafts kept (Drafting.alpha); k maximises tokens per second, within --speculate N, and is 0
where drafting would not pay (a CPU whose extra rows cost much, text that does not repeat).
Drafts that are rarely kept are still tried now and then: the rate forgets, back towards
even odds.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, UsageError
from ..job.sampler import Sampler

MIN_NGRAM, MAX_NGRAM = 2, 4  # a lone token repeats too often to predict what follows it
ROW_COST_PRIOR = 0.25  # an extra row of a step, as a share of a one-row step, until steps of several rows are timed
FORGET = 0.9  # per step, the weight left of what was seen before (step times, drafts kept): about the last 10 count
DEFAULT_DRAFT = 8  # --speculate's default: the most drafts a step verifies per sequence
MAX_DRAFT = 32  # --speculate's largest: half a step's rows (engine max_rows 64)


def logit_rows(n_slots: int, max_draft: int) -> int:
    """Rows of one step that may want logits: each sequence's row and its drafts'."""
    return n_slots * (1 + max_draft)


class PromptLookup:
    """A sequence's tokens (prompt and generated) and, for each n-gram, where it last occurred
    with a token after it: in the sequence, or in a predicted output (OpenAI's `prediction`),
    taken as if it followed the prompt."""

    def __init__(self, tokens: list[int], prediction: tuple[int, ...] = ()):
        self.tokens: list[int] = []
        # n-gram -> (the token list, index of the token after the n-gram's latest occurrence in it)
        self._after: dict[tuple[int, ...], tuple[list[int], int]] = {}
        self.extend(tokens)
        if prediction:  # indexed after the prompt (a later occurrence wins), before anything generated
            predicted = self.tokens[-MAX_NGRAM:] + list(prediction)
            for end in range(1, len(predicted)):
                self._index(predicted, end)

    def _index(self, tokens: list[int], end: int) -> None:
        """The n-grams ending at `end` have tokens[end] after them."""
        for n in range(MIN_NGRAM, min(MAX_NGRAM, end) + 1):
            self._after[tuple(tokens[end - n : end])] = (tokens, end)

    def extend(self, tokens) -> None:
        for token in tokens:
            self.tokens.append(int(token))
            self._index(self.tokens, len(self.tokens) - 1)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens: what followed the longest suffix of the text seen before."""
        end = len(self.tokens)
        for n in range(min(MAX_NGRAM, end), MIN_NGRAM - 1, -1):
            found = self._after.get(tuple(self.tokens[end - n :]))
            if found is not None:
                source, at = found
                return source[at : at + k]
        return []


@dataclass
class Drafting:
    """One sequence's speculation: what it drafted and kept, and its recent rate of drafts kept."""

    max_draft: int
    lookup: PromptLookup | None = None  # None: the job's draft model drafts
    draft_sampler: Sampler | None = None  # the draft model's choices for this sequence
    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # decoding steps of the sequence (each yields one token and the drafts kept)
    _kept: float = 0.0  # drafts kept and drafts tried (a run of kept drafts, then the first rejected), forgetting
    _tried: float = 0.0

    @property
    def alpha(self) -> float:
        """The chance that the next draft is kept, given the last was (Laplace's rule: 1/2 with
        nothing seen)."""
        return (self._kept + 1) / (self._tried + 2)

    def verified(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.steps += 1
        self._kept = FORGET * self._kept + accepted
        self._tried = FORGET * self._tried + accepted + (accepted < drafted)


class StepCost:
    """Rank 0's running estimate of what a decoding step costs here, from its drafts made to its
    tokens given: base + per_row x (its rows - 1), a least-squares line through recent steps
    (each step's weight decays by FORGET), with per_row = ROW_COST_PRIOR x a one-row step until
    steps of different sizes have been timed."""

    def __init__(self):
        self._sums = np.zeros(5)  # weights, w x, w t, w x^2, w x t: x the rows past one, t seconds

    def step(self, extra_rows: int, seconds: float) -> None:
        x = float(extra_rows)
        self._sums *= FORGET
        self._sums += (1.0, x, seconds, x * x, x * seconds)

    def line(self) -> tuple[float, float]:
        """(base, per_row) seconds; (1, ROW_COST_PRIOR) before any step is timed."""
        w, sx, st, sxx, sxt = self._sums
        if w == 0:
            return 1.0, ROW_COST_PRIOR
        mx, mt = sx / w, st / w
        var = sxx / w - mx * mx
        per_row = max(0.0, (sxt / w - mx * mt) / var) if var > 0.25 else ROW_COST_PRIOR * mt / (1 + ROW_COST_PRIOR * mx)
        return max(mt - per_row * mx, 1e-9), per_row


def draft_length(alpha: float, base_s: float, per_draft_s: float, k_max: int) -> int:
    """The drafts that maximise expected tokens per second, (1 + alpha + ... + alpha^k) /
    (base_s + k per_draft_s), for k in 0..k_max."""
    best_k, best = 0, 1.0 / base_s
    tokens, p = 1.0, 1.0
    for k in range(1, k_max + 1):
        p *= alpha
        tokens += p
        rate = tokens / (base_s + k * per_draft_s)
        if rate > best:
            best_k, best = k, rate
    return best_k


class DraftModel:
    """A smaller model with the main model's vocabulary, loaded on rank 0 alone: a slot of its KV
    cache per slot of the main model's, holding what it last drafted from."""

    def __init__(self, job, max_draft: int):
        self.job, self.engine = job, job.engine
        self.held: list[list[int]] = [[] for _ in range(self.engine.n_slots)]  # what each slot's cache holds
        self._batch = self.engine.new_batch()
        # the distribution each draft was drawn from, per slot (Sampler.verify's q)
        self.probs = np.zeros((self.engine.n_slots, max_draft, job.plan.spec.vocab_size), np.float64)

    def propose(self, wants: list[tuple[int, list[int], int, Sampler]]) -> list[list[int]]:
        """For each (slot, context, k, sampler): k drafts continuing context, drawn by sampler
        (its distributions in probs[slot]). Every sequence's rows share each draft step: first
        what its slot's cache lacks of the context, then one row per draft."""
        engine, batch, drafts = self.engine, self._batch, [[] for _ in wants]
        pending = []  # tokens still to feed, per want
        for slot, context, _, _ in wants:
            held = self.held[slot]
            keep = min(common_prefix(held, context), len(context) - 1)  # the last token is fed: its logits are needed
            del held[keep:]
            pending.append(context[keep:])
        active = [i for i, want in enumerate(wants) if want[2] > 0]
        while active:
            batch.clear()
            finishing = []  # wants whose last pending token is in this step: they draft from its logits
            for i in active:
                room = batch.max_rows - batch.n
                if room == 0 or batch.n_logits == batch.max_logits:
                    break
                slot, take = wants[i][0], pending[i]
                n = min(len(take), room)
                start = len(self.held[slot])
                for j in range(n):
                    batch.add(take[j], slot, start + j, j == len(take) - 1)
                self.held[slot].extend(take[:n])
                pending[i] = take[n:]
                if not pending[i]:
                    finishing.append(i)
            logits = engine.step(batch)
            for row, i in enumerate(finishing):
                slot, _, k, sampler = wants[i]
                token = sampler.draw(logits[row], self.probs[slot, len(drafts[i])])
                drafts[i].append(token)
                if len(drafts[i]) < k:
                    pending[i] = [token]
            active = [i for i in active if len(drafts[i]) < wants[i][2]]
        return drafts


def check_draft_model(path, tokenizer) -> None:
    """Rank 0, before anything is loaded: InputError unless `path` is a model file whose
    vocabulary is `tokenizer`'s (its weights are read later, by open_draft_model)."""
    from ..files.modelfile import open_model

    try:
        model = open_model(path)
    except InputError as exc:
        raise InputError(f"--draft-model {path}: {exc}") from None
    try:
        problem = vocabulary_mismatch(tokenizer, model.tokenizer())
    finally:
        model.close()
    if problem is not None:
        raise InputError(f"--draft-model {path}: {problem}")


def open_draft_model(comm, path, main_job, max_draft: int, kv_type: str) -> DraftModel | None:
    """Collective over the main job's ranks: rank 0 loads the draft model alone (the others
    sleep) and checks its vocabulary against the main model's; every rank learns the outcome.
    Returns the DraftModel on rank 0, None elsewhere."""
    from ..job.loading import SaidIfSlow, open_job
    from ..parallel.comm import self_comm

    draft, problem = None, None
    if comm.rank == 0:
        try:
            with SaidIfSlow(f"loading the draft model {path}"):
                job = open_job(self_comm(), path, (1,), max_seq_len=main_job.engine.max_seq_len,
                               n_slots=main_job.engine.n_slots, kv_type=kv_type)
            problem = vocabulary_mismatch(main_job.tokenizer, job.tokenizer)
            if problem is None:
                draft = DraftModel(job, max_draft)
                spec = job.plan.spec
                print(f"draft model {path}: {spec.n_layers} layers, dim {spec.dim}, weights {spec.weights_text}; on "
                      f"rank 0: {job.weights.nbytes / 2**20:.1f} MiB weights + {job.engine.kv_cache_bytes / 2**20:.1f} "
                      f"MiB KV cache + {draft.probs.nbytes / 2**20:.1f} MiB draft distributions", file=sys.stderr)
        except UsageError as exc:
            problem = str(exc)
    comm.sleeping_barrier()  # the others sleep while rank 0 loads
    problem = comm.bcast_obj(problem)
    if problem is not None:
        raise UsageError(f"--draft-model {path}: {problem}")
    return draft


def vocabulary_mismatch(main, draft) -> str | None:
    """Why `draft`'s tokenizer cannot draft for `main`'s (None: the same vocabulary): token ids
    must mean the same bytes in both."""
    if main.vocab_size != draft.vocab_size:
        return (f"its vocabulary has {draft.vocab_size} tokens, the model's {main.vocab_size}; a draft model must "
                "share the model's vocabulary (the same family's smaller model, or the same model quantized)")
    for token in range(main.vocab_size):
        if main.decode(-1, token) != draft.decode(-1, token):
            return (f"token {token} is {draft.decode(-1, token)!r} in it and {main.decode(-1, token)!r} in the model; "
                    "a draft model must share the model's vocabulary")
    if tuple(main.eos_ids) != tuple(draft.eos_ids) or main.bos_id != draft.bos_id:
        return "its BOS/EOS tokens differ from the model's; a draft model must share the model's vocabulary"
    return None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
