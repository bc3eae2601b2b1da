"""Rank 0's scheduler in one process (a 1-rank job of the built-in synthetic model): what a
request costs the others is decided by steps, not by the clock, so these verdicts hold on a
machine of any speed."""

from __future__ import annotations

import threading
import time

import pytest

from dllama_mpi.job.loading import open_job
from dllama_mpi.parallel.comm import Comm
from dllama_mpi.serving.metrics import Metrics
from dllama_mpi.serving.request import Failed, Finished, GenRequest, Piece, Refused, Sampling
from dllama_mpi.serving.scheduler import Scheduler

CONTEXT = 96


@pytest.fixture(scope="module")
def job():
    return open_job(Comm(), None, (1,), max_seq_len=CONTEXT, n_slots=3)


class Recorder:
    """Every event of the requests it is given, in the order the scheduler emits them: (name, event)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def request(self, name: str, prompt: list[int], max_tokens: int, **kw) -> GenRequest:
        req = GenRequest(prompt, max_tokens, Sampling(), stop_ids=(), **kw)
        req.emit = lambda event: self.events.append((name, event))
        return req

    def ended(self, name: str) -> bool:
        return any(n == name and isinstance(e, Finished | Failed) for n, e in self.events)

    def order_of_ends(self) -> list[str]:
        return [n for n, e in self.events if isinstance(e, Finished | Failed)]


def test_a_cancelled_request_ends_before_the_next_step_and_frees_its_slot(job):
    """The flag a client's thread sets (it left) is read before every step: not one more token
    after it, the slot free and the request counted as cancelled."""
    metrics, rec = Metrics(), Recorder()
    scheduler = Scheduler(job, metrics)
    req = rec.request("left", [1, 5, 9], 60)
    pieces = 0

    def emit(event):
        nonlocal pieces
        rec.events.append(("left", event))
        pieces += isinstance(event, Piece)
        if pieces == 3:
            req.cancelled.set()  # as the HTTP thread does when the client has gone

    req.emit = emit
    scheduler.submit(req)
    scheduler.run(until=lambda: rec.ended("left"))
    kinds = [type(e).__name__ for _, e in rec.events]
    assert kinds == ["Piece"] * 3 + ["Failed"] and rec.events[-1][1].message == "cancelled"
    assert all(slot.seq is None for slot in scheduler.slots) and not scheduler.busy
    assert metrics.registry.get_sample_value("dllama_cancelled_requests_total") == 1


def test_a_request_at_the_limits_does_not_hold_back_a_short_one(job):
    """A prompt that fills most of the context and 4 stop strings of 1000 characters, submitted
    first: the short request submitted after it still finishes first, its prompt fed and its
    tokens decoded in the same steps as the long prompt's chunks."""
    rec = Recorder()
    scheduler = Scheduler(job)
    long_prompt = [1] + [7 + i % 200 for i in range(CONTEXT - 20)]
    stops = tuple(chr(0x4E00 + k) * 1000 for k in range(4))  # never generated: text held, never stopped
    scheduler.submit(rec.request("long", long_prompt, 19, stop=stops))
    scheduler.submit(rec.request("short", [1, 5, 9], 8))
    scheduler.run(until=lambda: rec.ended("long") and rec.ended("short"))
    assert rec.order_of_ends() == ["short", "long"]
    long_end = next(e for n, e in rec.events if n == "long" and isinstance(e, Finished))
    assert (long_end.reason, long_end.completion_tokens) == ("length", 19)


class FailingGrammar:
    """A constraint whose grammar gives out at its third token, as llguidance does when an answer hits one of its limits."""

    def __init__(self) -> None:
        self.masks = 0

    def mask(self, logits) -> str | None:
        self.masks += 1
        return "the answer's grammar failed: too complex" if self.masks == 3 else None

    def advance(self, token: int) -> None:
        pass


def test_a_grammar_that_fails_ends_its_request_not_the_server(job):
    """The failure reaches its client as Failed after the tokens given so far; a request in the same steps goes on."""
    rec = Recorder()
    scheduler = Scheduler(job)
    scheduler.submit(rec.request("constrained", [1, 5, 9], 20, constraint=FailingGrammar()))
    scheduler.submit(rec.request("plain", [1, 6, 9], 20))
    scheduler.run(until=lambda: rec.ended("constrained") and rec.ended("plain"))
    kinds = [type(e).__name__ for n, e in rec.events if n == "constrained"]
    assert kinds == ["Piece", "Piece", "Failed"]
    failed = next(e for n, e in rec.events if n == "constrained" and isinstance(e, Failed))
    assert failed.message == "the answer's grammar failed: too complex"
    plain_end = next(e for n, e in rec.events if n == "plain" and isinstance(e, Finished))
    assert plain_end.completion_tokens == 20 and all(slot.seq is None for slot in scheduler.slots)


# --------------------------------------------------------------------- the queue's limits and the published slots


def steps(n: int):
    """An `until` for Scheduler.run that lets it run n loop iterations (each at most one step)."""
    calls = iter(range(n + 1))
    return lambda: next(calls) == n


def test_a_flood_from_many_threads_gets_exactly_the_idle_slots_and_the_queue(job):
    """12 threads submit 5 requests each at once: exactly 3 (the idle slots) + 2 (--max-queue) are
    taken, every other one is Refused there and then, on its own thread, and counted; the ones
    taken all finish, and then the queue takes requests again."""
    metrics, rec = Metrics(), Recorder()
    scheduler = Scheduler(job, metrics, max_queue=2)
    start = threading.Barrier(12)

    def flood(t: int) -> None:
        start.wait()
        for i in range(5):
            scheduler.submit(rec.request(f"{t}.{i}", [1, 5 + t, 9 + i], 6))

    threads = [threading.Thread(target=flood, args=(t,)) for t in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [n for n, e in rec.events if isinstance(e, Refused)]
    taken = {f"{t}.{i}" for t in range(12) for i in range(5)} - set(refused)
    assert len(refused) == 55 and len(taken) == 5 and len(rec.events) == 55
    assert all(e.retry_after_s >= 1 and "2 requests are waiting" in e.message for n, e in rec.events)
    assert scheduler.queue_length() == 2 and isinstance(scheduler.refusal(), Refused)
    assert metrics.registry.get_sample_value("dllama_refused_requests_total", {"reason": "queue_full"}) == 56
    scheduler.run(until=lambda: all(rec.ended(n) for n in taken))
    assert all(isinstance(e, Piece | Finished) for n, e in rec.events if n in taken)
    assert scheduler.queue_length() == 0 and scheduler.refusal() is None
    scheduler.submit(rec.request("later", [1, 5, 9], 2))
    scheduler.run(until=lambda: rec.ended("later"))
    assert isinstance(rec.events[-1][1], Finished)


def test_a_slot_freed_makes_room_at_once(job):
    """3 slots busy, 1 request waiting (--max-queue 1): a request submitted when the first one
    finishes (from its Finished, on the scheduler's thread, before the waiting one takes the
    freed slot) is taken, not refused: the slot is counted free before the client hears of it."""
    rec = Recorder()
    scheduler = Scheduler(job, max_queue=1)
    first = rec.request("first", [1, 5, 9], 2)
    later = rec.request("later", [1, 6, 9], 4)
    seen = []

    def emit(event):
        rec.events.append(("first", event))
        if isinstance(event, Finished):
            seen.append(scheduler.queue_length())  # the waiting one has a slot to take: it no longer waits
            scheduler.submit(later)
            seen.append(scheduler.refusal())  # one more now would wait beyond the limit

    first.emit = emit
    scheduler.submit(first)
    for name in ("b", "c", "waiting"):
        scheduler.submit(rec.request(name, [1, 5, 9], 30 if name != "waiting" else 4))
    assert scheduler.queue_length() == 1 and isinstance(scheduler.refusal(), Refused)
    scheduler.run(until=lambda: all(rec.ended(n) for n in ("first", "b", "c", "waiting", "later")))
    assert seen[0] == 0 and isinstance(seen[1], Refused)
    assert not any(isinstance(e, Failed) for _, e in rec.events)
    assert rec.order_of_ends()[0] == "first"


def test_a_request_waiting_past_the_queue_timeout_is_refused_without_a_token(job):
    """--queue-timeout: the 3 slots busy for longer than the timeout (forced: the first token's
    client takes 0.2 s), the 4th request is Refused before any slot frees, without a token, and
    counted; the 3 finish as if it had never come."""
    metrics, rec = Metrics(), Recorder()
    scheduler = Scheduler(job, metrics, queue_timeout_s=0.05)
    slow = rec.request("slow", [1, 5, 9], 20)

    def emit(event):
        rec.events.append(("slow", event))
        if sum(n == "slow" for n, _ in rec.events) == 1:
            time.sleep(0.2)

    slow.emit = emit
    scheduler.submit(slow)
    for name in ("b", "c", "late"):
        scheduler.submit(rec.request(name, [1, 6, 9], 20))
    scheduler.run(until=lambda: all(rec.ended(n) for n in ("slow", "b", "c", "late")))
    late = [e for n, e in rec.events if n == "late"]
    assert len(late) == 1 and isinstance(late[0], Refused) and "0.05 s" in late[0].message
    assert rec.order_of_ends()[0] == "late"
    assert [type(e) for n, e in rec.events if n == "b"] == [Piece] * 20 + [Finished]
    assert metrics.registry.get_sample_value("dllama_refused_requests_total", {"reason": "queue_timeout"}) == 1
    assert metrics.registry.get_sample_value("dllama_refused_requests_total", {"reason": "queue_full"}) == 0


def test_the_published_slots_show_each_step(job):
    """slot_views after a step of 64 rows: a short prompt's 3 and a long one's first 61: the long
    one prefilling, the short one decoding, with their request ids and counts; idle, their caches kept, at the end."""
    rec = Recorder()
    scheduler = Scheduler(job)
    assert [v.state for v in scheduler.slot_views] == ["idle"] * 3
    long_prompt = [1] + [7 + i % 200 for i in range(79)]
    scheduler.submit(rec.request("short", [1, 5, 9], 10, request_id="cmpl-short"))  # first: its prompt goes first
    scheduler.submit(rec.request("long", long_prompt, 4, request_id="cmpl-long"))
    scheduler.run(until=steps(1))
    views = {v.request_id: v for v in scheduler.slot_views}
    assert (views["cmpl-long"].state, views["cmpl-long"].prompt_tokens, views["cmpl-long"].generated_tokens) == \
        ("prefilling", 80, 0)
    assert (views["cmpl-short"].state, views["cmpl-short"].n_cached, views["cmpl-short"].generated_tokens) == ("decoding", 3, 1)
    assert views["cmpl-long"].n_cached + views["cmpl-short"].n_cached == 64  # the step's rows
    assert views[None].state == "idle"
    state = scheduler.slots_state()
    assert state["queue"] == {"length": 0, "limit": None} and {s["id"] for s in state["slots"]} == {0, 1, 2}
    scheduler.run(until=lambda: rec.ended("long") and rec.ended("short"))
    scheduler.run(until=steps(1))
    assert [(v.state, v.request_id) for v in scheduler.slot_views] == [("idle", None)] * 3
    assert sorted(v.n_cached for v in scheduler.slot_views) == [0, 3 + 9, 80 + 3]
