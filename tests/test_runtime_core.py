"""The runtime on a model built with onnx's helpers (tests/onnx_tiny.py): these run without the `export` extra
(no torch, no optimum), against a NumPy twin of the graph."""

import json

import numpy as np
import pytest
from onnx_tiny import WORDS, build_tiny_folder, reference_logits

from unskill.runtime import GenerationParams, OnnxLM, load


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx_tiny") / "model"
    return folder, build_tiny_folder(folder)


def greedy_reference(w, last_token: int, steps: int) -> list[int]:
    """Next tokens by argmax of the NumPy twin, stopping after EOS (id 1) as the generator does."""
    out = []
    for _ in range(steps):
        last_token = int(np.argmax(reference_logits(w, last_token)[0]))
        out.append(last_token)
        if last_token == 1:
            break
    return out


def test_forward_returns_the_numpy_twins_logits_keys_and_a_grown_cache(tiny):
    folder, w = tiny
    model = OnnxLM(folder, device="cpu")
    ids = np.array([[WORDS.index("apple"), WORDS.index("nine")]], np.int64)
    mask = np.ones_like(ids)
    logits, present, extras = model.forward(ids, mask, model.empty_past(1), ["key_last.0", "key_last.1"])
    expected_logits, expected_keys = reference_logits(w, WORDS.index("nine"))
    np.testing.assert_allclose(logits[0], expected_logits, rtol=1e-5, atol=1e-5)
    assert {name: value.shape() for name, value in present.items()} == {
        f"past_key_values.{layer}.{kind}": [1, 1, 2, 4] for layer in range(2) for kind in ("key", "value")}
    for layer in range(2):
        np.testing.assert_allclose(extras[f"key_last.{layer}"][0], expected_keys[layer], rtol=1e-5, atol=1e-5)
    assert model.kv_heads == 1 and model.head_dim == 4


@pytest.mark.parametrize("prompts", [["apple"], ["nine add", "fig"]])
def test_greedy_generation_follows_the_numpy_twin_with_left_padding(tiny, prompts):
    folder, w = tiny
    generator = load(folder, device="cpu")
    results = generator.generate(prompts, GenerationParams(max_new_tokens=6, chat=False))
    for prompt, result in zip(prompts, results):
        expected = greedy_reference(w, WORDS.index(prompt.split()[-1]), 6)
        assert result.token_ids == expected
        assert result.finish_reason == ("eos" if expected[-1] == 1 else "length")


def test_ksd_guard_refuses_the_probed_skill_and_answers_the_rest(tiny, tmp_path):
    from unskill.stats.datasets import Dataset, Item
    from unskill.stats.probe import ProbeConfig, probe

    folder, _ = tiny
    generator = load(folder, device="cpu")
    fruit = Dataset("fruit", [Item(f"{a} {b}") for a in ("two", "three", "nine") for b in ("apple", "pear", "plum")])
    stats = probe(generator.model, generator.tokenizer, fruit, config=ProbeConfig(progress=False))
    path = stats.save(tmp_path / "fruit.npz")
    guarded = load(folder, [str(path)], alpha=1.0, layers=[-1], device="cpu")
    refused, answered = guarded.generate(["seven pear", "print loop"], GenerationParams(max_new_tokens=4, chat=False))
    assert refused.abstained and refused.finish_reason == "abstain" and refused.abstained_at == 0
    assert not answered.abstained


def test_ksd_run_writes_one_json_line_per_prompt(tiny, tmp_path):
    from unskill.ksd_run import main as ksd_run

    folder, w = tiny
    out = tmp_path / "out.jsonl"
    assert ksd_run(["--onnx", str(folder / "model.onnx"), "--prompt", "apple", "--prompt", "code list",
                    "--no-chat", "--max-new-tokens", "3", "--quiet", "--device", "cpu", "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["apple", "code list"]
    expected = greedy_reference(w, WORDS.index("apple"), 3)
    assert records[0]["text"] == " ".join(WORDS[t] for t in expected if t > 1)
