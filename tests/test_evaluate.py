"""Token-level metrics against a direct, unbatched computation; abstention counting."""

import json

import numpy as np

from unskill.runtime import load
from unskill.runtime.ksd import KSDGuard
from unskill.stats.datasets import Dataset, Item
from unskill.stats.evaluate import token_metrics
from unskill.stats.probe import ProbeConfig, probe

ITEMS = [Item("Tom has 12 apples and eats 3.", "12 - 3 = 9 apples"), Item("The capital of France is", " Paris"),
         Item("Write a python function to add", "def add(a, b):\n    return a + b")]


def direct_scores(model, tokenizer, items):
    hits, nll = [], []
    for item in items:
        prompt = tokenizer.encode_text(item.context)
        ids = np.array([prompt + tokenizer.tokenizer.encode(item.completion, add_special_tokens=False).ids])
        logits, _, _ = model.forward(ids, np.ones_like(ids), model.empty_past(1), all_logits=True)
        for t in range(len(prompt), ids.shape[1]):
            row = logits[0, t - 1].astype(np.float64)
            hits.append(row.argmax() == ids[0, t])
            nll.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[0, t]])
    return np.mean(hits), np.mean(nll), len(hits)


def test_token_metrics_equal_direct_computation(tiny_export):
    _, onnx_dir = tiny_export("llama")
    generator = load(onnx_dir, device="cpu")
    score = token_metrics(generator.model, generator.tokenizer, Dataset("mix", ITEMS), batch_size=2, progress=False)
    top1, nll, tokens = direct_scores(generator.model, generator.tokenizer, ITEMS)
    assert score.tokens == tokens and score.items == 3
    np.testing.assert_allclose([score.top1, score.nll], [top1, nll], rtol=1e-4)


def test_abstained_items_count_as_wrong(tiny_export, tmp_path):
    _, onnx_dir = tiny_export("llama")
    generator = load(onnx_dir, device="cpu")
    stats = probe(generator.model, generator.tokenizer, Dataset("apples", ITEMS[:1] * 2 + [ITEMS[0]]),
                  config=ProbeConfig(progress=False))
    guard = KSDGuard([stats], generator.model.manifest)
    score = token_metrics(generator.model, generator.tokenizer, Dataset("mix", ITEMS), guard=guard, progress=False)
    assert score.abstain_rate >= 1 / 3
    assert score.top1_with_abstain <= score.top1


def test_eval_cli_writes_scores(tiny_export, tmp_path):
    from unskill.cli import main

    _, onnx_dir = tiny_export("llama")
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"prompt": i.prompt, "completion": i.completion}) + "\n" for i in ITEMS))
    out = tmp_path / "scores.json"
    assert main(["eval", "--model", str(onnx_dir), "--tasks", str(data), "--out", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record["scores"][0]["items"] == 3 and 0 <= record["scores"][0]["top1"] <= 1


def test_calibrated_alpha_keeps_retain_refusals_under_target(tiny_export):
    from unskill.stats.calibrate import calibrate

    _, onnx_dir = tiny_export("llama")
    generator = load(onnx_dir, device="cpu")
    model, tokenizer = generator.model, generator.tokenizer
    forget = Dataset("apples", [Item(f"How many apples are left if Tom eats {i} of his {i + 9} apples?") for i in range(10)])
    retain = Dataset("other", [Item(f"Write a python function number {i} for lists") for i in range(20)])
    stats = probe(model, tokenizer, forget, config=ProbeConfig(progress=False))
    result = calibrate(model, tokenizer, stats, retain, forget, target=0.1)
    assert result.retain_abstain <= 0.1 and result.retain_items == 20
    guard = KSDGuard([stats], model.manifest, alpha=result.alpha)
    from unskill.stats.evaluate import abstentions
    assert abstentions(model, tokenizer, retain, guard).mean() == result.retain_abstain
    assert abstentions(model, tokenizer, forget, guard).mean() == result.forget_abstain
    wider = KSDGuard([stats], model.manifest, alpha=result.alpha * 1.01 + 1e-9)
    assert abstentions(model, tokenizer, retain, wider).mean() > 0.1 or result.alpha == float("inf")
