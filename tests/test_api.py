"""The HTTP API (dllama_mpi.serving.api) against a fake backend, through the official openai client with strict response
validation: what a real client sees, with no MPI and no model."""

from __future__ import annotations

import codecs
import json
import threading
import time

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dllama_mpi.errors import InputError
from dllama_mpi.serving.api import Server, make_app
from dllama_mpi.serving.metrics import Metrics
from dllama_mpi.serving.request import Failed, Finished, GenRequest, Piece, Refused, TokenLogprob, check_prompt_text

KEY = "sk-test"
MODEL = "fake-model"
REPLY = "Hello, wörld! ★"  # 18 bytes, one token each: "ö" and "★" span tokens, as real tokens may split characters


class FakeTokenizer:
    """Byte-level: token 3 + b is the byte b; 0..2 are <unk>, BOS and EOS."""

    bos_id, eos_ids, vocab_size, chat_template = 1, (2,), 259, "fake"

    def encode(self, text: str, bos: bool = True, special: bool = False) -> list[int]:
        return [self.bos_id] * bos + [3 + b for b in text.encode()]

    def decode(self, prev_token: int, token: int) -> bytes:
        return bytes([token - 3]) if token >= 3 else b""

    def min_tokens(self, text: str) -> int:
        return len(text.encode())


def fake_prompt_ids(tokenizer: FakeTokenizer, messages: list[dict], add_generation_prompt: bool = True,
                    max_seq_len: int | None = None, tools: list[dict] | None = None) -> list[int]:
    """chat.prompt_ids' stand-in: a template error for the content "raise", else the messages as `role: text` lines."""
    lines = []
    for m in messages:
        text = m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
        if text == "raise":
            raise InputError("the chat template raised: no such role")
        lines.append(f"{m['role']}: {text}\n")
    if max_seq_len is not None:
        check_prompt_text(tokenizer, "".join(lines), max_seq_len, "shorten the conversation")
    return tokenizer.encode("".join(lines))


class FakeBackend:
    """Answers every request with REPLY's bytes as tokens, on a thread of its own as the scheduler would; the last token's
    text is held back into Finished.text, as a possible stop string would be."""

    model_id, max_seq_len = MODEL, 64

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.ready = threading.Event()
        self.ready.set()
        self.metrics = Metrics()
        self.requests: list[GenRequest] = []
        self.delay = 0.0  # seconds per token
        self.repeat = 1  # times REPLY is generated over (a long answer)
        self.failing = False  # fail after the first token, as at a shutdown
        self.full: Refused | None = None  # refusal()'s answer: the queue is full
        self.expiring: Refused | None = None  # every request ends with this before a token, as at a queue timeout

    def slot_count(self) -> int:
        return 2

    def refusal(self) -> Refused | None:
        return self.full

    def slots_state(self) -> dict:
        return {"slots": [{"id": 0, "state": "idle"}], "queue": {"length": 0, "limit": 4}}

    def submit(self, req: GenRequest) -> None:
        self.requests.append(req)
        if self.expiring is not None:
            threading.Timer(0.2, req.emit, (self.expiring,)).start()
            return
        threading.Thread(target=self._generate, args=(req,), daemon=True).start()

    def _generate(self, req: GenRequest) -> None:
        script = [3 + b for b in REPLY.encode()] * self.repeat
        n = len(script) if req.max_tokens is None else min(req.max_tokens, len(script))
        decoder = codecs.getincrementaldecoder("utf-8")()
        held = ""
        for i, token in enumerate(script[:n]):
            time.sleep(self.delay)
            if req.cancelled.is_set() or (self.failing and i):
                req.emit(Failed("the request was cancelled" if req.cancelled.is_set() else "the server is shutting down"))
                return
            text = decoder.decode(bytes([token - 3]))
            if i == n - 1:
                held, text = text, ""
            top = tuple((token + 256 * j, -0.5 - j) for j in range(req.logprobs or 0))  # j >= 1: past the vocabulary
            req.emit(Piece(token, text, None if req.logprobs is None else TokenLogprob(token, -0.5, top)))
        fin = Finished("length" if n < len(script) else "stop", held, len(req.prompt_ids), 1, n, 0.01, 0.02)
        self.metrics.finished(fin)
        req.emit(fin)


@pytest.fixture(scope="module", autouse=True)
def fake_chat():
    """chat.prompt_ids replaced by the fake: these tests are about HTTP, not templates."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dllama_mpi.serving.templates.prompt_ids", fake_prompt_ids)
        yield


@pytest.fixture(scope="module")
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture(scope="module")
def served(backend):
    """(base URL, Server) of the app served on a free port."""
    server = Server(make_app(backend, api_key=KEY), "127.0.0.1", 0)
    server.start()
    yield f"http://127.0.0.1:{server.port}", server
    server.stop()


@pytest.fixture(scope="module")
def url(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, _strict_response_validation=True)


@pytest.fixture(scope="module")
def http(url):
    with httpx2.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as c:
        yield c


HI = [{"role": "user", "content": "hi"}]


def test_chat_stream_says_what_the_whole_answer_says(client):
    whole = client.chat.completions.create(model=MODEL, messages=HI)
    choice = whole.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", REPLY, "stop")
    prompt_len = len(fake_prompt_ids(FakeTokenizer(), HI))
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (prompt_len, 18, prompt_len + 18)
    assert whole.usage.prompt_tokens_details.cached_tokens == 1
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion" and whole.model == MODEL

    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, stream=True))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert (chunks[0].choices[0].delta.role, chunks[0].choices[0].delta.content) == ("assistant", "")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert all(c.usage is None for c in chunks)


def test_include_usage_adds_a_last_chunk_with_no_choices(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HI, max_completion_tokens=3, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )
    *content, last = chunks
    assert last.choices == [] and (last.usage.completion_tokens, last.usage.prompt_tokens_details.cached_tokens) == (3, 1)
    assert all(c.usage is None and len(c.choices) == 1 for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content) == "Hel"
    assert content[-1].choices[0].finish_reason == "length"  # max_completion_tokens won over max_tokens


def test_completions_stream_and_whole_agree(client):
    whole = client.completions.create(model=MODEL, prompt="Once")  # max_tokens defaults to 16, as OpenAI's
    expected = REPLY.encode()[:16].decode(errors="ignore")
    assert (whole.choices[0].text, whole.choices[0].finish_reason, whole.object) == (expected, "length", "text_completion")
    assert whole.id.startswith("cmpl-") and whole.usage.prompt_tokens == 5 and whole.usage.completion_tokens == 16

    # not strict: the SDK types a completion choice's finish_reason as always set, but in a stream's chunks it is null
    # until the last (as OpenAI and vLLM send it), which strict validation refuses
    loose = openai.OpenAI(base_url=str(client.base_url), api_key=KEY, max_retries=0)
    chunks = list(loose.completions.create(model=MODEL, prompt=[1, 80], max_tokens=None, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == REPLY
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert client.completions.create(model=MODEL, prompt=["Once"], max_tokens=2).choices[0].text == "He"


def test_tools_declined_are_answered_by_a_template_without_them(client):
    """The fake's template shows no tools: offered, they are a 400 (the table above); declined, the chat is answered."""
    tools = [{"type": "function", "function": {"name": "f"}}]
    reply = client.chat.completions.create(model=MODEL, messages=HI, tools=tools, tool_choice="none")
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (REPLY, "stop")


def test_chat_logprobs(client, backend):
    whole = client.chat.completions.create(model=MODEL, messages=HI, logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert b"".join(bytes(t.bytes) for t in content) == REPLY.encode()
    assert (content[0].token, content[0].logprob, [t.token for t in content[0].top_logprobs]) == ("H", -0.5, ["H", ""])
    assert content[-1].token == "\ufffd"  # the last byte of "★" alone: decoded leniently
    assert content[0].top_logprobs[1].bytes == []  # a token id past the vocabulary (padding rows) has no text
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == content
    assert backend.requests[-1].logprobs == 2
    assert client.chat.completions.create(model=MODEL, messages=HI).choices[0].logprobs is None


def test_completion_logprobs(client):
    lp = client.completions.create(model=MODEL, prompt="x", logprobs=1, max_tokens=9).choices[0].logprobs
    assert lp.tokens == ["H", "e", "l", "l", "o", ",", " ", "w", "\ufffd"]
    assert lp.token_logprobs == [-0.5] * 9 and lp.top_logprobs[0] == {"H": -0.5}
    assert lp.text_offset == list(range(9))


def test_ignore_eos_drops_the_end_of_generation_tokens(http, backend):
    http.post("/v1/completions", json={"prompt": [1, 80], "max_tokens": 2, "ignore_eos": True}).raise_for_status()
    assert backend.requests[-1].stop_ids == ()
    http.post("/v1/chat/completions", json={"messages": HI, "ignore_eos": True}).raise_for_status()
    assert backend.requests[-1].stop_ids == ()
    http.post("/v1/chat/completions", json={"messages": HI}).raise_for_status()
    assert backend.requests[-1].stop_ids is None  # the model's


def test_text_parts_and_template_errors(http):
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": parts})
    assert r.json()["choices"][0]["message"]["content"] == REPLY
    bad = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "raise"}]})
    assert bad.status_code == 400 and bad.json()["error"]["message"] == "the chat template raised: no such role"


CHAT = {"model": MODEL, "messages": HI}
IMAGE = {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
BAD_REQUESTS = {  # name: (path, body, status, param, words the message must hold)
    "n": ("/v1/chat/completions", {**CHAT, "n": 2}, 400, "n", "n > 1 is not supported"),
    "model": ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 400, "model", "'gpt-4' is not served"),
    "type": (
        "/v1/chat/completions",
        {**CHAT, "temperature": "hot"},
        400,
        "temperature",
        "temperature: Input should be a valid number",
    ),
    "range": ("/v1/chat/completions", {**CHAT, "top_p": 0}, 400, "top_p", "top_p: Input should be greater than 0"),
    "top_logprobs": ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, 400, "top_logprobs", "top_logprobs needs logprobs"),
    "stop": ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop",
             "stop: 5 stop strings were given; at most 4: drop some"),
    "no messages": ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "messages: Field required"),
    "image": ("/v1/chat/completions", IMAGE, 400, "messages[0].content", "messages[0].content: must be a string or a list of text"),
    "penalty": (
        "/v1/chat/completions",
        {**CHAT, "presence_penalty": 0.5},
        400,
        "presence_penalty",
        "presence_penalty is not supported",
    ),
    "functions": ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, 400, "functions",
                  "functions (OpenAI's deprecated function calling) is not supported: send tools instead"),
    "tools on completions": ("/v1/completions", {"prompt": "a", "tools": [{"type": "function", "function": {"name": "f"}}]},
                             400, "tools", "tools is taken by /v1/chat/completions only"),
    "forced call ignoring eos": ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
                                                          "tool_choice": "required", "ignore_eos": True},
                                 400, "tool_choice", "ignore_eos can't go with a forced call"),
    "tools without support": ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
                              400, "tools", "the model's chat template does not support tools"),
    "schema missing": ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format",
                       "response_format: type 'json_schema' goes with json_schema"),
    "format ignoring eos": ("/v1/completions", {"prompt": "a", "response_format": {"type": "json_object"}, "ignore_eos": True},
                            400, "ignore_eos", "ignore_eos can't go with a response_format"),
    "bad format": ("/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, 400, "response_format.type",
                   "Input should be 'text', 'json_object' or 'json_schema'"),
    "best_of": ("/v1/completions", {"prompt": "a", "best_of": 3}, 400, "best_of", "best_of > 1 is not supported"),
    "surrogate": ("/v1/completions", {"prompt": "a\udc80"}, 400, "prompt", "not valid UTF-8"),
    "surrogate message": ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\udc80"}]}, 400,
                          "messages[0].content", "not valid UTF-8"),
    "too long": ("/v1/completions", {"prompt": "x" * 100}, 400, "prompt",
                 "the prompt is at least 100 tokens (100 bytes) but the context holds 64; shorten it"),
    "too long chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 100}]}, 400, "messages",
                      "the prompt is at least 107 tokens (107 bytes) but the context holds 64; shorten the conversation"),
    "too many ids": ("/v1/completions", {"prompt": [3] * 65}, 400, "prompt", "the prompt is 65 tokens but the context holds 64"),
    "empty ids": ("/v1/completions", {"prompt": []}, 400, "prompt", "the prompt is empty (no tokens); give at least one"),
    "stop length": ("/v1/completions", {"prompt": "a", "stop": ["a", "x" * 1001]}, 400, "stop",
                    "stop: stop string 2 of 2 is 1001 characters; each may have at most 1000: shorten it"),
    "id range": ("/v1/completions", {"prompt": [1, 999]}, 400, "prompt", "token id 999 is outside the vocabulary"),
    "batch": ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "exactly one"),
    "echo": ("/v1/completions", {"prompt": "a", "echo": True}, 400, "echo", "echo is not supported"),
    "logprobs": (
        "/v1/completions",
        {"prompt": "a", "logprobs": 6},
        400,
        "logprobs",
        "logprobs: Input should be less than or equal to 5",
    ),
    "route": ("/v1/embeddings", {"input": "a"}, 404, None, "Not Found"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_are_answered_in_openai_shape(http, name):
    path, body, status, param, words = BAD_REQUESTS[name]
    # json.dumps escapes lone surrogates (\udc80) as JSON allows; a client encoding UTF-8 could not send them
    r = http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    error = r.json()["error"]
    assert (r.status_code, error["type"], error["param"]) == (status, "invalid_request_error", param) and words in error[
        "message"
    ], error
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_oversized_and_unauthorized_requests(url, http, client):
    def post(**kw):
        return httpx2.post(f"{url}/v1/chat/completions", **{"headers": {"Authorization": f"Bearer {KEY}"}, **kw})

    r = post(content=b'{"messages": [', headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    big = b'{"messages": [], "pad": "' + b"x" * 2**20 + b'"}'
    r = post(content=big)
    assert r.status_code == 413 and "over the limit of 1048576 bytes" in r.json()["error"]["message"]
    r = post(content=iter([big[:600_000], big[600_000:]]))  # sent in chunks: no Content-Length
    assert r.status_code == 413
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx2.get(f"{url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx2.get(f"{url}/metrics").status_code == 401
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert client.chat.completions.create(model=MODEL, messages=HI).choices[0].message.content == REPLY  # still serving


def test_health_while_loading_and_shutting_down(served, http, backend, client):
    url, server = served
    backend.ready.clear()
    try:
        assert (httpx2.get(f"{url}/health").status_code, httpx2.get(f"{url}/health").json()) == (503, {"status": "loading"})
        r = http.get("/v1/models")
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"] and r.json()["error"]["type"] == "server_error"
    finally:
        backend.ready.set()
    assert httpx2.get(f"{url}/health").json() == {"status": "ok", "slots": 2}
    assert [m.id for m in client.models.list()] == [MODEL]
    server.refuse_new()
    try:
        assert httpx2.get(f"{url}/health").status_code == 503
        r = http.post("/v1/completions", json={"prompt": "a"})
        assert r.status_code == 503 and r.json()["error"]["message"] == "the server is shutting down"
    finally:
        server.app.state.shutting_down = False


def test_metrics(http, backend, client):
    client.completions.create(model=MODEL, prompt="a", max_tokens=4)
    http.post("/v1/completions", json={"prompt": "a", "n": 3})
    backend.metrics.set_load(1, 2, 4)
    backend.metrics.set_rank_times([1.5, 2.0], [0.5, 0.25])
    r = http.get("/metrics")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    assert samples[("dllama_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] >= 1
    assert samples[("dllama_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))] >= 1
    assert samples[("dllama_generated_tokens_total", ())] >= 4
    assert samples[("dllama_time_per_output_token_seconds_count", ())] >= 1
    assert samples[("dllama_busy_slots", ())] == 2 and samples[("dllama_rank_collective_seconds", (("rank", "1"),))] == 0.25


def test_a_client_that_leaves_cancels_its_request(url, client, backend):
    backend.delay = 0.2  # 18 tokens: 3.6 s unless cancelled
    try:
        stream = client.chat.completions.create(model=MODEL, messages=HI, stream=True)
        next(stream), next(stream)  # the opening chunk and the first token's
        stream.close()
        req = backend.requests[-1]
        assert req.cancelled.wait(2)

        with pytest.raises(httpx2.ReadTimeout):
            httpx2.post(f"{url}/v1/completions", json={"prompt": "a"}, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
        assert backend.requests[-1] is not req and backend.requests[-1].cancelled.wait(2)
    finally:
        backend.delay = 0.0
    finished = client.chat.completions.create(model=MODEL, messages=HI)
    assert finished.choices[0].message.content == REPLY and not backend.requests[-1].cancelled.is_set()


def test_a_failure_is_an_error_answer_or_a_last_error_event(client, backend):
    backend.failing = True
    try:
        with pytest.raises(openai.InternalServerError, match="shutting down") as caught:
            client.chat.completions.create(model=MODEL, messages=HI)
        assert caught.value.status_code == 503
        stream = client.chat.completions.create(model=MODEL, messages=HI, stream=True)
        with pytest.raises(openai.APIError, match="shutting down"):
            list(stream)
    finally:
        backend.failing = False


def test_a_full_queue_is_a_429_before_the_body_is_read_and_a_queue_timeout_one_before_any_chunk(url, http, client,
                                                                                                 backend):
    """A full queue (the backend's refusal()): 429 in OpenAI's rate-limit shape with Retry-After, on both generating
    endpoints, the body not even read (an invalid one gets it too); the openai client raises RateLimitError. A request
    refused once submitted (a queue timeout) gets the same 429 streamed or not: a stream's headers wait for its first
    event. Other endpoints answer meanwhile."""
    backend.full = Refused("the queue is full: try later", 3)
    try:
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = http.post(path, content=b"{not json")
            assert r.status_code == 429 and r.headers["retry-after"] == "3"
            assert r.json() == {"error": {"message": "the queue is full: try later", "type": "requests", "param": None,
                                          "code": "rate_limit_exceeded"}}
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            client.chat.completions.create(model=MODEL, messages=HI)
        assert http.get("/v1/models").status_code == 200 and http.get("/slots").status_code == 200
    finally:
        backend.full = None
    backend.expiring = Refused("no slot within 0.1 s", 1)
    try:
        for stream in (False, True):
            r = http.post("/v1/completions", json={"prompt": "a", "stream": stream})
            assert (r.status_code, r.headers["retry-after"], r.json()["error"]["message"]) == (429, "1", "no slot within 0.1 s")
    finally:
        backend.expiring = None
    assert client.chat.completions.create(model=MODEL, messages=HI).choices[0].message.content == REPLY


def test_slots_wants_the_key_and_gives_the_backends_state(url, http, client, backend):
    """/slots behind the key; each submitted request carries its response's id, which /slots shows."""
    assert httpx2.get(f"{url}/slots").status_code == 401
    assert http.get("/slots").json() == {"slots": [{"id": 0, "state": "idle"}], "queue": {"length": 0, "limit": 4}}
    reply = client.completions.create(model=MODEL, prompt="a", max_tokens=2)
    assert reply.id.startswith("cmpl-") and backend.requests[-1].request_id == reply.id


def test_server_start_fails_on_a_taken_port(served):
    url, server = served
    taken = Server(server.app, "127.0.0.1", int(url.rsplit(":", 1)[1]))
    with pytest.raises(OSError, match="in use"):
        taken.start()
    taken.stop()


def test_a_non_streamed_client_that_leaves_mid_generation_frees_its_slot(url, backend):
    """Tokens coming faster than the disconnect poll must not hide that the client left: a
    non-streamed answer writes nothing that could fail until the end."""
    backend.delay, backend.repeat = 0.01, 1000  # a token every 10 ms, 18,000 of them: minutes unless cancelled
    before = len(backend.requests)
    try:
        with pytest.raises(httpx2.ReadTimeout):
            httpx2.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": None},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
        req = backend.requests[before]
        assert req.cancelled.wait(30)  # a hang catcher: it takes 0.1 s
    finally:
        backend.delay, backend.repeat = 0.0, 1


def test_a_body_is_json_whatever_its_content_type(url):
    body = json.dumps({"prompt": "a", "max_tokens": 2}).encode()
    for headers in ({}, {"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"}):
        r = httpx2.post(f"{url}/v1/completions", content=body, headers={"Authorization": f"Bearer {KEY}", **headers})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == REPLY[:2], (headers, r.text)


def test_head_health(url):
    r = httpx2.head(f"{url}/health")
    assert (r.status_code, r.content) == (200, b"")


def test_slow_or_too_many_connections_are_answered_and_closed(backend):
    """Headers trickled in past the header timeout: 408 and closed; a body past the body
    timeout: 408; a connection beyond the limit: 503 in OpenAI's shape; the server serves on."""
    import socket

    def connect(server: Server) -> socket.socket:
        return socket.create_connection(("127.0.0.1", server.port), timeout=30)

    def answer(sock: socket.socket) -> bytes:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data

    server = Server(make_app(backend, body_timeout_s=0.5), "127.0.0.1", 0, header_timeout_s=0.5)
    server.start()
    try:
        slow = connect(server)
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest of the headers
        reply = answer(slow)  # the server closes it: the client would wait 30 s
        assert reply.startswith(b"HTTP/1.1 408") and b"headers did not arrive within 0.5 s" in reply

        slow_body = connect(server)
        slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        reply = answer(slow_body)
        assert reply.startswith(b"HTTP/1.1 408") and b"body did not arrive within 0.5 s (Content-Length said 100 bytes, " \
            b"11 arrived); send the whole body at once" in reply
    finally:
        server.stop()

    server = Server(make_app(backend), "127.0.0.1", 0, max_connections=3)  # headers may take 10 s here
    server.start()
    try:
        held = [connect(server) for _ in range(3)]  # the limit: these three wait for their headers
        extra = connect(server)
        reply = answer(extra)
        assert reply.startswith(b"HTTP/1.1 503") and json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["message"] == \
            "the server has 3 connections open, its limit; try again shortly"
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 30  # until the server has seen them close
        while (r := httpx2.post(f"http://127.0.0.1:{server.port}/v1/completions", json={"prompt": "a", "max_tokens": 1})
               ).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.status_code == 200
    finally:
        server.stop()
