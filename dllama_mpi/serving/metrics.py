"""The server's Prometheus metrics, served at GET /metrics.

One Metrics object per server, with a registry of its own (never prometheus_client's global
one, so two servers in one process, as in the tests, never share counts). The HTTP side
counts requests; the scheduler, on rank 0's main thread, reports each finished generation,
the load and the ranks' cumulative times. prometheus_client is thread-safe, so neither side
locks anything.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .request import Finished

# Seconds: a first token can wait for a long prompt on slow ranks, a request can run for minutes.
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """Counters, histograms and gauges of one server, and their Prometheus text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dllama_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("dllama_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter(
            "dllama_prompt_cached_tokens", "Prompt tokens taken from a slot's KV cache rather than computed", registry=r
        )
        self.generated_tokens = Counter("dllama_generated_tokens", "Tokens generated (cancelled requests' included)", registry=r)
        self.drafted_tokens = Counter("dllama_draft_tokens", "Tokens drafted for speculation (finished requests')",
                                      registry=r)
        self.accepted_tokens = Counter("dllama_draft_accepted_tokens",
                                       "Drafted tokens the model kept, each one a token generated (finished requests')",
                                       registry=r)
        self.cancelled = Counter("dllama_cancelled_requests", "Requests ended by their client before they finished",
                                 registry=r)
        self.refusals = Counter(
            "dllama_refused_requests", "Requests refused at capacity (429), by reason: queue_full (--max-queue waiting "
            "already) or queue_timeout (no slot within --queue-timeout)", ["reason"], registry=r
        )
        for reason in ("queue_full", "queue_timeout"):  # both shown from the start, at 0
            self.refusals.labels(reason=reason)
        self.ttft = Histogram(
            "dllama_time_to_first_token_seconds", "From submission to the first sampled token", buckets=_TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "dllama_time_per_output_token_seconds", "Decode time per token after the first", buckets=_TPOT_BUCKETS, registry=r
        )
        self.duration = Histogram(
            "dllama_request_duration_seconds", "From submission to the last sampled token", buckets=_DURATION_BUCKETS, registry=r
        )
        self.queue_length = Gauge("dllama_queue_length", "Requests waiting for a slot", registry=r)
        self.busy_slots = Gauge("dllama_busy_slots", "Slots generating now", registry=r)
        self.slots = Gauge("dllama_slots", "Slots (requests generated together)", registry=r)
        self.rank_compute = Gauge("dllama_rank_compute_seconds", "Cumulative compute time of each rank", ["rank"], registry=r)
        self.rank_collective = Gauge(
            "dllama_rank_collective_seconds", "Cumulative time of each rank in collectives (waiting included)", ["rank"], registry=r
        )

    def request(self, endpoint: str, status: int) -> None:
        """One HTTP request answered (the HTTP side's middleware calls this)."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def finished(self, ev: Finished) -> None:
        """A generation ended normally: its tokens and timings."""
        self.prompt_tokens.inc(ev.prompt_tokens)
        self.cached_tokens.inc(ev.cached_tokens)
        self.generated_tokens.inc(ev.completion_tokens)
        self.drafted_tokens.inc(ev.drafted)
        self.accepted_tokens.inc(ev.accepted)
        if ev.completion_tokens:
            self.ttft.observe(ev.first_token_s)
        if ev.completion_tokens > 1:
            self.tpot.observe(ev.decode_s / (ev.completion_tokens - 1))
        self.duration.observe(ev.first_token_s + ev.decode_s)

    def cancelled_after(self, generated: int) -> None:
        """A request whose client left (or that shutdown ended) after `generated` tokens."""
        self.cancelled.inc()
        self.generated_tokens.inc(generated)

    def refused(self, reason: str) -> None:
        """A request refused at capacity: "queue_full" or "queue_timeout"."""
        self.refusals.labels(reason=reason).inc()

    def set_load(self, queue_length: int, busy_slots: int, slots: int) -> None:
        self.queue_length.set(queue_length)
        self.busy_slots.set(busy_slots)
        self.slots.set(slots)

    def set_rank_times(self, compute_s: list[float], collective_s: list[float]) -> None:
        """Each rank's cumulative compute and collective seconds, rank 0 first."""
        for rank, (compute, collective) in enumerate(zip(compute_s, collective_s, strict=True)):
            self.rank_compute.labels(rank=str(rank)).set(compute)
            self.rank_collective.labels(rank=str(rank)).set(collective)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
