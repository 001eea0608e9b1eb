"""One rule implementation: the decisions calibration takes on keys (stats/calibrate.py: layer scores, then the
vote over the chosen layers) are the decisions the runtime guard takes on the same keys (runtime/ksd.py), for
every region kind, layer subset, threshold, vote count and cap, on stats files that went through disk."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unskill.evals.evaluate import KeyEntry, ksd_view
from unskill.runtime.errors import UnskillError
from unskill.runtime.ksd import KSDGuard, build_cubes, layer_scores
from unskill.runtime.manifest import Manifest
from unskill.runtime.statsfile import GROUP_FIELDS, GuardSetting, Moments, StatsFile, load_stats
from unskill.stats.calibrate import fires, key_moments, retain_ratio_scores

LAYERS, WIDTH = 4, 6
NAMES = [f"key_last.{i}" for i in range(LAYERS)]
MANIFEST = Manifest(arch="llama", num_layers=LAYERS, hidden_size=WIDTH, key_width=WIDTH, activation="silu",
                    gated=True, key_outputs=[f"key.{i}" for i in range(LAYERS)], preact_outputs=[],
                    fingerprint="sha256:test", max_context=64, eos_token_ids=[0], pad_token_id=0,
                    key_last_outputs=NAMES)


def _moments(keys: np.ndarray, group: str = "ksd") -> Moments:
    moments = Moments.empty(GROUP_FIELDS[group], keys.shape[1], keys.shape[2])
    for layer in range(keys.shape[1]):
        moments.add(layer, keys[:, layer])
    return moments


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rule = draw(st.sampled_from(["box", "gauss", "ratio"]))
    layers = sorted(draw(st.sets(st.integers(0, LAYERS - 1), min_size=1, max_size=LAYERS)))
    votes = draw(st.integers(1, len(layers)))
    capped = rule == "ratio" and draw(st.booleans())
    return seed, rule, layers, votes, capped


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_calibration_and_guard_decide_alike(case, tmp_path):
    seed, rule, layers, votes, capped = case
    rng = np.random.default_rng(seed)
    forget = (rng.normal(size=(30, LAYERS, WIDTH)) * rng.uniform(0.3, 2, size=WIDTH)).astype(np.float32)
    retain = (rng.normal(size=(30, LAYERS, WIDTH)) + rng.uniform(-2, 2, size=WIDTH)).astype(np.float32)
    queries = np.concatenate([forget[:10], retain[:10], (rng.normal(size=(20, LAYERS, WIDTH)) * 2).astype(np.float32)])
    stats = StatsFile("sha256:test", "llama", WIDTH, LAYERS, {"skill": "toy"}, {"ksd": _moments(forget)})
    retain_moments = key_moments(retain)
    bounds = rng.uniform(0.5, 3, size=LAYERS) if capped else None
    # thresholds as calibration sets them: quantiles of the scores it ranks (some inside, some outside)
    scores = layer_scores(queries, stats, rule, retain_moments, bounds)
    finite = np.where(np.isfinite(scores), scores, np.nan)
    thresholds = [float(np.nanquantile(finite[:, i], rng.uniform(0.2, 0.8))) if np.isfinite(finite[:, i]).any()
                  else 1.0 for i in layers]
    calibrated = fires(scores, layers, thresholds, votes)

    setting = GuardSetting(rule, layers, thresholds, votes, {},
                           [float(bounds[i]) for i in layers] if capped else None)
    stats.guard = setting
    if rule == "ratio":
        stats.groups["ksd_retain"] = retain_moments
    stats.save(tmp_path / "rule.npz")
    guard = KSDGuard([load_stats(tmp_path / "rule.npz")], MANIFEST)
    hits = guard.check({name: queries[:, i] for i, name in enumerate(NAMES)})
    runtime = np.array([hit is not None for hit in hits])
    if rule == "box":   # the guard folds the threshold into the cube's width: float rounding at the boundary only
        near = (np.abs(scores[:, layers] / np.asarray(thresholds) - 1) < 1e-5).any(axis=1)
        np.testing.assert_array_equal(runtime[~near], calibrated[~near])
    else:
        np.testing.assert_array_equal(runtime, calibrated)
    assert guard.detectors[0].fires(lambda layer: queries[:, layer]).tolist() == runtime.tolist()


def test_eval_entry_alphas_are_the_guards_cube_scores():
    """evals' entry alpha is the paper cube's score; ksd_view refuses exactly where the cube at alpha holds."""
    rng = np.random.default_rng(5)
    forget = rng.normal(size=(30, LAYERS, WIDTH)).astype(np.float32)
    stats = StatsFile("sha256:test", "llama", WIDTH, LAYERS, {"skill": "toy"}, {"ksd": _moments(forget)})
    queries = (rng.normal(size=(40, WIDTH)) * 1.3).astype(np.float32)
    entry = KeyEntry({"toy": stats}, LAYERS, MANIFEST.key_outputs, -1)
    alphas = np.array([row["toy"] for row in entry(queries)])
    guard = KSDGuard([stats], MANIFEST, alpha=0.9)
    refused = [hit is not None for hit in guard.check({NAMES[-1]: queries})]
    view = ksd_view({"dataset": "toy", "kind": "gen", "entry": {"toy": alphas.tolist()},
                     "per_item": {"score": [True] * 40}}, "toy", 0.9)
    near = np.abs(alphas / 0.9 - 1) < 1e-5
    assert view["abstain"] == pytest.approx(np.mean(refused), abs=near.mean())
    cube = build_cubes(stats, [LAYERS - 1], 1.0, "k")[0]
    np.testing.assert_array_equal(alphas, cube.score(queries).astype(np.float64))


def test_cross_fitted_ratio_scores_use_the_regions_cap():
    rng = np.random.default_rng(6)
    forget = rng.normal(size=(30, LAYERS, WIDTH)).astype(np.float32)
    retain = (rng.normal(size=(40, LAYERS, WIDTH)) + 1).astype(np.float32)
    stats = StatsFile("sha256:test", "llama", WIDTH, LAYERS, {"skill": "toy"}, {"ksd": _moments(forget)})
    bounds = np.full(LAYERS, 1.5)
    capped = retain_ratio_scores(retain, stats, bounds=bounds)
    gauss = layer_scores(retain, stats, "gauss")
    assert np.isinf(capped[gauss > 1.5]).all() and np.isfinite(capped[gauss <= 1.5]).all()


def test_stats_without_a_rule_is_no_silent_guard():
    rng = np.random.default_rng(7)
    stats = StatsFile("sha256:test", "llama", WIDTH, LAYERS, {"skill": "toy"},
                      {"ksd": _moments(rng.normal(size=(30, LAYERS, WIDTH)).astype(np.float32))})
    with pytest.raises(UnskillError, match="has no calibrated rule: make the guard with `unskill guard"):
        KSDGuard([stats], MANIFEST)
    assert KSDGuard([stats], MANIFEST, rule="paper").detectors[0].rule == "paper"
    assert KSDGuard([stats], MANIFEST, alpha=1.0).detectors[0].rule == "paper"
