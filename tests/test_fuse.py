"""The fused graph (`unskill export`'s default, `unskill edit fuse` on a --no-fuse export): GroupQueryAttention,
onnxruntime's fusions and offline optimization keep every key output and the tokens, padded batches included."""

import numpy as np
import pytest

from tiny_models import graph_ops, run_plain_ort
from unskill.runtime import GenerationParams, load


@pytest.mark.parametrize("kind,model_type,rotary_in_op", [("llama", "qwen3", False), ("llama", "qwen3", True),
                                                          ("gemma3", "qwen3", False), ("gpt2", "gpt2", False)])
def test_fused_graph_matches_unfused(tiny_export, tmp_path, kind, model_type, rotary_in_op):
    """rotary_in_op: packed q/k/v into GroupQueryAttention with its own rotary; a left-padded row is rotated at
    its buffer positions there, which gives the same tokens (rotary scores see position differences only)."""
    import onnx

    from unskill.exporter.fuse import fuse

    _, onnx_dir = tiny_export(kind, fused=False)
    out = tmp_path / "fused"
    if rotary_in_op:   # through the CLI flag
        from unskill.cli import main
        from unskill.runtime.manifest import load_manifest

        assert main(["edit", "fuse", "--model", str(onnx_dir), "--out", str(out), "--rotary-in-op"]) == 0
        manifest = load_manifest(out)
        assert manifest.edits[-1]["rotary_in_op"] is True
    else:
        manifest = fuse(onnx_dir, out, model_type)
    edit = manifest.edits[-1]
    nodes = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    rotated = [n for n in nodes if n.op_type == "GroupQueryAttention" and n.input[1] == "" and n.input[7]]
    assert len(rotated) == (manifest.num_layers if rotary_in_op else 0)
    assert ("RotaryEmbedding" in [n.op_type for n in nodes]) == (kind == "llama" and not rotary_in_op)
    assert edit["nodes_after"] < edit["nodes_before"] and edit["shape_nodes_repointed"] >= 0, edit
    # llama and gemma3: one GroupQueryAttention a layer; GPT-2 keeps its attention.
    assert edit["attention_layers_fused"] == (0 if kind == "gpt2" else manifest.num_layers), edit
    assert edit["fused_ops"].get("GroupQueryAttention", 0) == edit["attention_layers_fused"], edit
    ids = np.random.default_rng(7).integers(5, 500, size=(1, 12))   # longer than gemma3's sliding window (8)
    fused, _, _ = run_plain_ort(out, ids)
    plain, _, _ = run_plain_ort(onnx_dir, ids)
    assert set(fused) == set(plain)   # logits, present.*, key.N, preact.N, key_last.N
    for name in [*manifest.key_outputs, *manifest.preact_outputs, *(manifest.key_last_outputs or []), "logits"]:
        scale = np.abs(plain[name]).max()
        assert np.abs(fused[name] - plain[name]).max() <= 1e-4 * scale, name
    # probe.onnx (the KSD prompt-pass graph) is cut from the fused graph: same key_last values.
    fused_probe, plain_probe = (run_plain_ort(d, ids, graph="probe.onnx")[0] for d in (out, onnx_dir))
    assert manifest.key_last_outputs and set(fused_probe) == set(plain_probe)
    for name in manifest.key_last_outputs:
        assert np.abs(fused_probe[name] - plain_probe[name]).max() <= 1e-4 * np.abs(plain_probe[name]).max(), name
    # A left-padded batch (attention_mask 0 in the KV cache) gives each prompt's tokens alone, as unfused.
    params = GenerationParams(max_new_tokens=24, ignore_eos=True)
    prompts = ["apples and pears", "def add(a, b):", "The capital of France is Paris. The quick brown fox jumps"]
    expected = [r.token_ids for r in load(onnx_dir, device="cpu").generate(prompts, params)]
    fused_model = load(out, device="cpu")
    assert [r.token_ids for r in fused_model.generate(prompts, params)] == expected
    assert [fused_model.generate([p], params)[0].token_ids for p in prompts] == expected
    if rotary_in_op:   # the packed, self-rotating graph still runs in onnxruntime-genai, token for token
        pytest.importorskip("onnxruntime_genai")
        import json

        from ecosystem import genai_greedy

        eos = json.loads((out / "unskill.json").read_text())["eos_token_ids"]
        alone = fused_model.generate([prompts[0]], GenerationParams(max_new_tokens=12))[0].token_ids
        assert [t for t in genai_greedy(out, prompts[0], 12, tokens=True) if t not in eos] == alone


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_default_export_is_the_fused_graph(tiny_export, kind):
    """`unskill export` (export_model's default) writes the fused graph as the export itself: no edit history."""
    _, onnx_dir = tiny_export(kind)
    manifest = load(onnx_dir, device="cpu").model.manifest
    ops = graph_ops(onnx_dir)
    assert ops.count("GroupQueryAttention") == manifest.num_layers and "Softmax" not in ops
    assert manifest.edits == [] and not manifest.stats_compatible


def test_fuse_refuses_an_already_fused_export(tiny_export, tmp_path):
    from unskill.exporter.fuse import fuse
    from unskill.runtime import UnskillError

    _, onnx_dir = tiny_export("llama")
    with pytest.raises(UnskillError, match="already fused"):
        fuse(onnx_dir, tmp_path / "again")


def test_fuse_refuses_a_non_empty_out_dir_before_working(tiny_export, tmp_path, capsys):
    from unskill.cli import main

    _, onnx_dir = tiny_export("llama", fused=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["edit", "fuse", "--model", str(onnx_dir), "--out", str(tmp_path / "taken")]) == 2
    assert "taken: exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_chunked_prompt_writes_one_shared_kv_buffer(tiny_export, monkeypatch):
    """A GroupQueryAttention graph runs a long prompt's chunks into one preallocated KV buffer (IO binding,
    past = present): same logits, keys and cache as chunk-by-chunk Concat, continuing a batch's prefix too."""
    from unskill.runtime import session as session_module

    monkeypatch.setattr(session_module, "PREFILL_CHUNK", 16)
    model = session_module.OnnxLM(tiny_export("llama")[1], device="cpu")
    assert model.manifest.attention == "gqa"
    ids = np.random.default_rng(3).integers(5, 500, size=(2, 70))
    mask = np.ones_like(ids)
    mask[0, :9] = 0   # a left-padded row
    _, prefix, _ = model.forward(ids[:, :20], mask[:, :20], model.empty_past(2), logits=False)
    names = model.manifest.key_last_outputs
    calls = []
    monkeypatch.setattr(model, "_run_in_place", lambda *a, run=model._run_in_place: calls.append(1) or run(*a))
    shared = model.forward(ids[:, 20:], mask, prefix, extra_outputs=names)
    assert len(calls) == 4   # 50 tokens in chunks of 16
    model.manifest.attention = "unfused"   # the same graph, past and present apart
    apart = model.forward(ids[:, 20:], mask, prefix, extra_outputs=names)
    assert np.abs(shared[0] - apart[0]).max() <= 1e-5 * np.abs(apart[0]).max()
    assert all(shared[1][name].shape() == [2, model.kv_heads, 70, model.head_dim] for name in model.past_names)
    cache = {name: value.numpy() for name, value in shared[1].items()}   # as evals keep a shared prefix
    shared = (shared[0], None, shared[2])   # the OrtValues go; the NumPy copies must stay valid
    model.forward(ids, mask, model.empty_past(2), logits=False)   # reuses freed memory, if any was freed
    for name in model.past_names:
        assert np.abs(cache[name] - apart[1][name].numpy()).max() <= 1e-5
    for name in names:
        assert np.abs(shared[2][name] - apart[2][name]).max() <= 1e-5 * np.abs(apart[2][name]).max()
    # The last position equals the full computation's last row (one pass, logits for every position).
    full, _, _ = model.forward(ids, mask, model.empty_past(2), all_logits=True)
    assert np.abs(shared[0] - full[:, -1]).max() <= 1e-4 * np.abs(full[:, -1]).max()


def test_decode_steps_write_into_the_reserved_kv_buffer(tiny_export, monkeypatch):
    """A prompt pass with `reserve` returns one buffer per layer with room for the tokens to come; the decode
    steps then run in place (past = present by IO binding) with the logits and keys of the copying path,
    a left-padded batch included, and the Generator reserves that room."""
    from unskill.runtime import session as session_module

    model = session_module.OnnxLM(tiny_export("llama")[1], device="cpu")
    names = model.manifest.key_last_outputs
    ids = np.random.default_rng(5).integers(5, 500, size=(2, 12))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    runs = {}
    for reserve in (0, 6):
        calls = []
        monkeypatch.setattr(model, "_run_in_place", lambda *a, run=session_module.OnnxLM._run_in_place.__get__(model):
                            calls.append(1) or run(*a))
        step_mask, step_ids, outputs = mask, ids, []
        logits, past, keys = model.forward(step_ids, step_mask, model.empty_past(2), names, reserve=reserve)
        for step in range(6):
            outputs.append((logits, keys))
            if reserve:
                assert past[model.past_names[0]].shape()[2] == 12 + 6   # the buffer, not the cache
            step_ids = logits.argmax(-1)[:, None]
            step_mask = np.concatenate([step_mask, np.ones((2, 1), dtype=np.int64)], axis=1)
            logits, past, keys = model.forward(step_ids, step_mask, past, names)
        runs[reserve] = (outputs, len(calls))
    assert runs[0][1] == 0 and runs[6][1] == 7   # the prompt and every decode step in place
    for (want, want_keys), (got, got_keys) in zip(runs[0][0], runs[6][0]):
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        for name in names:
            assert np.abs(got_keys[name] - want_keys[name]).max() <= 1e-5 * np.abs(want_keys[name]).max()
    # More new tokens than the room left: the CPU buffer grows (a copy), same logits as the copying path.
    more = np.random.default_rng(6).integers(5, 500, size=(2, 3))
    wider = np.concatenate([mask, np.ones((2, 3), dtype=np.int64)], axis=1)
    for reserve in (0, 1):
        _, past, _ = model.forward(ids, mask, model.empty_past(2), reserve=reserve)
        runs[reserve] = model.forward(more, wider, past)[0]
    assert np.abs(runs[1] - runs[0]).max() <= 1e-5 * np.abs(runs[0]).max()

    generator = load(tiny_export("llama")[1], device="cpu")
    reserved, forward = [], generator.model.forward
    monkeypatch.setattr(generator.model, "forward", lambda *a, **k: reserved.append(k.get("reserve", 0)) or forward(*a, **k))
    generator.generate(["apples and pears", "def add(a, b):"], GenerationParams(max_new_tokens=5, ignore_eos=True))
    assert reserved == [4, 0, 0, 0, 0]


@pytest.mark.model
def test_smollm2_fused_matches_unfused(smollm2_export, tmp_path):
    """The real SmolLM2: the fused graph against optimum's (whichever the session's export is, the other is
    made here): one prompt pass's logits and every key output within 1e-4 relative, 128 greedy ids equal."""
    from unskill.exporter.export import export_model
    from unskill.exporter.fuse import fuse
    from unskill.runtime.manifest import load_manifest

    if load_manifest(smollm2_export).attention == "gqa":
        fused, plain = smollm2_export, tmp_path / "plain"
        export_model("smollm2-135m", plain, progress=False, fused=False)
    else:   # UNSKILL_SMOLLM2_ONNX names an export made before fusion was the default
        plain, fused = smollm2_export, tmp_path / "fused"
        fuse(plain, fused)
    ids = np.random.default_rng(11).integers(100, 40000, size=(1, 40))
    got, manifest, _ = run_plain_ort(fused, ids)
    want, _, _ = run_plain_ort(plain, ids)
    for name in ["logits", *manifest["key_outputs"], *manifest["preact_outputs"], *manifest["key_last_outputs"]]:
        assert np.abs(got[name] - want[name]).max() <= 1e-4 * np.abs(want[name]).max(), name
    params = GenerationParams(max_new_tokens=128, ignore_eos=True)
    prompt = ["Natalia sold clips to 48 of her friends in April. How many clips did she sell?"]
    assert load(fused, device="cpu").generate(prompt, params)[0].token_ids == \
        load(plain, device="cpu").generate(prompt, params)[0].token_ids


def test_decode_steps_reuse_one_io_binding(tiny_export):
    """The decode steps of one generation on a KV buffer rebind only their small inputs: one IO binding for the
    prompt and every step, the logits of a binding made anew each run (earlier steps' logits left intact),
    and the binding goes with the buffer (it holds the KV cache)."""
    import weakref

    from unskill.runtime.session import KVBuffer, OnnxLM

    model = OnnxLM(tiny_export("llama")[1], device="cpu")
    ids = np.random.default_rng(8).integers(5, 500, size=(2, 10))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    made, make = [], model.session.io_binding
    model.session.io_binding = lambda: made.append(1) or make()
    runs = {}
    for fresh in (False, True):
        made.clear()
        logits, past, _ = model.forward(ids, mask, model.empty_past(2), reserve=5)
        step_mask, kept = mask, [logits]
        for _ in range(5):
            if fresh:
                past.binding = None
            step_mask = np.concatenate([step_mask, np.ones((2, 1), dtype=np.int64)], axis=1)
            logits, past, _ = model.forward(logits.argmax(-1)[:, None], step_mask, past)
            kept.append(logits)
        runs[fresh] = (kept, len(made))
        assert isinstance(past, KVBuffer) and past.fetched == ("logits",)
        binding = weakref.ref(past.binding)
        del past
        assert binding() is None
    assert runs[False][1] == 1 and runs[True][1] == 6
    for reused, anew in zip(runs[False][0], runs[True][0]):
        assert np.array_equal(reused, anew)
