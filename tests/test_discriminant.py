"""The linear rule: Fisher's discriminant in closed form (stats/discriminant.py), its calibration
(stats/calibrate.py calibrate_linear) and the runtime's LinearRegion deciding as calibration did, through a stats
file written and read back; bad stored weights are one clear error."""

from __future__ import annotations

import numpy as np
import pytest

from unskill.runtime.errors import UnskillError
from unskill.runtime.ksd import KSDGuard, LinearRegion
from unskill.runtime.statsfile import GuardSetting, load_stats
from unskill.stats.discriminant import _solve, fit


@pytest.fixture(scope="module")
def tiny_stats(tiny_export, llama_stats):
    """(the tiny llama's KSD stats, its manifest): a real stats file for the rule to live in."""
    from unskill.runtime import load

    _, onnx_dir = tiny_export("llama")
    return llama_stats[0], load(onnx_dir, device="cpu").model.manifest


def two_clouds(rows: int, width: int, shift: float, seed: int = 0):
    """Forget and retain keys: correlated Gaussian noise, the forget side moved along one direction."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(width, width)) / np.sqrt(width)
    direction = rng.normal(size=width)
    direction /= np.linalg.norm(direction)
    retain = rng.normal(size=(rows, width)) @ mixing
    forget = rng.normal(size=(rows, width)) @ mixing + shift * direction
    return forget.astype(np.float32), retain.astype(np.float32)


def test_woodbury_and_direct_solve_agree():
    """F > n goes through the n x n system; both forms solve the same shrunk system (float64, 1e-8 relative)."""
    rng = np.random.default_rng(1)
    centred = rng.normal(size=(40, 25))
    target = rng.normal(size=25)
    direct = _solve(centred, 0.02, 0.3, target)               # F <= n: the F x F form
    np.testing.assert_allclose((0.02 * centred.T @ centred + 0.3 * np.eye(25)) @ direct, target, rtol=1e-8)
    wide_rows = centred.T.copy()                               # 25 rows of 40 dimensions: Woodbury's n x n form
    wide_target = rng.normal(size=40)
    wide = _solve(wide_rows, 0.02, 0.3, wide_target)
    np.testing.assert_allclose((0.02 * wide_rows.T @ wide_rows + 0.3 * np.eye(40)) @ wide, wide_target, rtol=1e-8)


def test_fit_separates_and_scales_to_unit_spread():
    forget, retain = two_clouds(300, 16, shift=4.0)
    weight, bias = fit(forget, retain)
    region = LinearRegion("s", (0,), weight[None], bias, 0.0)
    forget, retain = forget[:, None], retain[:, None]
    assert (region.score(forget) < 0).mean() > 0.95 and (region.score(retain) > 0).mean() > 0.95
    assert np.std(region.score(np.concatenate([forget, retain]))) == pytest.approx(1.0, rel=1e-4)
    wide_forget, wide_retain = two_clouds(30, 64, shift=6.0, seed=2)   # fewer prompts than dimensions
    weight, bias = fit(wide_forget, wide_retain)
    wide = LinearRegion("s", (0,), weight[None], bias, 0.0)
    assert np.isfinite(weight).all() and (wide.score(wide_forget[:, None]) < 0).mean() > 0.9


def test_calibrated_linear_rule_decides_as_the_runtime_after_a_round_trip(tmp_path, tiny_stats):
    """calibrate_linear's thresholds keep the retain side within the target (out of fold), and the runtime's
    KSDGuard, reading the rule back from the stats file, refuses exactly the rows calibration's vote refuses."""
    from dataclasses import replace

    from unskill.stats.calibrate import calibrate_linear

    stats, manifest = tiny_stats
    layers, width = stats.num_layers, stats.key_width
    rng = np.random.default_rng(3)
    clouds = [two_clouds(200, width, shift=3.0, seed=10 + layer) for layer in range(layers)]
    forget = np.stack([c[0] for c in clouds], axis=1)
    retain = np.stack([c[1] for c in clouds], axis=1)
    validation = forget[rng.permutation(200)[:60]] + rng.normal(scale=0.1, size=(60, layers, width)).astype(np.float32)
    result = calibrate_linear(forget, list(range(layers)), retain, validation, plain=60, target=0.05,
                              windows=(1, layers))
    setting = result.setting
    assert setting.rule == "linear" and result.retain_rate <= 0.05 and result.forget_rate > 0.8
    path = replace(stats, guard=setting).save(tmp_path / "linear.npz")
    guard = KSDGuard([load_stats(path, manifest)], manifest)
    keys = np.concatenate([validation, retain[:50]])
    names = manifest.key_last_outputs
    hits = guard.check({names[layer]: keys[:, layer] for layer in setting.layers})
    # calibration's own arithmetic: the mean over the region's layers of each layer's w . v + b
    evidence = sum(keys[:, layer] @ setting.weights[i] + setting.biases[i] for i, layer in enumerate(setting.layers))
    expected = -evidence <= setting.thresholds[0]
    near = np.abs(-evidence - setting.thresholds[0]) < 1e-4   # float32 sums in another order: the boundary
    assert [hit is not None for hit, close in zip(hits, near) if not close] == expected[~near].tolist()
    assert 0 < expected.sum() < len(keys) and near.sum() <= 1


def test_bad_linear_weights_are_one_clear_error(tmp_path, tiny_stats):
    from dataclasses import replace

    stats, manifest = tiny_stats
    good = GuardSetting("linear", [0, 1], [0.5], weights=np.ones((2, stats.key_width), np.float32),
                        biases=np.zeros(2))
    cases = {
        "shape": replace(good, weights=np.ones((3, stats.key_width), np.float32)),
        "NaN": replace(good, weights=np.full((2, stats.key_width), np.nan, np.float32)),
        "zeros": replace(good, weights=np.zeros((2, stats.key_width), np.float32)),
        "two thresholds": replace(good, thresholds=[0.5, 0.5]),
        "same layer twice": replace(good, layers=[1, 1]),
        "missing": replace(good, weights=None, biases=None),
        "threshold": replace(good, thresholds=[5e3]),
    }
    for name, setting in cases.items():
        path = replace(stats, guard=setting).save(tmp_path / f"{name}.npz")
        with pytest.raises(UnskillError) as error:
            load_stats(path, manifest)
        assert str(path) in str(error.value) and "\n" not in str(error.value), name


def test_decoded_tokens_of_retain_prompts_bound_the_linear_threshold():
    """The guard checks every decoded token: retain prompts whose answers drift towards the skill join the retain
    side, and the stored threshold refuses at most the target of prompts and decoded prompts together (out of
    fold), so those answers are not cut off where the prompts alone would have allowed it."""
    from unskill.runtime.ksd import LinearRegion
    from unskill.stats.calibrate import calibrate_linear

    width, layers = 12, 2
    clouds = [two_clouds(300, width, shift=5.0, seed=20 + layer) for layer in range(layers)]
    forget = np.stack([c[0] for c in clouds], axis=1)
    retain = np.stack([c[1] for c in clouds], axis=1)
    rng = np.random.default_rng(4)
    # 40 decoded retain prompts x 5 tokens; every token of the first 10 halfway towards the skill
    owner = np.repeat(np.arange(40), 5)
    noise = rng.normal(scale=0.3, size=(200, layers, width)).astype(np.float32)
    decoded = retain[rng.integers(0, 300, size=200)] + noise
    decoded[owner < 10] = 0.5 * decoded[owner < 10] + 0.5 * forget[:50].repeat(1, axis=0)[:len(decoded[owner < 10])]
    validation = forget[:100]
    plain_only = calibrate_linear(forget, [0, 1], retain, validation, plain=100, target=0.02, windows=(2,))
    with_decoded = calibrate_linear(forget, [0, 1], retain, validation, plain=100, target=0.02, windows=(2,),
                                    decoded=decoded, owner=owner)
    for result in (plain_only, with_decoded):
        assert result.retain_rate <= 0.02 and result.setting.layers == [0, 1]

    def refused_answers(setting):
        region = LinearRegion("", (0, 1), setting.weights, float(setting.biases.sum()), setting.thresholds[0])
        fired = region.contains(decoded)
        return len({int(o) for o in owner[fired]})

    assert refused_answers(plain_only.setting) >= 5            # the prompts alone set a threshold the answers cross
    assert refused_answers(with_decoded.setting) <= 1          # at most 2 % of 40 decoded prompts (in sample)


def test_the_mean_of_the_last_tokens_catches_what_the_last_token_misses(tmp_path, tiny_stats):
    """A request whose skill sits in the tokens before its last one (which reads like a kept request) is caught
    by the mean key of its last tokens, whose threshold spends only the retain budget the last token left; the
    runtime guard, reading the stored rule back, decides each row as calibration's arithmetic does, and at a
    decode step (the last key alone) the mean no longer counts."""
    from dataclasses import replace

    from unskill.runtime.ksd import pool_keys
    from unskill.stats.calibrate import calibrate_linear

    stats, manifest = tiny_stats
    layers, width, positions = stats.num_layers, stats.key_width, 4
    clouds = [two_clouds(1000, width, shift=3.0, seed=20 + layer) for layer in range(layers)]
    forget_cloud = np.stack([c[0] for c in clouds], axis=1)    # (1000, L, F)
    retain_cloud = np.stack([c[1] for c in clouds], axis=1)

    def prompts(cloud, start, rows):   # (rows, P, L, F): every position drawn from one cloud
        return cloud[start:start + rows * positions].reshape(rows, positions, layers, width)

    forget, retain = prompts(forget_cloud, 0, 150), prompts(retain_cloud, 0, 200)
    retain_valid = np.ones((200, positions), bool)
    retain_valid[::7, 0] = False   # a short prompt: its first position is padding
    # validation: 40 read like the skill at the last token only, 40 at every token but the last
    validation = np.concatenate([prompts(retain_cloud, 800, 40), prompts(forget_cloud, 600, 40)])
    validation[:40, -1] = forget_cloud[760:800]
    validation[40:, -1] = retain_cloud[960:1000]
    validation_valid = np.ones((80, positions), bool)
    mean = {"positions": positions, "forget": pool_keys(forget, np.ones((150, positions), bool)),
            "retain": pool_keys(retain, retain_valid), "validation": pool_keys(validation, validation_valid)}
    fit_layers = list(range(layers))
    last_only = calibrate_linear(forget[:, -1], fit_layers, retain[:, -1], validation[:, -1], plain=80, target=0.05,
                                 windows=(layers,))
    result = calibrate_linear(forget[:, -1], fit_layers, retain[:, -1], validation[:, -1], plain=80, target=0.05,
                              windows=(layers,), pooled=mean)
    setting = result.setting
    assert last_only.setting.positions == 1 and last_only.forget_rate <= 0.55
    assert setting.positions == positions and np.isfinite(setting.pooled_threshold)
    assert result.forget_rate >= 0.9 and result.retain_rate <= 0.05
    path = replace(stats, guard=setting).save(tmp_path / "positions.npz")
    guard = KSDGuard([load_stats(path, manifest)], manifest)
    assert guard.positions == positions
    keys = {guard._prompt_output_of_layer[layer]: validation[:, :, layer] for layer in setting.layers}
    hits = guard.check(keys, validation_valid.astype(np.int64))
    # calibration's own arithmetic: the mean over layers of w . v + b, for the last key and the mean key
    last = sum(validation[:, -1, layer] @ setting.weights[i] + setting.biases[i]
               for i, layer in enumerate(setting.layers))
    pooled = sum(mean["validation"][:, layer] @ setting.pooled_weights[i] + setting.pooled_biases[i]
                 for i, layer in enumerate(setting.layers))
    expected = (-last <= setting.thresholds[0]) | (-pooled <= setting.pooled_threshold)
    margin = np.minimum(np.abs(-last - setting.thresholds[0]), np.abs(-pooled - setting.pooled_threshold))
    near = margin < 1e-4   # float32 sums in another order: the boundary
    assert [hit is not None for hit, close in zip(hits, near) if not close] == expected[~near].tolist()
    assert expected[40:].mean() >= 0.9 and near.sum() <= 1
    # a decode step reads the newest key alone: the mean no longer counts
    last_hits = guard.check({guard._output_of_layer[layer]: validation[:, -1, layer] for layer in setting.layers})
    assert sum(hit is not None for hit in last_hits[40:]) <= 4
