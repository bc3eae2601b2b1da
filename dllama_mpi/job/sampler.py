"""Next-token choice on rank 0: greedy, or temperature + top-p (nucleus) sampling, and the
acceptance rule of speculative sampling (Sampler.verify).

The kernels are in kernels.vector (twins: reference.sample, .distribution, .residual). Buffers
are allocated once; sampling a token allocates nothing.
"""

from __future__ import annotations

import random

import numpy as np

from ..kernels.vector import distribution, pick, residual, sample


class Sampler:
    def __init__(self, vocab_size: int, temperature: float, top_p: float, seed: int):
        self.temperature, self.top_p = float(temperature), float(top_p)
        self._rng = random.Random(seed)
        self._probs = np.zeros(vocab_size, np.float64)
        self._scratch = np.zeros(vocab_size, np.float64)

    def __call__(self, logits: np.ndarray) -> int:
        coin = self._rng.random() if self.temperature > 0 else 0.0
        return sample(logits, self.temperature, self.top_p, coin, self._probs, self._scratch)

    def verify(self, logits: np.ndarray, drafts, draft_probs: np.ndarray | None = None) -> tuple[int, int]:
        """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): logits (k + 1, vocab)
        are the model's at the rows [the last token, drafts...]; draft j was drawn from
        draft_probs[j] (None: one-hot, a prompt lookup's). Returns (a, token): the text goes on
        with drafts[:a], then token, and is distributed as the model's own sampling: draft j is
        kept with probability min(1, p(d) / q(d)), else the token is drawn from max(0, p - q)
        normalised; when all k are kept, the token is drawn from the last row. At temperature 0
        this is the greedy choice at each row (same bits as without drafts)."""
        k = len(drafts)
        if self.temperature == 0:
            for j in range(k):
                token = self(logits[j])
                if token != drafts[j]:
                    return j, token
            return k, self(logits[k])
        p = self._probs
        for j in range(k):
            distribution(logits[j], self.temperature, self.top_p, p, self._scratch)
            d = int(drafts[j])
            q_d = 1.0 if draft_probs is None else float(draft_probs[j, d])
            if self._rng.random() * q_d < p[d]:  # u < p(d) / q(d)
                continue
            if draft_probs is None:
                p[d] = 0.0  # max(0, p - one-hot at d)
                return j, pick(p, self._rng.random())
            residual(p, draft_probs[j], self._scratch)
            return j, pick(self._scratch, self._rng.random())
        return k, self(logits[k])

    def draw(self, logits: np.ndarray, probs_out: np.ndarray) -> int:
        """A draft model's token: drawn from its sampling distribution, written to probs_out
        (what verify's rule needs); greedy at temperature 0 (probs_out left as it is: unused)."""
        if self.temperature == 0:
            return self(logits)
        distribution(logits, self.temperature, self.top_p, probs_out, self._scratch)
        return pick(probs_out, self._rng.random())
