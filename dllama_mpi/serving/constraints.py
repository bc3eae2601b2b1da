"""Constrained output: a grammar (a JSON schema, any JSON object, or a Lark grammar such as a
tool call's text) enforced token by token on rank 0, with llguidance.

Why llguidance (docs/performance.md, "Constrained output", has the measurement against xgrammar
and outlines-core): it computes a token mask from the grammar's state on demand, so a request's
schema compiles in 1-3 ms (xgrammar 32-68 ms, outlines-core 1-43 s over a 128-152k vocabulary),
and a mask costs 42-80 us (median) over such a vocabulary, under 1% of a decode step; its Lark
grammars embed JSON schemas (`%json`), which a tool call's text format (a tag, JSON, a tag)
needs; its wheel has no Python dependencies (xgrammar's brings torch); and it bounds the work a
hostile schema can cause (its parser limits). It is MIT-licensed.

`Grammar` says what to enforce (built by the API from a request). `Grammars` is built once per
loaded job from its tokenizer (the vocabulary's bytes, indexed by llguidance: part of loading)
and compiles a Grammar into a `Constraint`, one per request: `mask(logits)` sets every token
the grammar forbids next to -inf, `advance(token)` moves it on. Once the grammar is complete
only the end-of-generation tokens are allowed, so a constrained answer ends with the format.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass

import llguidance
import llguidance.numpy
import numpy as np

from ..errors import InputError
from ..kernels.vector import mask_logits

# JSON as models write it and json.dumps does ('{"a": 1, "b": 2}'), and nothing else: no run of
# whitespace for a model to wander into
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(InputError):
    """A schema or grammar llguidance can't compile, or one over its limits."""


@dataclass(frozen=True)
class Grammar:
    """llguidance's grammar text (its JSON form, as LLMatcher takes it) and what it came from, for messages."""

    text: str
    what: str

    @staticmethod
    def json_schema(schema: dict) -> Grammar:
        """JSON valid against `schema`, in JSON_STYLE."""
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_STYLE)
        except ValueError as exc:
            raise GrammarError(f"the JSON schema can't be used: {exc}") from None
        return Grammar(text, "the JSON schema")

    @staticmethod
    def json_object() -> Grammar:
        """Any JSON object (OpenAI's response_format json_object)."""
        return Grammar(Grammar.json_schema({"type": "object"}).text, "a JSON object")

    @staticmethod
    def lark(text: str, what: str = "the grammar") -> Grammar:
        """A grammar in llguidance's Lark syntax, where `%json { schema }` stands for JSON valid
        against that schema (a tool call: a tag, the call's JSON, a tag): see `lark_json`."""
        return Grammar(llguidance.LLMatcher.grammar_from_lark(text), what)

    @staticmethod
    def lark_json(schema: dict) -> str:
        """The Lark fragment for JSON valid against `schema`, in JSON_STYLE (a rule's body)."""
        return "%json " + json.dumps({**schema, "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})}})


class Grammars:
    """The job's vocabulary as llguidance sees it, and compiling grammars over it (any thread)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: tuple[int, ...]) -> None:
        """vocab_size: the model's (its logits' length, which may pad the tokenizer's); stop_ids:
        the tokens that end an answer, allowed once a grammar is complete."""
        t0 = time.perf_counter()
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(_Vocabulary(tokenizer, vocab_size), n_vocab=vocab_size,
                                                eos_token=list(stop_ids))
        # llguidance's first mask indexes the vocabulary (0.2-1 s for 152k tokens): here, not in a request
        self.compile(Grammar.json_object()).mask(np.zeros(vocab_size, np.float32))
        self.setup_s = time.perf_counter() - t0

    def compile(self, grammar: Grammar) -> Constraint:
        """A fresh Constraint for one answer; GrammarError when llguidance refuses the grammar."""
        matcher = llguidance.LLMatcher(self.tokenizer, grammar.text, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{grammar.what} can't be enforced: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One answer's grammar state. Its buffers are allocated here: a token's mask allocates nothing."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)  # (1, ceil(vocab / 32)) int32

    def mask(self, logits: np.ndarray) -> str | None:
        """logits (vocab,) f32: every token the grammar forbids next set to -inf, in place. Returns
        why the grammar can't go on (llguidance hit one of its limits on this answer), else None."""
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._bitmask)
        if self._matcher.is_error():
            return f"the answer's grammar failed: {self._matcher.get_error().splitlines()[0]}"
        mask_logits(logits, self._bitmask[0])
        return None

    def advance(self, token: int) -> None:
        """`token` was chosen (from masked logits, so the grammar allows it)."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token} chosen under its own mask: {self._matcher.get_error()}")


class _Vocabulary(llguidance.TokenizerWrapper):
    """llguidance's TokenizerWrapper over our tokenizers: each token's bytes, special
    tokens (those that print nothing) by their names, and encoding (for the grammar's literals)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        bos = tokenizer.bos_id
        neutral = 0 if bos != 0 else 1  # a token's bytes after any token but BOS (SentencePiece drops a space after BOS)
        self.tokens, self.special_token_ids = [], []
        for i in range(vocab_size):
            raw = tokenizer.decode(neutral, i) if i < tokenizer.vocab_size else b""
            if not raw:  # special tokens (and padding past the tokenizer) print nothing: named, never text
                self.special_token_ids.append(i)
                raw = (tokenizer.token_text(i) if i < tokenizer.vocab_size else f"<[{i}]>").encode("utf-8")
            self.tokens.append(raw)
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = bos
        self.is_tokenizer_wrapper = True
        # tokenizing forced text mid-answer: no SentencePiece space before it (llama2c's and GGUF's flags)
        self._tokenizer = copy.copy(tokenizer)
        for flag in ("add_dummy_prefix", "add_space_prefix"):
            if getattr(tokenizer, flag, False):
                setattr(self._tokenizer, flag, False)
        special = set(self.special_token_ids)  # a special token's name is not its text
        self._by_bytes: dict[bytes, int] = {}  # the vocabulary's tokens by their bytes, for longest matches
        for i, token in enumerate(self.tokens):  # the last of equals: SentencePiece's byte tokens come first
            if i not in special:
                self._by_bytes[token] = i
        self._longest = max(map(len, self._by_bytes))

    def __call__(self, text: str | bytes) -> list[int]:
        """Tokens whose bytes are exactly `text`'s (llguidance forces these where the grammar
        leaves one way on): the tokenizer's own, else (a tokenizer that still adds something) the
        vocabulary's longest matches, a piece rather than a byte token where both spell the same."""
        raw = text if isinstance(text, bytes) else text.encode("utf-8")
        ids = self._tokenizer.encode(raw.decode("utf-8", errors="replace"), bos=False, special=False)
        if b"".join(self.tokens[i] for i in ids) == raw:
            return ids
        greedy, at = [], 0
        while at < len(raw):
            end = next((e for e in range(min(len(raw), at + self._longest), at, -1) if raw[at:e] in self._by_bytes), None)
            if end is None:  # a byte no token spells: the tokenizer's answer is as good as any
                return ids
            greedy.append(self._by_bytes[raw[at:end]])
            at = end
        return greedy
