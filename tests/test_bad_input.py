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
from unskill.runtime.statsfile import load_stats

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
             and 0 < top_p <= 1 and batch >= 1 and tokens >= 1 and math.isfinite(alpha) and alpha > 0)
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
