"""Per-rank arithmetic: vector ops, quantized products, and their plain-numpy twins (reference)."""

from __future__ import annotations

import functools
import importlib


@functools.cache
def resolve(name: str):
    """The kernel or twin a weight type's record names, "module.function" in this package
    (quant.Kernels: the registry imports no numba)."""
    module, _, function = name.partition(".")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)
