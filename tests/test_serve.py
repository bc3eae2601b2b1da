"""`python -m dllama_mpi serve` under mpiexec, driven by the official `openai` client with
strict response validation: stories260K completions (-n 2 and -n 3), chat on a tiny random
Llama-3-shaped model carrying Llama 3.1's real template, concurrency, KV reuse,
cancellation, bad requests, shutdown and rank death."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from conftest import (
    assert_no_survivors,
    assert_refused,
    convert_stories,
    launcher_family,
    need_stories,
    processes_marked,
    run_mpiexec,
    start_mpiexec,
)

pytestmark = pytest.mark.serve  # every test here talks to a server job

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went", "One day, a bird", "The sun was",
           "Tim had a red ball", "Mom said", "There was a big tree"]


class Server:
    """A `serve` job under mpiexec; its URL once it says it is serving."""

    def __init__(self, n: int, model: Path, *extra: str, env: dict | None = None):
        self.proc, self.mark = start_mpiexec(n, [sys.executable, "-m", "dllama_mpi", "serve", "--model", str(model),
                                                 "--port", "0", *extra], env)
        self.stderr: list[str] = []
        self.url = None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.stderr.append(line)
                if m := re.search(r"serving \S+ at (http://\S+)/v1", line):
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or self.url is None:
            self.kill()
            pytest.fail("the server did not start:\n" + "".join(self.stderr))

    def client(self, api_key: str = "none", strict: bool = True) -> openai.OpenAI:
        """strict=False only for streamed completions: the client's types make a completion
        choice's finish_reason required, while OpenAI (and we) send null until the last chunk."""
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60,
                             _strict_response_validation=strict)

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {s.name + json.dumps(s.labels, sort_keys=True) * bool(s.labels): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def pids(self) -> dict[str, int]:
        """{rank as the launcher numbered it: pid} of the job's ranks."""
        return {rank: pid for pid, rank in processes_marked(self.mark).items() if rank != "-"}

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM to the job, as scancel and Ctrl-C give it to every process; under Open MPI to rank 0
        alone: its mpirun ends the ranks at once when signalled (docs/clusters.md, "Which MPI")."""
        with contextlib.suppress(ProcessLookupError):
            if launcher_family() == "openmpi":
                os.kill(self.pids()["0"], signal.SIGTERM)
            else:
                os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the server did not stop within {timeout} s of SIGTERM:\n" + "".join(self.stderr))
        assert_no_survivors(self.mark, "the server")
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Path:
    need_stories()
    return convert_stories(tmp_path_factory.mktemp("serve"), "q40")


@pytest.fixture(scope="module", params=[2, 3])
def stories_server(request, stories):
    # at least 2 drafts a step wherever lookup finds them, whatever the step times say
    server = Server(request.param, stories, "--slots", "3", "--draft-min", "2")
    yield server
    assert server.stop() == 0, "".join(server.stderr)


@pytest.fixture(scope="module")
def chat_server(llama3_chat):
    server = Server(2, llama3_chat, "--slots", "2", "--memory-budget", "2", "1")
    yield server
    assert server.stop() == 0, "".join(server.stderr)


def cli_text(model: Path, prompt: str, steps: int, *extra: str) -> str:
    result = run_mpiexec(1, [sys.executable, "-m", "dllama_mpi", "--model", str(model), "--prompt", prompt,
                             "--steps", str(steps), *extra], timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prompt)
    return result.stdout[len(prompt):].removesuffix("\n")


@functools.cache
def cli_text_without_speculation(model: Path, prompt: str, steps: int) -> str:
    """The CLI's greedy text with `--speculate 0` (once per model, prompt and length in a test run)."""
    return cli_text(model, prompt, steps, "--speculate", "0")


def model_tokenizer(model: Path):
    from dllama_mpi.files.modelfile import ModelFile

    file = ModelFile(model)
    try:
        return file.tokenizer()
    finally:
        file.close()


def complete(client, prompt, max_tokens=24, **kw):
    return client.completions.create(model="stories260K-q40", prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


# --------------------------------------------------------------------- completions


def test_completion_equals_the_cli_and_streams_the_same(stories_server, stories):
    client = stories_server.client()
    got = complete(client, PROMPTS[0], 40)
    assert got.choices[0].text == cli_text(stories, PROMPTS[0], 40)
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 40 and got.usage.prompt_tokens == len(model_tokenizer(stories).encode(PROMPTS[0]))
    streamed, chunks = stream_text(complete(stories_server.client(strict=False), PROMPTS[0], 40, stream=True))
    assert streamed == got.choices[0].text
    assert len({c.id for c in chunks}) == 1 and chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_models_lists_the_model(stories_server):
    models = stories_server.client().models.list()
    assert [m.id for m in models.data] == ["stories260K-q40"]


def test_stop_string_across_tokens_never_leaks(stories_server):
    client = stories_server.client()
    full = complete(client, PROMPTS[0], 40).choices[0].text
    stop = "little g"  # " little" and " girl" are separate tokens: the stop string spans both
    assert stop in full, full
    expected = full[: full.index(stop)]
    got = complete(client, PROMPTS[0], 40, stop=[stop, "never there"])
    assert got.choices[0].text == expected and got.choices[0].finish_reason == "stop"
    streamed, chunks = stream_text(complete(stories_server.client(strict=False), PROMPTS[0], 40, stop=stop, stream=True))
    assert streamed == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_a_seed_reproduces_its_own_request_only(stories_server):
    client = stories_server.client()

    def sampled(seed):
        return client.completions.create(model="stories260K-q40", prompt=PROMPTS[1], max_tokens=30, temperature=1.0,
                                         seed=seed).choices[0].text

    first = sampled(7)
    sampled(None)  # an unseeded request in between changes nothing
    assert sampled(7) == first
    assert {sampled(s) for s in (8, 9, 10)} != {first}


def test_concurrent_clients_each_get_their_solo_text(stories_server):
    client = stories_server.client()
    solo = [complete(client, p, 32).choices[0].text for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:  # 8 clients over 3 slots: some wait in the queue
        together = list(pool.map(lambda p: complete(client, p, 32).choices[0].text, PROMPTS))
    assert together == solo
    m = stories_server.metrics()
    assert m["dllama_busy_slots"] == 0 and m["dllama_queue_length"] == 0


# prompts that repeat themselves: prompt lookup drafts from their first step
SPECULATION_PROMPTS = ["Once upon a time, there was a little girl named Lily. She loved to play outside. Once upon a time",
                       "The dog ran to the park. The dog ran to the park. The dog",
                       "Tom had a red ball. Tom had a red ball and a blue car. Tom had",
                       'Lily said, "I want to play." Mom said, "I want to play." Lily said,']


def draft_counts(server: Server) -> tuple[float, float]:
    """/metrics' drafted and accepted tokens so far."""
    m = server.metrics()
    return m["dllama_draft_tokens_total"], m["dllama_draft_accepted_tokens_total"]


def assert_prediction_usage(got) -> tuple[int, int]:
    """A completion's speculation counts, (accepted, rejected): neither negative, and the drafts kept
    are tokens of the completion after its first (which the prompt's step gives)."""
    details = got.usage.completion_tokens_details
    accepted, rejected = details.accepted_prediction_tokens, details.rejected_prediction_tokens
    assert accepted >= 0 and rejected >= 0, details
    assert accepted <= got.usage.completion_tokens - 1, (details, got.usage)
    return accepted, rejected


def test_speculating_server_gives_concurrent_clients_the_text_of_no_speculation(stories_server, stories):
    """The server speculates by default (prompt lookup): concurrent greedy completions of
    prompts that repeat are the CLI's text with `--speculate 0`; each one's usage says how many
    drafts were kept and rejected, and /metrics' draft counters grow by their sums."""
    expected = [cli_text_without_speculation(stories, p, 64) for p in SPECULATION_PROMPTS]
    client = stories_server.client()
    drafted_before, accepted_before = draft_counts(stories_server)
    with ThreadPoolExecutor(len(SPECULATION_PROMPTS)) as pool:  # 4 clients over 3 slots
        got = list(pool.map(lambda p: complete(client, p, 64), SPECULATION_PROMPTS))
    assert [g.choices[0].text for g in got] == expected
    assert all(g.usage.completion_tokens == 64 for g in got)
    counts = [assert_prediction_usage(g) for g in got]
    accepted, rejected = sum(a for a, _ in counts), sum(r for _, r in counts)
    assert accepted > 0, counts  # the text repeats: lookup drafts, and the model keeps some
    drafted_after, accepted_after = draft_counts(stories_server)
    assert (drafted_after - drafted_before, accepted_after - accepted_before) == (accepted + rejected, accepted)


def test_a_predicted_output_is_drafted_from_and_changes_no_token(stories_server, stories):
    """OpenAI's `prediction` (the text the answer is expected to repeat): a prompt with nothing
    to look up gets its drafts from the prediction, kept where the model agrees; the text is
    the CLI's with `--speculate 0` whatever the prediction says."""
    prompt = "Lily and Ben"
    expected = cli_text_without_speculation(stories, prompt, 48)
    client = stories_server.client()
    plain = complete(client, prompt, 48)
    right = complete(client, prompt, 48, extra_body={"prediction": {"type": "content", "content": expected}})
    wrong = complete(client, prompt, 48, extra_body={"prediction": {"type": "content", "content": [
        {"type": "text", "text": "The cat sat on the mat. "}, {"type": "text", "text": expected[::-1]}]}})
    assert plain.choices[0].text == right.choices[0].text == wrong.choices[0].text == expected
    accepted = [assert_prediction_usage(g)[0] for g in (plain, right, wrong)]
    assert accepted[1] >= 30 and accepted[1] > 4 * max(accepted[0], accepted[2]), accepted


def test_a_server_with_a_draft_model_gives_concurrent_clients_the_text_of_no_speculation(stories):
    """stories260K in f32 drafting for its q40 conversion, on rank 0 of a 2-rank server with 3
    slots: concurrent greedy completions (one waits for a slot) and a streamed one are the
    CLI's text with `--speculate 0`, and each completion kept drafts."""
    draft = convert_stories(stories.parent, "f32")
    expected = [cli_text_without_speculation(stories, p, 64) for p in SPECULATION_PROMPTS]
    server = Server(2, stories, "--slots", "3", "--draft-model", str(draft), "--draft-min", "2")
    try:
        client = server.client()
        with ThreadPoolExecutor(len(SPECULATION_PROMPTS)) as pool:
            got = list(pool.map(lambda p: complete(client, p, 64), SPECULATION_PROMPTS))
        assert [g.choices[0].text for g in got] == expected
        counts = [assert_prediction_usage(g) for g in got]
        assert all(accepted > 0 for accepted, _ in counts), counts
        streamed, chunks = stream_text(complete(server.client(strict=False), SPECULATION_PROMPTS[1], 64, stream=True))
        assert streamed == expected[1] and chunks[-1].choices[0].finish_reason == "length"
        drafted, accepted = draft_counts(server)
        assert accepted >= sum(a for a, _ in counts) > 0 and drafted >= accepted
    finally:
        assert server.stop() == 0, "".join(server.stderr)


def test_a_disconnected_stream_frees_its_slot(stories_server):
    client = stories_server.client()
    expected = complete(client, PROMPTS[2], 16).choices[0].text
    before = stories_server.metrics()
    with httpx.stream("POST", stories_server.url + "/v1/completions", timeout=30,
                      json={"model": "stories260K-q40", "prompt": PROMPTS[3], "max_tokens": 400, "temperature": 0,
                            "stream": True}) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.monotonic() + 60  # a hang catcher: it takes a step or two
    while stories_server.metrics()["dllama_busy_slots"] != 0:
        assert time.monotonic() < deadline, "the slot of a disconnected stream is still busy"
        time.sleep(0.05)
    after = stories_server.metrics()
    assert after["dllama_cancelled_requests_total"] == before["dllama_cancelled_requests_total"] + 1
    generated = after["dllama_generated_tokens_total"] - before["dllama_generated_tokens_total"]
    assert generated < 400, f"the disconnected stream ran all its {generated} tokens"
    assert complete(client, PROMPTS[2], 16).choices[0].text == expected


def test_health_answers_quickly_during_a_long_generation(chat_server):
    # the 128k-token vocabulary makes each step slow enough to measure /health during it
    client = chat_server.client()
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(client.completions.create, model="tiny-llama3-chat", prompt=p, max_tokens=480,
                               temperature=0) for p in PROMPTS[:2]]
        times = []
        with httpx.Client(timeout=5) as health:  # one keep-alive connection, as a monitor has
            while not all(r.done() for r in running):
                t0 = time.perf_counter()
                assert health.get(chat_server.url + "/health").status_code == 200
                times.append(time.perf_counter() - t0)
                time.sleep(0.02)
        assert all(r.result().usage.completion_tokens == 480 for r in running)
    # answered again and again while the generation ran, not held until it ended: a mechanism, so it holds on a
    # busy machine too (the milliseconds are printed, not judged)
    assert len(times) >= 10, f"only {len(times)} /health calls answered during the generation"
    times.sort()
    print(f"/health during a generation, ms: median {1e3 * times[len(times) // 2]:.1f}, worst {1e3 * times[-1]:.1f}")


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "model": "gpt-4"}, 400, "gpt-4"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "word " * 2000}, 400, "context"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(stories_server, body, status, message):
    body = {"model": "stories260K-q40", **body}
    response = httpx.post(stories_server.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and set(error) >= {"message", "type", "param", "code"}
    assert complete(stories_server.client(), "Once", 4).choices[0].text


def test_load_leaves_no_slot_or_memory_behind(stories_server):
    """8 clients, 200 requests in all: no error, the slot table empty afterwards and rank 0's
    resident memory within a few MiB of where it started."""
    client, loose = stories_server.client(), stories_server.client(strict=False)
    rank0 = stories_server.pids()["0"]

    def rss_mib():
        status = Path(f"/proc/{rank0}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024

    def one(i):
        if i % 3 == 0:
            return stream_text(complete(loose, PROMPTS[i % 8], 6 + i % 5, stream=True))[0]
        return complete(client, PROMPTS[i % 8], 6 + i % 5).choices[0].text

    list(ThreadPoolExecutor(8).map(one, range(40)))  # warm: allocator pools and caches settle
    before = rss_mib()
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(200)))
    assert all(texts)
    m = stories_server.metrics()
    assert m["dllama_busy_slots"] == 0 and m["dllama_queue_length"] == 0
    grown = rss_mib() - before
    print(f"rank 0's resident memory over 200 requests: {before:.1f} -> {before + grown:.1f} MiB")
    assert grown < 8, f"rank 0 grew by {grown:.1f} MiB over 200 requests"


def test_idle_followers_take_almost_no_cpu(stories_server):
    followers = [pid for rank, pid in stories_server.pids().items() if rank != "0"]
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu_s(pid):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    time.sleep(0.5)
    before, t0 = [cpu_s(p) for p in followers], time.monotonic()
    time.sleep(3)
    used = [(cpu_s(p) - b) / (time.monotonic() - t0) for p, b in zip(followers, before)]
    print(f"idle followers: {', '.join(f'{100 * u:.1f}%' for u in used)} of a core")
    assert max(used) < 0.05, f"idle followers use {used} of a core"


def rank0_peak_rss_mib(server: Server, reset: bool = False) -> float:
    """Rank 0's peak resident memory since it started, or since the last reset (earlier tests raised it)."""
    pid = server.pids()["0"]
    if reset:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the kernel's reset of the peak to the current size
    return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def test_requests_at_the_api_limits_cost_rank_0_little_and_hold_back_no_one(chat_server):
    """Prompts of a MiB and a stop string of 900,000 characters (each inside the 1 MiB body limit) are refused
    before any work proportional to them (beyond reading and parsing them: h11 and json, about 10 ms a MiB); a request
    at the limits that runs (4 stop strings of 1000 characters, a prompt and an answer that fill the context) runs beside
    a short request sent once it streams, which finishes first. Rank 0's peak resident memory grows by a few MiB (a
    900,000-character stop string alone once took rank 0 past the OOM killer)."""
    before = rank0_peak_rss_mib(chat_server, reset=True)
    long_prompt = "Once upon a time, there was a little girl. " * 11  # about 120 of the 512 tokens
    stops = ["\u4e00" * 1000, "\u4e01" * 1000, "\u4e02" * 1000, "\u4e03" * 1000]  # never generated
    refused = [{"prompt": "Once upon a time. " * 58_000}, {"prompt": "Once", "stop": "ab" * 450_000}]

    def post(body: dict) -> httpx.Response:
        return httpx.post(chat_server.url + "/v1/completions", timeout=120,
                          json={"model": "tiny-llama3-chat", "temperature": 0, **body})

    with ThreadPoolExecutor(8) as pool:
        huge = [pool.submit(post, body) for body in refused for _ in range(3)]
        with httpx.stream("POST", chat_server.url + "/v1/completions", timeout=120,
                          json={"model": "tiny-llama3-chat", "prompt": long_prompt, "stop": stops, "max_tokens": 380,
                                "temperature": 0, "ignore_eos": True, "stream": True}) as long:
            lines = long.iter_lines()
            assert next(lines).startswith("data: {")  # its first token: it runs
            short = pool.submit(post, {"prompt": "Once", "max_tokens": 8})
            chunks_before_short_ended, events = 0, []
            for line in filter(None, lines):
                chunks_before_short_ended += line.startswith("data: {") and not short.done()
                events.append(line)
        assert short.result().status_code == 200 and short.result().json()["usage"]["completion_tokens"] == 8
        assert events[-1] == "data: [DONE]" and chunks_before_short_ended < 380, (chunks_before_short_ended, events[-1])
        for f in huge:
            r = f.result()
            assert r.status_code == 400, r.text
            assert re.search(r"the prompt is at least \d+ tokens|is 900000 characters; each may have at most 1000",
                             r.json()["error"]["message"]), r.text
    grown = rank0_peak_rss_mib(chat_server) - before
    print(f"rank 0's peak resident memory: {before:.1f} -> {before + grown:.1f} MiB; the short request ended "
          f"after {chunks_before_short_ended} of the long one's 380 chunks")
    assert grown < 48, f"rank 0's peak grew by {grown:.1f} MiB"


def test_a_client_that_leaves_a_non_streamed_answer_cancels_it(chat_server):
    """The client closes its connection while the answer is generated (nothing has been written to it yet): the
    request is counted as cancelled and its slot is free again long before its 480 tokens would have run."""
    import socket

    before = chat_server.metrics()
    body = json.dumps({"model": "tiny-llama3-chat", "prompt": "Once", "max_tokens": 480, "temperature": 0,
                       "ignore_eos": True}).encode()
    host, port = chat_server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 60
        while chat_server.metrics()["dllama_busy_slots"] < 1:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
    deadline = time.monotonic() + 60  # a hang catcher: it takes a step or two
    while (m := chat_server.metrics())["dllama_busy_slots"] != 0:
        assert time.monotonic() < deadline, "the slot of a client that left is still busy"
        time.sleep(0.02)
    assert m["dllama_cancelled_requests_total"] == before["dllama_cancelled_requests_total"] + 1
    generated = m["dllama_generated_tokens_total"] - before["dllama_generated_tokens_total"]
    assert generated < 480, f"the request ran all its {generated} tokens after its client left"


# ---------------------------------------------------------------------------- chat


def test_chat_streams_the_same_text_and_reuses_the_conversation(chat_server, llama3_chat):
    client = chat_server.client()
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there!"}]
    first = client.chat.completions.create(model="tiny-llama3-chat", messages=messages, max_tokens=12, temperature=0)
    answer = first.choices[0].message.content
    assert first.choices[0].message.role == "assistant" and answer
    chunks = list(client.chat.completions.create(model="tiny-llama3-chat", messages=messages, max_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])

    # the second turn prefills only what is new, and writes what a cold run writes
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="tiny-llama3-chat", messages=messages, max_tokens=12, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens, (cached, first.usage.prompt_tokens)
    assert second.choices[0].message.content == cold_chat_answer(llama3_chat, messages, 12)


def cold_chat_answer(model: Path, messages, max_tokens) -> str:
    """The greedy answer of a fresh one-rank job (no cache to reuse), in this process."""
    from dllama_mpi.job.loading import open_job
    from dllama_mpi.parallel.comm import self_comm
    from dllama_mpi.serving import templates
    from dllama_mpi.serving.scheduler import generate

    job = open_job(self_comm(), model, (1,), max_seq_len=256)
    return generate(job, templates.prompt_ids(job.tokenizer, messages), max_tokens)["text"]


def test_special_token_text_typed_by_a_user_stays_text(chat_server, llama3_chat):
    from dllama_mpi.serving import templates

    messages = [{"role": "user", "content": "a <|eot_id|> b"}]
    got = chat_server.client().chat.completions.create(model="tiny-llama3-chat", max_tokens=1, temperature=0,
                                                       messages=messages)
    tokenizer = model_tokenizer(llama3_chat)
    ids = templates.prompt_ids(tokenizer, messages)
    assert got.usage.prompt_tokens == len(ids)
    without = templates.prompt_ids(tokenizer, [{"role": "user", "content": "a  b"}])
    # the template's own <|eot_id|> (after the system and the user message) and BOS only
    assert ids.count(128009) == without.count(128009) == 2 and ids.count(128000) == 1


def test_a_model_without_a_template_refuses_chat(stories_server):
    with pytest.raises(openai.BadRequestError) as refused:
        stories_server.client().chat.completions.create(model="stories260K-q40", max_tokens=4,
                                                        messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in str(refused.value)


# ------------------------------------------------------------------ safety and ends


def test_api_key_is_required_when_set(stories):
    server = Server(2, stories, "--api-key", "sesame")
    try:
        with pytest.raises(openai.AuthenticationError):
            complete(server.client(api_key="wrong"), "Once", 4)
        assert complete(server.client(api_key="sesame"), "Once", 4).choices[0].text
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("where", ["option", "environment"])
def test_an_api_key_with_spaces_is_refused_at_start(stories, where):
    """A key with a space around it could never match the header a client sends: refused before loading, and the key,
    a secret, is not printed."""
    key = " sesame\n"
    args, env = (["--api-key", key], None) if where == "option" else ([], {**os.environ, "DLLAMA_API_KEY": key})
    result = run_mpiexec(2, [sys.executable, "-m", "dllama_mpi", "serve", "--model", str(stories), "--port", "0", *args],
                         timeout=60, env=env)
    assert_refused(result, "--api-key (or $DLLAMA_API_KEY) holds spaces or characters other than printable ASCII "
                           "(8 characters)")
    assert "sesame" not in result.stderr and "loading the weights" not in result.stderr


def test_sigterm_ends_streams_and_exits_zero(stories):
    server = Server(2, stories)
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"model": "stories260K-q40", "prompt": "Once", "max_tokens": 450, "temperature": 0,
                            "stream": True}) as response:
        lines = response.iter_lines()
        next(lines)
        code = server.stop()  # fails the test if the job is not over within 20 s of SIGTERM: a hang catcher
        rest = list(lines)
    assert code == 0, "".join(server.stderr)
    assert rest and rest[-1] in ("data: [DONE]", "") or any("error" in line for line in rest), rest


def test_a_dead_rank_ends_the_job_and_closes_connections(llama3_chat):
    server = Server(3, llama3_chat)  # its 128k vocabulary makes a generation last long enough to kill a rank during it
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(server.client().completions.create, model="tiny-llama3-chat", prompt="Once",
                              max_tokens=480, temperature=0)
        time.sleep(0.5)
        assert not running.done()
        os.kill(server.pids()["2"], signal.SIGKILL)
        with pytest.raises((openai.APIConnectionError, openai.APIError)):
            running.result(timeout=30)
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        pytest.fail("the job went on after one of its ranks died")
    assert_no_survivors(server.mark, "the server after a rank died")
    assert server.proc.returncode != 0


# ------------------------------------------------------------------------ commands


def test_chat_command_holds_a_conversation_on_the_terminal(llama3_chat):
    result = run_mpiexec(2, [sys.executable, "-m", "dllama_mpi", "chat", "--model", str(llama3_chat), "--steps", "6",
                             "--system", "You are terse."], timeout=120, input="Hello there!\nAnd then?\n/exit\n")
    assert result.returncode == 0, result.stderr
    first = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there!"}]
    answer = cold_chat_answer(llama3_chat, first, 6)
    second = cold_chat_answer(llama3_chat, first + [{"role": "assistant", "content": answer},
                                                    {"role": "user", "content": "And then?"}], 6)
    # piped in, each message is echoed after its prompt, and each answer's speed follows on stderr
    assert result.stdout == f"> Hello there!\n{answer}\n> And then?\n{second}\n> /exit\n", result.stdout
    speeds = [line for line in result.stderr.splitlines() if line.startswith("prompt: ")]
    assert len(speeds) == 2 and "cached)" not in speeds[0] and "cached) in " in speeds[1], result.stderr
    assert all(re.search(r"; decode: 6 tokens, [0-9.]+ tokens/s$", line) for line in speeds), speeds
    assert "Traceback" not in result.stderr


def test_chat_refuses_a_model_without_a_template_before_loading(stories):
    result = run_mpiexec(2, [sys.executable, "-m", "dllama_mpi", "chat", "--model", str(stories)], timeout=60, input="")
    assert_refused(result, "this model has no chat template")
    assert "loading the weights" not in result.stderr


def test_serve_refuses_a_taken_port_before_loading(stories):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_mpiexec(2, [sys.executable, "-m", "dllama_mpi", "serve", "--model", str(stories),
                                 "--port", str(port)], timeout=60)
    assert_refused(result, f"cannot listen on 127.0.0.1:{port}")
