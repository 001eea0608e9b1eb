"""Next-token choice from logits: greedy, temperature, top-k, top-p. Plain NumPy, one row at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UnskillError


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
        if self.top_k < 0 or (vocab_size and self.top_k > vocab_size):
            limit = f" and <= the vocabulary size {vocab_size}" if vocab_size else ""
            raise UnskillError(f"top_k must be >= 0{limit}, got {self.top_k}")


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
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
