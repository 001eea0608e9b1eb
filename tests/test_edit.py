"""Neuron Adjust and Selective Pruning baked into ONNX: the edited graphs against PyTorch + the NumPy rule."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from tiny_models import graph_ops, na_gate_hook, run_plain_ort, torch_with_hooks
from unskill.exporter.neuron_adjust import na_hash_uniform, na_reference, neuron_adjust, select_neurons
from unskill.exporter.prune import prune, prune_scores
from unskill.runtime import GenerationParams, load, load_stats
from unskill.runtime.errors import UnskillError
from unskill.runtime.session import OnnxLM
from unskill.stats.datasets import Dataset, Item
from unskill.stats.probe import ProbeConfig, probe

ATOL, RTOL = 1e-4, 1e-3
FORGET = [Item(f"How many apples are left if Tom eats {i} of his {i + 9} apples?", f"{i + 9} - {i} = 9") for i in range(8)]
RETAIN = [Item(f"Write a python function number {i}", f"def f{i}(a, b):\n    return a + b") for i in range(8)]


@pytest.fixture(scope="module")
def edit_stats(tiny_export, tmp_path_factory):
    """kind -> stats path with NA and SP groups for that tiny model."""
    cache = {}

    def get(kind, model_dir=None):
        model_dir = model_dir or tiny_export(kind)[1]
        if model_dir not in cache:
            model = OnnxLM(model_dir, device="cpu")
            from unskill.runtime.tokenizer import TextTokenizer
            stats = probe(model, TextTokenizer(model_dir, model.manifest), Dataset("apples", FORGET),
                          Dataset("code", RETAIN), ProbeConfig(progress=False))
            cache[model_dir] = stats.save(tmp_path_factory.mktemp("edit") / "s.npz")
        return cache[model_dir]

    return get


def test_na_reference_rule():
    rng = np.random.default_rng(0)
    mu_f, sd_f, mu_r, sd_r = (np.float32(x) for x in (2.0, 0.5, -1.0, 1.5))
    v = rng.normal(0, 3, size=(4, 1000)).astype(np.float32)
    selected = np.ones(1000, bool)
    always = na_reference(v, mu_f, sd_f, mu_r, sd_r, selected, np.zeros_like(v))
    z = lambda x, m, s: (x - m) / s
    forget_likelier = (-0.5 * z(v, mu_f, sd_f) ** 2 - np.log(sd_f)) > (-0.5 * z(v, mu_r, sd_r) ** 2 - np.log(sd_r))
    mirrored = 2 * mu_r - ((v - mu_f) / sd_f * sd_r + mu_r)
    np.testing.assert_allclose(always, np.where(forget_likelier, mirrored, v), rtol=1e-5, atol=1e-5)
    never = na_reference(v, mu_f, sd_f, mu_r, sd_r, selected, np.ones_like(v))
    np.testing.assert_array_equal(never, v)
    unselected = na_reference(v, mu_f, sd_f, mu_r, sd_r, ~selected, np.zeros_like(v))
    np.testing.assert_array_equal(unselected, v)
    # replacement probability is p_f / (p_f + p_r)
    point = np.full((200000,), 2.0, np.float32)
    p_f = np.exp(-0.5 * z(2.0, mu_f, sd_f) ** 2) / sd_f
    p_r = np.exp(-0.5 * z(2.0, mu_r, sd_r) ** 2) / sd_r
    drawn = na_reference(point, mu_f, sd_f, mu_r, sd_r, True, rng.uniform(size=point.shape).astype(np.float32))
    assert abs((drawn != point).mean() - p_f / (p_f + p_r)) < 0.01
    far = na_reference(np.float32([1e30, -1e30]), mu_f, sd_f, mu_r, sd_r, True, np.zeros(2, np.float32))
    assert not np.isnan(far).any()


def test_selection_is_global_top_ratio(tiny_export, edit_stats):
    _, onnx_dir = tiny_export("llama")
    stats = load_stats(edit_stats("llama"))
    params = select_neurons(stats, 0.1)
    gap = stats.groups["na_forget"].mean() - stats.groups["na_retain"].mean()
    count = int(round(0.1 * gap.size))
    assert params.selected.sum() == count
    assert gap[params.selected].min() >= gap[~params.selected].max()
    assert (params.sd_f > 0).all()
    np.testing.assert_allclose(params.sd_f, np.maximum(stats.groups["na_forget"].std(), 1e-5), rtol=1e-6)


@pytest.mark.parametrize("kind,form,mode", [("llama", "masked", "input"), ("gemma3", "masked", "input"),
                                            ("gpt2", "masked", "input"), ("llama", "gather", "input"),
                                            ("gpt2", "gather", "input"), ("llama", "masked", "hash"),
                                            ("gemma3", "gather", "hash"), ("gpt2", "masked", "hash")])
def test_na_graph_matches_numpy_reference_in_torch(tiny_export, edit_stats, tmp_path, kind, form, mode):
    hf_dir, onnx_dir = tiny_export(kind)
    out = tmp_path / "na"
    manifest = neuron_adjust(onnx_dir, edit_stats(kind), 0.2, out, noise=mode, form=form, seed=5)
    params = select_neurons(load_stats(edit_stats(kind)), 0.2)
    ids = np.random.default_rng(1).integers(5, 500, size=(2, 10))
    width = manifest.key_width
    layers = [l for l in range(manifest.num_layers) if params.selected[l].any()]
    if mode == "input":
        noise = {f"na_noise.{l}": np.random.default_rng(l).uniform(size=(2, 10, width)).astype(np.float32)
                 for l in layers}
        assert list(noise) == manifest.edits[-1]["noise_inputs"]
        values, _, _ = run_plain_ort(out, ids, noise)
    else:   # the graph hashes (seed, layer, position, neuron) itself; the reference gets the same numbers
        positions = np.arange(10)[None].repeat(2, 0)
        noise = {f"na_noise.{l}": na_hash_uniform(5, l, positions, np.arange(width)) for l in layers}
        assert manifest.edits[-1]["noise_inputs"] == []
        values, _, _ = run_plain_ort(out, ids)

    adjust, replaced = na_gate_hook(params, noise)
    logits, keys = torch_with_hooks(hf_dir, ids, gate_fn=adjust)
    assert sum(replaced) > 0   # the rule fired, so the comparison means something
    np.testing.assert_allclose(values["logits"], logits, atol=ATOL, rtol=RTOL)
    for layer, key in enumerate(keys):
        np.testing.assert_allclose(values[f"key.{layer}"], key, atol=ATOL, rtol=RTOL)


def test_hash_noise_is_uniform_and_independent():
    positions = np.arange(64)[None]
    noise = na_hash_uniform(0, 3, positions, np.arange(1536))
    assert noise.dtype == np.float32 and 0 <= noise.min() and noise.max() < 1
    assert abs(noise.mean() - 0.5) < 0.005 and abs(noise.var() - 1 / 12) < 0.002
    assert noise.mean(axis=2).std() < 1.5 * 0.2887 / np.sqrt(1536)   # no per-position offset
    # neighbours in position, neuron, layer and seed are uncorrelated
    flat = noise[0]
    for a, b in ((flat[1:], flat[:-1]), (flat[:, 1:], flat[:, :-1]),
                 (flat, na_hash_uniform(0, 4, positions, np.arange(1536))[0]),
                 (flat, na_hash_uniform(1, 3, positions, np.arange(1536))[0])):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
    # a pruned layer keeps each surviving neuron's draws: the hash takes original neuron indices
    np.testing.assert_array_equal(na_hash_uniform(0, 3, positions, np.arange(0, 1536, 2)), noise[..., ::2])


def test_hash_na_is_a_function_of_its_input(tiny_export, edit_stats, tmp_path):
    """Same prompt, same logits: first in the session, after other prompts, and left-padded in a batch
    (prefill and a decode step with the KV cache). The stateful session noise differs on a rerun."""
    _, onnx_dir = tiny_export("llama")
    ids = np.random.default_rng(7).integers(5, 500, size=(1, 9))
    other = np.random.default_rng(8).integers(5, 500, size=(1, 13))
    for mode in ("hash", "session"):
        neuron_adjust(onnx_dir, edit_stats("llama"), 0.3, tmp_path / mode, noise=mode, seed=1)
    model = OnnxLM(tmp_path / "hash", device="cpu")

    def two_steps(batch_ids, mask):
        logits, past, _ = model.forward(batch_ids, mask, model.empty_past(len(batch_ids)))
        step = np.full((len(batch_ids), 1), 42)
        mask = np.concatenate([mask, np.ones_like(step)], axis=1)
        return logits, model.forward(step, mask, past)[0]

    first = two_steps(ids, np.ones_like(ids))
    two_steps(other, np.ones_like(other))
    again = two_steps(ids, np.ones_like(ids))
    from unskill.runtime.session import left_pad
    batch_ids, mask = left_pad([other[0].tolist(), ids[0].tolist()], 0)
    batched = two_steps(batch_ids, mask)
    for alone, rerun, in_batch in zip(first, again, batched):
        np.testing.assert_array_equal(alone, rerun)
        np.testing.assert_allclose(in_batch[1], alone[0], atol=1e-5)
    session = OnnxLM(tmp_path / "session", device="cpu")
    draws = [session.forward(ids, np.ones_like(ids), session.empty_past(1))[0] for _ in range(2)]
    assert not np.array_equal(*draws)


def test_na_session_mode_runs_with_standard_inputs_only(tiny_export, edit_stats, tmp_path):
    _, onnx_dir = tiny_export("llama")
    out = tmp_path / "na"
    neuron_adjust(onnx_dir, edit_stats("llama"), 0.3, out, noise="session", seed=3)
    original = {i.name for i in ort.InferenceSession(str(onnx_dir / "model.onnx")).get_inputs()}
    ids = np.random.default_rng(2).integers(5, 500, size=(1, 16))
    edited, _, session = run_plain_ort(out, ids)
    assert {i.name for i in session.get_inputs()} == original
    plain, _, _ = run_plain_ort(onnx_dir, ids)
    np.testing.assert_allclose(edited["preact.0"], plain["preact.0"], atol=1e-5)   # raw value stays visible
    assert not np.allclose(edited["logits"], plain["logits"], atol=1e-4)
    # the guarded runtime runs the edited model too
    params = GenerationParams(max_new_tokens=8)
    assert load(out, device="cpu").generate(["apples"], params)[0].finish_reason in ("eos", "length")


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_pruned_model_equals_zeroed_keys(tiny_export, edit_stats, tmp_path, kind):
    hf_dir, onnx_dir = tiny_export(kind)
    out = tmp_path / "pruned"
    manifest = prune(onnx_dir, edit_stats(kind), 0.1, out, progress=False)
    scores = prune_scores(load_stats(edit_stats(kind)))
    removed = np.zeros_like(scores, dtype=bool)
    for layer, kept in enumerate(manifest.kept_neurons):
        removed[layer] = True
        removed[layer, kept] = False
    assert removed.sum() == round(0.1 * scores.size) == manifest.edits[-1]["removed"]
    assert scores[removed].min() >= scores[~removed].max()
    assert (out / "model.onnx.data").stat().st_size < (onnx_dir / "model.onnx.data").stat().st_size

    ids = np.random.default_rng(3).integers(5, 500, size=(2, 9))
    values, _, _ = run_plain_ort(out, ids)
    logits, keys = torch_with_hooks(hf_dir, ids, key_fn=lambda l, k: np.where(removed[l], 0, k).astype(k.dtype))
    np.testing.assert_allclose(values["logits"], logits, atol=ATOL, rtol=RTOL)
    model = OnnxLM(out, device="cpu")   # the runtime puts the removed neurons back as zeros
    _, _, extras = model.forward(ids, np.ones_like(ids), model.empty_past(2), ["key.1"])
    np.testing.assert_allclose(extras["key.1"], keys[1], atol=ATOL, rtol=RTOL)


def test_iterative_prune_then_na_then_ksd(tiny_export, edit_stats, tmp_path, monkeypatch):
    _, onnx_dir = tiny_export("llama")
    forget, retain = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    for path, items in ((forget, FORGET), (retain, RETAIN)):
        path.write_text("".join(json.dumps({"prompt": i.prompt, "completion": i.completion}) + "\n" for i in items))
    from unskill.cli import main

    assert main(["stats", "--model", str(onnx_dir), "--forget", str(forget), "--retain", str(retain),
                 "--out", str(tmp_path / "s.npz"), "--no-progress"]) == 0
    assert main(["edit", "prune", "--model", str(onnx_dir), "--stats", str(tmp_path / "s.npz"), "--ratio", "0.1",
                 "--steps", "3", "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    pruned = json.loads((tmp_path / "p" / "unskill.json").read_text())
    assert pruned["edits"][-1]["removed"] == round(0.1 * 3 * 96)
    # stats of the old model no longer fit the pruned one
    assert main(["edit", "na", "--model", str(tmp_path / "p"), "--stats", str(tmp_path / "s.npz"),
                 "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    assert main(["stats", "--model", str(tmp_path / "p"), "--forget", str(forget), "--retain", str(retain),
                 "--out", str(tmp_path / "s2.npz"), "--no-progress"]) == 0
    assert main(["edit", "na", "--model", str(tmp_path / "p"), "--stats", str(tmp_path / "s2.npz"), "--ratio", "0.05",
                 "--out", str(tmp_path / "pn")]) == 0
    final = json.loads((tmp_path / "pn" / "unskill.json").read_text())
    assert [e["method"] for e in final["edits"]] == ["prune", "na"]
    assert main(["stats", "--model", str(tmp_path / "pn"), "--forget", str(forget), "--out", str(tmp_path / "k.npz"),
                 "--no-progress"]) == 0
    guarded = load(tmp_path / "pn", stats=[tmp_path / "k.npz"], rule="paper", device="cpu")
    assert guarded.generate([FORGET[0].prompt])[0].abstained


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_pack_and_unpack_keep_every_output_and_edits_apply(tiny_export, edit_stats, tmp_path, kind, capsys):
    """The default export packs q/k/v and gate/up (one MatMul + Split each): logits and every key /
    pre-activation output equal the unpacked graph's within 1e-5 relative (a wider sgemm may sum in another
    order), the parent's stats load on either, NA and prune on the packed graph give what they give on the
    unpacked one (prune unpacks, cuts and packs again), prune refuses a packed int4 graph in one line and
    writes nothing, and `edit pack` refuses an existing --out before the work."""
    import onnx

    from unskill.cli import main
    from unskill.exporter.export import export_model
    from unskill.exporter.pack import unpack_projections

    hf_dir, onnx_dir = tiny_export(kind)
    assert graph_ops(onnx_dir).count("Split") == 6   # 3 layers x (q/k/v, gate/up)
    plain_dir = tmp_path / "plain"
    export_model(str(hf_dir), plain_dir, progress=False, pack=False)
    assert main(["edit", "pack", "--model", str(plain_dir), "--out", str(tmp_path / "repacked")]) == 0
    assert "packed 15 projections" in capsys.readouterr().out
    model = onnx.load(str(onnx_dir / "model.onnx"))
    assert unpack_projections(model) == 15 and "Split" not in [n.op_type for n in model.graph.node]
    ids = np.random.default_rng(5).integers(5, 500, size=(2, 11))
    plain, _, _ = run_plain_ort(plain_dir, ids)
    for other in (onnx_dir, tmp_path / "repacked"):
        values, _, _ = run_plain_ort(other, ids)
        assert set(values) == set(plain)
        for name, expected in plain.items():
            assert np.abs(values[name] - expected).max() <= 1e-5 * max(np.abs(expected).max(), 1e-6), name
    stats = edit_stats(kind)
    load(tmp_path / "repacked", stats=[edit_stats(kind, plain_dir)], rule="paper", device="cpu")   # the parent's stats
    for method, extra in (("na", ["--ratio", "0.05"]), ("prune", ["--ratio", "0.1", "--no-progress"])):
        for model_dir, name in ((onnx_dir, "packed"), (plain_dir, "plain")):
            model_stats = edit_stats(kind, model_dir)   # the exports' fingerprints differ, their keys agree
            assert main(["edit", method, "--model", str(model_dir), "--stats", str(model_stats), *extra,
                         "--out", str(tmp_path / f"{method}-{name}")]) == 0
        edited = run_plain_ort(tmp_path / f"{method}-packed", ids)[0]["logits"]
        expected = run_plain_ort(tmp_path / f"{method}-plain", ids)[0]["logits"]
        assert np.abs(edited - expected).max() <= 1e-5 * np.abs(expected).max(), method
    assert graph_ops(tmp_path / "prune-packed").count("Split") == 6
    from unskill.exporter.quantize import quantize

    quantize(onnx_dir, tmp_path / "int4", "int4")
    capsys.readouterr()
    assert main(["edit", "prune", "--model", str(tmp_path / "int4"), "--stats", str(stats), "--ratio", "0.1",
                 "--out", str(tmp_path / "pruned-int4"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "quantized graph" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "pruned-int4").exists()
    assert main(["edit", "pack", "--model", str(plain_dir), "--out", str(tmp_path / "repacked")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_edit_errors(tiny_export, tmp_path, capsys):
    from unskill.cli import main

    _, onnx_dir = tiny_export("llama")
    ksd_only = tmp_path / "k.npz"
    assert main(["stats", "--model", str(onnx_dir), "--forget", "builtin:math", "--limit", "4", "--out", str(ksd_only),
                 "--no-progress"]) == 0
    assert main(["edit", "na", "--model", str(onnx_dir), "--stats", str(ksd_only), "--out", str(tmp_path / "x")]) == 2
    assert "--retain" in capsys.readouterr().err
    assert main(["edit", "prune", "--model", str(onnx_dir), "--stats", str(ksd_only), "--ratio", "1.5",
                 "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_hard_linked_export_gives_one_line_error(tiny_export, edit_stats, tmp_path, capsys):
    """`cp -al` copies share the weights file; onnx refuses such external data, we name the file instead."""
    import os
    import shutil

    from unskill.cli import main

    _, shared_dir = tiny_export("llama")
    # Link a private copy: linking the session-wide export would poison every later test that loads it.
    onnx_dir = shutil.copytree(shared_dir, tmp_path / "copy")
    linked = tmp_path / "linked"
    shutil.copytree(onnx_dir, linked, copy_function=os.link)
    code = main(["edit", "prune", "--model", str(linked), "--stats", str(edit_stats("llama")), "--ratio", "0.1",
                 "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(linked / "model.onnx") in err and "hard link" in err
    assert not (tmp_path / "p").exists()


def test_edited_model_runs_in_plain_onnxruntime_script(tiny_export, edit_stats, tmp_path):
    """examples/plain_onnxruntime.py imports no unskill code; its greedy text equals the runtime's."""
    import subprocess
    import sys
    from pathlib import Path

    _, onnx_dir = tiny_export("llama")
    out = tmp_path / "pruned"
    prune(onnx_dir, edit_stats("llama"), 0.1, out, progress=False)
    script = Path(__file__).resolve().parent.parent / "examples" / "plain_onnxruntime.py"
    code = (f"import runpy, sys; sys.argv = ['x', {str(out)!r}, 'apples']; "
            f"runpy.run_path({str(script)!r}, run_name='__main__'); "
            "assert not [m for m in sys.modules if m.startswith('unskill')]")
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    expected = load(out, device="cpu").generate(["apples"], GenerationParams(max_new_tokens=64))[0].text
    assert printed == expected + "\n"


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_keeps_outputs_and_accepts_fp32_stats(tiny_export, edit_stats, tmp_path, mode):
    from unskill.exporter.quantize import quantize

    _, onnx_dir = tiny_export("llama")
    out = tmp_path / mode
    manifest = quantize(onnx_dir, out, mode)
    assert manifest.stats_compatible == [json.loads((onnx_dir / "unskill.json").read_text())["fingerprint"]]
    ids = np.random.default_rng(4).integers(5, 500, size=(1, 12))
    quantized, _, _ = run_plain_ort(out, ids)
    plain, _, _ = run_plain_ort(onnx_dir, ids)
    assert (out / "model.onnx.data").stat().st_size < (onnx_dir / "model.onnx.data").stat().st_size
    # Random tiny weights give near-flat logits (|max| ~0.7) that int8's dynamic uint8 activations blur (max
    # error 0.198 of the largest logit): bound the relative RMS error and the greedy choice; int4 keeps its
    # max-error bound too. benchmarks/README.md ("Quantization") measures accuracy on the real model.
    diff = quantized["logits"] - plain["logits"]
    rel_rms = np.linalg.norm(diff) / np.linalg.norm(plain["logits"])
    agree = (quantized["logits"].argmax(-1) == plain["logits"].argmax(-1)).mean()
    assert rel_rms < 0.2 and agree >= 0.75, (rel_rms, agree)
    if mode == "int4":
        assert np.abs(diff).max() / np.abs(plain["logits"]).max() < 0.2
    assert quantized["key.2"].shape == plain["key.2"].shape
    load(out, stats=[edit_stats("llama")], rule="paper", device="cpu")   # fp32 stats are accepted on the quantized model


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_int4_options_quantize_lm_head_and_embeddings(tiny_export, edit_stats, tmp_path, kind):
    """Block 16, fp32 activations, embeddings too: the LM head becomes MatMulNBits (gemma3's is tied:
    MatMul(x, Transpose(embedding)) in the export), the token embedding GatherBlockQuantized; logits stay
    close to fp32 and the fp32 stats still load."""
    import onnx

    from unskill.exporter.quantize import quantize

    _, onnx_dir = tiny_export(kind)
    out = tmp_path / "int4-emb"
    manifest = quantize(onnx_dir, out, "int4", block_size=16, accuracy_level=0, embeddings=True)
    edit = manifest.edits[-1]
    assert edit == {"method": "quantize", "mode": "int4", "ratio": 0.0, "block_size": 16, "accuracy_level": 0,
                    "embeddings": True, "symmetric": True, "grid": "source", "grid_tensors": edit["grid_tensors"],
                    "packed_projections": 3 * 5,   # 3 layers: q/k/v -> 1 + Split, gate/up -> 1 + Split
                    "block_8bit": "head"}
    assert set(edit["grid_tensors"]) == {"off-grid"}   # random weights: all to onnxruntime's quantizer
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    weights = {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Transpose"}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]   # LM head too
    assert not [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
                and i.dims[0] * i.dims[1] >= 512 * 64
                and i.name not in ("cos_cache", "sin_cache")]   # no fp32 embedding-sized matrix left (rotary tables aside)
    assert "GatherBlockQuantized" in [n.op_type for n in graph.node]
    ids = np.random.default_rng(4).integers(5, 500, size=(1, 12))
    quantized, _, _ = run_plain_ort(out, ids)
    plain, _, _ = run_plain_ort(onnx_dir, ids)
    # Random tiny weights give near-flat logits (|max| ~0.6): bound the relative RMS error, as above. Tiny
    # gemma3 measures 0.24 with fp32 embeddings and 0.28 with int4 ones (its tied head over a 64-wide hidden
    # state, scaled by sqrt(hidden) at the input); a broken graph is off by ~1.
    rel_rms = np.linalg.norm(quantized["logits"] - plain["logits"]) / np.linalg.norm(plain["logits"])
    assert rel_rms < (0.2 if kind == "llama" else 0.35), rel_rms
    load(out, stats=[edit_stats(kind)], rule="paper", device="cpu")


def test_quantize_refuses_unknown_block_size(tiny_export, tmp_path):
    from unskill.exporter.quantize import quantize

    _, onnx_dir = tiny_export("llama")
    with pytest.raises(UnskillError, match="block size 48"):
        quantize(onnx_dir, tmp_path / "bad", "int4", block_size=48)
    assert not (tmp_path / "bad").exists()


def _snap_to_gguf_grids(hf_dir, out_dir):
    """The tiny llama with every projection on a Q4_1 grid (w = d*q + m, q in 0..15, fp16 d and m, blocks of 32
    along the input dimension) and its LM head on a Q8_0 grid (w = d*q, q in -127..127), computed as GGUF's
    dequantization does (float32), as the packaged models' weights are."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            w = module.weight.numpy().reshape(module.out_features, -1, 32)
            if name == "lm_head":
                d = (np.abs(w).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
                q = np.clip(np.rint(w / np.where(d > 0, d, 1)), -127, 127)
                snapped = d * q
            else:
                low, high = w.min(-1, keepdims=True), w.max(-1, keepdims=True)
                d = ((high - low) / 15).astype(np.float16).astype(np.float32)
                m = low.astype(np.float16).astype(np.float32)
                q = np.clip(np.rint((w - m) / d), 0, 15)
                snapped = d * q + m
            module.weight.copy_(torch.from_numpy(snapped.astype(np.float32).reshape(module.weight.shape)))
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_dir / name).exists():
            (out_dir / name).write_bytes((hf_dir / name).read_bytes())
    return out_dir


@pytest.fixture(scope="module")
def gguf_grid_export(tiny_export, tmp_path_factory):
    from unskill.exporter.export import export_model

    hf_dir, _ = tiny_export("llama")
    root = tmp_path_factory.mktemp("tiny_gguf_grid")
    export_model(str(_snap_to_gguf_grids(hf_dir, root / "hf")), root / "onnx", progress=False)
    return root / "onnx"


def test_int4_source_grid_is_exact_on_gguf_weights(gguf_grid_export, tmp_path):
    """Weights on Q4_1 / Q8_0 grids come back from MatMulNBits (+ the residual correction) equal to the fp32
    weights within float rounding, and with fp32 activations (accuracy level 0) the logits and every key
    output equal the fp32 model's within 1e-5 relative; the round-to-nearest quantizer is ~100x further off."""
    import onnx
    from onnx import numpy_helper

    from unskill.exporter.grid import GridWeight
    from unskill.exporter.pack import unpack_projections
    from unskill.exporter.quantize import quantize

    manifest = quantize(gguf_grid_export, tmp_path / "exact", "int4", accuracy_level=0, grid="exact", pack=False,
                        block_8bit="source")
    assert manifest.edits[-1]["grid_tensors"] == {"4-bit/32 + residual": 21, "8-bit/32": 1}
    source = onnx.load(str(gguf_grid_export / "model.onnx"))
    unpack_projections(source)   # the export packs q/k/v and gate/up; quantize unpacks them the same way
    weights = {i.name: numpy_helper.to_array(i) for i in source.graph.initializer}
    by_output = {n.output[0]: weights[n.input[1]] for n in source.graph.node
                 if n.op_type == "MatMul" and n.input[1] in weights}
    graph = onnx.load(str(tmp_path / "exact" / "model.onnx")).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    adds = {n.input[0]: n for n in graph.node if n.op_type == "Add"}
    residuals = {n.output[0]: arrays[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in arrays}
    checked = 0
    for node in (n for n in graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: a.i for a in node.attribute}
        add = adds.get(node.output[0])
        output = add.output[0] if add is not None else node.output[0]
        residual = residuals[add.input[1]] if add is not None else None
        grid = GridWeight(attrs["bits"], attrs["block_size"], arrays[node.input[1]], arrays[node.input[2]], residual)
        expected = by_output[output]
        assert np.abs(grid.dequantized() - expected).max() <= 1e-6 * np.abs(expected).max(), output
        checked += 1
    assert checked == 22
    ids = np.random.default_rng(4).integers(5, 500, size=(1, 12))
    exact, _, _ = run_plain_ort(tmp_path / "exact", ids)
    plain, _, _ = run_plain_ort(gguf_grid_export, ids)
    for name in ("logits", "key.0", "key.2", "preact.1", "key_last.2"):
        assert np.abs(exact[name] - plain[name]).max() <= 1e-5 * np.abs(plain[name]).max(), name
    errors = {}
    for grid in ("source", "rtn"):
        quantize(gguf_grid_export, tmp_path / grid, "int4", accuracy_level=0, grid=grid, pack=False,
                 block_8bit="source")
        logits = run_plain_ort(tmp_path / grid, ids)[0]["logits"]
        errors[grid] = np.abs(logits - plain["logits"]).max() / np.abs(plain["logits"]).max()
    # source: the block mins' residuals as two 4-bit digits (to 1/238 of the largest in 32 blocks), no node
    # per MatMul: AveragePool (+ Pad: 2 blocks) + Concat per input tensor (3 layers x q/k/v, o, gate/up, down)
    assert errors["source"] < 1e-2 and errors["rtn"] > 10 * errors["source"], errors
    ops = graph_ops(tmp_path / "source")
    assert ops.count("MatMulNBits") == 22 and ops.count("Add") == [n.op_type for n in source.graph.node].count("Add")
    assert ops.count("AveragePool") == ops.count("Pad") == 12


@pytest.mark.parametrize("grid, symmetric", [("source", True), ("exact", True), ("rtn", False)])
def test_packed_projections_equal_separate_ones(gguf_grid_export, tmp_path, grid, symmetric):
    """int4 packs q/k/v and gate/up into one MatMulNBits + Split (the default): every output equals the
    unpacked graph's (each output column reads the same input and its own weight column; 1e-6 relative
    allows for a kernel tiling the wider N differently). rtn + asymmetric: zero points packed too; exact:
    the fp32 residual MatMuls pack as well."""
    import onnx

    from unskill.exporter.quantize import quantize

    for pack in (False, True):
        quantize(gguf_grid_export, tmp_path / str(pack), "int4", grid=grid, symmetric=symmetric, pack=pack)
    ops = {pack: graph_ops(tmp_path / str(pack)) for pack in (False, True)}
    assert ops[False].count("MatMulNBits") == 22 and ops[True].count("MatMulNBits") == 22 - 3 * 3
    assert ops[True].count("Split") == 3 * 2 + (3 * 2 if grid == "exact" else 0)
    if not symmetric:
        graph = onnx.load(str(tmp_path / "True" / "model.onnx"), load_external_data=False).graph
        assert all(len(n.input) >= 4 and n.input[3] for n in graph.node if n.op_type == "MatMulNBits")
    ids = np.random.default_rng(4).integers(5, 500, size=(2, 12))
    separate, _, _ = run_plain_ort(tmp_path / "False", ids)
    packed, _, _ = run_plain_ort(tmp_path / "True", ids)
    assert set(packed) == set(separate)
    for name, expected in separate.items():
        assert np.abs(packed[name] - expected).max() <= 1e-6 * max(np.abs(expected).max(), 1e-6), name


def test_8bit_grids_reround_to_wider_blocks(gguf_grid_export, tmp_path):
    """--block-8bit head (the default): the Q8_0 head (an 8-bit/32 grid) re-rounded to symmetric 8-bit blocks
    of 128. Each weight moves by at most half a step (1/254 of its block's largest |w|), a partial last block
    is padded, and the logits stay within 1e-2 relative of fp32 at accuracy level 0 (the 4-bit layers stay
    exact)."""
    import onnx

    from unskill.exporter.grid import round_8bit
    from unskill.exporter.quantize import quantize

    weight = np.random.default_rng(3).standard_normal((200, 6)).astype(np.float32)   # 200 = 128 + 72
    grid = round_8bit(weight, 128)
    assert grid.packed.shape == (6, 2, 128) and grid.scales.shape == (12,)
    rebuilt = grid.dequantized()[:200]
    blocks_max = np.abs(np.concatenate([weight, np.zeros((56, 6), np.float32)])).reshape(2, 128, 6).max(1)
    step = np.repeat(blocks_max / 127, 128, axis=0)[:200]
    assert np.all(np.abs(rebuilt - weight) <= step / 2 + 1e-7)
    manifest = quantize(gguf_grid_export, tmp_path / "b128", "int4", accuracy_level=0)
    assert manifest.edits[-1]["grid_tensors"] == {"4-bit/32 + residual": 21, "8-bit/32 -> 8-bit/128": 1}
    blocks = {next(a.i for a in n.attribute if a.name == "block_size") for n in
              onnx.load(str(tmp_path / "b128" / "model.onnx"), load_external_data=False).graph.node
              if n.op_type == "MatMulNBits" and next(a.i for a in n.attribute if a.name == "bits") == 8}
    assert blocks == {128}
    ids = np.random.default_rng(4).integers(5, 500, size=(1, 12))
    logits = run_plain_ort(tmp_path / "b128", ids)[0]["logits"]
    plain = run_plain_ort(gguf_grid_export, ids)[0]["logits"]
    assert np.abs(logits - plain).max() <= 1e-2 * np.abs(plain).max()


@pytest.mark.parametrize("reblock, expected", [("head", ["8-bit/32", "8-bit/32 -> 8-bit/128"]),
                                                ("all", ["8-bit/32 -> 8-bit/128"] * 2),
                                                ("source", ["8-bit/32"] * 2)])
def test_block_8bit_picks_the_head_alone_by_default(reblock, expected):
    """Two Q8_0-grid MatMuls, the second writing the graph output (the LM head): `head` re-rounds only that
    one (Gemma-3's re-rounded Q5_0/Q6_K projections cost 2 MMLU points, the head none), `all` both, `source`
    neither; a re-rounded weight comes back within half a step of 1/127 of its 128-block's largest value."""
    from onnx import TensorProto, helper, numpy_helper

    from unskill.exporter.grid import GridWeight, replace_with_grid_matmuls

    rng = np.random.default_rng(1)

    def q8_weight():   # [K=128, N=128] on a Q8_0 grid: fp16 block scales, as GGUF stores them
        scales = (rng.random((128, 4, 1)) / 100).astype(np.float16).astype(np.float32)
        return (scales * rng.integers(-127, 128, (128, 4, 32))).astype(np.float32).reshape(128, 128).T.copy()

    weights = [q8_weight(), q8_weight()]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["h"], name="inner"),
         helper.make_node("MatMul", ["h", "w1"], ["logits"], name="head")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 128])],
        [numpy_helper.from_array(weights[0], "w0"), numpy_helper.from_array(weights[1], "w1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report = replace_with_grid_matmuls(model, accuracy_level=4, reblock_8bit=reblock)
    assert [report["w0"], report["w1"]] == expected
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node, weight in zip(model.graph.node, weights):
        block = next(a.i for a in node.attribute if a.name == "block_size")
        rebuilt = GridWeight(8, block, arrays[node.input[1]], arrays[node.input[2]], None).dequantized()
        tolerance = np.abs(weight).max(axis=0) / 254 if block == 128 else 1e-6 * np.abs(weight).max()
        assert np.all(np.abs(rebuilt - weight) <= tolerance * (1 + 1e-5)), (node.name, block)


def test_projections_pack_only_on_one_grid():
    """--rotary-in-op packs q/k/v only where they share a grid (or none has one): a Q6_K v beside Q4_K q/k
    stays apart, so `--grid source` keeps every part exact."""
    from unskill.exporter.gqa import same_grid

    rng = np.random.default_rng(2)
    q4 = (rng.integers(0, 16, (64, 8)) * 0.5 - 3.0).astype(np.float32)     # 4-bit, one 64-row block per column
    q8 = (rng.integers(-100, 100, (64, 8)) * 0.01).astype(np.float32)     # needs 8 bits
    noise = rng.standard_normal((64, 8)).astype(np.float32)
    assert same_grid([q4, q4.copy(), q4 * 2]) and same_grid([noise, noise * 3, noise + 1])
    assert not same_grid([q4, q4, q8]) and not same_grid([q4, q4, noise])


@pytest.mark.parametrize("blocks", [2, 18, 33, 48, 100])
def test_residual_digits_read_the_block_means(blocks):
    """The digit rows over x' = [x, M, ..., M] (M = block means, copies or zero-padded pages as digit_layout
    places them) give X @ R (X = block sums) to the digits' 1/238: SmolLM2's 18 and 48 blocks, a page and a
    bit (33), several pages (100), a tiny model's 2."""
    from unskill.exporter.grid import digit_layout, residual_digits

    rng = np.random.default_rng(blocks)
    residual = rng.standard_normal((blocks, 7)) * rng.random((blocks, 1))
    packed, scales, extra = residual_digits(residual)
    length, copies, placed = digit_layout(blocks)
    assert extra == copies * length and len(placed) == 2 * -(-blocks // 32) and (length == blocks or copies == 2)
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(7, packed.shape[1], 32).astype(np.float64) - 8
    weight = (q * scales[..., None]).reshape(7, -1).T[:extra]
    x = rng.standard_normal((5, blocks * 32))
    means = np.zeros((5, length))
    means[:, :blocks] = x.reshape(5, blocks, 32).mean(-1)
    want = x.reshape(5, blocks, 32).sum(-1) @ residual
    got = np.concatenate([means] * copies, axis=1) @ weight
    assert np.abs(got - want).max() <= 0.01 * np.abs(want).max()


def test_fit_grid_finds_symmetric_and_16_blocks_and_refuses_noise():
    """Q8_0 (symmetric, 256 levels): 8-bit, integer zero points, no residual; Q6_K (a scale per 16 weights):
    8-bit blocks of 16; Gaussian noise fits no grid (it goes to onnxruntime's quantizer)."""
    from unskill.exporter.grid import find_grid

    rng = np.random.default_rng(0)
    d = (rng.random((64, 4, 1)) / 100).astype(np.float16).astype(np.float32)   # GGUF block scales are fp16
    q8 = (d * rng.integers(-127, 128, (64, 4, 32))).astype(np.float32)
    grid = find_grid(q8.reshape(64, 128).T.copy())
    assert (grid.bits, grid.block, grid.residual) == (8, 32, None)
    assert np.array_equal(grid.dequantized(), q8.reshape(64, 128).T)
    q6 = np.repeat(d, 2, axis=1) * rng.integers(1, 40, (64, 8, 1)) * rng.integers(-32, 32, (64, 8, 16))
    grid = find_grid(q6.reshape(64, 128).T.copy().astype(np.float32))
    assert (grid.bits, grid.block) == (8, 16)
    assert np.abs(grid.dequantized() - q6.reshape(64, 128).T).max() <= 1e-6 * np.abs(q6).max()
    assert find_grid(rng.standard_normal((128, 64)).astype(np.float32)) is None


def test_fp16_keeps_fp32_inputs_outputs_and_runs_on_cpu(tiny_export, edit_stats, tmp_path):
    """`quantize --mode fp16` (the GPU path): every weight float16, every graph input and output as in the fp32
    export (KV cache, logits and the key outputs fp32, so the runtime, optimum and the guard's fp32 stats work
    unchanged). onnxruntime's CPU provider runs it too: logits and keys within 2e-3 relative of fp32 (fp16's
    11-bit mantissa over 3 layers; SmolLM2 measures 2.4e-3 on logits, benchmarks/README.md)."""
    import onnx

    from unskill.exporter.quantize import quantize

    _, onnx_dir = tiny_export("llama")
    out = tmp_path / "fp16"
    quantize(onnx_dir, out, "fp16")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    source = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    assert {i.data_type for i in graph.initializer if len(i.dims) == 2} == {onnx.TensorProto.FLOAT16}
    assert [(v.name, v.type.tensor_type.elem_type) for v in [*graph.input, *graph.output]] == \
        [(v.name, v.type.tensor_type.elem_type) for v in [*source.input, *source.output]]
    ids = np.random.default_rng(4).integers(5, 500, size=(1, 12))
    half, _, _ = run_plain_ort(out, ids)
    plain, _, _ = run_plain_ort(onnx_dir, ids)
    for name in ("logits", "key.0", "key.2", "preact.1", "present.2.key"):
        assert np.abs(half[name] - plain[name]).max() <= 2e-3 * np.abs(plain[name]).max(), name
    load(out, stats=[edit_stats("llama")], rule="paper", device="cpu")


def test_edited_fingerprint_tells_graphs_apart_with_the_same_weights_and_edits(tmp_path):
    """Two edits with one record and one weights file but different graphs (e.g. attributes only) must not
    share a fingerprint: the eval cache is keyed by it."""
    from unskill.exporter.folder import edited_fingerprint
    data = tmp_path / "model.onnx.data"
    data.write_bytes(b"\x00" * 64)
    graph_a, graph_b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    graph_a.write_bytes(b"graph with accuracy_level 4")
    graph_b.write_bytes(b"graph with accuracy_level 0")
    edits = [{"kind": "quantize", "mode": "int4"}]
    assert edited_fingerprint(graph_a, data, edits) != edited_fingerprint(graph_b, data, edits)
    assert edited_fingerprint(graph_a, data, edits) == edited_fingerprint(graph_a, data, edits)
    assert edited_fingerprint(graph_a, data, edits) != edited_fingerprint(graph_a, data, [*edits, {"kind": "x"}])
