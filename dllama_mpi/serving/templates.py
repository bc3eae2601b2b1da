"""Chat prompts: a model's own chat template rendered as transformers renders it, and tokenized.

The template (a Jinja string stored with the tokenizer at conversion) is run the way
transformers' ``apply_chat_template`` runs it (``transformers/utils/chat_template_utils.py``):
a sandboxed environment with ``trim_blocks``/``lstrip_blocks``, loop controls, a ``tojson`` that
does not escape HTML, ``raise_exception`` and ``strftime_now``; the variables ``messages``,
``bos_token``, ``eos_token`` (absent when the model has none), ``add_generation_prompt``,
``tools`` (OpenAI's tool dicts, or None) and ``documents`` (None). Messages are normalized as
transformers does: keys whose value is None are dropped and a reasoning field is also passed
under the other names templates read. On top of that, OpenAI's list-of-parts content is joined
into one string, and an assistant message's ``tool_calls`` carry their ``function.arguments`` as
the object that OpenAI's JSON text holds (templates write it with ``tojson`` or iterate it, as
vLLM hands it to them). ``reads_tools`` tells whether a template shows tools to its model at all.

Tokenizing differs from transformers in one way, on purpose: special-token text that a user
types inside a message (``<|eot_id|>``, ``<|im_start|>``) stays plain text. Only the special
tokens the template itself writes become special ids, so a message can't end its own turn
or forge another role's. Without such text the ids are exactly ``apply_chat_template``'s.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InputError
from .request import check_prompt_text


class ChatTemplateError(InputError):
    """The chat template can't render these messages: it refused them (``raise_exception``), failed
    on them, or doesn't compile; or a message has a shape no template takes."""


class NoChatTemplate(InputError):
    """The model carries no chat template, so chat messages can't be turned into a prompt."""


# transformers passes a message's reasoning under each of these names (the first is the standard one).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# User text that would read as a special token is swapped for \ue000<n>\ue001 (private-use
# characters, which no template writes) while the template runs; the user's own private-use
# marker characters are swapped too, so every marker in the rendered text is one of ours.
_MARKER_CHARS = re.compile("[\ue000\ue001]")
_MARKER = re.compile("\ue000([0-9]+)\ue001")


def render(template: str, messages: list[dict], *, bos_token: str | None, eos_token: str | None,
           add_generation_prompt: bool = True, **extra) -> str:
    """The text ``apply_chat_template(messages, chat_template=template, tokenize=False, ...)``
    gives with these BOS/EOS token texts (None: the tokenizer has none); ``extra`` are further
    template variables (``date_string=...``)."""
    return _render(template, _plain_messages(messages), bos_token, eos_token, add_generation_prompt, extra)


def prompt_text(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The model's chat template rendered for ``messages``, special-token text typed in them included
    as typed (transformers' text)."""
    return _render(_template(tokenizer), _plain_messages(messages), *_bos_eos(tokenizer), add_generation_prompt, {})


def prompt_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
               max_seq_len: int | None = None, tools: list[dict] | None = None) -> list[int]:
    """Token ids of the rendered chat: the template's special tokens as their ids, everything else,
    special-token text typed in a message or a tool's definition included, as plain text; one BOS
    first when the tokenizer adds BOS (whether or not the template wrote it). With `max_seq_len`, a
    rendered chat that surely can't fit it is refused before the encoding work (InputError)."""
    template = _template(tokenizer)
    table: list[str] = []
    marked = _mark(_plain_messages(messages), tokenizer, table)
    extra = {"tools": _mark(tools, tokenizer, table)} if tools else {}
    text = _render(template, marked, *_bos_eos(tokenizer), add_generation_prompt, extra)
    if max_seq_len is not None:
        plain = _MARKER.sub(lambda m: table[int(m.group(1))], text)
        check_prompt_text(tokenizer, plain, max_seq_len, "shorten the conversation")
    ids: list[int] = []
    for piece, token_id in tokenizer.split_special(text):
        if token_id is not None:
            ids.append(token_id)
        else:
            plain = _MARKER.sub(lambda m: table[int(m.group(1))], piece)
            ids.extend(tokenizer.encode(plain, bos=False, special=False))
    if tokenizer.add_bos and ids[:1] != [tokenizer.bos_id]:
        ids.insert(0, tokenizer.bos_id)
    return ids


def _template(tokenizer) -> str:
    if tokenizer.chat_template is None:
        raise NoChatTemplate(
            "this model has no chat template (convert it from a checkpoint that has one); "
            "use /v1/completions with a plain prompt"
        )
    return tokenizer.chat_template


def _bos_eos(tokenizer) -> tuple[str | None, str | None]:
    return tuple(None if i is None else tokenizer.token_text(i) for i in (tokenizer.bos_id, tokenizer.eos_id))


def _plain_messages(messages) -> list[dict]:
    """Fresh message dicts, normalized as transformers does, with list-of-parts content joined."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError(f"expected a non-empty list of messages, found {_kind(messages)}")
    out = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"message {n}: expected an object with 'role' and 'content', found {_kind(message)}")
        message = {key: value for key, value in message.items() if value is not None}
        if isinstance(message.get("content"), list):
            message["content"] = _joined_text(message["content"], n)
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [_parsed_arguments(call, n, k) for k, call in enumerate(message["tool_calls"])]
        reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _parsed_arguments(call, n: int, k: int):
    """A tool call whose ``function.arguments``, OpenAI's JSON text, is the value it holds."""
    function = call.get("function") if isinstance(call, dict) else None
    if not (isinstance(function, dict) and isinstance(function.get("arguments"), str)):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError as exc:
        raise ChatTemplateError(f"message {n}: tool call {k}'s function.arguments is not valid JSON ({exc}); send "
                                "the arguments as the JSON text of an object, as the answer that made the call gave them") from None
    return {**call, "function": {**function, "arguments": arguments}}


def _joined_text(parts: list, n: int) -> str:
    """OpenAI content parts ``[{"type": "text", "text": ...}, ...]`` as one string."""
    texts = []
    for part in parts:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            found = part.get("type") if isinstance(part, dict) else _kind(part)
            raise ChatTemplateError(
                f"message {n}: content part of type {found!r} is not supported; only text parts "
                '({"type": "text", "text": "..."}) are'
            )
        texts.append(part["text"])
    return "".join(texts)


def _kind(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _mark(value, tokenizer, table: list[str]):
    """``value`` with every special-token text (and private-use marker character) inside its strings
    replaced by a marker holding its index in ``table``; dict keys are left alone."""
    if isinstance(value, str):
        return "".join(_marked_text(piece, token_id is not None, table) for piece, token_id in tokenizer.split_special(value))
    if isinstance(value, dict):
        return {key: _mark(item, tokenizer, table) for key, item in value.items()}
    if isinstance(value, list):
        return [_mark(item, tokenizer, table) for item in value]
    return value


def _marked_text(piece: str, special: bool, table: list[str]) -> str:
    def marker(text: str) -> str:
        table.append(text)
        return f"\ue000{len(table) - 1}\ue001"

    return marker(piece) if special else _MARKER_CHARS.sub(lambda m: marker(m.group()), piece)


def _render(template: str, messages: list[dict], bos_token: str | None, eos_token: str | None,
            add_generation_prompt: bool, extra: dict) -> str:
    # transformers passes the tokenizer's special tokens that exist (an absent one is undefined,
    # not "None"), then the caller's variables, then these three
    specials = {key: value for key, value in (("bos_token", bos_token), ("eos_token", eos_token)) if value is not None}
    variables = {"tools": None, "documents": None, **specials, **extra,
                 "messages": messages, "add_generation_prompt": add_generation_prompt}
    compiled = _compile(template)
    try:
        return compiled.render(**variables)
    except ChatTemplateError:
        raise
    except Exception as exc:  # the template is third-party code run on the request's data: its failures are bad input
        raise ChatTemplateError(f"the model's chat template failed on these messages: {type(exc).__name__}: {exc}") from None


@functools.lru_cache(maxsize=16)
def reads_tools(template: str) -> bool:
    """Whether `template` reads the ``tools`` variable, i.e. can show tools to its model."""
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(_environment().parse(template))
    except jinja2.TemplateSyntaxError as exc:
        raise _syntax_error(exc) from None


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise _syntax_error(exc) from None


def _syntax_error(exc: jinja2.TemplateSyntaxError) -> ChatTemplateError:
    return ChatTemplateError(f"the model's chat template does not compile: {exc.message} (line {exc.lineno})")


def _raise_exception(message) -> None:
    raise ChatTemplateError(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' ``tojson``: Jinja's own escapes HTML characters, which templates don't expect."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``, which some templates put around the assistant's text
    (transformers uses it to mask training targets): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()
