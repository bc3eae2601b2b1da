"""HDF5 attributes as Python values, read the same way in every file this program reads (model
files, saved logits, temporaries' records). h5py hands text over as str, or as bytes (fixed-
length and byte strings), either possibly inside a numpy scalar or a one-element array."""

from __future__ import annotations

import numpy as np


def attribute_text(value) -> str | None:
    """A text attribute as str; None for anything else: absent, not text, or bytes that are
    not UTF-8."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(())
    if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            return None
    return str(value) if isinstance(value, str) else None


def decoded(attrs) -> dict:
    """Every attribute, its text as str (attribute_text); the rest as h5py gives them."""
    return {name: value if (text := attribute_text(value)) is None else text for name, value in attrs.items()}


def plain_value(value):
    """One attribute as plain Python: its text as str (attribute_text), numpy scalars and
    arrays as numbers and lists; to print, or to compare."""
    if (text := attribute_text(value)) is not None:
        return text
    return value.tolist() if isinstance(value, (np.generic, np.ndarray)) else value


def plain(attrs) -> dict:
    """Every attribute as plain_value."""
    return {name: plain_value(value) for name, value in attrs.items()}
