"""Bytes from a file taken as text: UTF-8, or an InputError that names where they came from."""

from __future__ import annotations

from ..errors import InputError


def utf8(raw: bytes, what: str) -> str:
    """`raw` decoded; `what` names it in the message (a file, an attribute, a metadata key)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
