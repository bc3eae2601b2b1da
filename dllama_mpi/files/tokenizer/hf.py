"""Anything the Hugging Face ``tokenizers`` library runs (byte-level BPE of Llama 3 and Qwen2 GGUF
files, ``tokenizer.json`` model directories), with the model's BOS/EOS and chat-template settings
beside it; decoding by tables built from its vocabulary, so that a token's bytes come out as they
are."""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterator, Sequence

import h5py

from ...errors import InputError
from ..text import utf8
from .common import BYTE_PIECE, SPACE, StreamDecoder, alternatives, split_at, unique


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (what the ByteLevel pre-tokenizer maps bytes to)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class HFTokenizer:
    """A HF ``tokenizers.Tokenizer`` (exact HF behaviour) with model-level BOS/EOS/chat-template settings."""

    def __init__(
        self,
        tokenizer,
        bos_id: int | None = None,
        eos_ids: Sequence[int] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
        eos_id: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_id = None if bos_id is None or int(bos_id) < 0 else int(bos_id)
        self._eos_ids = unique([eos_id, *eos_ids])
        self.eos_id = self._eos_ids[0] if self._eos_ids else None
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template = chat_template or None
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        for name, value in (("bos_id", self.bos_id), *(("eos id", e) for e in self._eos_ids)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise InputError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        self._decoded: list[bytes] | None = None
        self._decoded_after_bos: list[bytes] | None = None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    def write_hdf5(self, group: h5py.Group) -> None:
        """This tokenizer as a model file's group (hdf5.py: the layout of each kind)."""
        from .hdf5 import write

        write(self, group)

    # ------------------------------------------------------------ encode/decode

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text, bos=False)), known without the BPE work (which
        holds Python's lock for about 1 s a MiB): the normalizer, which may shrink the text
        (NFC, Strip), runs first (a fast linear pass); then no token covers more bytes of it
        than the longest vocabulary entry stands for. 0 (no bound) where that does not hold."""
        if self._longest_entry is None:
            return 0
        normalizer = self.tokenizer.normalizer
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        return -(-len(text.encode("utf-8", "surrogatepass")) // self._longest_entry)

    @functools.cached_property
    def _longest_entry(self) -> int | None:
        """Bytes of text the longest vocabulary entry covers (min_tokens): a byte-level entry
        spells each byte as one character; any other entry, and an added token (matched
        whole in the text), covers its own UTF-8 bytes. None where a token may cover more: a
        vocabulary that can't spell every byte (its unknown token stands for any run of
        text) or a pre-tokenizer that drops text (whitespace splitters)."""
        def state(component) -> str:
            return "" if component is None else component.__getstate__().decode()

        decoder, pre = state(self.tokenizer.decoder), state(self.tokenizer.pre_tokenizer)
        bytelevel = bool(decoder) and _decoder_kind(json.loads(decoder))[0] == "bytelevel"
        every_byte = bytelevel or getattr(self.tokenizer.model, "byte_fallback", False)  # a BPE model's switch
        drops_text = any(f'"{kind}"' in pre for kind in ("Whitespace", "WhitespaceSplit", "BertPreTokenizer", "Removed"))
        if not every_byte or drops_text:
            return None
        byte_chars = _byte_decoder()
        added = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
        return max(1, max(len(t) if bytelevel and t not in added and all(c in byte_chars for c in t)
                          else len(t.encode("utf-8", "surrogatepass"))
                          for t in self.tokenizer.get_vocab(with_added_tokens=True)))

    def encode(self, text: str, bos: bool = True, eos: bool = False, special: bool = True) -> list[int]:
        """HF ``encode(text, add_special_tokens=False)``; ``bos=True`` adds BOS when the model asks for it.
        ``special=False`` reads special-token text as plain text (HF ``split_special_tokens=True``)."""
        tokenizer = self.tokenizer if special else self._plain_tokenizer
        ids = list(tokenizer.encode(text, add_special_tokens=False).ids)
        if bos and self.add_bos:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    @functools.cached_property
    def _plain_tokenizer(self):
        """A copy that reads special-token text as plain text: the library's switch is a property
        of the tokenizer, and flipping it on the shared one would race with other encodes."""
        plain = copy.deepcopy(self.tokenizer)
        plain.encode_special_tokens = True
        return plain

    @functools.cached_property
    def _specials(self) -> tuple[re.Pattern[str] | None, dict]:
        """The library's special added tokens: a regex of their texts (longest first, as its
        leftmost-longest matcher; kept free of groups, which would make `re` try every one of a
        few hundred alternatives at every character) and {text: (id, AddedToken)}."""
        added = {t.content: (i, t) for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        return alternatives(list(added)), added

    def _special_spans(self, text: str) -> Iterator[tuple[int, int, int]]:
        """(start, end, id) of the special tokens in ``text``, an ``lstrip``/``rstrip`` token's span
        taking the whitespace beside it, as the library does."""
        pattern, added = self._specials
        pos = 0
        for m in pattern.finditer(text) if pattern is not None else ():
            start, end = m.span()
            if start < pos:
                continue  # in whitespace an rstrip token took
            token_id, token = added[m.group()]
            while token.lstrip and start > pos and text[start - 1].isspace():
                start -= 1
            while token.rstrip and end < len(text) and text[end].isspace():
                end += 1
            pos = end
            yield start, end, token_id

    def token_text(self, token_id: int) -> str:
        """A token as the vocabulary spells it (what a chat template's ``bos_token`` is)."""
        return self.tokenizer.id_to_token(token_id)

    def split_special(self, text: str) -> list[tuple[str, int | None]]:
        """``text`` cut at the special tokens that ``encode(..., special=True)`` reads in it (added tokens
        marked special): ``(matched text, id)`` for each, ``(text, None)`` between them."""
        return split_at(text, self._special_spans(text))

    def _build_decode_tables(self) -> None:
        spec = json.loads(self.tokenizer.to_str())
        kind, strip_first = _decoder_kind(spec.get("decoder"))
        added = self.tokenizer.get_added_tokens_decoder()
        byte_dec = _byte_decoder()
        id_to_piece: dict[int, str] = {i: p for p, i in self.tokenizer.get_vocab(with_added_tokens=False).items()}
        table: list[bytes] = []
        for i in range(self.vocab_size):
            at = added.get(i)
            if at is not None:
                table.append(b"" if at.special else at.content.encode("utf-8"))
                continue
            piece = id_to_piece.get(i)
            if piece is None:
                table.append(b"")
            elif kind == "bytelevel":
                if all(c in byte_dec for c in piece):
                    table.append(bytes(byte_dec[c] for c in piece))
                else:
                    table.append(piece.encode("utf-8"))
            elif kind == "spm":
                m = BYTE_PIECE.fullmatch(piece.encode("utf-8"))
                table.append(bytes([int(m.group(1), 16)]) if m else piece.replace(SPACE, " ").encode("utf-8"))
            else:
                table.append(self.tokenizer.decode([i], skip_special_tokens=True).encode("utf-8"))
        self._decoded = table
        self._decoded_after_bos = [d[1:] if strip_first and d[:1] == b" " else d for d in table]

    def decode(self, prev_token: int, token: int) -> bytes:
        """Raw bytes of ``token`` (byte-level pieces map back to bytes; special tokens print nothing)."""
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.vocab_size})")
        if self._decoded is None:
            self._build_decode_tables()
        if prev_token == self.bos_id and prev_token is not None:
            return self._decoded_after_bos[token]
        return self._decoded[token]

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


def _decoder_kind(dec: dict | None) -> tuple[str, bool]:
    """("bytelevel" | "spm" | "other", strip a leading space after BOS) for a tokenizer.json decoder."""
    if not dec:
        return "other", False
    parts = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
    types = {p.get("type") for p in parts if isinstance(p, dict)}
    if "ByteLevel" in types:
        return "bytelevel", False
    if "Metaspace" in types:
        meta = next(p for p in parts if p.get("type") == "Metaspace")
        return "spm", meta.get("prepend_scheme", "always") != "never" and meta.get("add_prefix_space", True)
    if "ByteFallback" in types or any(p.get("type") == "Replace" and p.get("content") == " " for p in parts):
        return "spm", any(p.get("type") == "Strip" and p.get("start", 0) > 0 for p in parts)
    return "other", False


def parse_json(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON ({exc})") from None


def from_json(raw: bytes, what: str):
    """A tokenizers.Tokenizer from tokenizer.json bytes, once they are known to be a JSON object with
    a model."""
    from tokenizers import Tokenizer as _HFTokenizer

    text = utf8(raw, what)
    spec = parse_json(text, what)
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise InputError(f"{what}: expected a tokenizer.json object with a 'model' object")
    try:
        return _HFTokenizer.from_str(text)
    except Exception as exc:  # a third-party parser that reports every bad input as a bare Exception
        raise InputError(f"{what}: the tokenizers library can't load it ({exc})") from None
