"""Key Space Detection: abstain when the key vector falls inside a skill's hypercube.

A stats file's `ksd` group gives, per layer, the mean mu and sample std sigma (ddof=1) of the key vector
at the last prompt token over the forget probes. The cube is |v - mu| <= r * sigma in every dimension:
    alpha_mode="k"      r = alpha * k, k = the smallest multiplier whose cube holds every probe vector
                        (the reference code's convention; default alpha 1.0: the tightest cube that still
                        covers all probes). k comes exactly from the stored per-dimension min and max.
    alpha_mode="sigma"  r = alpha (the paper's mu ± alpha*sigma).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UnskillError
from .manifest import Manifest
from .statsfile import StatsFile

SIGMA_FLOOR = 1e-6   # a dimension constant over all probes still admits float noise around it
ALPHA_MODES = ("k", "sigma")


@dataclass
class Hypercube:
    skill: str
    layer: int
    center: np.ndarray      # (F,) float32
    halfwidth: np.ndarray   # (F,) float32
    k: float                # fitted factor, reported for context

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """keys (B, F) -> (B,) bool: inside in every dimension."""
        return (np.abs(keys - self.center) <= self.halfwidth).all(axis=-1)


@dataclass
class Hit:
    skill: str
    layer: int


def fitted_k(mean: np.ndarray, std: np.ndarray, low: np.ndarray, high: np.ndarray) -> float:
    """Smallest k with low >= mean - k*std and high <= mean + k*std in every dimension."""
    std = np.maximum(std, SIGMA_FLOOR)
    return float(np.max(np.maximum(high - mean, mean - low) / std))


def build_cubes(stats: StatsFile, layers: list[int], alpha: float, alpha_mode: str) -> list[Hypercube]:
    if alpha_mode not in ALPHA_MODES:
        raise UnskillError(f"alpha mode {alpha_mode!r}: use one of {ALPHA_MODES}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise UnskillError(f"alpha must be positive and finite, got {alpha}")
    moments = stats.groups.get("ksd")
    if moments is None:
        raise UnskillError(f"stats for {stats.skill!r} have no KSD group; rebuild them with `unskill stats`")
    mean, std = moments.mean(), np.maximum(moments.std(ddof=1), SIGMA_FLOOR)
    cubes = []
    for layer in layers:
        if moments.count[layer] < 2:
            raise UnskillError(f"stats for {stats.skill!r}: layer {layer} has {moments.count[layer]} probes, need >= 2")
        k = fitted_k(mean[layer], std[layer], moments.values["min"][layer], moments.values["max"][layer])
        if not (k > 0 and math.isfinite(k)):   # identical probes: a cube of width 0 would never fire
            raise UnskillError(f"stats for {stats.skill!r}: layer {layer}'s probe keys have no spread (k = {k:g}); "
                               f"the cube would refuse nothing; probe with more varied prompts")
        radius = alpha * k if alpha_mode == "k" else alpha
        cubes.append(Hypercube(stats.skill, layer, mean[layer].astype(np.float32),
                               (radius * std[layer]).astype(np.float32), k))
    return cubes


class KSDGuard:
    """Several skills, several layers: a row abstains if any cube holds its key at any checked layer."""

    def __init__(self, stats_files: list[StatsFile], manifest: Manifest, alpha: float = 1.0,
                 alpha_mode: str = "k", layers: list[int] | None = None):
        if not stats_files:
            raise UnskillError("KSD guard needs at least one stats file")
        layers = [manifest.num_layers - 1] if layers is None else [self._layer(i, manifest) for i in layers]
        self.cubes = [cube for stats in stats_files for cube in build_cubes(stats, layers, alpha, alpha_mode)]
        # key_last.{i} ([B, F]) where the export has it: a long prompt's prefill then copies one position
        # out of onnxruntime, not [B, S, F].
        names = manifest.key_last_outputs or manifest.key_outputs
        self.output_names = [names[i] for i in sorted(set(layers))]
        self._output_of_layer = {i: names[i] for i in layers}

    @staticmethod
    def _layer(index: int, manifest: Manifest) -> int:
        layer = index + manifest.num_layers if index < 0 else index
        if not 0 <= layer < manifest.num_layers:
            raise UnskillError(f"layer {index} out of range: the model has {manifest.num_layers} FFL layers")
        return layer

    def check(self, last_keys: dict[str, np.ndarray]) -> list[Hit | None]:
        """last_keys: output name -> (B, F) key at the last position. First hit per row, else None."""
        batch = next(iter(last_keys.values())).shape[0]
        hits: list[Hit | None] = [None] * batch
        for cube in self.cubes:
            inside = cube.contains(last_keys[self._output_of_layer[cube.layer]])
            for row in np.flatnonzero(inside):
                hits[row] = hits[row] or Hit(cube.skill, cube.layer)
        return hits
