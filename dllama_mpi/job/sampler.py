"""Next-token choice on rank 0: greedy, or temperature + top-p (nucleus) sampling.

The kernel is kernels.sample (twin: reference.sample). Buffers are allocated once; sampling a token allocates nothing.
"""

from __future__ import annotations

import random

import numpy as np

from ..kernels.vector import sample


class Sampler:
    def __init__(self, vocab_size: int, temperature: float, top_p: float, seed: int):
        self.temperature, self.top_p = float(temperature), float(top_p)
        self._rng = random.Random(seed)
        self._probs = np.zeros(vocab_size, np.float64)
        self._scratch = np.zeros(vocab_size, np.float64)

    def __call__(self, logits: np.ndarray) -> int:
        coin = self._rng.random() if self.temperature > 0 else 0.0
        return sample(logits, self.temperature, self.top_p, coin, self._probs, self._scratch)
