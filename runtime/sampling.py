"""Next-token choice from logits: greedy, temperature, top-k, top-p. Plain NumPy, one row at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UnskillError

MAX_SEED = 2 ** 63 - 1        # OpenAI's seed is an int64; numpy's generator takes any non-negative int
GREEDY_BELOW = 1e-5           # temperatures this small pick the top token anyway: sample greedily (no
                              # division that overflows: 5e-324 would turn every logit into inf, then NaN)


@dataclass
class SamplingParams:
    temperature: float = 0.0      # 0 = greedy
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 1 = off
    seed: int | None = None

    def validate(self, vocab_size: int | None = None) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UnskillError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise UnskillError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise UnskillError(f"seed must be an integer in 0..{MAX_SEED}, got {self.seed}")
        if self.top_k < 0 or (vocab_size and self.top_k > vocab_size):
            limit = f" and <= the vocabulary size {vocab_size}" if vocab_size else ""
            raise UnskillError(f"top_k must be >= 0{limit}, got {self.top_k}")


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.temperature < GREEDY_BELOW:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64)
    # Shift before dividing: every value is then <= 0 and finite, so no temperature overflows it to inf.
    scaled = (logits - logits.max()) / params.temperature
    if params.top_k:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]   # smallest set reaching top_p
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.size, p=probs))
