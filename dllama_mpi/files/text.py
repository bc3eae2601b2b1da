"""Bytes from a file taken as text: UTF-8, or an InputError that names where they came from."""

from __future__ import annotations

from ..errors import InputError


def utf8(raw: bytes, what: str, fix: str = "") -> str:
    """`raw` decoded; `what` names it in the message (a file, an attribute, a metadata key),
    `fix` says what to do where the user can (a file of theirs can be converted; a byte inside
    a model's metadata can't, the message says which byte)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}: "
                         f"{exc.reason}){f'; {fix}' if fix else ''}") from None
