"""scripts/fit_sets.py, the screen of a linear guard's fit sets, on keys drawn so the answer is known."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def _script():
    path = Path(__file__).resolve().parent.parent / "scripts" / "fit_sets.py"
    spec = importlib.util.spec_from_file_location("fit_sets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _keys(layers: int = 3, width: int = 16, seed: int = 0) -> dict:
    """Probes sit along e0, the real skill requests (calibration and held out alike) along e1, everything benign
    at the origin: a fit on the probes alone misses the real requests, one with the calibration half finds them."""
    rng = np.random.default_rng(seed)
    e0, e1 = np.eye(width)[0] * 4, np.eye(width)[1] * 4

    def draw(count, centre):
        return (rng.normal(size=(count, layers, width)) + centre).astype(np.float32)

    keys = {name: draw(150, e0) for name in ("probes", "probes_framed", "probes_bon", "validation", "test",
                                             "test_framed")}
    keys.update({name: draw(6, e1) for name in ("real_skill", "real_skill_framed", "real_skill_bon")})
    keys["heldout_skill"] = draw(40, e1)
    for name in ("retain_general", "retain_chat", "retain_instructions", "heldout_benign"):
        keys[name] = draw(200, 0)
    return keys


def test_the_screen_finds_what_the_calibration_requests_add():
    fit_sets = _script()
    keys = _keys()
    found, retain = fit_sets.variants(keys)
    rates = {name: fit_sets.chosen_window(fit_sets.score_variant(keys, forget, retain, repeats))
             for name, (forget, repeats) in found.items()}
    plain = rates["guard's fit"]
    assert plain["validation"] == 1.0 and plain["test"] == 1.0 and plain["window"] == 3   # ties go to the widest
    assert plain["heldout_skill"] < 0.2 and plain["heldout_benign"] <= 0.03
    weighted = rates["+ calibration skill requests x20"]
    assert weighted["heldout_skill"] > 0.9 and weighted["heldout_benign"] <= 0.03 and weighted["validation"] >= 0.98


def test_a_keys_file_without_the_sets_is_one_line_and_exit_2(tmp_path, capsys):
    fit_sets = _script()
    path = tmp_path / "keys.npz"
    np.savez(path, probes=np.zeros((2, 1, 4), np.float16))
    assert fit_sets.main(["report", "--keys", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and "probes_framed" in err
    assert fit_sets.main(["report", "--keys", str(tmp_path / "absent.npz")]) == 2
    assert "absent.npz" in capsys.readouterr().err


def test_the_real_requests_break_the_tie_between_windows():
    """Layer 1 sees the real requests' direction, layers 0 and 2 do not; every window refuses all validation
    prompts. chosen_window keeps the widest; the tie-break by the calibration half's real requests takes layer 1."""
    fit_sets = _script()
    keys = _keys()
    e1 = np.eye(16)[1] * 4
    keys["validation"] += np.eye(16)[0] * 4   # far enough that every window refuses all of them: a tie
    for name in ("real_skill", "real_skill_framed", "real_skill_bon", "heldout_skill"):
        keys[name][:, [0, 2]] -= e1 + np.eye(16)[0] * 4   # far on the benign side at layers 0 and 2
        keys[name][:, 1] += np.eye(16)[0] * 4   # ... and like the probes at layer 1
    found, retain = fit_sets.variants(keys)
    forget, repeats = found["guard's fit"]
    rows = fit_sets.score_variant(keys, forget, retain, repeats)
    assert (fit_sets.chosen_window(rows)["window"], fit_sets.chosen_window(rows)["start"]) == (3, 0)
    tied = fit_sets.window_by_real_requests(rows)
    assert (tied["window"], tied["start"]) == (1, 1) and tied["heldout_skill"] > 0.9


def test_weighing_the_border_answers_more_border_requests():
    """Benign requests that lean towards the skill (the calibration half's and, alike, the held-out ones): weighed
    10 times in the fit, fewer held-out ones are refused, and the forget side is still caught (fails where the
    weights are dropped)."""
    fit_sets = _script()
    keys = _keys(seed=1)
    border = np.eye(16)[0] * 2.5 + np.eye(16)[2] * 3
    rng = np.random.default_rng(2)
    for name in ("retain_instructions", "heldout_benign"):
        keys[name] = (rng.normal(size=keys[name].shape) + border).astype(np.float32)
    found, retain = fit_sets.variants(keys)
    plain = fit_sets.chosen_window(fit_sets.score_variant(keys, found["guard's fit"][0], retain,
                                                          found["guard's fit"][1]))
    weighed = fit_sets.chosen_window(fit_sets.score_variant(keys, found["calibration benign requests x10"][0], retain,
                                                            found["calibration benign requests x10"][1]))
    assert weighed["heldout_benign"] < plain["heldout_benign"] and weighed["heldout_benign"] <= 0.03
    assert weighed["validation"] >= 0.98
