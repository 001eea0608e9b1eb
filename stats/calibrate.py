"""Choose KSD's alpha from data: the widest cube whose false-abstain rate on retain prompts stays under a
target, reported with how much of the forget set it still catches. The paper leaves alpha to hand-tuning.

A prompt's entry alpha is max over dimensions of |v - mu| / (k * sigma): the smallest alpha (in units of the
fitted k) whose cube contains it. Rates at any alpha follow from sorting these, with no more forward passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from unskill.runtime.errors import UnskillError
from unskill.runtime.session import OnnxLM
from unskill.runtime.statsfile import StatsFile
from unskill.runtime.tokenizer import TextTokenizer

from .datasets import Dataset
from .evaluate import KeyEntry, prompt_keys


@dataclass
class Calibration:
    alpha: float                 # in units of the fitted k (ksd-run --alpha-mode k)
    layer: int
    retain_abstain: float        # on the retain prompts given
    forget_abstain: float | None
    retain_items: int
    forget_items: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def calibrate(model: OnnxLM, tokenizer: TextTokenizer, stats: StatsFile, retain: Dataset,
              forget: Dataset | None = None, target: float = 0.01, layer: int = -1, chat: bool = True) -> Calibration:
    if not 0 <= target < 1:
        raise UnskillError(f"--target must be in [0, 1), got {target}")
    manifest = model.manifest
    entry = KeyEntry({"skill": stats}, manifest.num_layers, manifest.key_outputs, layer)
    layer = entry.layer

    def alphas(dataset):
        return np.array([row["skill"] for row in entry(prompt_keys(model, tokenizer, dataset, layer, chat))])

    retain_alphas = np.sort(alphas(retain))
    allowed = int(np.floor(target * retain_alphas.size))   # retain prompts we may refuse
    alpha = float(retain_alphas[allowed]) * (1 - 1e-6) if allowed < retain_alphas.size else float("inf")
    forget_alphas = alphas(forget) if forget is not None else None
    return Calibration(alpha, layer, float(np.mean(retain_alphas <= alpha)),
                       None if forget_alphas is None else float(np.mean(forget_alphas <= alpha)),
                       int(retain_alphas.size), None if forget_alphas is None else int(forget_alphas.size))
