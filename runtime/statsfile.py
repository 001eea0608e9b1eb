"""The stats `.npz`: streaming moments per layer for KSD, NA and SP, plus where they came from.

Plain arrays only (strings as NumPy unicode arrays, metadata as a JSON string), so it loads with
allow_pickle=False. Groups and their fields:
    ksd        key vector at the last prompt token, forget prompts: count, sum, sumsq, min, max
    na_forget  pre-activation, every real token of forget texts: count, sum, sumsq
    na_retain  same on retain texts
    sp_forget  key vector, every real token of forget texts: count, abs_sum, sumsq, pos_count
    sp_retain  same on retain texts
    ksd_retain key vector at the last prompt token, calibration's retain prompts (written by `unskill calibrate`
               with a `ratio` rule: the retain side of its forget/retain score)
A stored `linear` rule (one region over its layers) keeps its discriminant as `guard.weights` (layers, F) float32
and `guard.biases` (layers,), summed; one that also reads the mean key of the prompt's last tokens (`positions`)
keeps that one's as `guard.pooled_weights` and `guard.pooled_biases`; one that also reads every prompt position
(`anywhere_threshold`; at its last `anywhere_positions` only, where set) scores them with its last-token weights.
count is per layer (L,); the other fields are float64 (L, F). Sums (not means) so shards merge by addition.
An optional `guard` member (a JSON string) holds the rule `unskill calibrate` chose (GuardSetting); merged
shards drop it and `ksd_retain` (their cubes changed, so it must be calibrated again). Files without it load
with guard None.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UnskillError
from .io import write_npz_atomic
from .manifest import Manifest

SCHEMA_VERSION = 1
GROUP_FIELDS = {
    "ksd": ("sum", "sumsq", "min", "max"),
    "na_forget": ("sum", "sumsq"),
    "na_retain": ("sum", "sumsq"),
    "sp_forget": ("abs_sum", "sumsq", "pos_count"),
    "sp_retain": ("abs_sum", "sumsq", "pos_count"),
    "ksd_retain": ("sum", "sumsq", "min", "max"),
}
CALIBRATION_GROUPS = ("ksd_retain",)   # belong to the stored rule: merging shards drops them with it
PROBED_GROUPS = tuple(group for group in GROUP_FIELDS if group not in CALIBRATION_GROUPS)   # what `unskill stats` writes


@dataclass
class Moments:
    """Float64 running sums over rows of an (n, F) array, per layer. Memory is O(L*F), whatever n."""
    fields: tuple[str, ...]
    count: np.ndarray                       # (L,) int64
    values: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def empty(cls, fields, layers: int, width: int) -> "Moments":
        init = {"min": np.inf, "max": -np.inf}
        return cls(tuple(fields), np.zeros(layers, np.int64),
                   {f: np.full((layers, width), init.get(f, 0.0)) for f in fields})

    def add(self, layer: int, rows: np.ndarray) -> None:
        if rows.shape[0] == 0:
            return
        rows = rows.astype(np.float64)
        self.count[layer] += rows.shape[0]
        v = self.values
        if "sum" in v:
            v["sum"][layer] += rows.sum(0)
        if "abs_sum" in v:
            v["abs_sum"][layer] += np.abs(rows).sum(0)
        if "sumsq" in v:
            v["sumsq"][layer] += np.einsum("ij,ij->j", rows, rows)
        if "pos_count" in v:
            v["pos_count"][layer] += (rows > 0).sum(0)
        if "min" in v:
            np.minimum(v["min"][layer], rows.min(0), out=v["min"][layer])
        if "max" in v:
            np.maximum(v["max"][layer], rows.max(0), out=v["max"][layer])

    def merge(self, other: "Moments") -> "Moments":
        combine = {"min": np.minimum, "max": np.maximum}
        values = {f: combine.get(f, np.add)(self.values[f], other.values[f]) for f in self.fields}
        return Moments(self.fields, self.count + other.count, values)

    def mean(self, name: str = "sum") -> np.ndarray:
        return self.values[name] / np.maximum(self.count, 1)[:, None]

    def std(self, ddof: int = 1) -> np.ndarray:
        """Standard deviation (not variance; the reference code stores a variance under this name)."""
        n = self.count[:, None].astype(np.float64)
        centered = self.values["sumsq"] - self.values["sum"] ** 2 / np.maximum(n, 1)
        return np.sqrt(np.maximum(centered, 0.0) / np.maximum(n - ddof, 1))


GUARD_RULES = ("box", "gauss", "ratio", "linear")

# Where a region's size may lie, per rule (the threshold's unit), so that it can refuse something and does not
# refuse everything. Calibrated settings sit near 1 (box 1-9 x k, gauss and ratio 1-5): a forget probe's own mean
# squared z-score is about 1, and the k-cube holds every probe. A region a thousand times smaller holds no
# real key (1e-300 underflows to a cube of width 0); one a thousand times larger holds every key.
REGION_LIMITS = {
    "box": (1e-3, 1e3),      # x the fitted k (also --alpha with --alpha-mode k)
    "sigma": (1e-3, 1e4),    # x sigma (--alpha with --alpha-mode sigma)
    "gauss": (1e-3, 1e4),    # mean squared z-score under the forget probes' Gaussian
    "ratio": (1e-4, 1e4),    # forget score / retain score
    "bound": (1e-3, 1e6),    # ratio's forget-side cap: a gauss score
}


def region_problem(kind: str, value: float) -> str | None:
    """Why a threshold (or alpha) of this kind cannot work as a guard, or None when it can."""
    low, high = REGION_LIMITS[kind]
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        return f"must be a finite number > 0, got {value}"
    if value < low:
        return f"{value:g} is below {low:g}: the region would hold no real key and refuse nothing"
    if value > high:
        return f"{value:g} is above {high:g}: the region would hold every key and refuse everything"
    return None


MAX_POSITIONS = 64   # prompt positions a linear rule may read at the prompt (their keys are fetched per position)
LINEAR_LIMIT = 1e3   # a linear rule's thresholds are in units of the projected keys' spread: |t| beyond is no rule


def linear_problem(threshold: float) -> str | None:
    if abs(threshold) > LINEAR_LIMIT:
        return f"{threshold:g} is beyond +-{LINEAR_LIMIT:g} spreads of the projected keys: it would refuse nothing or everything"
    return None


def alpha_problem(alpha, alpha_mode: str = "k") -> str | None:
    """Why this --alpha cannot guard (in units of the fitted k, or of sigma), or None."""
    return region_problem("box" if alpha_mode == "k" else "sigma", alpha)


@dataclass
class GuardSetting:
    """The calibrated KSD rule for one skill: per layer a region (box: the cube at `threshold` x k; gauss: mean
    squared z-score <= threshold; ratio: that score under the forget probes over the same under the retain
    prompts (`ksd_retain`) <= threshold); the prompt is refused when at least `votes` regions hold its keys."""
    rule: str
    layers: list[int]
    thresholds: list[float]
    votes: int = 1
    calibration: dict = field(default_factory=dict)   # what it was calibrated on, with the rates it reached
    bounds: list[float] | None = None   # ratio only, per layer: the forget-side score above which nothing fires
    weights: np.ndarray | None = None   # linear only, (layers, F): each layer's share of the discriminant
    biases: np.ndarray | None = None    # linear only, (layers,): summed into the region's bias
    positions: int = 1                  # linear only: at the prompt also the mean key of its last `positions` tokens
    pooled_threshold: float | None = None   # linear only, positions > 1: that mean key's threshold ...
    pooled_weights: np.ndarray | None = None   # ... its discriminant (layers, F) (`guard.pooled_weights`) ...
    pooled_biases: np.ndarray | None = None    # ... and (layers,) biases, summed (`guard.pooled_biases`)
    anywhere_threshold: float | None = None   # linear only: at the prompt also each position, scored by the
    #                                           last-token discriminant, against this threshold (None: not read) ...
    anywhere_positions: int = 0               # ... at the last this many prompt positions (0: every position)

    @property
    def name(self) -> str:
        spread = f", last {self.positions} prompt tokens" if self.positions > 1 else ""
        if self.anywhere_threshold is not None:
            spread += (f", each of the last {self.anywhere_positions} prompt positions" if self.anywhere_positions
                       else ", every prompt position")
        return f"calibrated {self.rule}, {self.votes} of layers {','.join(map(str, self.layers))}{spread}"

    def to_json(self) -> str:
        extra = {} if self.bounds is None else {"bounds": self.bounds}
        if self.positions > 1:
            extra.update(positions=self.positions, pooled_threshold=self.pooled_threshold)
        if self.anywhere_threshold is not None:
            extra.update(anywhere_threshold=self.anywhere_threshold)
        if self.anywhere_positions:
            extra.update(anywhere_positions=self.anywhere_positions)
        return json.dumps({"rule": self.rule, "layers": self.layers, "thresholds": self.thresholds,
                           "votes": self.votes, "calibration": self.calibration, **extra}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str, num_layers: int) -> "GuardSetting":
        try:
            raw = json.loads(text)
            setting = cls(str(raw["rule"]), [int(i) for i in raw["layers"]], [float(t) for t in raw["thresholds"]],
                          int(raw["votes"]), dict(raw.get("calibration") or {}),
                          None if raw.get("bounds") is None else [float(b) for b in raw["bounds"]],
                          positions=int(raw.get("positions", 1)),
                          pooled_threshold=None if raw.get("pooled_threshold") is None
                          else float(raw["pooled_threshold"]),
                          anywhere_threshold=None if raw.get("anywhere_threshold") is None
                          else float(raw["anywhere_threshold"]),
                          anywhere_positions=int(raw.get("anywhere_positions", 0)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UnskillError(f"{where}: guard setting is not valid ({type(exc).__name__}: {exc})") from None
        problem = setting.problem(num_layers)
        if problem:
            raise UnskillError(f"{where}: guard setting {problem}")
        return setting

    def problem(self, num_layers: int) -> str | None:
        """What makes this setting unusable as a whole (shape, layers, votes, thresholds that refuse nothing or
        everything), or None."""
        setting = self
        problem = (f"rule {setting.rule!r} is not one of {GUARD_RULES}" if setting.rule not in GUARD_RULES else
                   "a linear rule is one region over its layers: one threshold, one vote" if setting.rule == "linear"
                   and (len(setting.thresholds) != 1 or setting.votes != 1 or not setting.layers) else
                   "needs as many thresholds as layers" if setting.rule != "linear" and (
                       len(setting.layers) != len(setting.thresholds) or not setting.layers) else
                   f"a layer is outside 0..{num_layers - 1}" if not all(0 <= i < num_layers for i in setting.layers) else
                   f"a layer appears twice in {setting.layers}" if len(set(setting.layers)) != len(setting.layers) else
                   f"votes {setting.votes} not in 1..{len(setting.layers)}" if not 1 <= setting.votes <= len(setting.layers)
                   else "thresholds must be finite" if not all(math.isfinite(t) for t in setting.thresholds)
                   else "thresholds must be positive" if setting.rule != "linear"
                   and not all(t > 0 for t in setting.thresholds)
                   else f"positions {setting.positions} not in 1..{MAX_POSITIONS} (only a linear rule reads several)"
                   if not 1 <= setting.positions <= MAX_POSITIONS or (setting.positions > 1 and setting.rule != "linear")
                   else "positions > 1 need a finite pooled_threshold" if setting.positions > 1 and not (
                       setting.pooled_threshold is not None and math.isfinite(setting.pooled_threshold))
                   else "anywhere_threshold needs a linear rule and a finite value"
                   if setting.anywhere_threshold is not None and (setting.rule != "linear"
                                                                 or not math.isfinite(setting.anywhere_threshold))
                   else f"anywhere_positions {setting.anywhere_positions} not in 0..{MAX_POSITIONS} (0: every position)"
                   if not 0 <= setting.anywhere_positions <= MAX_POSITIONS
                   else "anywhere_positions needs an anywhere_threshold"
                   if setting.anywhere_positions and setting.anywhere_threshold is None
                   else "bounds need one positive value per layer" if setting.bounds is not None and (
                       len(setting.bounds) != len(setting.layers) or not all(b > 0 for b in setting.bounds))
                   else None)
        if problem:
            return problem
        if setting.positions > 1 and linear_problem(setting.pooled_threshold):
            return f"pooled_threshold: {linear_problem(setting.pooled_threshold)}"
        if setting.anywhere_threshold is not None and linear_problem(setting.anywhere_threshold):
            return f"anywhere_threshold: {linear_problem(setting.anywhere_threshold)}"
        for layer, threshold in zip(setting.layers, setting.thresholds):
            reason = linear_problem(threshold) if setting.rule == "linear" else region_problem(setting.rule, threshold)
            if reason:
                return f"threshold of layer {layer}: {reason}"
        for layer, bound in zip(setting.layers, setting.bounds or []):
            reason = region_problem("bound", bound)
            if reason:
                return f"bound of layer {layer}: {reason}"
        return None


@dataclass
class StatsFile:
    fingerprint: str
    arch: str
    key_width: int
    num_layers: int
    meta: dict                              # datasets, counts, prompt template, tool version
    groups: dict[str, Moments]
    guard: GuardSetting | None = None       # the calibrated rule, where `unskill calibrate` stored one

    @property
    def skill(self) -> str:
        return self.meta.get("skill") or self.meta.get("forget", {}).get("name", "forget")

    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash leaves no half-written file behind."""
        path = Path(path)
        arrays = {
            "schema_version": np.array(SCHEMA_VERSION),
            "fingerprint": np.array(self.fingerprint),
            "arch": np.array(self.arch),
            "key_width": np.array(self.key_width),
            "num_layers": np.array(self.num_layers),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        if self.guard is not None:
            arrays["guard"] = np.array(self.guard.to_json())
            if self.guard.weights is not None:
                arrays["guard.weights"] = np.asarray(self.guard.weights, np.float32)
                arrays["guard.biases"] = np.asarray(self.guard.biases, np.float64)
            if self.guard.positions > 1:
                arrays["guard.pooled_weights"] = np.asarray(self.guard.pooled_weights, np.float32)
                arrays["guard.pooled_biases"] = np.asarray(self.guard.pooled_biases, np.float64)
        for group, moments in self.groups.items():
            arrays[f"{group}.count"] = moments.count
            for name, value in moments.values.items():
                arrays[f"{group}.{name}"] = value
        write_npz_atomic(path, arrays)
        return path

    def check_model(self, manifest: Manifest, where: str) -> None:
        if self.fingerprint != manifest.fingerprint and self.fingerprint not in (manifest.stats_compatible or []):
            # A fresh export of the same weights counts too (its graph, e.g. packed, has another fingerprint).
            raise UnskillError(f"{where}: stats were taken on another model or export (fingerprint "
                               f"{self.fingerprint[:19]}…; this {manifest.source or manifest.arch} export has "
                               f"{manifest.fingerprint[:19]}…): probe this export with `unskill stats --model DIR`")
        if (self.num_layers, self.key_width) != (manifest.num_layers, manifest.key_width):
            raise UnskillError(f"{where}: stats have {self.num_layers}x{self.key_width} keys, "
                               f"model has {manifest.num_layers}x{manifest.key_width}")


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UnskillError(f"{path}: no such stats file")
    # np.load also reads bare .npy and (refusing) pickle files: anything that is not a zip is not a stats file.
    if not zipfile.is_zipfile(path):
        raise UnskillError(f"{path}: not a valid .npz (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise UnskillError(f"{path}: contains pickled objects; refusing to load it") from None
        raise UnskillError(f"{path}: not a valid .npz ({exc})") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UnskillError(f"{path}: not a valid .npz ({exc})") from None
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray):   # a zip member that is not .npy data comes back as bytes
            raise UnskillError(f"{path}: member {name!r} is not a NumPy array")
    return arrays


def _scalar(path: Path, arrays: dict[str, np.ndarray], name: str, kinds: str):
    value = arrays[name]
    if value.shape != () or value.dtype.kind not in kinds:
        expected = "an integer" if kinds == "iu" else "a string"
        raise UnskillError(f"{path}: {name} should be {expected} scalar, "
                           f"got {value.dtype} array of shape {value.shape}")
    return value.item()


def _check_consistent(path: Path, group: str, moments: Moments) -> None:
    """Sums that no real data could give (min above max, a negative variance) mean a damaged file."""
    used = moments.count > 0
    v = moments.values
    if "min" in v and (v["min"][used] > v["max"][used]).any():
        raise UnskillError(f"{path}: {group}.min is above {group}.max; the file is damaged")
    if "sumsq" in v and "sum" in v:
        n = np.maximum(moments.count, 1)[:, None]
        centered = v["sumsq"] - v["sum"] ** 2 / n
        tolerance = 1e-6 * np.maximum(np.abs(v["sumsq"]), 1.0)
        if (centered[used] < -tolerance[used]).any():
            raise UnskillError(f"{path}: {group} has a negative variance (sumsq < sum^2/count); the file is damaged")
    if "sumsq" in v and (v["sumsq"][used] < 0).any():
        raise UnskillError(f"{path}: {group}.sumsq is negative; the file is damaged")


def _linear_arrays(path: Path, arrays: dict[str, np.ndarray], rows: int, width: int, prefix: str = "guard."):
    """A stored linear rule's weights (rows, width) and biases (rows,), checked (prefix "guard.pooled_": the
    mean key's discriminant)."""
    w, b = f"{prefix}weights", f"{prefix}biases"
    weights, biases = arrays.get(w), arrays.get(b)
    if weights is None or biases is None:
        raise UnskillError(f"{path}: the stored linear rule has no {w}/{b}; make it again with `unskill guard`")
    if weights.shape != (rows, width) or biases.shape != (rows,) or weights.dtype.kind != "f" or biases.dtype.kind != "f":
        raise UnskillError(f"{path}: {w} {weights.dtype}{weights.shape} / {b} "
                           f"{biases.dtype}{biases.shape}, expected floats of shape ({rows}, {width}) / ({rows},)")
    if not (np.isfinite(weights).all() and np.isfinite(biases).all()):
        raise UnskillError(f"{path}: {w} or {b} contain NaN or infinity")
    if not (np.abs(weights).max(axis=1) > 0).all():
        raise UnskillError(f"{path}: a layer of {w} is all zeros: that rule would fire on everything or nothing")
    return weights.astype(np.float32), biases.astype(np.float64)


def load_stats(path: str | Path, manifest: Manifest | None = None) -> StatsFile:
    """Read and validate a stats file; with a manifest, also check it belongs to that model."""
    path = Path(path)
    arrays = _read_arrays(path)
    for required in ("schema_version", "fingerprint", "arch", "key_width", "num_layers", "meta"):
        if required not in arrays:
            raise UnskillError(f"{path}: not an unskill stats file (no {required!r})")
    version = _scalar(path, arrays, "schema_version", "iu")
    if version != SCHEMA_VERSION:
        raise UnskillError(f"{path}: schema version {version}, expected {SCHEMA_VERSION}")
    layers, width = _scalar(path, arrays, "num_layers", "iu"), _scalar(path, arrays, "key_width", "iu")
    fingerprint, arch = _scalar(path, arrays, "fingerprint", "U"), _scalar(path, arrays, "arch", "U")
    groups = {}
    for group, fields in GROUP_FIELDS.items():
        if f"{group}.count" not in arrays:
            continue
        count = arrays[f"{group}.count"]
        if count.shape != (layers,) or count.dtype.kind not in "iu":
            raise UnskillError(f"{path}: {group}.count is a {count.dtype} array of shape {count.shape}, "
                               f"expected integers of shape ({layers},)")
        values = {}
        for name in fields:
            value = arrays.get(f"{group}.{name}")
            if value is None or value.shape != (layers, width):
                shape = None if value is None else value.shape
                raise UnskillError(f"{path}: {group}.{name} has shape {shape}, expected ({layers}, {width})")
            if not np.isfinite(value[count > 0]).all():
                raise UnskillError(f"{path}: {group}.{name} contains NaN or infinity")
            values[name] = value.astype(np.float64)
        if (count < 0).any():
            raise UnskillError(f"{path}: {group}.count has negative entries")
        moments = Moments(fields, count.astype(np.int64), values)
        _check_consistent(path, group, moments)
        groups[group] = moments
    try:
        meta = json.loads(_scalar(path, arrays, "meta", "U"))
    except json.JSONDecodeError:
        raise UnskillError(f"{path}: meta is not valid JSON") from None
    if not isinstance(meta, dict):
        raise UnskillError(f"{path}: meta should be a JSON object, got {type(meta).__name__}")
    guard = None
    if "guard" in arrays:
        guard = GuardSetting.from_json(_scalar(path, arrays, "guard", "U"), str(path), layers)
        if "ksd" not in groups:
            raise UnskillError(f"{path}: has a stored guard rule but no KSD key statistics (ksd group); "
                               f"rebuild it with `unskill stats` and `unskill calibrate`")
        if guard.rule == "linear":
            guard.weights, guard.biases = _linear_arrays(path, arrays, len(guard.layers), width)
        if guard.rule == "linear" and guard.positions > 1:
            guard.pooled_weights, guard.pooled_biases = _linear_arrays(path, arrays, len(guard.layers), width,
                                                                       "guard.pooled_")
        if guard.rule == "ratio" and not ("ksd_retain" in groups and (groups["ksd_retain"].count >= 2).all()):
            raise UnskillError(f"{path}: the stored ratio rule needs the retain key statistics (ksd_retain); "
                               f"run `unskill calibrate` again")
    stats = StatsFile(fingerprint, arch, width, layers, meta, groups, guard)
    if manifest is not None:
        stats.check_model(manifest, str(path))
    return stats
