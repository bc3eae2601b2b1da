"""`serve --max-queue` and `--queue-timeout` under mpiexec, and GET /slots: a bounded flood and a
queue timeout on stories260K at -n 2. The timing is forced, not hoped for: the follower rank is
stopped (SIGSTOP), so rank 0's scheduler stands in a step's collective with its slots busy while
the requests arrive; the queue's count and the 429s need no step, and the scheduler resumes
where it stood at SIGCONT."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest
from test_serve import PROMPTS, Server, stories  # noqa: F401 (stories: the fixture)

pytestmark = pytest.mark.serve
MODEL = "stories260K-q40"
# the flood's queued requests: long enough that the one in a slot still runs when the follower is stopped again,
# a few steps after the long stream's first chunk reached the test
QUEUED_TOKENS = 400  # of the context's 512: hundreds of steps of margin


class Stream:
    """A streamed greedy completion read on a thread of its own: its status, id and text once done."""

    def __init__(self, url: str, prompt: str, max_tokens: int):
        self.first_chunk = threading.Event()
        self.status, self.id, self.text, self.reason = None, None, "", None
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}
        self._thread = threading.Thread(target=self._read, args=(url, body), daemon=True)
        self._thread.start()

    def _read(self, url: str, body: dict) -> None:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    self.id, self.text = chunk["id"], self.text + chunk["choices"][0]["text"]
                    self.reason = chunk["choices"][0]["finish_reason"] or self.reason
                    self.first_chunk.set()
        self.first_chunk.set()

    def join(self) -> Stream:
        self._thread.join(120)
        assert not self._thread.is_alive(), "a stream did not end within 120 s"
        return self


def post(url: str, prompt: str, max_tokens: int) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=120, json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                                                   "temperature": 0, "ignore_eos": True})


def slots(server: Server) -> dict:
    return httpx.get(server.url + "/slots", timeout=10).json()


def wait_for(server: Server, what: str, test) -> dict:
    """/slots once `test` holds of it (a hang catcher, not a timing: with the follower stopped nothing else changes)."""
    deadline = time.monotonic() + 60
    while not test(state := slots(server)):
        assert time.monotonic() < deadline, f"/slots never showed {what}: {state}"
        time.sleep(0.02)
    return state


@contextlib.contextmanager
def stopped(pid: int):
    """The follower rank stopped: rank 0's next step waits for it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def busy(state: dict) -> dict[str, dict]:
    return {s["request_id"]: s for s in state["slots"] if s["state"] != "idle"}


def assert_refused(r: httpx.Response, waiting: int) -> None:
    assert r.status_code == 429 and r.headers["retry-after"] == "1", (r.status_code, r.text)
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == ("requests", "rate_limit_exceeded", None)
    assert f"{waiting} requests are waiting for a slot" in err["message"] and "try again" in err["message"]


def test_a_flood_is_refused_beyond_the_queue_and_every_admitted_request_gets_its_text(stories):  # noqa: F811
    """--slots 2 --max-queue 3. With the follower stopped: a long stream takes a slot (/slots: prefilling, its id);
    4 more fill the other slot and the queue (/slots: 3 waiting); 4 more get 429 at once, in OpenAI's shape with
    Retry-After. Resumed until the long stream's first chunk, stopped again: /slots shows both slots busy, the long
    stream decoding, 3 waiting; 2 more get 429. Resumed: every admitted request's text is its solo text; /slots ends
    idle; /metrics counts the 6 refusals."""
    server = Server(2, stories, "--slots", "2", "--max-queue", "3")
    try:
        follower = server.pids()["1"]
        with ThreadPoolExecutor(4) as pool:
            with stopped(follower):
                long = Stream(server.url, PROMPTS[0], 300)
                state = wait_for(server, "the long stream in a slot", lambda s: len(busy(s)) == 1)
                (long_id, view), = busy(state).items()
                assert long_id.startswith("cmpl-") and view["state"] == "prefilling" and view["generated_tokens"] == 0
                queued = [pool.submit(post, server.url, p, QUEUED_TOKENS) for p in PROMPTS[1:5]]
                state = wait_for(server, "3 waiting", lambda s: s["queue"]["length"] == 3)
                assert state["queue"]["limit"] == 3
                t0 = time.monotonic()
                for prompt in PROMPTS[5:8] + PROMPTS[:1]:
                    assert_refused(post(server.url, prompt, 8), 3)
                assert time.monotonic() - t0 < 30  # answered with the scheduler standing still
            assert long.first_chunk.wait(60) and long.status == 200
            with stopped(follower):
                state = wait_for(server, "both slots busy", lambda s: len(busy(s)) == 2)
                views = busy(state)
                assert views[long_id]["state"] == "decoding" and 1 <= views[long_id]["generated_tokens"] < 300
                assert views[long_id]["n_cached"] >= views[long_id]["prompt_tokens"]
                assert state["queue"]["length"] == 3
                for prompt in PROMPTS[6:8]:
                    assert_refused(post(server.url, prompt, 8), 3)
            answers = [f.result() for f in queued]
        long.join()
        assert (long.status, long.id, long.reason) == (200, long_id, "length")
        assert [a.status_code for a in answers] == [200] * 4
        admitted_ids = {long_id, *(a.json()["id"] for a in answers)}
        assert views.keys() <= admitted_ids and len(admitted_ids) == 5
        solo = [post(server.url, p, QUEUED_TOKENS).json()["choices"][0]["text"] for p in PROMPTS[1:5]]
        assert [a.json()["choices"][0]["text"] for a in answers] == solo
        assert long.text == post(server.url, PROMPTS[0], 300).json()["choices"][0]["text"]
        state = slots(server)
        assert [s["state"] for s in state["slots"]] == ["idle", "idle"] and state["queue"] == {"length": 0, "limit": 3}
        metrics = server.metrics()
        assert metrics['dllama_refused_requests_total{"reason": "queue_full"}'] == 6
        assert metrics['dllama_requests_total{"endpoint": "/v1/completions", "status": "429"}'] == 6
    finally:
        assert server.stop() == 0, "".join(server.stderr)


def test_a_request_given_no_slot_within_the_queue_timeout_gets_429_streamed_or_not(stories):  # noqa: F811
    """--slots 1 --queue-timeout 0.5: with the follower stopped, one request takes the slot and two wait (one
    streamed) past the timeout; resumed, both get 429 (the stream too: its headers wait for its first event), no
    token sent, while the first runs to its end; /metrics counts 2 timeouts."""
    server = Server(2, stories, "--slots", "1", "--queue-timeout", "0.5")
    try:
        with ThreadPoolExecutor(2) as pool:
            with stopped(server.pids()["1"]):
                first = Stream(server.url, PROMPTS[0], 40)
                wait_for(server, "the first request in the slot", lambda s: len(busy(s)) == 1)
                waiting = pool.submit(post, server.url, PROMPTS[1], 8)
                streamed = Stream(server.url, PROMPTS[2], 8)
                wait_for(server, "2 waiting", lambda s: s["queue"]["length"] == 2)
                time.sleep(0.6)
            r = waiting.result()
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "no slot became free within the queue timeout of 0.5 s" in r.json()["error"]["message"]
        streamed.join()
        assert (streamed.status, streamed.text) == (429, "")
        first.join()
        assert (first.status, first.reason) == (200, "length")
        assert first.text == post(server.url, PROMPTS[0], 40).json()["choices"][0]["text"]
        assert server.metrics()['dllama_refused_requests_total{"reason": "queue_timeout"}'] == 2
    finally:
        assert server.stop() == 0, "".join(server.stderr)
