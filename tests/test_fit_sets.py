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
    rates = {name: fit_sets.chosen_window(fit_sets.score_variant(keys, forget, fit_retain, retain))
             for name, (forget, fit_retain) in found.items()}
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
