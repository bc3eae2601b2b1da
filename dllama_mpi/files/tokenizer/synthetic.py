"""The vocabulary of the built-in synthetic model: llama2.c's layout, filled with deterministic
English-ish pieces so that its meaningless text still reads as words."""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterable, Iterator

import numpy as np

from .llama2c import NUM_RESERVED

_WORDS = (
    "the", "once", "upon", "time", "there", "was", "little", "girl", "boy", "named",
    "she", "he", "it", "and", "to", "of", "in", "her", "his", "with", "they", "day",
    "big", "happy", "said", "play", "mom", "dad", "friend", "saw", "very", "had",
    "one", "were", "not", "on", "you", "is", "for", "that", "be", "at", "so", "but",
    "wanted", "went", "park", "tree", "ball", "dog", "cat", "sun", "fun", "love",
)


def synthetic_vocabulary(vocab_size: int) -> tuple[list[bytes], np.ndarray]:
    """(pieces, scores (vocab_size,) float32) for llama2c.Tokenizer."""
    if vocab_size < NUM_RESERVED:
        raise ValueError(f"synthetic tokenizer needs vocab_size >= {NUM_RESERVED}, got {vocab_size}")
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    seen = set(pieces)
    pieces.extend(itertools.islice(_filler(seen), vocab_size - NUM_RESERVED))
    # Longer pieces score higher (earlier ones break ties), so merges grow
    # words left to right; reserved pieces get 0 like llama2.c's file.
    scores = np.zeros(vocab_size, dtype=np.float32)
    for i in range(NUM_RESERVED, vocab_size):
        scores[i] = len(pieces[i]) - i / vocab_size
    return pieces, scores


def _filler(seen: set[bytes]) -> Iterator[bytes]:
    """Unique filler pieces, in priority order, without end."""

    def fresh(candidates: Iterable[str]) -> Iterator[bytes]:
        for c in candidates:
            b = c.encode("utf-8")
            if b not in seen:
                seen.add(b)
                yield b

    letters = string.ascii_lowercase
    # A bare space is needed: the dummy prefix must be a mergeable piece, not a byte token.
    yield from fresh([" "])
    yield from fresh(" " + c for c in letters)
    yield from fresh(letters)
    # Every prefix of a word is a piece too, so left-to-right merges can reach the word.
    yield from fresh(" " + w[:k] for w in _WORDS for k in range(1, len(w) + 1))
    for n in itertools.count(2):
        yield from fresh("".join(t) for t in itertools.product(letters, repeat=n))
