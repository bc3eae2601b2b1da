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
"""

from __future__ import annotations

import math
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..job.loading import Job
from ..job.sampler import Sampler
from .request import Failed, Finished, GenRequest, Piece, Sampling, TokenLogprob
from .textstream import TextStream

OP_STEP, OP_STATS, OP_EXIT = 1, 2, 3
PREFILL_ROWS_WHILE_DECODING = 16  # a long prompt is fed in chunks this size while others decode: their streams keep going
STATS_EVERY_S = 2.0  # how often the followers' compute and collective times are gathered while busy


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

    @property
    def prompt(self) -> list[int]:
        return self.req.prompt_ids


class Scheduler:
    """Rank 0's side of serving `job`: submit() from any thread, run() on the main thread."""

    def __init__(self, job: Job, metrics=None):
        if job.comm.rank != 0:
            raise RuntimeError("the scheduler runs on rank 0; other ranks call follow()")
        self.job, self.engine, self.comm, self.metrics = job, job.engine, job.comm, metrics
        self.slots = [Slot(i) for i in range(self.engine.n_slots)]
        self._inbox: queue.SimpleQueue[tuple[GenRequest, float]] = queue.SimpleQueue()  # (request, submitted at)
        self._closed: str | None = None  # why no more requests are taken (shutting down)
        self._closing = threading.Lock()  # orders submit() against close()
        self._waiting: deque[tuple[GenRequest, float]] = deque()
        self._batch = self.engine.new_batch()
        self._rank_times = np.zeros((self.comm.size, 2), np.float64)
        self._stats_due, self._stats_at = 0.0, 0.0
        self._exited = False

    # --- any thread -------------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        if req.emit is None:
            raise ValueError("GenRequest.emit must be set before submitting")
        with self._closing:
            if self._closed is None:
                self._inbox.put((req, time.perf_counter()))
                return
        req.emit(Failed(self._closed))

    def close(self, message: str) -> None:
        """Take no more requests: from now on submit() fails them at once with `message`."""
        with self._closing:
            self._closed = message

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
            if self._build_step():
                self.comm.bcast_idle(self._batch.wire)
                logits = self.engine.step(self._batch)
                self._after_step(logits)
            self._report_load()

    def fail_all(self, message: str) -> None:
        """Close, and end every request, running or waiting, with Failed (shutting down)."""
        self.close(message)
        self._take_inbox(0)
        for req, _ in self._waiting:
            req.emit(Failed(message))
        self._waiting.clear()
        for slot in self.slots:
            if slot.seq is not None:
                self._cancel(slot.seq, message)
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
            self._waiting = deque(w for w in self._waiting if not w[0].cancelled.is_set())
        for slot in self.slots:
            if slot.seq is not None and slot.seq.req.cancelled.is_set():
                self._cancel(slot.seq, "cancelled")

    def _admit(self) -> None:
        while self._waiting:
            idle = [s for s in self.slots if s.seq is None]
            if not idle:
                return
            req, t_submit = self._waiting.popleft()
            prompt = req.prompt_ids
            reuse = [_common_prefix(s.tokens, prompt) for s in idle]
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
            if req.max_tokens == 0:
                self._finish(slot.seq, "length")

    def _build_step(self) -> bool:
        """Fill the batch: one row per decoding sequence, then prompt chunks in admission
        order in the rows left. False when there is nothing to run."""
        batch = self._batch
        batch.clear(OP_STEP)
        active = [s.seq for s in self.slots if s.seq is not None]
        decoding = [q for q in active if q.fed == len(q.prompt)]
        for q in decoding:
            batch.add(q.generated[-1], q.slot.index, len(q.slot.tokens), True)
        room = batch.max_rows - batch.n
        if decoding:
            room = min(room, PREFILL_ROWS_WHILE_DECODING)
        for q in sorted((q for q in active if q.fed < len(q.prompt)), key=lambda q: q.t_submit):
            if room <= 0:
                break
            take = min(room, len(q.prompt) - q.fed)
            for i in range(q.fed, q.fed + take):
                batch.add(q.prompt[i], q.slot.index, i, i == len(q.prompt) - 1)
            room -= take
        return batch.n > 0

    def _after_step(self, logits: np.ndarray) -> None:
        batch, now = self._batch, time.perf_counter()
        owner = {}
        for r in range(batch.n):  # rows -> their sequence, and the tokens now in each cache
            seq = self.slots[int(batch.slots[r])].seq
            seq.slot.tokens.append(int(batch.tokens[r]))
            if seq.fed < len(seq.prompt):
                seq.fed += 1
            owner[r] = seq
        for i in range(batch.n_logits):
            seq = owner[int(batch.logit_rows[i])]
            self._emit_token(seq, logits[i], now)

    def _emit_token(self, seq: Sequence, logits: np.ndarray, now: float) -> None:
        token = seq.sampler(logits)
        seq.generated.append(token)
        if seq.t_first is None:
            seq.t_first = now
        logprob = _logprobs(logits, token, seq.req.logprobs) if seq.req.logprobs is not None else None
        if token in seq.stop_ids:
            self._finish(seq, "stop", stop_token=token)
            return
        seq.req.emit(Piece(token, seq.stream.feed(token), logprob))
        if seq.stream.stopped:
            self._finish(seq, "stop")
        elif len(seq.generated) == seq.req.max_tokens or len(seq.slot.tokens) == self.engine.max_seq_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_token: int | None = None) -> None:
        rest = "" if seq.stream.stopped else seq.stream.finish()
        t_end = time.perf_counter()
        t_first = seq.t_first if seq.t_first is not None else t_end
        event = Finished(reason, rest, len(seq.prompt), seq.n_cached, len(seq.generated),
                         t_first - seq.t_submit, t_end - t_first, stop_token)
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

    def _report_load(self) -> None:
        if self.metrics is None:
            return
        busy = sum(s.seq is not None for s in self.slots)
        self.metrics.set_load(len(self._waiting), busy, len(self.slots))
        now = time.perf_counter()
        if now >= self._stats_due and self.engine.forward_s != self._stats_at:  # only after new steps
            self._stats_due, self._stats_at = now + STATS_EVERY_S, self.engine.forward_s
            times = self.rank_times()
            self.metrics.set_rank_times(times[:, 0].tolist(), times[:, 1].tolist())


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


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
             stop_ids=None, on_text=None) -> dict:
    """Collective: one request, start to end (the CLI, the benchmark, tests). Rank 0 passes
    the prompt (other ranks None) and gets the text as it is released through on_text.
    Returns the generated ids (every rank) and timings."""
    comm = job.comm
    if comm.rank != 0:
        follow(job)
        return comm.bcast_obj(None)
    events: list = []

    def emit(event):
        if on_text is not None and isinstance(event, (Piece, Finished)):
            on_text(event.text)
        events.append(event)

    req = GenRequest(list(prompt_ids), max_tokens, sampling or Sampling(), stop_ids=stop_ids, emit=emit)
    scheduler = Scheduler(job)
    scheduler.submit(req)
    scheduler.run(until=lambda: bool(events) and not isinstance(events[-1], Piece))
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
    }
    return comm.bcast_obj(result)
