"""The packaged SmolLM2-135M end to end: tokenizer, greedy parity with HF, KSD refusing math only."""

import numpy as np
import pytest

from unskill.runtime import GenerationParams, load
from unskill.stats.datasets import load_dataset
from unskill.stats.probe import ProbeConfig, probe

pytestmark = pytest.mark.model


def test_tokenizer_has_no_bos_and_round_trips(smollm2_export):
    generator = load(smollm2_export, device="cpu")
    tokenizer = generator.tokenizer
    text = "def f(x):\n    return x ** 2  # naïve — 日本語 😀"
    ids = tokenizer.encode_text(text)
    assert ids[0] != generator.model.manifest.bos_token_id
    assert tokenizer.decode(ids) == text
    assert generator.model.manifest.eos_token_ids[0] == tokenizer.tokenizer.token_to_id("<|im_end|>")
    chat = tokenizer.encode_prompt("hi")
    assert tokenizer.tokenizer.decode(chat, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_greedy_matches_hf_generate(smollm2_export):
    import torch
    from transformers import AutoModelForCausalLM

    from unskill.exporter.sources import resolve_model

    source = resolve_model("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file).eval()
    generator = load(smollm2_export, device="cpu")
    prompt = "What is the capital of France? Answer in one word."
    ids = generator.tokenizer.encode_prompt(prompt)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=24, do_sample=False, eos_token_id=generator.model.manifest.eos_token_ids)
    theirs = [t for t in out[0, len(ids):].tolist() if t not in generator.model.manifest.eos_token_ids]
    assert generator.generate([prompt], GenerationParams(max_new_tokens=24))[0].token_ids == theirs


def test_builtin_math_stats_refuse_math_and_answer_code(smollm2_export, tmp_path):
    generator = load(smollm2_export, device="cpu")
    forget = load_dataset("builtin:math")
    stats = probe(generator.model, generator.tokenizer, forget, config=ProbeConfig(progress=False))
    path = stats.save(tmp_path / "math.npz")
    guarded = load(smollm2_export, stats=[path], rule="paper", device="cpu")
    math, code = guarded.generate(["A baker makes 24 muffins and sells 3/4 of them. How many muffins are left?",
                                   "Write a python function to reverse a string."], GenerationParams(max_new_tokens=24))
    assert math.abstained and math.text == "Your query is not valid."
    assert not code.abstained and "def" in code.text


def test_gsm8k_stats_separate_gsm8k_from_mbpp(smollm2_export, data_dir, tmp_path):
    """The issue's bar on a smaller sample: >= 90 % of GSM8K test refused, <= 5 % of MBPP test, one alpha."""
    generator = load(smollm2_export, device="cpu")
    forget = load_dataset("gsm8k:train", data_dir, limit=200)
    path = probe(generator.model, generator.tokenizer, forget, config=ProbeConfig(progress=False)).save(tmp_path / "g.npz")
    guarded = load(smollm2_export, stats=[path], alpha=1.5, device="cpu")
    params = GenerationParams(max_new_tokens=2)
    gsm = guarded.generate(load_dataset("gsm8k:test", data_dir, limit=40).prompts, params)
    mbpp = guarded.generate(load_dataset("mbpp:test", data_dir, limit=40).prompts, params)
    assert np.mean([r.abstained for r in gsm]) >= 0.9
    assert np.mean([r.abstained for r in mbpp]) <= 0.05


def test_harness_on_the_real_model(smollm2_export, data_dir, tmp_path):
    """SmolLM2 predicts most reference-answer tokens, and KSD entries recorded by the harness from gsm8k stats
    separate GSM8K from MBPP at alpha 1.5 (x k), in token tasks and during generation."""
    from unskill.evals.evaluate import EvalConfig, Harness, ksd_view

    generator = load(smollm2_export, device="cpu")
    forget = load_dataset("gsm8k:train", data_dir, limit=100)
    stats = probe(generator.model, generator.tokenizer, forget, config=ProbeConfig(progress=False))
    harness = Harness(generator.model, generator.tokenizer,
                      EvalConfig(str(data_dir), limit=12, gen_limit=4, progress=False), {"gsm8k": stats})
    results = harness.run(["gsm8k:test", "mbpp:test", "gen:xquad-en"])
    assert results["gsm8k:test"]["score"] > 0.5 and results["mbpp:test"]["score"] > 0.5
    assert ksd_view(results["gsm8k:test"], "gsm8k", 1.5)["abstain"] >= 0.9
    assert ksd_view(results["mbpp:test"], "gsm8k", 1.5)["abstain"] == 0
    assert results["gen:xquad-en"]["items"] == 4 and "entry" in results["gen:xquad-en"]


@pytest.fixture(scope="module")
def smollm2_torch():
    from transformers import AutoModelForCausalLM

    from unskill.exporter.sources import resolve_model

    source = resolve_model("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file).eval()


@pytest.fixture(scope="module")
def smollm2_edit_stats(smollm2_edits):
    return smollm2_edits["stats"]   # math vs code, 24 each, shared with tests/test_ecosystem.py


def test_na_graph_matches_numpy_reference(smollm2_export, smollm2_edit_stats, smollm2_torch, tmp_path):
    """NA at 3 % with the noise fed in: plain onnxruntime vs PyTorch whose gate outputs go through na_reference."""
    from tiny_models import na_gate_hook, run_plain_ort, torch_with_hooks
    from unskill.exporter.neuron_adjust import neuron_adjust, select_neurons
    from unskill.runtime import load_stats

    manifest = neuron_adjust(smollm2_export, smollm2_edit_stats, 0.03, tmp_path / "na", noise="input")
    params = select_neurons(load_stats(smollm2_edit_stats), 0.03)
    ids = np.array([load(smollm2_export, device="cpu").tokenizer.encode_text("Tom has 12 apples and eats 3.")])
    noise = {name: np.random.default_rng(i).uniform(size=ids.shape + (manifest.key_width,)).astype(np.float32)
             for i, name in enumerate(manifest.edits[-1]["noise_inputs"])}
    values, _, _ = run_plain_ort(tmp_path / "na", ids, noise)
    adjust, replaced = na_gate_hook(params, noise)
    logits, keys = torch_with_hooks(smollm2_torch, ids, gate_fn=adjust)
    assert sum(replaced) > 0
    np.testing.assert_allclose(values["logits"], logits, atol=2e-3, rtol=1e-2)
    for layer in range(0, manifest.num_layers, 5):
        np.testing.assert_allclose(values[f"key.{layer}"], keys[layer], atol=2e-3, rtol=1e-2)


def test_pruned_smollm2_equals_zeroed_keys(smollm2_export, smollm2_edit_stats, smollm2_torch, tmp_path):
    from tiny_models import run_plain_ort, torch_with_hooks
    from unskill.exporter.prune import prune

    manifest = prune(smollm2_export, smollm2_edit_stats, 0.02, tmp_path / "sp", progress=False)
    removed = np.ones((manifest.num_layers, manifest.key_width), dtype=bool)
    for layer, kept in enumerate(manifest.kept_neurons):
        removed[layer, kept] = False
    assert removed.sum() == round(0.02 * removed.size)
    ids = np.array([load(smollm2_export, device="cpu").tokenizer.encode_text("def add(a, b): return a + b")])
    values, _, _ = run_plain_ort(tmp_path / "sp", ids)
    logits, _ = torch_with_hooks(smollm2_torch, ids, key_fn=lambda l, k: np.where(removed[l], 0, k).astype(k.dtype))
    np.testing.assert_allclose(values["logits"], logits, atol=2e-3, rtol=1e-2)


def test_int4_source_grid_finds_the_gguf_blocks(smollm2_export, smollm2_math_stats, tmp_path):
    """SmolLM2's weights are its GGUF's Q4_1 projections and Q8_0 head, dequantized: `quantize --mode int4`
    (grid source) puts every one of them back on its grid, none goes to onnxruntime's re-rounding quantizer
    (the 8-bit head then to 8-bit blocks of 128, the default); the copy's greedy text starts as the fp32
    model's and the fp32 stats refuse a math prompt on it."""
    from unskill.exporter.quantize import quantize

    manifest = quantize(smollm2_export, tmp_path / "q4", "int4")
    assert manifest.edits[-1]["grid_tensors"] == {"4-bit/32 + residual": 210, "8-bit/32 -> 8-bit/128": 1}
    params = GenerationParams(max_new_tokens=6)
    prompt = "Write a Python function that reverses a string."
    expected = load(smollm2_export, device="cpu").generate([prompt], params)[0].text
    guarded = load(tmp_path / "q4", stats=[smollm2_math_stats], rule="paper", device="cpu")
    assert guarded.generate([prompt], params)[0].text[:12] == expected[:12]
    assert guarded.generate(["Tom has 3 apples and buys 5 more. How many apples does he have?"], params)[0].abstained
