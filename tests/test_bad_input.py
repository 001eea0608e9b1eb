"""Hostile input: every case gets one clear error line (exit 2 in the CLIs) and loses nothing.
Property-style (hypothesis): random and malformed prompts, options, stats files and manifests never
raise anything but UnskillError, and a failed run leaves the output file as it was."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unskill.runtime import GenerationParams, SamplingParams, UnskillError, load, load_manifest
from unskill.ksd_run import main as ksd_run
from unskill.runtime.ksd import KSDGuard
from unskill.runtime.statsfile import alpha_problem, load_stats

SLOW_OK = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def llama(tiny_export):
    return tiny_export("llama")[1]


@pytest.fixture(scope="module")
def generator(llama):
    return load(llama, device="cpu")


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


@SLOW_OK
@given(prompt=st.text(max_size=60) | st.lists(st.dictionaries(st.sampled_from(["role", "content", "x"]),
                                                               st.text(max_size=10) | st.integers()), max_size=3),
       chat=st.booleans())
def test_random_prompts_generate_or_fail_cleanly(generator, prompt, chat):
    try:
        result = generator.generate([prompt], GenerationParams(max_new_tokens=2, chat=chat))[0]
        assert result.finish_reason in ("eos", "length", "stop")
    except UnskillError as exc:
        assert "\n" not in str(exc)


@SLOW_OK
@given(temperature=st.floats(allow_nan=True, allow_infinity=True) | st.just(0.0),
       top_k=st.integers(-5, 2000), top_p=st.floats(allow_nan=True, allow_infinity=True) | st.just(1.0),
       batch=st.integers(-3, 3), tokens=st.integers(-2, 3), alpha=st.floats(allow_nan=True, allow_infinity=True))
def test_random_options_exit_0_or_2_and_keep_the_output(llama, llama_stats, tmp_path_factory, capsys,
                                                          temperature, top_k, top_p, batch, tokens, alpha):
    out = tmp_path_factory.mktemp("opts") / "out.jsonl"
    out.write_text("precious\n")
    code = ksd_run(["--onnx", str(llama), "--stats", str(llama_stats[1]), "--prompt", "Write a python function",
                    f"--temperature={temperature!r}", f"--top-k={top_k}", f"--top-p={top_p!r}",
                    f"--batch-size={batch}", f"--max-new-tokens={tokens}", f"--alpha={alpha!r}",
                    "--output", str(out), "--device", "cpu", "--quiet", "--seed", "0"])
    valid = (math.isfinite(temperature) and temperature >= 0 and 0 <= top_k <= 512 and math.isfinite(top_p)
             and 0 < top_p <= 1 and batch >= 1 and tokens >= 1 and alpha_problem(alpha) is None)
    if valid:
        assert code == 0 and out.read_text() != "precious\n"
        capsys.readouterr()
    else:
        assert code == 2 and out.read_text() == "precious\n"
        one_error_line(capsys)
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]   # no temporary file left


def test_output_that_cannot_be_written_fails_before_the_model_loads(llama, tmp_path, capsys):
    base = ["--onnx", str(tmp_path / "no-model-here"), "--prompt", "hi", "--device", "cpu"]
    assert ksd_run(base + ["--output", str(tmp_path)]) == 2
    assert "is a directory" in one_error_line(capsys)
    if os.geteuid() != 0:   # root writes read-only files anyway
        readonly = tmp_path / "ro.jsonl"
        readonly.write_text("keep")
        readonly.chmod(0o444)
        assert ksd_run(base + ["--output", str(readonly)]) == 2
        assert "read-only" in one_error_line(capsys)
    assert ksd_run(base + ["--output", str(tmp_path / "ok.jsonl")]) == 2
    assert "no manifest" in one_error_line(capsys)   # only now does it look at the model


def test_prompts_file_that_is_not_utf8(llama, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"fine\n\xff\xfe broken\n")
    assert ksd_run(["--onnx", str(llama), "--prompts", str(prompts), "--device", "cpu"]) == 2
    assert "not UTF-8" in one_error_line(capsys)
    assert ksd_run(["--onnx", str(llama), "--prompt", "bad \udcff bytes", "--device", "cpu"]) == 2
    assert "not valid UTF-8" in one_error_line(capsys)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text()[:500]), "not a valid tokenizer"),
    (lambda d: _edit_manifest(d, chat_template="{% for m in messages %}{{ m.content }"), "not valid Jinja"),
    (lambda d: _edit_manifest(d, chat_template="{{ raise_exception('no system role') }}"), "chat template failed"),
    (lambda d: _edit_manifest(d, num_layers="3"), "'num_layers' has the wrong type"),
    (lambda d: _edit_manifest(d, eos_token_ids=[]), "'eos_token_ids'"),
    (lambda d: (d / "unskill.json").write_text("[1, 2]"), "expected a JSON object"),
])
def test_damaged_model_files(llama, tmp_path, damage, message):
    broken = tmp_path / "model"
    shutil.copytree(llama, broken)
    damage(broken)
    with pytest.raises(UnskillError, match=message):
        load(broken, device="cpu").generate(["hi"], GenerationParams(max_new_tokens=1))


def _edit_manifest(directory, **fields):
    manifest = json.loads((directory / "unskill.json").read_text())
    manifest.update(fields)
    (directory / "unskill.json").write_text(json.dumps(manifest))


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 10 ** 6) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3), max_leaves=6)


@SLOW_OK
@given(field=st.sampled_from(["arch", "num_layers", "key_width", "key_outputs", "eos_token_ids", "pad_token_id",
                              "max_context", "chat_template", "kept_neurons", "key_last_outputs", "gated"]),
       value=JSON_VALUES)
def test_random_manifest_fields_load_or_fail_cleanly(llama, tmp_path_factory, field, value):
    directory = tmp_path_factory.mktemp("manifest")
    manifest = json.loads((llama / "unskill.json").read_text())
    manifest[field] = value
    (directory / "unskill.json").write_text(json.dumps(manifest))
    try:
        load_manifest(directory)
    except UnskillError as exc:
        assert "\n" not in str(exc)


def _save_arrays(path, arrays):
    np.savez(path, **arrays)
    return path


@SLOW_OK
@given(member=st.sampled_from(["ksd.min", "ksd.max", "ksd.sum", "ksd.sumsq", "ksd.count", "key_width", "meta"]),
       change=st.sampled_from(["negate", "nan", "zero", "swap", "shape", "string"]))
def test_random_stats_damage_is_refused_or_harmless(llama, llama_stats, tmp_path_factory, member, change):
    with np.load(llama_stats[1], allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    value = arrays[member]
    arrays[member] = {"negate": lambda v: -v if v.dtype.kind in "if" else v,
                      "nan": lambda v: np.full(v.shape, np.nan) if v.dtype.kind == "f" else v,
                      "zero": lambda v: np.zeros_like(v) if v.dtype.kind in "if" else v,
                      "swap": lambda v: arrays["ksd.max" if member == "ksd.min" else "ksd.min"] if member in ("ksd.min", "ksd.max") else v,
                      "shape": lambda v: v.reshape(-1)[:3] if v.ndim else np.array([v, v]),
                      "string": lambda v: np.array("x")}[change](value)
    path = _save_arrays(tmp_path_factory.mktemp("stats") / "s.npz", arrays)
    manifest = load_manifest(llama)
    try:
        guard = KSDGuard([load_stats(path, manifest)], manifest, rule="paper")
    except UnskillError as exc:
        assert "\n" not in str(exc)
        return
    # accepted: then it is a working guard whose cubes have positive width
    assert all((cube.halfwidth > 0).any() for cube in guard.cubes)


def test_stats_that_would_disable_the_guard_are_refused(llama, llama_stats, tmp_path):
    with np.load(llama_stats[1], allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    manifest = load_manifest(llama)
    swapped = dict(arrays, **{"ksd.min": arrays["ksd.max"], "ksd.max": arrays["ksd.min"]})
    with pytest.raises(UnskillError, match="min is above"):
        load_stats(_save_arrays(tmp_path / "swap.npz", swapped), manifest)
    negative = dict(arrays, **{"ksd.sumsq": arrays["ksd.sumsq"] * 0.0})
    with pytest.raises(UnskillError, match="negative variance"):
        load_stats(_save_arrays(tmp_path / "neg.npz", negative), manifest)
    count = arrays["ksd.count"].astype(np.float64)[:, None]
    mean = arrays["ksd.sum"] / count
    flat = dict(arrays, **{"ksd.min": mean, "ksd.max": mean, "ksd.sumsq": mean ** 2 * count})
    with pytest.raises(UnskillError, match="no spread"):
        KSDGuard([load_stats(_save_arrays(tmp_path / "flat.npz", flat), manifest)], manifest, rule="paper")
    with pytest.raises(UnskillError, match="finite"):
        KSDGuard([load_stats(llama_stats[1], manifest)], manifest, alpha=math.inf)
    with pytest.raises(UnskillError):
        SamplingParams(temperature=math.nan).validate()


def test_stats_cli_refuses_bad_options_and_duplicate_shards(llama_stats, tmp_path, capsys):
    from unskill.cli import main as unskill

    shard = str(llama_stats[1])
    out = tmp_path / "merged.npz"
    assert unskill(["stats", "--merge", shard, shard, "--out", str(out)]) == 2
    assert "count its probes twice" in one_error_line(capsys) and not out.exists()
    copy = tmp_path / "copy.npz"
    shutil.copy(shard, copy)
    assert unskill(["stats", "--merge", shard, str(copy), "--out", str(out)]) == 2
    assert "twice" in one_error_line(capsys)
    for flag in ("--batch-size", "--max-text-tokens"):
        assert unskill(["stats", "--model", "m", "--forget", "builtin:math", flag, "0", "--out", str(out)]) == 2
        assert flag in one_error_line(capsys)
    assert unskill(["stats", "--model", "m", "--forget", "builtin:math", "--out", str(tmp_path)]) == 2
    assert "is a directory" in one_error_line(capsys)
    with zipfile.ZipFile(tmp_path / "junk.npz", "w") as archive:
        archive.writestr("meta.npy", b"not numpy")
    assert unskill(["stats", "--merge", shard, str(tmp_path / "junk.npz"), "--out", str(out)]) == 2
    one_error_line(capsys)


def test_ctrl_c_is_one_line_and_exit_130(llama):
    # A shell starts background jobs with SIGINT ignored, and Python then installs no Ctrl-C handler: the child
    # gets the default disposition back, as at a terminal, whatever ran this test.
    proc = subprocess.Popen([sys.executable, "-m", "unskill.ksd_run", "--onnx", str(llama), "--device", "cpu"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "type a prompt" in proc.stderr.readline()   # loaded and waiting at the interactive prompt
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "interrupted"


# ---- inputs that broke a request (or everyone's), switched the guard off, or hung a template ----
from unskill.runtime.sampling import MAX_SEED, sample  # noqa: E402
from unskill.runtime.statsfile import REGION_LIMITS, GuardSetting  # noqa: E402


@SLOW_OK
@given(seed=st.integers(-2 ** 70, 2 ** 70) | st.sampled_from([-1, 0, MAX_SEED, MAX_SEED + 1]),
       temperature=st.sampled_from([5e-324, 1e-300, 1e-6, 0.7]))
def test_seeds_and_tiny_temperatures_answer_or_exit_2(llama, capsys, seed, temperature):
    code = ksd_run(["--onnx", str(llama), "--prompt", "Write a python function", "--max-new-tokens", "3",
                    f"--seed={seed}", f"--temperature={temperature!r}", "--device", "cpu", "--quiet"])
    if 0 <= seed <= MAX_SEED:
        assert code == 0, capsys.readouterr().err
        capsys.readouterr()
    else:
        assert code == 2 and "seed must be an integer" in one_error_line(capsys)


@settings(max_examples=200, deadline=None)
@given(logits=st.lists(st.floats(-1e30, 1e30), min_size=2, max_size=16),
       temperature=st.floats(0, 2) | st.sampled_from([5e-324, 1e-320, 1e-300]), top_p=st.floats(0.01, 1),
       seed=st.integers(0, MAX_SEED))
def test_sampling_never_fails_on_finite_logits(logits, temperature, top_p, seed):
    params = SamplingParams(temperature, 0, top_p, seed)
    params.validate()
    token = sample(np.asarray(logits, dtype=np.float32), params, np.random.default_rng(seed))
    assert 0 <= token < len(logits)


def test_alpha_or_layers_that_switch_the_guard_off_exit_2(llama, llama_stats, capsys):
    base = ["--onnx", str(llama), "--stats", str(llama_stats[1]), "--prompt", "hi", "--device", "cpu", "--quiet"]
    for flags, message in ((["--alpha", "1e-300"], "refuse nothing"), (["--alpha", "1e9"], "refuse everything"),
                           (["--alpha", "1e-300", "--alpha-mode", "sigma"], "refuse nothing"),
                           (["--layers", ""], "--layers ''"), (["--layers", "1,1"], "named twice")):
        assert ksd_run(base + flags) == 2
        assert message in one_error_line(capsys)


def _stats_arrays(path):
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


@SLOW_OK
@given(rule=st.sampled_from(["box", "gauss", "ratio"]),
       threshold=st.floats(allow_nan=False) | st.sampled_from([1e-300, 5e-324, 1e300, 1.0]))
def test_stored_thresholds_that_refuse_nothing_or_everything_are_refused(llama, llama_stats, tmp_path_factory,
                                                                          rule, threshold):
    arrays = _stats_arrays(llama_stats[1])
    if rule == "ratio":   # its retain side: the forget statistics stand in
        arrays.update({f"ksd_retain.{name}": arrays[f"ksd.{name}"] for name in ("count", "sum", "sumsq", "min", "max")})
    arrays["guard"] = np.array(GuardSetting(rule, [1], [threshold], 1).to_json())
    path = _save_arrays(tmp_path_factory.mktemp("guard") / "s.npz", arrays)
    manifest = load_manifest(llama)
    low, high = REGION_LIMITS[rule]
    if low <= threshold <= high:
        assert KSDGuard([load_stats(path, manifest)], manifest).detectors[0].rule.startswith("calibrated")
    else:
        with pytest.raises(UnskillError, match="guard setting") as caught:
            load_stats(path, manifest)
        assert "\n" not in str(caught.value)


def test_stored_rule_without_ksd_statistics_is_one_line(llama, llama_stats, tmp_path, capsys):
    arrays = {name: value for name, value in _stats_arrays(llama_stats[1]).items() if not name.startswith("ksd.")}
    arrays["guard"] = np.array(GuardSetting("gauss", [1], [1.0], 1).to_json())
    path = _save_arrays(tmp_path / "no-ksd.npz", arrays)
    assert ksd_run(["--onnx", str(llama), "--stats", str(path), "--prompt", "hi", "--device", "cpu"]) == 2
    assert "no KSD key statistics" in one_error_line(capsys)


def test_output_under_sys_fails_before_the_work(tmp_path, capsys):
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no /sys here")
    assert ksd_run(["--onnx", str(tmp_path / "no-model"), "--prompt", "hi", "--output", "/sys/x.jsonl"]) == 2
    assert "cannot write in /sys" in one_error_line(capsys)


HOSTILE_TEMPLATES = {
    "{{ 1/0 }}": "ZeroDivisionError",
    "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}": "recursed too deeply",
    "{% if false %}x{% endif %}": "rendered nothing",
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}x": "loop steps",
    "{{ 'a' * 300000000 }}": "repetition",
    "{{ 'a' | center(300000000) }}": "passed to a filter",
    "{{ 2 ** 99999999 }}": "a number over",
    "{% for a in 'x' * 900000 %}{% for b in 'x' * 900000 %}{% endfor %}{% endfor %}x": "over 2 s",
    "{% for m in messages %}{{ m.content * 500000 }}{{ m.content * 500000 }}{% endfor %}": "characters",
    "{{ ''.__class__.__mro__ }}": "SecurityError",
}


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_hostile_chat_templates_fail_in_one_line_and_fast(llama, tmp_path, template):
    import time

    model = tmp_path / "model"
    shutil.copytree(llama, model)
    _edit_manifest(model, chat_template=template)
    generator = load(model, device="cpu")
    started = time.monotonic()
    with pytest.raises(UnskillError, match=HOSTILE_TEMPLATES[template]) as caught:
        generator.generate(["hi"], GenerationParams(max_new_tokens=1, chat=True))
    assert time.monotonic() - started < 6 and "\n" not in str(caught.value)


@pytest.mark.parametrize("fields, message", [
    (dict(kept_neurons=[[0, 1]] * 30), "kept_neurons has 30 layers"),
    (dict(kept_neurons="decreasing"), "increasing indices"),
    (dict(pad_token_id=10 ** 9), "pad_token_id 1000000000 is outside the vocabulary"),
    (dict(eos_token_ids=[7, 10 ** 6]), "eos_token_ids 1000000 is outside"),
])
def test_manifest_ids_the_graph_cannot_hold_fail_at_load(llama, tmp_path, fields, message):
    model = tmp_path / "model"
    shutil.copytree(llama, model)
    if fields.get("kept_neurons") == "decreasing":
        fields = dict(kept_neurons=[[1, 0]] * load_manifest(llama).num_layers)
    _edit_manifest(model, **fields)
    with pytest.raises(UnskillError, match=message):
        load(model, device="cpu").generate(["hi", "a longer prompt"], GenerationParams(max_new_tokens=1))


def test_kept_neurons_that_disagree_with_the_graph_fail_in_one_line(llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(llama, model)
    manifest = load_manifest(llama)
    _edit_manifest(model, kept_neurons=[[0, 1]] * manifest.num_layers)
    model = load(model, device="cpu").model
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    with pytest.raises(UnskillError, match="kept_neurons lists 2"):
        model.forward(ids, np.ones_like(ids), model.empty_past(1), [manifest.key_last_outputs[0]])
