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
from unskill.evals.evaluate import KeyEntry, prompt_keys


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
    _check_target(target)
    entry = KeyEntry({"skill": stats}, model.manifest.num_layers, model.manifest.key_outputs, layer)
    retain_alphas = _entry_alphas(model, tokenizer, entry, retain, chat)["skill"]
    forget_alphas = _entry_alphas(model, tokenizer, entry, forget, chat)["skill"] if forget is not None else None
    return _choose(retain_alphas, forget_alphas, target, entry.layer)


def calibrate_skills(model: OnnxLM, tokenizer: TextTokenizer, stats: dict[str, StatsFile],
                     forget: dict[str, Dataset], retain: Dataset | None = None, target: float = 0.01,
                     layer: int = -1, chat: bool = True) -> dict[str, Calibration]:
    """Several skills in one pass: each prompt gets one prefill and its entry alpha for every cube.

    A skill's retain set is the shared `retain` plus every other skill's validation prompts (forget Spanish:
    the German, Arabic, ... prompts must stay answered), so N skills cost one pass over N forget sets instead
    of N passes over N retain sets, and each cube's retain tail is measured on more prompts.
    """
    _check_target(target)
    if set(forget) != set(stats):
        raise UnskillError(f"calibrate: every --stats NAME needs a --forget NAME=SPEC and back "
                           f"(stats {sorted(stats)}, forget {sorted(forget)})")
    entry = KeyEntry(stats, model.manifest.num_layers, model.manifest.key_outputs, layer)
    per_forget = {name: _entry_alphas(model, tokenizer, entry, dataset, chat) for name, dataset in forget.items()}
    shared = _entry_alphas(model, tokenizer, entry, retain, chat) if retain is not None else None
    results = {}
    for name in stats:
        parts = [per_forget[other][name] for other in forget if other != name]
        if shared is not None:
            parts.append(shared[name])
        results[name] = _choose(np.concatenate(parts), per_forget[name][name], target, entry.layer)
    return results


def _check_target(target: float) -> None:
    if not 0 <= target < 1:
        raise UnskillError(f"--target must be in [0, 1), got {target}")


def _entry_alphas(model, tokenizer, entry: KeyEntry, dataset: Dataset, chat: bool) -> dict[str, np.ndarray]:
    rows = entry(prompt_keys(model, tokenizer, dataset, entry.layer, chat))
    return {name: np.array([row[name] for row in rows]) for name in entry.cubes}


def _choose(retain_alphas: np.ndarray, forget_alphas: np.ndarray | None, target: float, layer: int) -> Calibration:
    """The largest alpha that refuses at most floor(target * n) retain prompts (entry alpha <= alpha refuses)."""
    if retain_alphas.size == 0:
        raise UnskillError("calibrate: no retain prompts to calibrate on")
    retain_alphas = np.sort(retain_alphas)
    allowed = int(np.floor(target * retain_alphas.size))   # retain prompts we may refuse
    alpha = float(retain_alphas[allowed]) * (1 - 1e-6) if allowed < retain_alphas.size else float("inf")
    return Calibration(alpha, layer, float(np.mean(retain_alphas <= alpha)),
                       None if forget_alphas is None else float(np.mean(forget_alphas <= alpha)),
                       int(retain_alphas.size), None if forget_alphas is None else int(forget_alphas.size))
