"""The decode loop and KSD guard on real exported tiny models, against HF generate and NumPy."""

import json
import shutil

import numpy as np
import pytest

from unskill.runtime import GenerationParams, SamplingParams, UnskillError, load
from unskill.runtime.ksd import fitted_k
from unskill.runtime.statsfile import Moments
from unskill.stats.datasets import Dataset, Item
from unskill.stats.probe import ProbeConfig, probe

PROMPTS = ["Natalia sold clips to 48 of her friends", "Write a python function", "The capital of France is"]


def greedy(n, chat=False):
    return GenerationParams(max_new_tokens=n, chat=chat)


def hf_greedy(hf_dir, prompt_ids, n):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt2"])
def test_greedy_tokens_match_hf_generate(tiny_export, kind):
    hf_dir, onnx_dir = tiny_export(kind)
    generator = load(onnx_dir, device="cpu")
    for prompt in PROMPTS:
        ids = generator.tokenizer.encode_prompt(prompt, chat=False)
        ours = generator.generate([prompt], greedy(12))[0].token_ids
        theirs = [t for t in hf_greedy(hf_dir, ids, 12) if t != 2]
        assert ours == theirs


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batch_with_left_padding_equals_single(tiny_export, kind):
    _, onnx_dir = tiny_export(kind)
    generator = load(onnx_dir, device="cpu")
    batched = generator.generate(PROMPTS, greedy(10))
    single = [generator.generate([p], greedy(10))[0] for p in PROMPTS]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]


def test_stream_pieces_join_to_generated_text(tiny_export):
    _, onnx_dir = tiny_export("llama")
    generator = load(onnx_dir, device="cpu")
    streamed = "".join(event.text for event in generator.stream(PROMPTS[0], greedy(15, chat=True)))
    assert streamed == generator.generate([PROMPTS[0]], greedy(15, chat=True))[0].text


def test_stream_events_hold_back_and_refuse_without_partial_text(tiny_export, llama_stats):
    _, onnx_dir = tiny_export("llama")
    generator = load(onnx_dir, device="cpu")
    events = list(generator.stream(PROMPTS[1], GenerationParams(max_new_tokens=8, chat=True, ignore_eos=True),
                                   hold_tokens=5))
    assert events[0].completion_tokens >= 6 and events[-1].finish_reason == "length"   # nothing before 5 passed
    assert events[-1].completion_tokens == 8 and all(e.finish_reason is None for e in events[:-1])
    guarded = load(onnx_dir, stats=[llama_stats[1]], rule="paper", device="cpu")
    refused = list(guarded.stream("How many apples are left if Tom eats 3 of his 12 apples?", greedy(8, chat=True),
                                  hold_tokens=4))
    assert [(e.text, e.finish_reason, e.abstained, e.skill) for e in refused] == [
        (guarded.abstain_message, "abstain", True, "probe")]


def test_chat_messages_go_through_the_template(tiny_export):
    _, onnx_dir = tiny_export("llama")
    generator = load(onnx_dir, device="cpu")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a python function"},
            {"role": "assistant", "content": "def f():"}, {"role": "user", "content": "The capital of France is"}]
    rendered = generator.tokenizer.render(chat)
    assert rendered == "<|user|>Be brief.</s><|user|>Write a python function</s><|user|>def f():</s>" \
                       "<|user|>The capital of France is</s><|assistant|>"
    as_text = generator.generate([rendered], greedy(6))[0]
    assert generator.generate([chat], greedy(6, chat=True))[0].token_ids == as_text.token_ids
    for bad in ([], [{"role": "user"}], [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]):
        with pytest.raises(UnskillError):
            generator.generate([bad], greedy(2, chat=True))


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_export):
    _, onnx_dir = tiny_export("llama")
    generator = load(onnx_dir, device="cpu")

    def sampled(seed, **kw):
        params = GenerationParams(20, SamplingParams(temperature=1.5, seed=seed, **kw), chat=False)
        return generator.generate([PROMPTS[1]], params)[0].token_ids

    assert sampled(1) == sampled(1)
    assert sampled(1) != sampled(2)
    assert sampled(3, top_k=1) == generator.generate([PROMPTS[1]], greedy(20))[0].token_ids
    assert len(sampled(4, top_p=0.5)) > 0


def test_stop_string_cuts_text(tiny_export):
    _, onnx_dir = tiny_export("llama")
    generator = load(onnx_dir, device="cpu")
    full = generator.generate([PROMPTS[2]], greedy(20))[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = generator.generate([PROMPTS[2]], GenerationParams(20, stop=(stop,), chat=False))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]


def test_chat_template_is_applied(tiny_export):
    _, onnx_dir = tiny_export("llama")
    tokenizer = load(onnx_dir, device="cpu").tokenizer
    assert tokenizer.render("hi") == "<|user|>hi</s><|assistant|>"
    assert tokenizer.render("hi", chat=False) == "hi"
    assert tokenizer.encode_prompt("hi")[0] == tokenizer.tokenizer.token_to_id("<|user|>")


def test_fitted_k_is_the_smallest_cube_holding_all_probes():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(50, 8)) * rng.uniform(0.1, 3, size=8)
    moments = Moments.empty(("sum", "sumsq", "min", "max"), 1, 8)
    moments.add(0, rows)
    mean, std = moments.mean()[0], moments.std()[0]
    k = fitted_k(mean, std, moments.values["min"][0], moments.values["max"][0])
    np.testing.assert_allclose(k, np.max(np.abs(rows - rows.mean(0)) / rows.std(0, ddof=1)), rtol=1e-12)
    assert (np.abs(rows - mean) <= k * std + 1e-12).all()
    assert not (np.abs(rows - mean) <= 0.999 * k * std).all()


def test_every_probe_prompt_is_inside_its_own_cube(tiny_export, llama_stats):
    """alpha = 1.0 x fitted k is by construction the smallest cube holding every probe: all abstain at the prompt."""
    _, onnx_dir = tiny_export("llama")
    _, path = llama_stats
    generator = load(onnx_dir, stats=[path], alpha=1.0, device="cpu")
    prompts = [f"How many apples are left if Tom eats {i} of his {i + 9} apples?" for i in range(12)]
    results = generator.generate(prompts, greedy(5, chat=True))
    assert all(r.abstained and r.abstained_at == 0 and r.text == "Your query is not valid." for r in results)
    assert {r.skill for r in results} == {"probe"} and {r.layer for r in results} == {2}


def test_guard_matches_numpy_hypercube(tiny_export, llama_stats):
    _, onnx_dir = tiny_export("llama")
    stats, path = llama_stats
    generator = load(onnx_dir, stats=[path], alpha=3.0, alpha_mode="sigma", layers=[0, 1], device="cpu")
    model, tokenizer = generator.model, generator.tokenizer
    prompts = ["How many apples are left if Tom eats 100 of his 200 apples?", *PROMPTS]
    ksd = stats.groups["ksd"]
    for prompt in prompts:
        ids = np.array([tokenizer.encode_prompt(prompt)])
        _, _, keys = model.forward(ids, np.ones_like(ids), model.empty_past(1), ["key.0", "key.1"])
        inside = [bool(np.all(np.abs(keys[f"key.{l}"][0, -1] - ksd.mean()[l]) <= 3.0 * ksd.std()[l])) for l in (0, 1)]
        result = generator.generate([prompt], greedy(1, chat=True))[0]
        assert (result.abstained and result.abstained_at == 0) == any(inside)


def test_several_skills_report_which_fired(tiny_export, llama_stats, tmp_path):
    _, onnx_dir = tiny_export("llama")
    generator = load(onnx_dir, device="cpu")
    code = Dataset("code", [Item(f"Write a python function number {i}") for i in range(6)])
    code_path = probe(generator.model, generator.tokenizer, code, config=ProbeConfig(progress=False)).save(tmp_path / "c.npz")
    guarded = load(onnx_dir, stats=[llama_stats[1], code_path], rule="paper", device="cpu")
    apples, write = guarded.generate(["How many apples are left if Tom eats 3 of his 12 apples?",
                                      "Write a python function number 4"], greedy(3, chat=True))
    assert (apples.skill, write.skill) == ("probe", "code")


def test_bad_input_is_one_clear_error(tiny_export, llama_stats, tmp_path):
    _, onnx_dir = tiny_export("llama")
    generator = load(onnx_dir, device="cpu")
    with pytest.raises(UnskillError, match="empty prompt"):
        generator.generate(["  "], greedy(3))
    with pytest.raises(UnskillError, match="does not fit the context of 4096"):
        generator.generate(["apples " * 5000], greedy(3))
    with pytest.raises(UnskillError, match="out of range"):
        load(onnx_dir, stats=[llama_stats[1]], layers=[7], device="cpu")
    with pytest.raises(UnskillError, match="alpha must be a finite number > 0"):
        load(onnx_dir, stats=[llama_stats[1]], alpha=0, device="cpu")
    broken = tmp_path / "broken"
    shutil.copytree(onnx_dir, broken)
    manifest = json.loads((broken / "unskill.json").read_text())
    manifest["key_outputs"] = [f"missing.{i}" for i in range(3)]
    (broken / "unskill.json").write_text(json.dumps(manifest))
    with pytest.raises(UnskillError, match="lacks key outputs"):
        load(broken, device="cpu")
    with pytest.raises(UnskillError, match="no manifest"):
        load(tmp_path, device="cpu")


def test_ksd_run_cli_writes_jsonl_and_fails_cleanly(tiny_export, llama_stats, tmp_path, capsys):
    from unskill.ksd_run import main

    _, onnx_dir = tiny_export("llama")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "How many apples are left if Tom eats 3 of his 12 apples?"}) + "\n"
                       + json.dumps({"prompt": "Write a python function"}) + "\n")
    out = tmp_path / "out.jsonl"
    # stats without a stored rule are no silent guard: one line saying how to make one, nothing written
    code = main(["--onnx", str(onnx_dir / "model.onnx"), "--stats", str(llama_stats[1]), "--prompts", str(prompts),
                 "--max-new-tokens", "4", "--output", str(out), "--device", "cpu", "--quiet"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists() and len(error) == 1
    assert error[0] == f"error: {llama_stats[1]} has no calibrated rule: make the guard with `unskill guard --model " \
                       "DIR --forget SPEC --out FILE.npz`, or pass --alpha/--rule paper to use the paper's cube"
    code = main(["--onnx", str(onnx_dir / "model.onnx"), "--stats", str(llama_stats[1]), "--prompts", str(prompts),
                 "--max-new-tokens", "4", "--output", str(out), "--device", "cpu", "--quiet", "--rule", "paper"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["abstained"] for r in rows] == [True, False]
    assert rows[0]["skill"] == "probe" and rows[0]["layer"] == 2 and rows[1]["text"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    out2 = tmp_path / "out2.jsonl"
    code = main(["--onnx", str(onnx_dir), "--prompts", str(bad), "--output", str(out2), "--device", "cpu"])
    assert code == 2 and not out2.exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: empty prompt"
