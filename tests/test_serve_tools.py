"""Tool calls through `serve` under mpiexec, driven by the official `openai` client with strict response
validation: a call forced by tool_choice (the grammar makes a random model's call well-formed), whole and
streamed, its result sent back for a final answer; a template that can't show tools refused."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from test_serve import Server

pytestmark = pytest.mark.serve

MODEL = "tiny-llama3-chat"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon", "Nice"]}}, "required": ["city"],
                   "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time now."}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model(llama3_chat) -> Path:
    return llama3_chat


@pytest.fixture(scope="module")
def server(model):
    server = Server(2, model, "--slots", "2")
    yield server
    assert server.stop() == 0, "".join(server.stderr)


def ask_weather(client: openai.OpenAI, **kw):
    return client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], max_tokens=40, temperature=0,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}}, **kw)


def test_a_forced_call_round_trip_whole_and_streamed(server, model):
    client = server.client()
    got = ask_weather(client)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"} and arguments["city"] in ("Paris", "Lyon", "Nice"), arguments

    chunks = list(ask_weather(client, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(not c.choices[0].delta.content for c in chunks), "a call's text is never content"
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
    assert [(d.index, d.type, d.function.name, d.function.arguments) for d in deltas] == \
        [(0, "function", "get_weather", call.function.arguments)]
    assert deltas[0].id.startswith("call_") and deltas[0].id != call.id
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["tool_calls"]

    # "required": a call to any of the tools, each within its schema
    required = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required",
                                              max_tokens=40, temperature=1, seed=5)
    [any_call] = required.choices[0].message.tool_calls
    assert required.choices[0].finish_reason == "tool_calls"
    assert (any_call.function.name, json.loads(any_call.function.arguments)) in \
        [("now", {}), *(("get_weather", {"city": city}) for city in ("Paris", "Lyon", "Nice"))]

    # the call and its result go back; the answer is what a cold run gives for that conversation
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, CLOCK], max_tokens=8,
                                           temperature=0)
    prompt_tokens, text = cold_answer(model, messages, [WEATHER, CLOCK], 8)
    assert final.usage.prompt_tokens == prompt_tokens
    assert final.choices[0].finish_reason == "length" and final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content == text


def cold_answer(model: Path, messages: list[dict], tools: list[dict], max_tokens: int) -> tuple[int, str]:
    """(prompt tokens, greedy answer) of a fresh one-rank job in this process, the calls rendered as the template
    writes them."""
    from dllama_mpi.job.loading import open_job
    from dllama_mpi.parallel.comm import self_comm
    from dllama_mpi.serving import templates
    from dllama_mpi.serving.scheduler import generate

    job = open_job(self_comm(), model, (1,), max_seq_len=512)
    ids = templates.prompt_ids(job.tokenizer, messages, tools=tools)
    return len(ids), generate(job, ids, max_tokens)["text"]


def test_tool_choice_none_renders_no_tools(server):
    client = server.client()
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0)
    offered = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=4, temperature=0)
    declined = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                              max_tokens=4, temperature=0)
    assert declined.usage.prompt_tokens == plain.usage.prompt_tokens < offered.usage.prompt_tokens
    assert declined.choices[0].message.content == plain.choices[0].message.content
