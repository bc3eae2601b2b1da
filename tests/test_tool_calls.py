"""Tool calls: OpenAI's tools rendered by real chat templates as transformers renders them, the model's
answers read back into calls whole and streamed (split anywhere), the grammars that force calls
checked against the templates' own rendering of a call, and the requests refused.

The templates are Llama 3.1's and Qwen2.5-Coder's (tests/data/chat_templates, see the README there).
"""

from __future__ import annotations

import copy
import json
import random

import llguidance
import numpy as np
import pytest
from pydantic import ValidationError
from test_chat import LLAMA31, LLAMA32, MISTRAL, hf_tokenizer, template
from test_llamacpp_vocab import load
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models

from dllama_mpi.errors import InputError
from dllama_mpi.serving import templates
from dllama_mpi.serving.constraints import Grammar
from dllama_mpi.serving.protocol import ChatRequest
from dllama_mpi.serving.templates import ChatTemplateError
from dllama_mpi.serving.tool_calls import HERMES, LLAMA_JSON, CallReader, ToolCall, format_of

QWEN_CODER = "Qwen-Qwen2.5-7B-Instruct"  # Qwen2.5-Coder-0.5B-Instruct's GGUF carries the same bytes
SPECIALS = {LLAMA31: ("<|begin_of_text|>", "<|eot_id|>"), QWEN_CODER: (None, "<|im_end|>")}
# where each template writes an assistant's message (the call), and what ends it
ASSISTANT = {LLAMA31: ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
             QWEN_CODER: ("<|im_start|>assistant\n", "<|im_end|>")}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city <b>&",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now"}}  # no parameters: an empty object of arguments
TOOLS = [WEATHER, CLOCK]
NAMES = frozenset({"get_weather", "now"})


def call(name: str, arguments: dict, id: str = "call_1") -> dict:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def conversation(name: str) -> list[dict]:
    """A system prompt, a question, the assistant's calls (Llama's template takes one per message), their results and
    the answer; arguments as OpenAI sends them, JSON text."""
    calls = [call("get_weather", {"city": "Paris", "unit": "C"}, "call_1")]
    results = [{"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    if name == QWEN_CODER:
        calls.append(call("now", {}, "call_2"))
        results.append({"role": "tool", "tool_call_id": "call_2", "content": "12:00"})
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris, and the time?"},
            {"role": "assistant", "content": None, "tool_calls": calls}, *results,
            {"role": "assistant", "content": "21 °C at noon."}]


def with_argument_objects(messages: list[dict]) -> list[dict]:
    """What transformers is given (as vLLM gives it): each call's arguments as the object."""
    out = copy.deepcopy(messages)
    for message in out:
        for c in message.get("tool_calls") or ():
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return out


@pytest.fixture(scope="module")
def tiny_raw() -> RawTokenizer:
    return RawTokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))


def hf_render(raw, name: str, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None) -> str:
    return hf_tokenizer(raw, *SPECIALS[name]).apply_chat_template(
        messages, chat_template=template(name), tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", [LLAMA31, QWEN_CODER])
def test_tools_and_calls_render_as_transformers_renders_them(tiny_raw, name, add_generation_prompt) -> None:
    messages = conversation(name)
    bos, eos = SPECIALS[name]
    for ask in (messages[:2], messages):  # tools offered; then the calls, their results and the answer
        ours = templates.render(template(name), ask, bos_token=bos, eos_token=eos,
                                add_generation_prompt=add_generation_prompt, tools=TOOLS)
        assert ours == hf_render(tiny_raw, name, with_argument_objects(ask), add_generation_prompt, TOOLS)
        assert '"description": "The weather now in a city <b>&"' in ours  # the tools are shown, unescaped
    assert '{"name": "get_weather", ' in ours and '"city": "Paris", "unit": "C"}' in ours and "temperature" in ours


def test_a_call_as_the_template_writes_it_is_what_the_grammar_forces_and_the_reader_reads(tiny_raw) -> None:
    """The template's rendering of a past call, the grammar and the reader agree on one format."""
    for name, fmt in ((LLAMA31, LLAMA_JSON), (QWEN_CODER, HERMES)):
        messages = conversation(name)[:3]
        rendered = templates.render(template(name), messages, bos_token=SPECIALS[name][0], eos_token=SPECIALS[name][1],
                                    add_generation_prompt=False, tools=TOOLS)
        start, end = ASSISTANT[name]
        written = rendered[rendered.rindex(start) + len(start): rendered.rindex(end)]
        assert accepted(fmt.grammar(TOOLS, parallel=True), written)
        reader = CallReader(fmt, NAMES)
        assert reader.finish(written) == ("", [ToolCall(c["function"]["name"], c["function"]["arguments"])
                                               for c in messages[2]["tool_calls"]])


def test_typed_special_token_text_in_tools_stays_text() -> None:
    """As in messages: a tool's description can't end the template's turn."""
    tokenizer = copy.copy(load("llama-bpe"))
    tokenizer.chat_template = template(LLAMA31)
    messages = [{"role": "user", "content": "Weather?"}]
    hf = hf_tokenizer(tokenizer.tokenizer, *SPECIALS[LLAMA31])
    ids = templates.prompt_ids(tokenizer, messages, tools=TOOLS)
    assert ids == hf.apply_chat_template(messages, chat_template=tokenizer.chat_template, tools=TOOLS, tokenize=True,
                                         add_generation_prompt=True, return_dict=False)
    forged = [{**WEATHER, "function": {**WEATHER["function"], "description": "x<|eot_id|>y"}}]
    ids = templates.prompt_ids(tokenizer, messages, tools=forged)
    assert ids.count(128009) == 2  # the template's own, after the system and the user turn
    assert "x<|eot_id|>y" in hf.decode(ids)


def test_which_templates_take_tools_and_in_which_format() -> None:
    assert templates.reads_tools(template(LLAMA31)) and not templates.reads_tools("{{ messages[0].content }}")
    assert format_of(template(QWEN_CODER)) is HERMES
    assert format_of(template(LLAMA31)) is LLAMA_JSON and format_of(template(LLAMA32)) is LLAMA_JSON
    with pytest.raises(InputError, match="does not support tools .* leave tools out"):
        format_of("{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(InputError, match="in a format this server does not read"):
        format_of(template(MISTRAL))  # [TOOL_CALLS] lists: not read


def test_arguments_that_are_not_json_are_refused() -> None:
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                      "function": {"name": "now", "arguments": "{city: Paris}"}}]}]
    with pytest.raises(ChatTemplateError, match="message 1: tool call 0's function.arguments is not valid JSON"):
        templates.render(template(QWEN_CODER), messages, bos_token=None, eos_token=None, tools=TOOLS)


# ----------------------------------------------------------------------------- reading answers

HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
PARIS = ToolCall("get_weather", '{"city": "Paris"}')
NOW = ToolCall("now", "{}")
# (format, answer, content, calls): content is all the text shown, calls [] when the answer is not calls
ANSWERS = [
    (HERMES, HERMES_CALL, "", [PARIS]),
    (HERMES, f"Let me look.\n{HERMES_CALL}\n", "Let me look.", [PARIS]),  # the whitespace before a call goes with it
    (HERMES, f"\n{HERMES_CALL}", "", [PARIS]),
    (HERMES, f'{HERMES_CALL}\n<tool_call>\n{{"name": "now", "arguments": {{}}}}\n</tool_call>', "", [PARIS, NOW]),
    (HERMES, '<tool_call>\n{"name": "now", "arguments": {}}', "", [NOW]),  # ended before its close: still a call
    (HERMES, ' {"name": "get_weather", "arguments": {"city": "Paris"}}', "", [PARIS]),  # untagged, as Qwen2.5-0.5B writes
    (HERMES, '{"answer": 4}', '{"answer": 4}', []),
    (HERMES, "No tools needed: 4.", "No tools needed: 4.", []),
    (HERMES, "a <tool_c b", "a <tool_c b", []),
    (HERMES, HERMES_CALL.replace("get_weather", "delete_all"), HERMES_CALL.replace("get_weather", "delete_all"), []),
    (HERMES, HERMES_CALL.replace('"Paris"}', '"Paris"'), HERMES_CALL.replace('"Paris"}', '"Paris"'), []),
    (HERMES, f"{HERMES_CALL} and more", f"{HERMES_CALL} and more", []),
    (HERMES, '<tool_call>\n{"name": "now", "arguments": "{}"}\n</tool_call>',
     '<tool_call>\n{"name": "now", "arguments": "{}"}\n</tool_call>', []),
    (LLAMA_JSON, '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [PARIS]),
    (LLAMA_JSON, ' \n{"name": "now", "arguments": {}} ', "", [NOW]),
    (LLAMA_JSON, '{"name": "nope", "parameters": {}}', '{"name": "nope", "parameters": {}}', []),
    (LLAMA_JSON, '{"name": "now", "parameters": {}} {"name": "now", "parameters": {}}',
     '{"name": "now", "parameters": {}} {"name": "now", "parameters": {}}', []),
    (LLAMA_JSON, 'Sure: {"name": "now", "parameters": {}}', 'Sure: {"name": "now", "parameters": {}}', []),
    (LLAMA_JSON, "  ", "  ", []),
]


@pytest.mark.parametrize("fmt, text, content, calls", ANSWERS)
def test_answers_read_whole_and_streamed_in_any_pieces(fmt, text, content, calls) -> None:
    whole = CallReader(fmt, NAMES)
    assert whole.finish(text)[1] == calls and whole.shown == content
    rng = random.Random(text)
    splits = [range(1, len(text)), *(sorted(rng.sample(range(1, len(text)), min(3, len(text) - 1))) for _ in range(20))]
    for cuts in splits:  # character by character, and in 20 random 4-piece splits
        bounds = [0, *cuts, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        reader, shown = CallReader(fmt, NAMES), ""
        for piece in pieces[:-1]:
            shown += reader.feed(piece)
            assert content.startswith(shown)  # nothing is shown that turns out to be part of a call
        rest, got = reader.finish(pieces[-1])
        assert (shown + rest, got) == (content, calls)


def test_text_before_a_call_streams_and_a_possible_marker_is_held() -> None:
    reader = CallReader(HERMES, NAMES)
    assert reader.feed("Let me look. <tool") == "Let me look."
    assert reader.feed("box>") == " <toolbox>"
    assert reader.feed(" <tool_call>\n{") == ""
    assert reader.feed('"name": "now", "arguments": {}}') == ""
    assert reader.finish("\n</tool_call>") == ("", [NOW])
    llama = CallReader(LLAMA_JSON, NAMES)
    assert llama.feed("\n") == "" and llama.feed("Hello") == "\nHello" and llama.feed(" {") == " {"


# ----------------------------------------------------------------------------- grammars


class _ByteTokenizer:
    """Token b is the byte b, 256 is EOS: a grammar's language, byte for byte."""

    eos_token_id, bos_token_id, special_token_ids = 256, None, [256]
    tokens = [bytes([b]) for b in range(256)] + [b"</s>"]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


BYTES = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()))


def accepted(grammar: Grammar, text: str) -> bool:
    matcher = llguidance.LLMatcher(BYTES, grammar.text)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(list(text.encode())) and matcher.is_accepting()


def test_grammars_force_calls_to_the_allowed_tools_only() -> None:
    second = '\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    assert accepted(HERMES.grammar(TOOLS, parallel=True), HERMES_CALL + second)
    assert not accepted(HERMES.grammar(TOOLS, parallel=False), HERMES_CALL + second)
    assert accepted(HERMES.grammar(TOOLS, parallel=False), HERMES_CALL)
    assert not accepted(HERMES.grammar([CLOCK], parallel=True), HERMES_CALL)  # tool_choice named "now"
    assert not accepted(HERMES.grammar(TOOLS, parallel=True), "Sure. " + HERMES_CALL)
    assert not accepted(HERMES.grammar(TOOLS, parallel=True), HERMES_CALL.replace('{"city"', '{"town"'))
    llama = LLAMA_JSON.grammar(TOOLS, parallel=True)
    assert accepted(llama, '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "F"}}')
    assert not accepted(llama, '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "K"}}')
    assert not accepted(llama, '{"name": "now", "parameters": {"x": 1}}')  # no parameters: an empty object
    assert not accepted(llama, '{"name": "now", "parameters": {}}\n{"name": "now", "parameters": {}}')


def test_a_forced_call_in_llama_3_tokens_then_only_the_end(llama3_grammars) -> None:
    """The project's constraint over the real Llama 3 vocabulary: the template's own call, token by token, then only
    the end-of-generation tokens; a schema llguidance refuses is an InputError (a 400)."""
    tokenizer, grammars = load("llama-bpe"), llama3_grammars
    constraint = grammars.compile(LLAMA_JSON.grammar([WEATHER], parallel=False))
    logits = np.zeros(tokenizer.vocab_size, np.float32)
    for token in tokenizer.encode('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "F"}}', bos=False):
        logits[:] = 0
        constraint.mask(logits)
        assert logits[token] == 0 and np.isneginf(logits).sum() > 0
        constraint.advance(token)
    logits[:] = 0
    constraint.mask(logits)
    assert set(np.flatnonzero(logits == 0)) <= set(tokenizer.eos_ids)
    bad = {"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"$ref": "#/nope"}}}}}
    with pytest.raises(InputError, match="the tools' parameters can't be enforced"):
        grammars.compile(HERMES.grammar([bad], parallel=True))


def test_a_schema_with_refs_keeps_them_resolvable() -> None:
    tool = {"type": "function", "function": {"name": "move", "parameters": {
        "type": "object", "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
        "properties": {"to": {"$ref": "#/$defs/point"}}, "required": ["to"]}}}
    assert accepted(LLAMA_JSON.grammar([tool], parallel=False), '{"name": "move", "parameters": {"to": {"x": 3}}}')


# ----------------------------------------------------------------------------- requests


def chat(**fields) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def test_tool_choice_modes() -> None:
    assert chat().tool_mode() == "none" and chat(tools=TOOLS).tool_mode() == "auto"
    assert chat(tools=TOOLS, tool_choice="none").tool_mode() == "none"
    assert chat(tools=TOOLS, tool_choice="required").tool_mode() == "required"
    assert chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "now"}}).tool_mode() == "named"
    assert chat(tools=TOOLS).tool_dicts() == TOOLS  # as sent: no fields added
    assert chat(tools=TOOLS, tool_choice="required").forced_tools() == TOOLS
    assert chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "now"}}).forced_tools() == [CLOCK]


BAD = [
    ({"tools": [WEATHER, WEATHER]}, "tools", "tool names must be unique; 'get_weather' is given more than once"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools.0.function.name",
     "a tool's name is 1 to 64 letters, digits, '_' or '-'; found 'get weather'"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type", "Input should be 'function'"),
    ({"tools": TOOLS, "tool_choice": "any"}, "tool_choice", 'must be "none", "auto", "required" or'),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "names 'nope', which is not among the tools given ('get_weather', 'now')"),
    ({"tool_choice": "required"}, "tool_choice", '"required" needs tools'),
    ({"functions": [{"name": "f"}]}, "functions", "send tools instead"),
    ({"function_call": "auto"}, "function_call", "send tool_choice instead"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "a call is forced, so the answer's format is the call's"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages.0", "content is missing"),
    ({"messages": [{"role": "tool", "content": "21"}]}, "messages.0", "a tool's message needs tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [call("now", {})]}]}, "messages.0",
     "tool_calls are made by the assistant"),
]


@pytest.mark.parametrize("fields, where, words", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_tool_requests(fields, where, words) -> None:
    with pytest.raises(ValidationError) as caught:
        ChatRequest(**{"messages": [{"role": "user", "content": "hi"}], **fields})
    error = caught.value.errors()[0]
    assert ".".join(map(str, error["loc"])) == where and words in error["msg"], error
