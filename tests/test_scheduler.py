"""Rank 0's scheduler in one process (a 1-rank job of the built-in synthetic model): what a
request costs the others is decided by steps, not by the clock, so these verdicts hold on a
machine of any speed."""

from __future__ import annotations

import pytest

from dllama_mpi.job.loading import open_job
from dllama_mpi.parallel.comm import Comm
from dllama_mpi.serving.metrics import Metrics
from dllama_mpi.serving.request import Failed, Finished, GenRequest, Piece, Sampling
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
