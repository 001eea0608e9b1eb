"""The KSD guard computed inside the graph (`unskill edit guard`, exporter/guard_graph.py), read by the decode loop.

`GraphGuard` implements the Guard contract of runtime/ksd.py: the decode loop fetches its `output_names`
(`guard.refuse` and `guard.refuse.<SKILL>`) with every forward and `check` turns them into hits. The NumPy
KSDGuard stays the reference and the fallback: the runtime uses the graph's decision only where the manifest
says the graph carries a guard (`guard` in unskill.json) and the caller gave no stats files of its own, or the
same ones (by sha256) with no alpha/layer overrides.

`skill_scores` is the NumPy twin of the graph's `guard.score.<SKILL>` outputs (the tests hold the graph to it):
per region a margin (<= 1 inside): box max |v - mu| / halfwidth / threshold; gauss score / threshold; ratio
max(forget / (threshold * max(retain, tiny)), forget / bound); linear 1 + score - threshold, or for a rule over
several prompt positions, in a prompt's forward (pooled_applies), LinearRegion.prompt_margin: the smallest of the
last token's margin, the pooled mean key's and (a rule read at every position) the lowest position's; per skill the
votes-th smallest margin.
"""

from __future__ import annotations

import numpy as np

from .errors import UnskillError
from .io import sha256_file
from .ksd import (Ellipsoid, Hit, Hypercube, KSDGuard, LinearRegion, RatioRegion, gauss_score, prompt_window,
                  reads_positions, region_keys)
from .manifest import Manifest

TINY = np.finfo(np.float32).tiny


def region_margin(region, keys: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """keys (B, F) -> (B,) float32: the region's score over its threshold (<= 1 inside). A LinearRegion takes
    (B, layers, F), or (B, P, layers, F) at P prompt positions with valid (B, P) (its prompt_margin)."""
    if isinstance(region, LinearRegion):   # its threshold has either sign: 1 + score - threshold
        if keys.ndim == 4:
            return region.prompt_margin(keys, np.ones(keys.shape[:2], bool) if valid is None else valid)
        return region.margin(keys)
    if isinstance(region, Hypercube):
        return region.score(keys) / np.float32(region.threshold)
    if isinstance(region, RatioRegion):
        forget = gauss_score(keys, region.center, region.inverse_sigma)
        retain = gauss_score(keys, region.retain_center, region.retain_inverse_sigma)
        limit = np.float32(region.threshold) * np.maximum(retain, TINY)
        return np.maximum(forget / limit, forget / np.float32(region.bound))
    if isinstance(region, Ellipsoid):
        return region.score(keys) / np.float32(region.threshold)
    raise UnskillError(f"no graph form for the guard region kind {type(region).__name__}")


def pooled_applies(new_positions: int, mask: np.ndarray | None) -> bool:
    """Whether a forward of `new_positions` input tokens with attention mask (B, past + new) is a prompt's, where
    a linear rule over several positions also reads the pooled mean key: several new tokens (a whole prompt, its
    chunks, a continuation after a cached prefix), or no past (a one-token prompt). A decode step (one token
    after a past) is not: the runtime checks it with key_last alone (KSDGuard.check without per-position keys).
    The graph's guard decides alike (exporter/guard_graph.py _is_prompt)."""
    return new_positions > 1 or mask is None or mask.shape[1] == new_positions


def skill_scores(guard: KSDGuard, keys_of_layer: dict[int, np.ndarray], mask: np.ndarray | None = None
                 ) -> list[np.ndarray]:
    """Per detector (in order) the (B,) score the graph writes to guard.score.<SKILL>: the votes-th smallest
    region margin. keys_of_layer: layer -> (B, F) full-width key at the last position, or (B, S, F) at the S
    positions of this forward (then mask (B, past + S), the attention mask whose last S columns they are): a
    linear rule over several positions reads its last `positions` of them (a rule read at every position: all of
    them) where pooled_applies, every other region (and that rule at a decode step) the last one (as
    KSDGuard.check)."""
    def last(layer: int) -> np.ndarray:
        keys = keys_of_layer[layer]
        return keys if keys.ndim == 2 else keys[:, -1]

    def margin(region) -> np.ndarray:
        spread = keys_of_layer[region.layers[0]] if reads_positions(region) else None
        if spread is not None and spread.ndim == 3 and pooled_applies(spread.shape[1], mask):
            return region_margin(region, *prompt_window(region, keys_of_layer.get, mask))
        return region_margin(region, region_keys(region, last))

    scores = []
    for detector in guard.detectors:
        margins = np.stack([margin(region) for region in detector.regions])
        scores.append(np.sort(margins, axis=0)[detector.votes - 1])
    return scores


class GraphGuard:
    """The guard baked into the graph: per row the first skill whose guard.refuse.<SKILL> is set."""

    def __init__(self, manifest: Manifest, graph_outputs: set[str]):
        record = manifest.guard or {}
        self.skills = [(s["skill"], s["rule"], s["refuse_output"]) for s in record.get("skills", [])]
        self.output_names = [record.get("refuse_output", "guard.refuse"), *(out for _, _, out in self.skills)]
        missing = [name for name in self.output_names if name not in graph_outputs]
        if not self.skills or missing:
            raise UnskillError(f"unskill.json records a guard in the graph, but the graph lacks {missing[:3]}; "
                               "re-run `unskill edit guard`")

    def describe(self) -> list[str]:
        return [f"{skill}: {rule} (in the graph)" for skill, rule, _ in self.skills]

    def check(self, outputs: dict[str, np.ndarray]) -> list[Hit | None]:
        hits: list[Hit | None] = [None] * len(outputs[self.output_names[0]])
        for row in np.flatnonzero(outputs[self.output_names[0]]):
            skill, rule = next(((s, r) for s, r, out in self.skills if outputs[out][row]), self.skills[0][:2])
            hits[row] = Hit(skill, None, f"{rule} (in the graph)")
        return hits


def graph_guard_applies(manifest: Manifest, stats_paths, explicit: bool) -> bool:
    """Whether the graph's own guard is the one asked for: the graph carries one and the caller named no stats
    (the model's guard), or exactly its stats files with no alpha/layer override."""
    if not manifest.guard:
        return False
    if not stats_paths:
        return True
    recorded = sorted(s["stats_sha256"] for s in manifest.guard["skills"])
    return not explicit and sorted(sha256_file(p) for p in stats_paths) == recorded
