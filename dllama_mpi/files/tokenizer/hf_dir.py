"""A Hugging Face model directory's tokenizer: ``tokenizer.json``, with BOS, EOS and the chat template
gathered from ``tokenizer_config.json``, ``config.json``, ``generation_config.json`` and the chat
template files, as transformers reads them."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from ...errors import InputError
from ..text import utf8
from .hf import HFTokenizer, from_json, parse_json


def from_hf_dir(path: str | PathLike[str]) -> HFTokenizer:
    """Tokenizer of a HF model directory (tokenizer.json + tokenizer_config/config/generation_config)."""
    path = Path(path)
    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise InputError(f"{path}: no tokenizer.json (only HF 'fast' tokenizers are supported)")
    tok = from_json(tj.read_bytes(), str(tj))
    cfg = _read_json(path / "tokenizer_config.json")
    model_cfg = _read_json(path / "config.json")
    gen_cfg = _read_json(path / "generation_config.json")

    def token_id(value) -> list[int]:
        if value is None:
            return []
        if isinstance(value, list):
            return [i for v in value for i in token_id(v)]
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, bool):
            return []
        if isinstance(value, int):
            return [value]
        if isinstance(value, str):
            tid = tok.token_to_id(value)
            return [] if tid is None else [tid]
        return []

    bos_candidates = token_id(cfg.get("bos_token")) + token_id(gen_cfg.get("bos_token_id")) + \
        token_id(model_cfg.get("bos_token_id"))
    bos_id = bos_candidates[0] if bos_candidates else None
    eos_primary = token_id(cfg.get("eos_token"))
    eos_ids = eos_primary + token_id(gen_cfg.get("eos_token_id")) + token_id(model_cfg.get("eos_token_id"))
    if "add_bos_token" in cfg and isinstance(cfg["add_bos_token"], bool):
        add_bos = cfg["add_bos_token"]
    else:  # what the tokenizer.json post-processor does on its own
        add_bos = bos_id is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not template and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if not template and (path / "chat_template.json").is_file():
        template = _read_json(path / "chat_template.json").get("chat_template")
    return HFTokenizer(tok, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos,
                       chat_template=template if isinstance(template, str) else None,
                       eos_id=eos_primary[0] if eos_primary else None)


def _read_json(path: Path) -> dict:
    """A model directory's optional JSON settings file ({} if absent or not an object)."""
    if not path.is_file():
        return {}
    data = parse_json(utf8(path.read_bytes(), str(path)), str(path))
    return data if isinstance(data, dict) else {}
