"""Key Space Detection: abstain when the key vector falls inside a skill's region. This module owns the rule.

Every region kind scores a key, then fires: `score(keys (..., F)) -> (...,)` and inside when score <= threshold.
    Hypercube     max_d |v - center| / halfwidth          (threshold 1.0: the paper's cube, alpha in halfwidth)
    Ellipsoid     mean_d ((v - center) * inverse_sigma)^2  (diagonal Gaussian)
    RatioRegion   Ellipsoid's score over the same under the retain prompts' Gaussian, +inf beyond `bound`
    LinearRegion  -(w . v + b): Fisher's linear discriminant between the forget probes' keys and the retain
                  prompts' keys (closed form from their means and shrunk pooled covariance: nothing trained)
A Detector (one skill) fires on a row when at least `votes` of its regions (one per layer) hold that row's key
of their layer (`vote`). Calibration (stats/calibrate.py) and evaluation (evals/, runtime/keys.py KeyEntry) score
keys with these regions and decide with `vote`; they never re-derive a score or a threshold.

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
from typing import Protocol

import numpy as np

from .errors import UnskillError
from .manifest import Manifest, require_key_last, resolve_layers
from .statsfile import GuardSetting, StatsFile, alpha_problem

SIGMA_FLOOR = 1e-6   # a dimension constant over all probes still admits float noise around it
ALPHA_MODES = ("k", "sigma")
RULES = ("box", "gauss", "ratio", "linear")


@dataclass
class Hypercube:
    """The box region: the key is inside when |v - center| <= halfwidth in every dimension.
    score(keys) = max_d |v_d - center_d| / halfwidth_d; inside when score <= threshold (1.0 for every cube the
    guard builds: the stored alpha is folded into halfwidth = alpha * k * sigma). With alpha 1 the score is the
    key's *entry alpha*, the smallest alpha (x k) whose cube holds it: what calibration and evals rank."""
    skill: str
    layer: int
    center: np.ndarray      # (F,) float32
    halfwidth: np.ndarray   # (F,) float32
    k: float                # fitted factor, reported for context
    threshold: float = 1.0

    def score(self, keys: np.ndarray) -> np.ndarray:
        """keys (..., F) -> (...,) the largest |v - center| / halfwidth over dimensions."""
        return np.max(np.abs(keys - self.center) / self.halfwidth, axis=-1)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """keys (B, F) -> (B,) bool: inside in every dimension."""
        return self.score(keys) <= self.threshold


def gauss_score(keys: np.ndarray, center: np.ndarray, inverse_sigma: np.ndarray) -> np.ndarray:
    """Mean over the last axis of ((v - mu) / sigma)^2: keys (..., F), center and inverse_sigma broadcast against
    them ((F,) for one layer, (L, F) for keys of every layer). The one implementation: the guard and calibrate."""
    z = (keys - center) * inverse_sigma
    return np.einsum("...f,...f->...", z, z) / z.shape[-1]


def gaussian(moments) -> tuple[np.ndarray, np.ndarray]:
    """(mu, 1 / sigma) per layer, (L, F) float32 each, from a stats group (sample std, floored)."""
    std = np.maximum(moments.std(ddof=1), SIGMA_FLOOR)
    return moments.mean().astype(np.float32), (1 / std).astype(np.float32)


@dataclass
class Ellipsoid:
    """The diagonal-Gaussian region. score(keys) = mean over dimensions of ((v - center) * inverse_sigma)^2
    (gauss_score); inside when score <= threshold."""
    skill: str
    layer: int
    center: np.ndarray      # (F,) float32
    inverse_sigma: np.ndarray   # (F,) float32
    threshold: float

    def score(self, keys: np.ndarray) -> np.ndarray:
        return gauss_score(keys, self.center, self.inverse_sigma)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        return self.score(keys) <= self.threshold


@dataclass
class RatioRegion:
    """Forget against retain: the key's mean squared z-score under the forget probes' Gaussian divided by the
    same under the retain prompts' Gaussian (both diagonal, from key statistics only) <= threshold. A prompt
    far from the forget probes but farther still from everything the model must keep answering (a coding
    request told as a story) falls inside; one near both (chat with numbers) does not.
    score(keys) = f / max(r, tiny) where f = gauss_score under (center, inverse_sigma) and r = gauss_score under
    (retain_center, retain_inverse_sigma), tiny = float32's smallest normal; +inf where f > bound (the cap);
    inside when score <= threshold."""
    skill: str
    layer: int
    center: np.ndarray             # (F,) forget mean
    inverse_sigma: np.ndarray      # (F,) forget 1 / sigma
    retain_center: np.ndarray      # (F,) retain mean
    retain_inverse_sigma: np.ndarray
    threshold: float
    bound: float = math.inf        # forget-side score cap: a key far from BOTH Gaussians is no forget request

    def score(self, keys: np.ndarray) -> np.ndarray:
        # Keys at decoded tokens lie far from both prompt-token Gaussians; their quotient says nothing, and
        # without the cap it fires on every answer (measured: docs/robustness.md).
        forget = gauss_score(keys, self.center, self.inverse_sigma)
        ratio = forget / np.maximum(gauss_score(keys, self.retain_center, self.retain_inverse_sigma), TINY)
        return np.where(forget <= self.bound, ratio, np.inf)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        return self.score(keys) <= self.threshold


TINY = np.finfo(np.float32).tiny


def ratio_score(keys, center, inverse_sigma, retain_center, retain_inverse_sigma) -> np.ndarray:
    """The uncapped ratio score (RatioRegion.score with bound inf)."""
    forget = gauss_score(keys, center, inverse_sigma)
    return forget / np.maximum(gauss_score(keys, retain_center, retain_inverse_sigma), TINY)


@dataclass
class LinearRegion:
    """One side of a hyperplane over the keys of one or more layers: score(keys) = -(sum_l keys_l . weight_l +
    bias), inside when score <= threshold (either sign). The weights are Fisher's discriminant of each layer's
    keys, forget probes against retain prompts (stats/discriminant.py: (S + shrinkage)^-1 (mu_forget - mu_retain),
    scaled to unit spread), averaged over the layers. Where the Gaussians of the other kinds score the distance
    from the forget probes, which any new frame, language or noise moves a request away from, this reads the
    direction that separates the skill from what must be kept, so a request in a new wrapping still lies on the
    skill's side (docs/guard.md). Its keys are (..., len(layers), F): `region_keys` stacks them."""
    skill: str
    layers: tuple[int, ...]
    weight: np.ndarray      # (len(layers), F) float32
    bias: float
    threshold: float        # at the newest position: the prompt's last token, then every decoded token
    positions: int = 1      # at the prompt also the mean key of its last `positions` tokens (1: not read) ...
    pooled_weight: np.ndarray | None = None   # ... scored by its own discriminant (len(layers), F) ...
    pooled_bias: float = 0.0
    pooled_threshold: float = -math.inf      # ... against its own threshold (calibrated on the budget left)
    anywhere_threshold: float = -math.inf    # at the prompt also each position's key, scored as the last token's,
    #                                          against this threshold (-inf: not read) ...
    anywhere_positions: int = 0              # ... at the prompt's last this many positions (0: every position)

    @property
    def reads_anywhere(self) -> bool:
        """Whether the rule also reads earlier prompt positions one by one (the last `anywhere_positions`, or all)."""
        return self.anywhere_threshold > -math.inf

    @property
    def every_position(self) -> bool:
        """Whether the rule reads every prompt position (then its prompt keys are all of them, however long the
        prompt: it runs in one forward), not a window of the last ones."""
        return self.reads_anywhere and self.anywhere_positions == 0

    @property
    def window(self) -> int:
        """The prompt's last positions whose keys the rule reads (where it does not read every position): the
        mean key's and the one-by-one read's, whichever reaches further back."""
        return max(self.positions, self.anywhere_positions if self.reads_anywhere else 1)

    @property
    def layer(self) -> int:
        """The deepest layer it reads (what a refusal reports)."""
        return self.layers[-1]

    def score(self, keys: np.ndarray) -> np.ndarray:
        """keys (..., len(layers), F) -> (...,)."""
        projected = np.einsum("...lf,lf->...", np.asarray(keys, np.float32), self.weight, dtype=np.float32)
        return -(projected + np.float32(self.bias))

    def contains(self, keys: np.ndarray) -> np.ndarray:
        return self.score(keys) <= self.threshold

    def margin(self, keys: np.ndarray) -> np.ndarray:
        """<= 1 inside: 1 + score - threshold (the threshold may be negative, so no quotient)."""
        return 1 + self.score(keys) - np.float32(self.threshold)

    def pooled_score(self, pooled: np.ndarray) -> np.ndarray:
        """pooled (..., len(layers), F) mean keys (pool_keys) -> (...,) -(pooled_weight . v + pooled_bias)."""
        projected = np.einsum("...lf,lf->...", np.asarray(pooled, np.float32), self.pooled_weight, dtype=np.float32)
        return -(projected + np.float32(self.pooled_bias))

    def prompt_margin(self, keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """keys (B, P, len(layers), F) at the prompt's last P positions (every position for an every-position rule),
        valid (B, P) which of them are the row's tokens (left padding is not; the last always is) -> (B,) the
        smallest of the last token's margin, the mean key's (1 + pooled score - pooled_threshold) and the lowest
        position's (1 + score - anywhere_threshold); <= 1 fires. A request's raw text ends where its user stopped
        typing ("... Answer:", a closing sentence), and Best-of-N noise garbles single tokens: the mean of the last
        tokens' keys keeps the skill's evidence that one position loses. And a causal model's key at the end of
        the request does not change with what follows it, so a suffix, a story or a transcript frame around the
        request cannot hide it from a rule read at every position (docs/guard.md)."""
        return 1 + np.minimum.reduce(list(self.read_margins(keys, valid).values()))

    def read_margins(self, keys: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
        """Each read's (B,) score - threshold (<= 0 fires) on prompt keys as prompt_margin takes them: "last" (the
        last token), "mean" (the mean key of the last `positions`), "anywhere" (the lowest position); +inf for a
        read the rule does not make. Which read refuses a prompt, and by how much (scripts/guard_reads.py)."""
        never = np.full(len(keys), np.inf, np.float32)
        margins = {"last": self.score(keys[:, -1]) - np.float32(self.threshold), "mean": never, "anywhere": never}
        if self.positions > 1:
            pooled = pool_keys(keys[:, -self.positions:], valid[:, -self.positions:])
            margins["mean"] = self.pooled_score(pooled) - np.float32(self.pooled_threshold)
        if self.reads_anywhere:
            margins["anywhere"] = self.lowest_score(keys, valid) - np.float32(self.anywhere_threshold)
        return margins

    def lowest_score(self, keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """(B,) the lowest last-token score over each row's valid positions among the last `anywhere_positions`
        (all where 0) of keys (B, P, len(layers), F)."""
        take = -self.anywhere_positions if self.anywhere_positions else 0
        return np.where(valid[:, take:], self.score(keys[:, take:]), np.float32(np.inf)).min(axis=1)

    def prompt_contains(self, keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """(B,) bool: prompt_margin's decision, made with the comparisons themselves (score <= threshold)."""
        inside = self.score(keys[:, -1]) <= np.float64(self.threshold)
        if self.positions > 1:
            pooled = pool_keys(keys[:, -self.positions:], valid[:, -self.positions:])
            inside |= self.pooled_score(pooled) <= np.float64(self.pooled_threshold)
        if self.reads_anywhere:
            inside |= self.lowest_score(keys, valid) <= np.float64(self.anywhere_threshold)
        return inside


def pool_keys(keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """keys (B, P, ..., F), valid (B, P) -> (B, ..., F): the mean over each row's valid positions (float32; the
    in-graph guard computes the same sum over the mask, divided by its count)."""
    weights = np.asarray(valid, np.float32).reshape(valid.shape + (1,) * (keys.ndim - 2))
    total = np.sum(np.asarray(keys, np.float32) * weights, axis=1, dtype=np.float32)
    count = np.maximum(weights.sum(axis=1, dtype=np.float32), np.float32(1))
    return total / count


def prompt_window(region, keys_of_layer, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A rule over several prompt positions: its keys at the prompt's last `positions` tokens (every position
    given, for an every-position rule), (B, P, layers, F), from keys_of_layer(layer) -> (B, S, F), and which of
    them are the row's own tokens (B, P) from the attention mask whose last S columns they are (None: all).
    KSDGuard.check, graph_guard.skill_scores and the attackers' score read a prompt through this one helper."""
    take = 0 if region.every_position else -region.window
    keys = np.stack([keys_of_layer(layer)[:, take:] for layer in region.layers], axis=-2)
    valid = np.ones(keys.shape[:2], bool) if mask is None else mask[:, -keys.shape[1]:] > 0
    return keys, valid


def reads_positions(region) -> bool:
    """Whether a region reads more prompt positions than the last (a LinearRegion's mean key or every position)."""
    return getattr(region, "positions", 1) > 1 or getattr(region, "reads_anywhere", False)


def region_layers(region) -> tuple[int, ...]:
    """The layers whose keys a region reads: one, or a LinearRegion's several."""
    return tuple(region.layers) if isinstance(region, LinearRegion) else (region.layer,)


def region_keys(region, keys_of_layer) -> np.ndarray:
    """What region.score takes, from layer -> (B, F) keys (a callable): (B, F), or (B, layers, F) stacked."""
    if isinstance(region, LinearRegion):
        return np.stack([keys_of_layer(layer) for layer in region.layers], axis=-2)
    return keys_of_layer(region.layer)


@dataclass
class Hit:
    skill: str
    layer: int
    rule: str = "paper"     # which rule fired: "paper" (one cube) or the stored calibrated rule's name


def fitted_k(mean: np.ndarray, std: np.ndarray, low: np.ndarray, high: np.ndarray) -> float:
    """Smallest k with low >= mean - k*std and high <= mean + k*std in every dimension."""
    std = np.maximum(std, SIGMA_FLOOR)
    return float(np.max(np.maximum(high - mean, mean - low) / std))


def build_cubes(stats: StatsFile, layers: list[int], alpha: float, alpha_mode: str) -> list[Hypercube]:
    if alpha_mode not in ALPHA_MODES:
        raise UnskillError(f"alpha mode {alpha_mode!r}: use one of {ALPHA_MODES}")
    problem = alpha_problem(alpha, alpha_mode)
    if problem:
        raise UnskillError(f"alpha {problem}")
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


class Guard(Protocol):
    """What the decode loop calls each step (Generator, and any batching engine built on the same contract):
    it fetches `output_names` (key_last.{i} outputs) with every forward and passes them, (B, F) each, to
    `check`, which returns per row the hit that refuses it or None. KSDGuard and eval's recorder implement it."""
    output_names: list[str]

    def check(self, last_keys: dict[str, np.ndarray]) -> list["Hit | None"]: ...


# ------------------------------------------------------------------------------------------------ the rule
# Every region kind scores a key (lower = deeper inside) and holds it when score <= its threshold; a Detector
# fires on a row when at least `votes` of its regions hold that row's key of their layer. Calibration
# (stats/calibrate.py) scores keys with these same regions and decides with `vote`, so the thresholds it picks
# mean the same thing here, bit for bit (tests/test_rule.py).

def vote(scores: np.ndarray, thresholds, votes: int) -> np.ndarray:
    """scores (B, R) of R regions, thresholds (R,) -> (B,) bool: at least `votes` regions hold the row."""
    return (scores <= np.asarray(thresholds, dtype=np.float64)).sum(axis=-1) >= votes


def rule_regions(stats: StatsFile, rule: str, layers, thresholds=None, retain=None, bounds=None) -> list:
    """One region of kind `rule` per layer of `stats`: box (a Hypercube at alpha = threshold x k), gauss
    (Ellipsoid) or ratio (RatioRegion against `retain`, the retain prompts' key Moments; default the stats
    file's `ksd_retain`). thresholds None: 1.0 for box (score = entry alpha) and inf otherwise, i.e. regions
    to score keys with. bounds: the ratio rule's per-layer forget-side caps (None: no cap)."""
    if rule not in RULES:
        raise UnskillError(f"rule {rule!r}: use one of {RULES}")
    layers = list(layers)
    if thresholds is None:
        thresholds = [1.0 if rule == "box" else math.inf] * len(layers)
    if rule == "linear":   # fitted on keys, not derived from the moments: only a stored rule has its region
        raise UnskillError(f"stats for {stats.skill!r}: a linear rule's region comes from its stored setting "
                           f"(build_regions), not from the key moments")
    if rule == "box":
        return [build_cubes(stats, [layer], float(threshold), "k")[0] for layer, threshold in zip(layers, thresholds)]
    if "ksd" not in stats.groups:
        raise UnskillError(f"stats for {stats.skill!r} have no KSD group; rebuild them with `unskill stats`")
    mean, inverse_sigma = gaussian(stats.groups["ksd"])
    if rule == "gauss":
        return [Ellipsoid(stats.skill, layer, mean[layer], inverse_sigma[layer], float(threshold))
                for layer, threshold in zip(layers, thresholds)]
    retain = stats.groups.get("ksd_retain") if retain is None else retain
    if retain is None:
        raise UnskillError(f"stats for {stats.skill!r}: a ratio rule needs the retain prompts' key moments "
                           f"(ksd_retain); make the guard again with `unskill guard`")
    retain_mean, retain_inverse_sigma = gaussian(retain)
    bounds = [math.inf] * len(layers) if bounds is None else bounds
    return [RatioRegion(stats.skill, layer, mean[layer], inverse_sigma[layer], retain_mean[layer],
                        retain_inverse_sigma[layer], float(threshold), float(bound))
            for layer, threshold, bound in zip(layers, thresholds, bounds)]


def linear_regions(skill: str, setting: GuardSetting | None) -> list[LinearRegion]:
    """A linear rule's one region over its layers: weights and bias live in the setting (stored beside it)."""
    if setting is None or setting.rule != "linear" or setting.weights is None:
        raise UnskillError(f"stats for {skill!r}: a linear rule needs its stored weights; "
                           f"make the guard with `unskill guard`")
    pooled = {} if setting.positions <= 1 else dict(
        pooled_weight=np.asarray(setting.pooled_weights, np.float32), pooled_bias=float(np.sum(setting.pooled_biases)),
        pooled_threshold=float(setting.pooled_threshold))
    if setting.anywhere_threshold is not None:
        pooled.update(anywhere_threshold=float(setting.anywhere_threshold),
                      anywhere_positions=setting.anywhere_positions)
    return [LinearRegion(skill, tuple(setting.layers), np.asarray(setting.weights, np.float32),
                         float(np.sum(setting.biases)), float(setting.thresholds[0]), setting.positions, **pooled)]


def layer_scores(keys: np.ndarray, stats: StatsFile, rule: str, retain=None, bounds=None) -> np.ndarray:
    """keys (n, L, F) at every layer -> (n, L): each layer's region score (rule_regions with no thresholds).
    box: the entry alpha max_d |v - mu| / (k sigma); gauss: mean_d ((v - mu) / sigma)^2; ratio: gauss under
    the forget probes over gauss under `retain`, +inf beyond `bounds` (per layer, when given)."""
    regions = rule_regions(stats, rule, range(keys.shape[1]), retain=retain, bounds=bounds)
    return np.stack([region.score(keys[:, region.layer]) for region in regions], axis=1)


def build_regions(stats: StatsFile, setting: GuardSetting) -> list:
    """A stored rule's regions, one per layer: cubes (thresholds in units of the fitted k), ellipsoids
    (thresholds on the mean squared z-score), forget/retain ratios (thresholds on the quotient) or linear
    discriminants (thresholds on -(w . v + b))."""
    if setting.rule == "linear":
        return linear_regions(stats.skill, setting)
    return rule_regions(stats, setting.rule, setting.layers, setting.thresholds, bounds=setting.bounds)


@dataclass
class Detector:
    """One skill's rule: a row is refused when at least `votes` of its regions hold the key of their layer
    (region.score(key) <= region.threshold)."""
    skill: str
    rule: str
    regions: list
    votes: int = 1

    @property
    def thresholds(self) -> np.ndarray:
        return np.array([region.threshold for region in self.regions], dtype=np.float64)

    def scores(self, keys_of_layer) -> np.ndarray:
        """keys_of_layer: layer -> (B, F) keys (a dict, or a callable) -> (B, R) region scores."""
        get = keys_of_layer if callable(keys_of_layer) else keys_of_layer.__getitem__
        return np.stack([region.score(region_keys(region, get)) for region in self.regions], axis=-1)

    def fires(self, keys_of_layer) -> np.ndarray:
        """(B,) bool: the rule refuses the row."""
        return vote(self.scores(keys_of_layer), self.thresholds, self.votes)


def detector(stats: StatsFile, setting: GuardSetting) -> Detector:
    """The stored rule of a stats file as a Detector."""
    return Detector(stats.skill, setting.name, build_regions(stats, setting), setting.votes)


NO_RULE_HINT = ("has no calibrated rule: make the guard with `unskill guard --model DIR --forget SPEC --out "
                "FILE.npz`, or pass --alpha/--rule paper to use the paper's cube")


class KSDGuard:
    """Several skills, several layers. Per stats file either the rule stored by `unskill guard` / `unskill
    calibrate` (when no alpha, no layers and no rule are given) or the paper's (rule="paper", or an explicit
    alpha or layers): one cube per checked layer, any cube refuses. A stats file with no stored rule is an error
    unless the paper's rule is asked for: its cube at alpha 1 refuses much of what the model must keep
    (100 % of MBPP for an augmented GSM8K probe set on SmolLM2), so it is never a silent default (the in-graph
    guard, exporter/guard_graph.py, follows the same policy)."""

    def __init__(self, stats_files: list[StatsFile], manifest: Manifest, alpha: float | None = None,
                 alpha_mode: str = "k", layers: list[int] | None = None, use_stored: bool = True,
                 rule: str | None = None, where: list[str] | None = None):
        if not stats_files:
            raise UnskillError("KSD guard needs at least one stats file")
        if rule not in (None, "stored", "paper"):
            raise UnskillError(f"rule {rule!r}: use 'stored' or 'paper'")
        paper = rule == "paper" or not use_stored or alpha is not None or layers is not None or alpha_mode != "k"
        layers = [manifest.num_layers - 1] if layers is None else resolve_layers(layers, manifest.num_layers)
        self.detectors = []
        for index, stats in enumerate(stats_files):
            setting = None if paper else stats.guard
            if setting is not None:
                resolve_layers(setting.layers, manifest.num_layers)   # a stored rule of another model: one clear error
                self.detectors.append(detector(stats, setting))
            elif not paper:
                name = where[index] if where else f"stats for {stats.skill!r}"
                raise UnskillError(f"{name} {NO_RULE_HINT}")
            else:
                cubes = build_cubes(stats, layers, 1.0 if alpha is None else alpha, alpha_mode)
                self.detectors.append(Detector(stats.skill, "paper", cubes, 1))
        self.cubes = [region for detector in self.detectors for region in detector.regions]
        checked = sorted({layer for region in self.cubes for layer in region_layers(region)})
        names = require_key_last(manifest, manifest.source or manifest.arch)
        self.output_names = [names[i] for i in checked]
        self._output_of_layer = {i: names[i] for i in checked}
        # a rule over several prompt positions reads: the per-position key.* outputs, at the prompt only
        spread = {layer for region in self.cubes if reads_positions(region) for layer in region_layers(region)}
        self.positions = max([getattr(region, "window", 1) for region in self.cubes])
        # a rule read at every prompt position takes the keys of all of them (the prompt pass fetches them all)
        self.every_position = any(getattr(region, "every_position", False) for region in self.cubes)
        self.prompt_output_names = [manifest.key_outputs[i] if i in spread else names[i] for i in checked]
        self._prompt_output_of_layer = dict(zip(checked, self.prompt_output_names))

    def describe(self) -> list[str]:
        """One line per skill: the rule, its layers and thresholds."""
        return [f"{d.skill}: {d.rule}" if d.rule != "paper" else
                f"{d.skill}: paper, one cube per layer {[r.layer for r in d.regions]}, any refuses"
                for d in self.detectors]

    def check(self, last_keys: dict[str, np.ndarray], mask: np.ndarray | None = None) -> list[Hit | None]:
        """last_keys: output name -> (B, F) key at the last position, or at the prompt (prompt_output_names) the
        per-position keys (B, S, F) of a multi-position rule's layers, with mask (B, >= S) the attention mask whose
        last S columns are those positions. First hit per row, else None."""
        batch = next(iter(last_keys.values())).shape[0]
        hits: list[Hit | None] = [None] * batch

        def keys_at(layer: int, positions: bool = False) -> np.ndarray:
            """positions: the per-position keys where given; else the last position's"""
            names = (self._prompt_output_of_layer[layer], self._output_of_layer[layer])
            value = next(last_keys[name] for name in (names if positions else names[::-1]) if name in last_keys)
            return value if positions or value.ndim == 2 else value[:, -1]

        for detector in self.detectors:
            inside = detector.scores(keys_at) <= detector.thresholds
            for column, region in enumerate(detector.regions):
                if reads_positions(region) and keys_at(region.layers[0], True).ndim == 3:
                    keys, valid = prompt_window(region, lambda layer: keys_at(layer, True), mask)
                    inside[:, column] = region.prompt_contains(keys, valid)
            fired = inside.sum(axis=-1) >= detector.votes      # = vote(scores, thresholds, votes)
            for row in np.flatnonzero(fired):
                layer = detector.regions[int(np.argmax(inside[row]))].layer
                hits[row] = hits[row] or Hit(detector.skill, layer, detector.rule)
        return hits
