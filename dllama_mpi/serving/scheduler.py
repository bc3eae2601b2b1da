"""Rank 0 drives, the others follow: continuous batching of requests over one loaded Job.

Every rank runs the same steps. Rank 0's Scheduler decides each step (which sequences
decode, which prompt chunk is fed), broadcasts it as one fixed int64 array (engine.Batch's
wire: op, rows, then tokens, slots, positions, logit rows), runs it and samples; the
followers loop in `follow`, waiting for the next step with a sleeping poll, so an idle
follower takes no core. All MPI calls on rank 0 happen on the thread that calls
`Scheduler.run` (the main thread); clients on other threads talk to it through `submit`
(a queue) and the events of their request (request.py).

KV slots: each of the engine's n_slots holds one sequence's cache and remembers the tokens
it holds. A new request takes the idle slot sharing the longest prefix with its prompt
(the least recently used one when none shares any) and prefills only the rest.

Admission: with max_queue, a request that would make more than max_queue wait for a slot is
refused (request.Refused) as soon as it is submitted, on the submitting thread: the count of
requests submitted and not yet in a slot, and of idle slots, is kept under one lock by both
threads, so it is exact without waiting for a step to end. With queue_timeout_s, one still
waiting that long after its submission is refused between steps (never once in a slot, so never
after a token). GET /slots reads the slots as the scheduler last published them (slot_views),
an immutable snapshot replaced after admissions and after each step.

Speculation (speculation.py): a decoding sequence's row may bring draft rows after it, each
wanting logits; after the step Sampler.verify keeps the drafts the model agrees with, and the
slot holds only the rows kept.
"""

from __future__ import annotations

import math
import queue
import random
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from ..job.loading import Job
from ..job.sampler import Sampler
from .request import Failed, Finished, GenRequest, Piece, Refused, Sampling, TokenLogprob
from .speculation import Drafting, DraftModel, PromptLookup, StepCost, common_prefix, draft_length
from .textstream import TextStream

OP_STEP, OP_STATS, OP_EXIT = 1, 2, 3
PREFILL_ROWS_WHILE_DECODING = 16  # a long prompt is fed in chunks this size while others decode: their streams keep going
STATS_EVERY_S = 2.0  # how often the followers' compute and collective times are gathered while busy
RETRY_AFTER_S = 1  # Retry-After of a refusal: short, since a slot frees whenever any answer ends; clients back off further


def follow(job: Job) -> None:
    """A follower rank (rank > 0): run rank 0's steps until it says exit."""
    engine, comm = job.engine, job.comm
    batch = engine.new_batch()
    while True:
        comm.bcast_idle(batch.wire)
        if batch.op == OP_STEP:
            engine.step(batch)
        elif batch.op == OP_STATS:
            comm.gather_rows(_times(engine), None)
        elif batch.op == OP_EXIT:
            return
        else:
            raise RuntimeError(f"rank {comm.rank}: unknown step op {batch.op}")


def _times(engine) -> np.ndarray:
    return np.array([engine.forward_s - engine.collective_s, engine.collective_s], np.float64)


@dataclass
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # what its KV cache holds, position by position
    seq: Sequence | None = None
    last_used: float = 0.0


@dataclass(frozen=True)
class SlotView:
    """One slot as GET /slots shows it."""

    id: int
    state: str  # "idle", "prefilling" (its prompt is being fed) or "decoding"
    n_cached: int  # tokens its KV cache holds
    request_id: str | None  # the request generating there (GenRequest.request_id); None when idle
    prompt_tokens: int
    generated_tokens: int  # so far


@dataclass
class Sequence:
    req: GenRequest
    slot: Slot
    sampler: Sampler
    stream: TextStream
    stop_ids: tuple[int, ...]
    t_submit: float
    n_cached: int  # prompt tokens found in the slot's cache
    fed: int  # prompt tokens in the cache so far
    generated: list[int] = field(default_factory=list)
    t_first: float | None = None
    drafting: Drafting | None = None  # None: no speculation
    drafts: list[int] | None = None  # this step's drafts after its row (decoding); None: a prompt chunk or no row

    @property
    def prompt(self) -> list[int]:
        return self.req.prompt_ids


class Scheduler:
    """Rank 0's side of serving `job`: submit() from any thread, run() on the main thread."""

    def __init__(self, job: Job, metrics=None, max_draft: int = 0, draft: DraftModel | None = None,
                 min_draft: int = 0, max_queue: int | None = None, queue_timeout_s: float | None = None):
        """max_draft: the most drafts a decoding sequence's row brings to a step (0: no
        speculation); min_draft: the fewest, where that many may be drafted (0: as many as
        pay, speculation.draft_length); draft: the model that drafts them (None: prompt lookup).
        max_queue: the most requests waiting for a slot (None: no limit); queue_timeout_s: the
        longest a request waits for one (None: no limit); beyond either it is Refused."""
        if job.comm.rank != 0:
            raise RuntimeError("the scheduler runs on rank 0; other ranks call follow()")
        self.job, self.engine, self.comm, self.metrics = job, job.engine, job.comm, metrics
        self.max_draft, self.min_draft, self.draft = max_draft, min_draft, draft
        self.max_queue, self.queue_timeout_s = max_queue, queue_timeout_s
        self.cost = StepCost()  # what a decoding step and a draft cost here: how many drafts pay
        self.slots = [Slot(i) for i in range(self.engine.n_slots)]
        self._inbox: queue.SimpleQueue[tuple[GenRequest, float]] = queue.SimpleQueue()  # (request, submitted at)
        self._closed: str | None = None  # why no more requests are taken (shutting down)
        self._admission = threading.Lock()  # orders submit() against close(), and guards the two counts below
        self._queued = 0  # requests submitted, not yet in a slot nor ended: in the inbox or waiting
        self._idle = len(self.slots)  # slots without a sequence
        self.slot_views = self._views()  # the slots as last published (read by any thread)
        self._waiting: deque[tuple[GenRequest, float]] = deque()
        self._batch = self.engine.new_batch()
        self._rank_times = np.zeros((self.comm.size, 2), np.float64)
        self._stats_due, self._stats_at = 0.0, 0.0
        self._exited = False

    # --- any thread -------------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        """Queue `req`, or end it at once (on this thread): Failed when closed, Refused when
        the queue is full."""
        if req.emit is None:
            raise ValueError("GenRequest.emit must be set before submitting")
        with self._admission:
            refusal = Failed(self._closed) if self._closed is not None else self._full()
            if refusal is None:
                self._queued += 1
                self._inbox.put((req, time.perf_counter()))
                return
        req.emit(refusal)

    def refusal(self) -> Refused | None:
        """What submit() would answer a request now if the queue is full (counted as refused),
        else None: the HTTP side asks before reading and tokenizing a request."""
        with self._admission:
            return self._full()

    def queue_length(self) -> int:
        """Requests waiting for a slot now (those submitted beyond the idle slots)."""
        with self._admission:
            return max(0, self._queued - self._idle)

    def slots_state(self) -> dict:
        """GET /slots's answer (any thread): each slot as last published, and the queue now."""
        return {"slots": [asdict(v) for v in self.slot_views], "queue": {"length": self.queue_length(), "limit": self.max_queue}}

    def close(self, message: str) -> None:
        """Take no more requests: from now on submit() fails them at once with `message`."""
        with self._admission:
            self._closed = message

    def _full(self) -> Refused | None:
        """Under the lock: Refused when one more request would wait beyond max_queue."""
        if self.max_queue is None or self._queued < self.max_queue + self._idle:
            return None
        if self.metrics is not None:
            self.metrics.refused("queue_full")
        return Refused(f"the server is at capacity: {self.max_queue} requests are waiting for a slot, the most its "
                       f"queue holds (all {len(self.slots)} slots are generating); try again in a few seconds, "
                       "or send fewer requests at once", RETRY_AFTER_S)

    def _count(self, queued: int = 0, idle: int = 0) -> None:
        with self._admission:
            self._queued += queued
            self._idle += idle

    # --- rank 0's main thread ---------------------------------------------------
    @property
    def busy(self) -> bool:
        return not self._inbox.empty() or bool(self._waiting) or any(s.seq is not None for s in self.slots)

    def run(self, until, idle_wait_s: float = 0.05) -> None:
        """Serve until `until()` is true (checked between steps; while idle, every
        idle_wait_s at most)."""
        while not until():
            self._take_inbox(wait_s=0 if self.busy else idle_wait_s)
            self._drop_cancelled()
            self._admit()
            self._drop_expired()
            self._publish()
            t0 = time.perf_counter()  # a step's cost: drafting and verifying included
            if self._build_step():
                self.comm.bcast_idle(self._batch.wire)
                logits = self.engine.step(self._batch)
                decoding_only = all(self.slots[int(s)].seq.drafts is not None for s in self._batch.slots[: self._batch.n])
                self._after_step(logits)
                if decoding_only:  # a prompt's rows cost otherwise than a decoding row's drafts
                    self.cost.step(self._batch.n - 1, time.perf_counter() - t0)
            self._publish()
            self._report_load()

    def fail_all(self, message: str) -> None:
        """Close, and end every request, running or waiting, with Failed (shutting down)."""
        self.close(message)
        self._take_inbox(0)
        for req, _ in self._waiting:
            req.emit(Failed(message))
        self._count(queued=-len(self._waiting))
        self._waiting.clear()
        for slot in self.slots:
            if slot.seq is not None:
                self._cancel(slot.seq, message)
        self._publish()
        self._report_load()

    def exit_followers(self) -> None:
        """Tell the follower ranks to return from follow() (once)."""
        if not self._exited:
            self._exited = True
            self._batch.clear(OP_EXIT)
            self.comm.bcast_idle(self._batch.wire)

    def rank_times(self) -> np.ndarray:
        """(size, 2): each rank's compute and collective seconds in steps so far (collective:
        gathers follower times, so main thread only)."""
        self._batch.clear(OP_STATS)
        self.comm.bcast_idle(self._batch.wire)
        self.comm.gather_rows(_times(self.engine), self._rank_times)
        return self._rank_times

    # --- the steps --------------------------------------------------------------
    def _take_inbox(self, wait_s: float) -> None:
        try:
            item = self._inbox.get(timeout=wait_s) if wait_s else self._inbox.get_nowait()
            while True:
                self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        if any(req.cancelled.is_set() for req, _ in self._waiting):
            for req, _ in self._waiting:
                if req.cancelled.is_set():
                    req.emit(Failed("cancelled"))
                    if self.metrics is not None:
                        self.metrics.cancelled_after(0)
            kept = deque(w for w in self._waiting if not w[0].cancelled.is_set())
            self._count(queued=len(kept) - len(self._waiting))
            self._waiting = kept
        for slot in self.slots:
            if slot.seq is not None and slot.seq.req.cancelled.is_set():
                self._cancel(slot.seq, "cancelled")

    def _admit(self) -> None:
        while self._waiting:
            idle = [s for s in self.slots if s.seq is None]
            if not idle:
                return
            req, t_submit = self._waiting.popleft()
            self._count(queued=-1, idle=-1)
            prompt = req.prompt_ids
            reuse = [common_prefix(s.tokens, prompt) for s in idle]
            best = max(range(len(idle)), key=lambda i: (reuse[i], -idle[i].last_used))
            slot = idle[best]
            n_cached = min(reuse[best], len(prompt) - 1)  # the last prompt token is fed again: its logits are needed
            del slot.tokens[n_cached:]
            sampling = req.sampling
            seed = sampling.seed if sampling.seed is not None else random.SystemRandom().randrange(2**63)
            sampler = Sampler(self.job.plan.spec.vocab_size, sampling.temperature, sampling.top_p, seed)
            stream = TextStream(self.job.tokenizer, req.stop, prompt[-1])
            stop_ids = self.job.stop_ids if req.stop_ids is None else tuple(req.stop_ids)
            slot.seq = Sequence(req, slot, sampler, stream, stop_ids, t_submit, n_cached, n_cached)
            if self.max_draft and req.constraint is None:  # a grammar's mask is per token: no drafts to verify against
                if self.draft is None:
                    slot.seq.drafting = Drafting(self.max_draft, lookup=PromptLookup(prompt, req.prediction))
                else:  # the draft model's own choices: a generator of its own, from the request's seed
                    draft_sampler = Sampler(self.job.plan.spec.vocab_size, sampling.temperature, sampling.top_p, seed + 1)
                    slot.seq.drafting = Drafting(self.max_draft, draft_sampler=draft_sampler)
            if req.max_tokens == 0:
                self._finish(slot.seq, "length")

    def _drop_expired(self) -> None:
        """Refuse the requests still waiting queue_timeout_s after their submission (after
        admission: none of them could have a slot now)."""
        if self.queue_timeout_s is None:
            return
        due = time.perf_counter() - self.queue_timeout_s
        while self._waiting and self._waiting[0][1] <= due:  # waiting in submission order
            req, _ = self._waiting.popleft()
            self._count(queued=-1)
            req.emit(Refused(f"no slot became free within the queue timeout of {self.queue_timeout_s:g} s (--queue-timeout; "
                             f"all {len(self.slots)} slots are generating); try again in a few seconds, or send fewer "
                             "requests at once", RETRY_AFTER_S))
            if self.metrics is not None:
                self.metrics.refused("queue_timeout")

    def _build_step(self) -> bool:
        """Fill the batch: one row per decoding sequence, each followed by its drafts, then
        prompt chunks in admission order in the rows left. False when there is nothing to run."""
        batch = self._batch
        batch.clear(OP_STEP)
        active = [s.seq for s in self.slots if s.seq is not None]
        decoding = [q for q in active if q.fed == len(q.prompt)]
        prefilling = [q for q in active if q.fed < len(q.prompt)]
        drafts = self._drafts(decoding, prefilling)
        for q in decoding:
            position = len(q.slot.tokens)
            batch.add(q.generated[-1], q.slot.index, position, True)
            q.drafts = drafts[q.slot.index]
            for i, token in enumerate(q.drafts):
                batch.add(token, q.slot.index, position + 1 + i, True)
        room = batch.max_rows - batch.n
        if decoding:
            room = min(room, PREFILL_ROWS_WHILE_DECODING)
        for q in sorted(prefilling, key=lambda q: q.t_submit):
            if room <= 0:
                break
            take = min(room, len(q.prompt) - q.fed)
            for i in range(q.fed, q.fed + take):
                batch.add(q.prompt[i], q.slot.index, i, i == len(q.prompt) - 1)
            room -= take
        # where every sequence's next token is the greedy choice, only that travels, not the logits
        batch.greedy = all(q.sampler.temperature == 0 and q.req.logprobs is None and q.req.constraint is None for q in active)
        return batch.n > 0

    def _drafts(self, decoding: list[Sequence], prefilling: list[Sequence]) -> dict[int, list[int]]:
        """Each decoding sequence's drafts for this step, by slot: as many as its Drafting
        wants, within what it may still generate, the context, and the step's rows and logits
        (room is left for the prompt chunks waiting)."""
        batch, drafts = self._batch, {q.slot.index: [] for q in decoding}
        base, per_draft = self.cost.line()  # a row's cost: its draft made, run and verified
        base += per_draft * (len(decoding) - 1)  # the step's rows without this sequence's drafts
        rows = batch.max_rows - len(decoding) - (min(PREFILL_ROWS_WHILE_DECODING, batch.max_rows) if prefilling else 0)
        logit_rows = batch.max_logits - len(decoding) - len(prefilling)
        wants = []
        for q in decoding:
            if q.drafting is None:
                continue
            left = q.req.max_tokens - len(q.generated) if q.req.max_tokens is not None else self.engine.max_seq_len
            k = min(q.drafting.max_draft, left - 1, self.engine.max_seq_len - 1 - len(q.slot.tokens), rows, logit_rows)
            k = max(min(self.min_draft, k), draft_length(q.drafting.alpha, base, per_draft, k))
            if k <= 0:
                continue
            if q.drafting.lookup is not None:
                drafts[q.slot.index] = q.drafting.lookup.propose(k)
                k = len(drafts[q.slot.index])
            else:
                wants.append((q.slot.index, q.prompt + q.generated, k, q.drafting.draft_sampler))
            rows, logit_rows = rows - k, logit_rows - k
        if wants:
            for (slot, *_), tokens in zip(wants, self.draft.propose(wants), strict=True):
                drafts[slot] = tokens
        return drafts

    def _after_step(self, logits: np.ndarray) -> None:
        """logits: the step's (Engine.step), or with batch.greedy each logit row's greedy token."""
        batch, now = self._batch, time.perf_counter()
        owner = {}
        for r in range(batch.n):  # rows -> their sequence, and the prompt tokens now in each cache
            seq = self.slots[int(batch.slots[r])].seq
            if seq.drafts is None:
                seq.slot.tokens.append(int(batch.tokens[r]))
                seq.fed += 1
            owner[r] = seq
        i = 0
        while i < batch.n_logits:
            seq = owner[int(batch.logit_rows[i])]
            if seq.req.constraint is not None and (failure := seq.req.constraint.mask(logits[i])) is not None:
                seq.drafts = None  # (a constrained sequence never drafts: one logit row)
                self._cancel(seq, failure)  # the request fails, not the server
                i += 1
                continue
            if seq.drafts is None:  # the last row of a prompt: its first token
                token = int(logits[i]) if batch.greedy else seq.sampler(logits[i])
                _, end = self._emit(seq, [token], logits[i : i + 1], now)
                if end is not None:
                    self._finish(seq, *end)
                i += 1
                continue
            drafts, k = seq.drafts, len(seq.drafts)  # logits i..i+k: the sequence's row, then its drafts'
            seq.drafts = None
            if batch.greedy:  # the drafts the greedy choices confirm, then the next choice
                kept = common_prefix(drafts, logits[i : i + k].tolist())
                token = int(logits[i + kept])
            else:
                draft_probs = self.draft.probs[seq.slot.index, :k] if self.draft is not None else None
                kept, token = seq.sampler.verify(logits[i : i + k + 1], drafts, draft_probs)
            seq.slot.tokens.extend([seq.generated[-1], *drafts[:kept]])  # the rows kept: the cache holds them
            emitted, end = self._emit(seq, [*drafts[:kept], token], logits[i : i + kept + 1], now)
            if seq.drafting is not None:
                seq.drafting.verified(k, min(kept, emitted))
            if end is not None:
                self._finish(seq, *end)
            i += k + 1

    def _emit(self, seq: Sequence, tokens: list[int], logits: np.ndarray, now: float) -> tuple[int, tuple | None]:
        """Give the sequence's new tokens (logits[j]: what tokens[j] was chosen from) to its
        client, one by one, until it is done; returns how many were given, and _finish's
        arguments where it is done (the caller finishes it, its counts complete). The cache
        holds every token but the last."""
        held = len(seq.slot.tokens) - len(tokens) + 1  # what the cache holds before each token, as without drafts
        for j, token in enumerate(tokens):
            seq.generated.append(token)
            if seq.drafting is not None and seq.drafting.lookup is not None:
                seq.drafting.lookup.extend((token,))
            if seq.t_first is None:
                seq.t_first = now
            logprob = _logprobs(logits[j], token, seq.req.logprobs) if seq.req.logprobs is not None else None
            if token in seq.stop_ids:
                return j + 1, ("stop", token)
            if seq.req.constraint is not None:
                seq.req.constraint.advance(token)
            seq.req.emit(Piece(token, seq.stream.feed(token), logprob))
            if seq.stream.stopped:
                return j + 1, ("stop",)
            if len(seq.generated) == seq.req.max_tokens or held + j == self.engine.max_seq_len:
                return j + 1, ("length",)
        return len(tokens), None

    def _finish(self, seq: Sequence, reason: str, stop_token: int | None = None) -> None:
        rest = "" if seq.stream.stopped else seq.stream.finish()
        t_end = time.perf_counter()
        t_first = seq.t_first if seq.t_first is not None else t_end
        d = seq.drafting
        event = Finished(reason, rest, len(seq.prompt), seq.n_cached, len(seq.generated),
                         t_first - seq.t_submit, t_end - t_first, stop_token,
                         *((d.drafted, d.accepted, d.steps) if d is not None else ()))
        self._release(seq)
        seq.req.emit(event)
        if self.metrics is not None:
            self.metrics.finished(event)

    def _cancel(self, seq: Sequence, message: str) -> None:
        self._release(seq)
        seq.req.emit(Failed(message))
        if self.metrics is not None:
            self.metrics.cancelled_after(len(seq.generated))

    def _release(self, seq: Sequence) -> None:
        seq.slot.seq, seq.slot.last_used = None, time.perf_counter()
        self._count(idle=1)

    def _views(self) -> tuple[SlotView, ...]:
        views = []
        for slot in self.slots:
            q = slot.seq
            if q is None:
                views.append(SlotView(slot.index, "idle", len(slot.tokens), None, 0, 0))
            else:
                state = "prefilling" if q.fed < len(q.prompt) else "decoding"
                views.append(SlotView(slot.index, state, len(slot.tokens), q.req.request_id or None, len(q.prompt),
                                      len(q.generated)))
        return tuple(views)

    def _publish(self) -> None:
        self.slot_views = self._views()  # one assignment: a reader sees the old snapshot or the new, whole

    def _report_load(self) -> None:
        if self.metrics is None:
            return
        busy = sum(s.seq is not None for s in self.slots)
        self.metrics.set_load(self.queue_length(), busy, len(self.slots))  # what /slots and the 429 count
        now = time.perf_counter()
        if now >= self._stats_due and self.engine.forward_s != self._stats_at:  # only after new steps
            self._stats_due, self._stats_at = now + STATS_EVERY_S, self.engine.forward_s
            times = self.rank_times()
            self.metrics.set_rank_times(times[:, 0].tolist(), times[:, 1].tolist())


def _logprobs(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """log softmax of the model's logits (temperature 1), in float64: the chosen token's and
    the k most likely."""
    x = logits.astype(np.float64)
    top = float(x.max())
    lse = top + math.log(float(np.exp(x - top).sum()))
    best = np.argpartition(-x, k - 1)[:k] if 0 < k < len(x) else np.arange(len(x) if k else 0)
    best = best[np.argsort(-x[best], kind="stable")]
    return TokenLogprob(token, float(x[token]) - lse, tuple((int(i), float(x[i]) - lse) for i in best))


def generate(job: Job, prompt_ids: list[int] | None, max_tokens: int, sampling: Sampling | None = None,
             stop_ids=None, on_text=None, max_draft: int = 0, draft: DraftModel | None = None,
             min_draft: int = 0) -> dict:
    """Collective: one request, start to end (the CLI, the benchmark, tests). Rank 0 passes
    the prompt (other ranks None) and gets the text as it is released through on_text;
    max_draft, min_draft and draft as Scheduler's. Returns the generated ids (every rank), timings and
    speculation's counts."""
    comm = job.comm
    if comm.rank != 0:
        follow(job)
        return comm.bcast_obj(None)
    events: list = []
    rounds = [comm.rounds]  # collectives started: at the start, then at the first token

    def emit(event):
        if len(rounds) == 1 and isinstance(event, (Piece, Finished)):
            rounds.append(comm.rounds)
        if on_text is not None and isinstance(event, (Piece, Finished)):
            on_text(event.text)
        events.append(event)

    req = GenRequest(list(prompt_ids), max_tokens, sampling or Sampling(), stop_ids=stop_ids, emit=emit)
    scheduler = Scheduler(job, max_draft=max_draft, draft=draft, min_draft=min_draft)
    scheduler.submit(req)
    scheduler.run(until=lambda: bool(events) and not isinstance(events[-1], Piece))
    decode_rounds = comm.rounds - rounds[-1]
    scheduler.exit_followers()
    end = events[-1]
    if isinstance(end, Failed):
        raise RuntimeError(end.message)
    generated = [e.token for e in events if isinstance(e, Piece)] + ([end.stop_token] if end.stop_token is not None else [])
    n_decode = max(0, len(generated) - 1)  # forward passes after the prompt's (the last token is not fed back)
    result = {
        "generated": generated, "text": "".join(e.text for e in events if isinstance(e, Piece)) + end.text,
        "n_prompt": end.prompt_tokens, "hit_context": end.reason == "length" and len(generated) < max_tokens,
        "prompt_s": end.first_token_s if max_tokens else None, "decode_s": end.decode_s, "n_decode": n_decode,
        "n_forward": end.prompt_tokens - end.cached_tokens + n_decode if max_tokens else 0,
        "drafted": end.drafted, "accepted": end.accepted, "steps": end.steps,
        "decode_rounds": decode_rounds,  # collectives after the first token (rank 0's count is every rank's)
    }
    return comm.bcast_obj(result)
