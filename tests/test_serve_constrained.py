"""`serve` with response_format (constrained output), through the official openai client with strict
validation, on a tiny random model with Llama 3's real 128k vocabulary and Llama 3.1's template:
random weights at temperature 1 make the most of every freedom a schema leaves, so an answer
that validates is the grammar's doing."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest
from test_constraints import PERSON as KID
from test_serve import Server

pytestmark = pytest.mark.serve

PET = {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
                                        "required": ["kind"], "additionalProperties": False}]}
# test_constraints' person, with an optional-shaped pet: every freedom bounded, so even random weights end
PERSON = {**KID, "properties": {**KID["properties"], "pet": PET}, "required": [*KID["required"], "pet"]}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
PLAIN = [[{"role": "user", "content": "Hello there"}], [{"role": "user", "content": "Tell me a story"}]]


@pytest.fixture(scope="module")
def server(llama3_chat):
    server = Server(2, llama3_chat, "--slots", "4", "--memory-budget", "2", "1")
    yield server
    assert server.stop() == 0, "".join(server.stderr)


def greedy_text(client: openai.OpenAI, messages) -> str:
    reply = client.chat.completions.create(model=None, messages=messages, max_tokens=40, temperature=0)
    return reply.choices[0].message.content


def test_twenty_schema_answers_at_temperature_1_validate_while_greedy_neighbours_keep_their_text(server):
    client = server.client()
    alone = [greedy_text(client, m) for m in PLAIN]

    def constrained(seed: int):
        return client.chat.completions.create(model=None, messages=ASK, max_tokens=200, temperature=1, seed=seed,
                                              response_format=FORMAT)

    with ThreadPoolExecutor(8) as pool:
        plain = [pool.submit(greedy_text, client, m) for m in PLAIN]
        replies = list(pool.map(constrained, range(20)))
        assert [f.result() for f in plain] == alone
    for reply in replies:
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    assert len({r.choices[0].message.content for r in replies}) > 10  # sampled, not one answer


def test_a_streamed_json_object_parses(server):
    stream = server.client(strict=False).chat.completions.create(
        model=None, messages=ASK, max_tokens=300, temperature=1, seed=7, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "list", "schema": {
            "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 5}}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    values = json.loads(text)
    assert 1 <= len(values) <= 5 and all(0 <= v <= 9 for v in values)


def test_the_clients_pydantic_parse_gets_its_type(server):
    """openai's `chat.completions.parse` sends the model class as a strict json_schema and parses the answer into it."""

    class Pet(pydantic.BaseModel):
        kind: Literal["cat", "dog", "bird"]
        legs: int = pydantic.Field(ge=0, le=8)

    reply = server.client().chat.completions.parse(model=None, messages=ASK, max_tokens=300, temperature=1, seed=3,
                                                   response_format=Pet)
    assert isinstance(reply.choices[0].message.parsed, Pet)


def test_a_schema_that_cannot_be_enforced_is_a_400_naming_the_field(server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model=None, messages=ASK, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {"a": {"$ref": "#/$defs/missing"}}}}})
    error = caught.value.body
    assert error["param"] == "response_format" and "can't be enforced" in error["message"], error
