"""Tool calls in a model's own format: which format a chat template teaches, how the model's answer
is read back into OpenAI's tool calls, and the grammar that forces a call.

Two formats, told apart by the template's text (as vLLM's parsers read them):

- Hermes, Qwen2.5's: any text, then one or more ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
  (or the bare call as the whole answer, as small Qwen2.5 models write it);
- Llama 3.1/3.2's JSON: the whole answer is ``{"name": ..., "parameters": {...}}`` (possibly after
  ``<|python_tag|>``, a special token that decodes to no text).

An answer is calls only when all of it from the first call on reads as calls to given tools, each
an object with the name and an object of arguments (under "arguments" or "parameters", whichever
the model wrote); otherwise all of it is content, so that text which merely looks like a call (bad
JSON, a tool nobody gave) reaches the client as the model wrote it. A streamed answer is read the
same way: text is released as it comes until a call may have begun, then held to the end, where
it becomes calls or content as a whole answer would.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..errors import InputError
from .constraints import Grammar
from .templates import reads_tools


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI sends it


def _call(text: str, names: frozenset[str]) -> ToolCall | None:
    """`text` as one call to a given tool, or None."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    arguments = obj.get("arguments", obj.get("parameters"))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a Lark string literal: JSON's escapes are Lark's


_WHAT = "the tools' parameters"  # what a grammar that can't be enforced came from, for its message


def _call_rules(tools: list[dict], key: str) -> list[str]:
    """Lark rules `call: call_0 | call_1 ...`, each a call to one tool as its template writes it: the name a constant,
    the arguments under `key` JSON valid against the tool's parameters schema (none: an empty object, OpenAI's
    meaning), written as templates write it (constraints.JSON_STYLE)."""
    rules = [f"call: {' | '.join(f'call_{i}' for i in range(len(tools)))}"]
    for i, tool in enumerate(tools):
        function = tool["function"]
        head = _lark_string(f'{{"name": "{function["name"]}", "{key}": ')
        parameters = function.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        rules += [f'call_{i}: {head} args_{i} "}}"', f"args_{i}: {Grammar.lark_json(parameters)}"]
    return rules


class ToolFormat(ABC):
    """How one family of templates writes calls: `watch` says how much of an answer's text so far may be shown,
    `parse` reads the held rest, `grammar` forces calls."""

    @abstractmethod
    def watch(self, text: str, shown: bool) -> tuple[int, bool]:
        """(how many characters of `text`, the unshown text so far, may be shown now; whether a call has begun at
        that point). `shown`: some content was already shown."""
        raise NotImplementedError

    @abstractmethod
    def parse(self, text: str, names: frozenset[str]) -> list[ToolCall] | None:
        """The calls `text` (held from where a call began to the end) makes, or None when it is not calls."""

    @abstractmethod
    def grammar(self, tools: list[dict], parallel: bool) -> Grammar:
        """An answer that is calls to `tools` only: one, or with `parallel` one or more."""


class _LlamaJson(ToolFormat):
    """The whole answer is one call's JSON."""

    def watch(self, text: str, shown: bool) -> tuple[int, bool]:
        if shown:
            return len(text), False
        body = text.lstrip()
        if not body:
            return 0, False  # only whitespace so far: a call may still follow
        return (0, True) if body[0] == "{" else (len(text), False)

    def parse(self, text: str, names: frozenset[str]) -> list[ToolCall] | None:
        call = _call(text, names)
        return None if call is None else [call]

    def grammar(self, tools: list[dict], parallel: bool) -> Grammar:
        """One call whatever `parallel` says: the template takes one call per message."""
        return Grammar.lark("\n".join(["start: call", *_call_rules(tools, "parameters")]), _WHAT)


class _Hermes(_LlamaJson):
    """<tool_call> blocks after any text; or, as small Qwen2.5 models also answer (Qwen2.5-Coder-0.5B does), the
    bare call as the whole answer, read as Llama's is."""

    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"\s*<tool_call>(.*?)(?:</tool_call>|\Z)\s*", re.S)  # the last call may end at the answer's end

    def watch(self, text: str, shown: bool) -> tuple[int, bool]:
        if not shown and text.lstrip()[:1] in ("", "{"):
            return super().watch(text, shown)
        # the whitespace before a call goes with it (a block's leading \s*), so it is never shown ahead of it
        if (start := text.find(self.START)) >= 0:
            return len(text[:start].rstrip()), True
        # hold a tail that may be the start marker's beginning, and the whitespace before it
        keep = next((k for k in range(min(len(self.START) - 1, len(text)), 0, -1) if text.endswith(self.START[:k])), 0)
        return len(text[: len(text) - keep].rstrip()), False

    def parse(self, text: str, names: frozenset[str]) -> list[ToolCall] | None:
        if text.lstrip().startswith("{"):
            return super().parse(text, names)
        calls, pos = [], 0
        while pos < len(text):
            block = self._BLOCK.match(text, pos)
            if block is None or (call := _call(block.group(1), names)) is None:
                return None
            calls.append(call)
            pos = block.end()
        return calls

    def grammar(self, tools: list[dict], parallel: bool) -> Grammar:
        start, end, between = (_lark_string(text) for text in (self.START + "\n", "\n" + self.END, "\n"))
        return Grammar.lark("\n".join([f"start: block ({between} block)*" if parallel else "start: block",
                                       f"block: {start} call {end}", *_call_rules(tools, "arguments")]), _WHAT)


HERMES, LLAMA_JSON = _Hermes(), _LlamaJson()


def format_of(template: str) -> ToolFormat:
    """The tool-call format `template` teaches its model, told by the text it writes for a call; InputError when it
    shows its model no tools, or writes calls in neither known format."""
    if not reads_tools(template):
        raise InputError("the model's chat template does not support tools (it never shows them to the model): leave "
                         'tools out (or send tool_choice "none"), or serve a model whose template takes them')
    if HERMES.START in template:
        return HERMES
    if '"parameters": ' in template and '{"name": "' in template:
        return LLAMA_JSON
    raise InputError("the model's chat template takes tools, but writes tool calls in a format this server does not "
                     "read (it reads Hermes/Qwen2.5 <tool_call> blocks and Llama 3.1/3.2 JSON calls): leave tools out, "
                     "or serve a model whose template uses one of those")


class CallReader:
    """One answer's text, in the pieces it is generated in: content to show as it may be shown, then at the end the
    rest and the calls."""

    def __init__(self, fmt: ToolFormat, names: frozenset[str]) -> None:
        self.fmt, self.names = fmt, names
        self._pending = ""  # not shown yet
        self._shown = ""  # content shown so far
        self._begun = False  # a call may have begun: everything from there is held to the end

    def feed(self, text: str) -> str:
        """The content that may be shown now that `text` came; "" while held."""
        self._pending += text
        if self._begun:
            return ""
        cut, self._begun = self.fmt.watch(self._pending, bool(self._shown))
        out, self._pending = self._pending[:cut], self._pending[cut:]
        self._shown += out
        return out

    def finish(self, text: str = "") -> tuple[str, list[ToolCall]]:
        """After the last text: (content not yet shown, the calls, [] when the answer is not calls)."""
        shown = self.feed(text)
        rest, self._pending = self._pending, ""
        calls = self.fmt.parse(rest, self.names) if self._begun else None
        if calls:
            return shown, calls
        self._shown += rest
        return shown + rest, []

    @property
    def shown(self) -> str:
        """The content shown so far: once finished, all of it."""
        return self._shown
