"""What the OpenAI-compatible API accepts and how it refuses: the request bodies as pydantic
models (as in vLLM and llama-cpp-python) with their limits, and OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`, in which every refusal is answered.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from ..errors import InputError
from .constraints import Grammar
from .request import Sampling, check_utf8

MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 1000  # OpenAI's count; a length that bounds a request's stop-matching work
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_UNSUPPORTED_ABOVE_ONE = {"n": "send one request per choice", "best_of": "leave it out"}  # field: what to do instead


# ---------------------------------------------------------------- errors


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    # 429: the type OpenAI gives a limit on requests (its limit on tokens is "tokens")
    kinds = {401: "authentication_error", 429: "requests"}
    kind = kinds.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


class ApiError(Exception):
    """An answer in OpenAI's error shape, raised from anywhere in a handler."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 made a 400 that names the field: `temperature: Input should be a valid number ...`, param "temperature"."""
    problems, params = [], []
    for err in exc.errors():
        loc = err["loc"][1:]
        if err["type"] == "json_invalid":
            return error(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])} (character {loc[0]})")
        if not loc:
            return error(400, "the request body must be a JSON object")
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        if f"{param}: {msg}" not in problems:
            problems.append(f"{param}: {msg}")
            params.append(param)
    return error(400, "; ".join(problems[:3]), params[0])


# ---------------------------------------------------------------- requests

_Stop = Annotated[str, Field(min_length=1)]


def _utf8(text: str) -> str:
    """JSON may carry lone surrogates ("\\udc80"), which are not text: refuse them here rather
    than fail in a tokenizer."""
    try:
        check_utf8(text, "the text", "send it as UTF-8")
    except InputError as e:
        raise ValueError(str(e)) from None
    return text


class _StreamOptions(BaseModel):
    include_usage: bool | None = False


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Prediction(BaseModel):
    """OpenAI's predicted output: text the answer is expected to repeat much of (a file being
    edited), which speculation drafts from."""

    type: Literal["content"]
    content: str | list[_TextPart]

    @field_validator("content")
    @classmethod
    def _text(cls, content: str | list[_TextPart]) -> str | list[_TextPart]:
        for text in [content] if isinstance(content, str) else [part.text for part in content]:
            _utf8(text)
        return content

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class _JsonSchema(BaseModel):
    """OpenAI's response_format.json_schema: the schema the answer must be valid against."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")  # {} (no schema given): any JSON value
    strict: bool | None = None  # enforced whatever it says: the mask admits nothing else


class _ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> _ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("type 'json_schema' goes with json_schema: {\"name\": ..., \"schema\": {...}}, and only "
                             f"it (type is {self.type!r}, json_schema is {'given' if self.json_schema else 'missing'})")
        return self

    def grammar(self) -> Grammar | None:
        """What the answer must follow (None: anything). A schema llguidance can't compile is
        refused when it is compiled (constraints.GrammarError, a 400)."""
        if self.type == "json_object":
            return Grammar.json_object()
        if self.type == "json_schema":
            return Grammar.json_schema(self.json_schema.schema_)
        return None


class CommonRequest(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored (clients send many); a field that would change the
    output but isn't implemented is refused rather than silently ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1, as OpenAI
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: list[_Stop] | None = None  # a string is taken as a list of one
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: _ResponseFormat | None = None
    # refused when given (functions are tools' deprecated form): answering without them would look like success
    functions: list | None = None
    function_call: Any = None
    best_of: int | None = None
    ignore_eos: bool | None = False  # not OpenAI's (llama.cpp's server and vLLM take it): run on to max_tokens past EOS
    prediction: _Prediction | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _listed(cls, stop: Any) -> Any:
        """A string as a list of one; the limits checked before any other work on the strings."""
        stop = [stop] if isinstance(stop, str) else stop
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(stop)} stop strings were given; at most {MAX_STOP_STRINGS}: drop some")
        for i, s in enumerate(stop if isinstance(stop, list) else ()):
            if isinstance(s, str) and len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop string {i + 1} of {len(stop)} is {len(s)} characters; each may have at most "
                                 f"{MAX_STOP_CHARS}: shorten it")
        return stop

    @field_validator("stop")
    @classmethod
    def _stop_text(cls, stop: list[str] | None) -> list[str] | None:
        return stop and [_utf8(s) for s in stop]

    @field_validator("n", "best_of")
    @classmethod
    def _at_most_one(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value > 1:
            raise ValueError(f"{info.field_name} > 1 is not supported: {_UNSUPPORTED_ABOVE_ONE[info.field_name]}")
        return value

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise ValueError(f"{info.field_name} is not supported (leave it out)")
        return value

    @field_validator("functions", "function_call")
    @classmethod
    def _deprecated(cls, value: Any, info: ValidationInfo) -> Any:
        if value and value != "none":
            raise ValueError(f"{info.field_name} (OpenAI's deprecated function calling) is not supported: send "
                             f"{'tools' if info.field_name == 'functions' else 'tool_choice'} instead")
        return value

    @field_validator("ignore_eos")
    @classmethod
    def _ends_with_its_format(cls, ignore_eos: bool | None, info: ValidationInfo) -> bool | None:
        form = info.data.get("response_format")
        if ignore_eos and form is not None and form.type != "text":
            raise ValueError("ignore_eos can't go with a response_format: a formatted answer ends where its format does; "
                             "leave one out")
        return ignore_eos

    def sampling(self) -> Sampling:
        return Sampling(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
        )

    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def stop_ids(self) -> tuple[int, ...] | None:
        """No end-of-generation tokens with ignore_eos; else None, the model's."""
        return () if self.ignore_eos else None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class _FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text (templates.py reads it)


class _ToolCall(BaseModel):
    """A call an earlier answer made, sent back in the assistant's message."""

    id: str
    type: Literal["function"] = "function"
    function: _FunctionCall


class _Message(BaseModel):
    role: str
    content: str | list[_TextPart] | None = None  # None (or absent) only in an assistant's message that makes calls
    tool_calls: list[_ToolCall] | None = Field(None, min_length=1)
    tool_call_id: str | None = None  # a tool's message: the call it answers

    @field_validator("content", mode="wrap")
    @classmethod
    def _text(cls, content: Any, handler: ValidatorFunctionWrapHandler) -> str | list[_TextPart] | None:
        """One message for what pydantic reports per member of the union."""
        try:
            content = handler(content)
        except ValidationError:
            raise ValueError('must be a string or a list of text parts {"type": "text", "text": "..."}') from None
        for text in [] if content is None else [content] if isinstance(content, str) else [part.text for part in content]:
            _utf8(text)
        return content

    @model_validator(mode="after")
    def _roles_fields(self) -> _Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls are made by the assistant; this message's role is {self.role!r}")
        if self.content is None and self.tool_calls is None:
            raise ValueError("content is missing: every message needs one but an assistant's that has tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool's message needs tool_call_id, the id of the call it answers")
        return self


class _FunctionDefinition(BaseModel):
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object; None: no arguments
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        """OpenAI's rule; it also lets a name stand in a grammar's literal and a template's quotes unescaped."""
        if not _TOOL_NAME.fullmatch(name):
            raise ValueError(f"a tool's name is 1 to 64 letters, digits, '_' or '-'; found {name[:80]!r}: rename it")
        return name


class _Tool(BaseModel):
    type: Literal["function"]
    function: _FunctionDefinition


class _FunctionName(BaseModel):
    name: str


class _NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: _FunctionName


class ChatRequest(CommonRequest):
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the end of the context
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[_Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | _NamedToolChoice | None = None  # None: "auto" with tools
    parallel_tool_calls: bool | None = True

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[_Tool] | None) -> list[_Tool] | None:
        names = [tool.function.name for tool in tools or ()]
        if dupes := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"tool names must be unique; {', '.join(map(repr, dupes))} is given more than once")
        return tools

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _given_tool(cls, choice: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        try:
            choice = handler(choice)
        except ValidationError:
            raise ValueError('must be "none", "auto", "required" or {"type": "function", "function": {"name": NAME}}') from None
        if "tools" not in info.data:  # tools were refused: that is the error to report
            return choice
        names = [tool.function.name for tool in info.data["tools"] or ()]
        if choice in ("auto", "required") and not names:
            raise ValueError(f'"{choice}" needs tools: give them, or leave tool_choice out')
        if isinstance(choice, _NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"names {choice.function.name!r}, which is not among the tools given "
                             f"({', '.join(map(repr, names)) or 'none'})")
        form = info.data.get("response_format")
        if names and choice not in (None, "none", "auto") and form is not None and form.type != "text":
            raise ValueError("a call is forced, so the answer's format is the call's: leave response_format out, or "
                             'make tool_choice "auto"')
        if names and choice not in (None, "none", "auto") and info.data.get("ignore_eos"):
            raise ValueError("ignore_eos can't go with a forced call: the answer ends where the call does; leave one out")
        return choice

    def tool_mode(self) -> str:
        """"none", "auto", "required", or "named" (tool_choice names a tool): what the answer may or must be."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        return "named" if isinstance(self.tool_choice, _NamedToolChoice) else self.tool_choice or "auto"

    def tool_dicts(self) -> list[dict]:
        """The tools as the client sent them (fields it left out stay out), as templates take them."""
        return [tool.model_dump(exclude_unset=True) for tool in self.tools or ()]

    def forced_tools(self) -> list[dict]:
        """Those of tool_dicts() a forced answer may call: the one tool_choice names, or all."""
        named = self.tool_choice.function.name if isinstance(self.tool_choice, _NamedToolChoice) else None
        return [tool for tool in self.tool_dicts() if named in (None, tool["function"]["name"])]


class CompletionRequest(CommonRequest):
    prompt: str | list[int] | list[str]  # a list of token ids is taken as it is (no BOS added)
    max_tokens: int | None = Field(16, ge=1)  # 16 as OpenAI; null: up to the end of the context
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    tools: Any = None
    tool_choice: Any = None

    @field_validator("tools", "tool_choice")
    @classmethod
    def _chat_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value and value != "none":
            raise ValueError(f"{info.field_name} is taken by /v1/chat/completions only (a plain prompt has no template to "
                             "show tools): use that endpoint, or leave it out")
        return value

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_prompt(cls, prompt: Any, handler: ValidatorFunctionWrapHandler) -> str | list[int] | list[str]:
        try:
            prompt = handler(prompt)
        except ValidationError:
            raise ValueError("must be a string, a list of one string or a list of token ids") from None
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) and len(prompt) != 1:
            raise ValueError(f"a list of prompts must hold exactly one (batches are not supported), got {len(prompt)}")
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
            _utf8(prompt if isinstance(prompt, str) else prompt[0])
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool | None) -> bool | None:
        if echo:
            raise ValueError("echo is not supported")
        return echo
