"""Constrained output (dllama_mpi.serving.constraints, llguidance): the mask kernel against its
twin, grammars over real vocabularies (stories260K's SentencePiece bytes, Llama 3's byte-level
BPE), and the scheduler serving constrained answers at temperature 1 in the same steps as
unconstrained greedy ones, in one process."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from conftest import STORIES, need_stories

from dllama_mpi.files.tokenizer.llama2c import Tokenizer
from dllama_mpi.kernels import reference
from dllama_mpi.kernels.vector import mask_logits
from dllama_mpi.serving.constraints import Grammar, GrammarError, Grammars
from dllama_mpi.serving.request import Failed, Finished, GenRequest, Piece, Sampling

# bounded everywhere, so that even a model choosing at random ends within a few dozen tokens
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 1, "maximum": 99},
        "mood": {"enum": ["happy", "sad", "sleepy"]},
        "friends": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["name", "age", "mood", "friends"],
    "additionalProperties": False,
}
ANSWER = '{"name": "Lily", "age": 7, "mood": "happy", "friends": ["Tom"]}'


@pytest.mark.parametrize("n", [1, 31, 32, 33, 100, 513])
def test_mask_kernel_equals_its_twin(n):
    rng = np.random.default_rng(n)
    words = rng.integers(-(2**31), 2**31, size=(n + 31) // 32, dtype=np.int64).astype(np.int32)
    words[::3], words[1::3] = 0, -1  # whole words forbidden and allowed (the kernel's fast paths), the last one too
    words[-1] = [0, -1, words[-1]][n % 3]
    logits = rng.standard_normal(n).astype(np.float32)
    expected = reference.mask_logits(logits, words)
    mask_logits(logits, words)
    np.testing.assert_array_equal(logits, expected)
    assert np.isneginf(logits).sum() == n - sum((int(words[i // 32]) >> (i % 32)) & 1 for i in range(n))


@pytest.fixture(scope="module")
def stories_tokenizer() -> Tokenizer:
    need_stories()
    return Tokenizer.from_llama2c(STORIES / "tok512.bin")


@pytest.fixture(scope="module")
def stories_grammars(stories_tokenizer) -> Grammars:
    return Grammars(stories_tokenizer, stories_tokenizer.vocab_size, stories_tokenizer.eos_ids)


def tokens_of(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text`'s tokens as they come mid-answer: without SentencePiece's dummy prefix space."""
    import copy

    plain = copy.copy(tokenizer)
    plain.add_dummy_prefix = False
    return plain.encode(text, bos=False)


def allowed(constraint, vocab_size: int) -> np.ndarray:
    logits = np.zeros(vocab_size, np.float32)
    constraint.mask(logits)
    return np.flatnonzero(logits == 0)


def walk(grammars: Grammars, grammar: Grammar, ids: list[int]) -> np.ndarray:
    """Each of `ids` allowed in turn and taken; what is allowed after them."""
    constraint = grammars.compile(grammar)
    for token in ids:
        ok = allowed(constraint, grammars.vocab_size)
        assert token in ok
        assert len(ok) < grammars.vocab_size  # it constrains
        constraint.advance(token)
    return allowed(constraint, grammars.vocab_size)


def test_a_schema_allows_its_answer_and_then_only_the_end(stories_grammars, stories_tokenizer):
    """The tokenizer's own tokens of a valid answer (SentencePiece: its dummy space must not
    leak into what llguidance forces), then only end-of-generation tokens."""
    ids = tokens_of(stories_tokenizer, ANSWER)
    assert b"".join(stories_tokenizer.decode(0, i) for i in ids) == ANSWER.encode()
    assert set(walk(stories_grammars, Grammar.json_schema(PERSON), ids)) <= set(stories_tokenizer.eos_ids)


def test_a_wrong_token_is_masked(stories_grammars, stories_tokenizer):
    constraint = stories_grammars.compile(Grammar.json_schema(PERSON))
    for token in tokens_of(stories_tokenizer, '{"name": "A", "age": '):
        constraint.advance(token)
    ok = allowed(constraint, stories_grammars.vocab_size)
    texts = {stories_tokenizer.decode(0, int(i)) for i in ok}
    assert texts and all(t[:1].isdigit() and t[:1] != b"0" for t in texts), texts  # an integer from 1: no quote, no 0
    with pytest.raises(RuntimeError, match="refused token"):
        constraint.advance(stories_tokenizer.encode('"', bos=False)[-1])


def test_a_tool_call_grammar_mixes_text_and_json(stories_grammars, stories_tokenizer):
    call = {"type": "object", "properties": {"name": {"const": "f"}, "arguments": PERSON}, "required": ["name", "arguments"]}
    grammar = Grammar.lark('start: "<call>" body "</call>"\nbody: ' + Grammar.lark_json(call))
    text = '<call>{"name": "f", "arguments": ' + ANSWER + "}</call>"
    ids = tokens_of(stories_tokenizer, text)
    assert set(walk(stories_grammars, grammar, ids)) <= set(stories_tokenizer.eos_ids)


def test_bad_schemas_are_refused_with_the_reason(stories_grammars):
    with pytest.raises(GrammarError, match="does not exist"):
        stories_grammars.compile(Grammar.json_schema({"properties": {"a": {"$ref": "#/defs/nope"}}}))
    with pytest.raises(GrammarError, match="can't be enforced"):
        stories_grammars.compile(Grammar.lark("start: nothing_defined"))


def test_llama3_vocabulary_forces_json_in_its_byte_level_tokens(llama3_grammars):
    from test_llamacpp_vocab import load

    tok = load("llama-bpe")
    ids = tok.encode(ANSWER, bos=False)
    assert set(walk(llama3_grammars, Grammar.json_schema(PERSON), ids)) <= set(tok.eos_ids)


# ------------------------------------------------------------------ the scheduler


@pytest.fixture(scope="module")
def stories_job(tmp_path_factory):
    from conftest import convert_stories

    from dllama_mpi.job.loading import open_job
    from dllama_mpi.parallel.comm import Comm

    need_stories()
    path = convert_stories(tmp_path_factory.mktemp("constraints"), "q40")
    return open_job(Comm(), str(path), (1,), max_seq_len=256, n_slots=6)


def serve(job, requests: list[GenRequest]) -> list[tuple[int, object]]:
    """Run the requests through one Scheduler, all submitted at once: (request index, event) in emitted order."""
    from dllama_mpi.serving.scheduler import Scheduler

    events: list[tuple[int, object]] = []
    for i, req in enumerate(requests):
        req.emit = lambda event, i=i: events.append((i, event))
    scheduler = Scheduler(job)
    for req in requests:
        scheduler.submit(req)
    scheduler.run(until=lambda: sum(isinstance(e, Finished | Failed) for _, e in events) == len(requests))
    return events


def text_of(events, i: int) -> str:
    return "".join(e.text for j, e in events if j == i and isinstance(e, Piece | Finished))


def test_constrained_answers_at_temperature_1_validate_while_greedy_neighbours_keep_their_text(stories_job):
    """20 seeded requests at temperature 1 under a schema, in the same steps as 2 greedy
    requests without one: every constrained answer parses and validates, and the greedy ones
    are what they are alone."""
    tok, grammars = stories_job.tokenizer, Grammars(stories_job.tokenizer, 512, stories_job.stop_ids)
    prompts = [tok.encode(p) for p in ("Once upon a time", "The little dog")]

    def greedy(p):
        return GenRequest(p, 40, Sampling(0.0))

    alone = [text_of(serve(stories_job, [greedy(p)]), 0) for p in prompts]
    constrained = [GenRequest(prompts[i % 2], 120, Sampling(1.0, seed=i), constraint=grammars.compile(Grammar.json_schema(PERSON)))
                   for i in range(20)]
    events = serve(stories_job, [greedy(p) for p in prompts] + constrained)
    assert [text_of(events, i) for i in range(2)] == alone
    for i in range(2, 22):
        end = next(e for j, e in events if j == i and isinstance(e, Finished | Failed))
        assert isinstance(end, Finished) and end.reason == "stop", end
        jsonschema.validate(json.loads(text_of(events, i)), PERSON)
    # the greedy answers were decoded in the same steps as constrained ones: pieces interleave
    order = [j for j, e in events if isinstance(e, Piece)]
    first, last = order.index(0), len(order) - 1 - order[::-1].index(0)
    assert any(j >= 2 for j in order[first:last])
    assert len({text_of(events, i) for i in range(2, 22)}) > 10  # temperature 1 really sampled
