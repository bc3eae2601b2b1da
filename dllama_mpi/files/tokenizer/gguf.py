"""A GGUF file's vocabulary (``tokenizer.ggml.*`` metadata, as llama.cpp reads it) as a tokenizer:
sentencepiece (``"llama"``) as an SpmTokenizer, byte-level BPE (``"gpt2"``) built into a
``tokenizers`` BPE with the pre-tokenizer that ``tokenizer.ggml.pre`` names."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ...errors import InputError
from ..gguf_file import GGUFFile
from .common import TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED, unique
from .hf import HFTokenizer
from .spm import SpmTokenizer

# Texts of tokens that end a turn, as llama.cpp recognises them (llama-vocab.cpp "EOG" tokens).
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|end|>", "<|endoftext|>",
    "<end_of_turn>", "<EOT>", "_<EOT>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<|return|>", "<|call|>",
})

# Pre-tokenizer regexes as in the models' HF tokenizer.json (llama.cpp llama-vocab.cpp quotes them).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# tokenizer.ggml.pre -> (regex, ignore_merges, NFC normalizer, default add_bos)
_BPE_PRE_TYPES: dict[str, tuple[str, bool, bool, bool]] = {
    "llama-bpe": (_LLAMA3_REGEX, True, False, True),
    "llama3": (_LLAMA3_REGEX, True, False, True),
    "llama-v3": (_LLAMA3_REGEX, True, False, True),
    "smaug-bpe": (_LLAMA3_REGEX, False, False, False),
    "dbrx": (_LLAMA3_REGEX, False, False, False),
    "qwen2": (_QWEN2_REGEX, False, True, False),
    "stablelm2": (_QWEN2_REGEX, False, False, False),
    "gpt-2": (_GPT2_REGEX, False, False, False),
    "gpt2": (_GPT2_REGEX, False, False, False),
}


def from_gguf(reader: GGUFFile) -> SpmTokenizer | HFTokenizer:
    """Tokenizer of a GGUF file (``reader``: a ``gguf_file.GGUFFile`` opened on it)."""
    model = reader.string("tokenizer.ggml.model")
    if model == "llama":
        return _spm(reader)
    if model == "gpt2":
        return _bpe(reader)
    if model is None:
        raise InputError("GGUF file has no tokenizer (key 'tokenizer.ggml.model' is missing)")
    raise InputError(
        f"GGUF vocabulary type tokenizer.ggml.model={model!r} is not supported "
        "(supported: 'llama' sentencepiece, 'gpt2' byte-level BPE)"
    )


def _spm(reader: GGUFFile) -> SpmTokenizer:
    texts = _vocabulary(reader)
    n = len(texts)
    scores = reader.per_token("tokenizer.ggml.scores", "number", n)
    scores = np.zeros(n, np.float32) if scores is None else np.asarray(scores, np.float32)
    types = reader.per_token("tokenizer.ggml.token_type", "integer", n)
    types = np.full(n, TOKEN_NORMAL, np.int32) if types is None else np.asarray(types, np.int32)
    bos = reader.scalar("tokenizer.ggml.bos_token_id", "integer", 1)
    eos = reader.scalar("tokenizer.ggml.eos_token_id", "integer", 2)
    return SpmTokenizer(
        texts, scores, types,
        bos_id=bos, eos_id=eos,
        eos_ids=_eog_ids(reader, texts, types.tolist(), eos),
        unk_id=reader.scalar("tokenizer.ggml.unknown_token_id", "integer", 0),
        add_bos=reader.scalar("tokenizer.ggml.add_bos_token", "boolean", True),
        add_space_prefix=reader.scalar("tokenizer.ggml.add_space_prefix", "boolean", True),
        chat_template=reader.string("tokenizer.chat_template"),
    )


def _bpe(reader: GGUFFile) -> HFTokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as _HFTokenizer

    pre = reader.string("tokenizer.ggml.pre") or "default"
    if pre not in _BPE_PRE_TYPES:
        raise InputError(
            f"GGUF byte-level BPE pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(_BPE_PRE_TYPES))})"
        )
    regex, ignore_merges, nfc, default_add_bos = _BPE_PRE_TYPES[pre]
    texts = _vocabulary(reader, exact=True)  # the tokenizers library takes UTF-8 only
    types_arr = reader.per_token("tokenizer.ggml.token_type", "integer", len(texts))
    types = [TOKEN_NORMAL] * len(texts) if types_arr is None else [int(t) for t in types_arr]
    vocab = {t: i for i, t in enumerate(texts)}
    merges = _bpe_merges(reader.strings("tokenizer.ggml.merges", exact=True) or [], vocab)
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges,
                                  byte_fallback=False, fuse_unk=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(texts, types)
               if k == TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(texts, types)
            if k == TOKEN_USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    bos = reader.scalar("tokenizer.ggml.bos_token_id", "integer")
    eos = reader.scalar("tokenizer.ggml.eos_token_id", "integer")
    return HFTokenizer(
        tok,
        bos_id=bos,
        eos_ids=_eog_ids(reader, texts, types, eos),
        add_bos=reader.scalar("tokenizer.ggml.add_bos_token", "boolean", default_add_bos),
        chat_template=reader.string("tokenizer.chat_template"),
        eos_id=eos,
    )


def _vocabulary(reader: GGUFFile, exact: bool = False) -> list[str]:
    texts = reader.strings("tokenizer.ggml.tokens", exact)
    if texts is None:
        raise InputError("GGUF metadata lacks 'tokenizer.ggml.tokens' (the vocabulary)")
    return texts


def _eog_ids(reader: GGUFFile, texts: Sequence[str], types: Sequence[int], eos: int | None) -> tuple[int, ...]:
    """The tokens that end a turn: EOS, EOT and EOM as the metadata names them, then every
    control/user-defined token whose text ends a turn."""
    first: Iterable[int | None] = [eos, reader.scalar("tokenizer.ggml.eot_token_id", "integer"),
                                   reader.scalar("tokenizer.ggml.eom_token_id", "integer")]
    extra = [i for i, t in enumerate(texts) if t in _EOG_TEXTS and types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    return unique([*first, *extra])


def _bpe_merges(lines: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """GGUF merges ("left right") as pairs, checked like the tokenizers library's BPE builder
    would (it panics instead): both sides and their concatenation are tokens."""
    merges = []
    for m in lines:
        left, sep, right = m.partition(" ")
        if not sep:
            raise InputError(f"GGUF merge {m!r} is not 'left right'")
        missing = [t for t in (left, right, left + right) if t not in vocab]
        if missing:
            raise InputError(f"GGUF merge {m!r} names {missing[0]!r}, which is not in the vocabulary")
        merges.append((left, right))
    return merges
