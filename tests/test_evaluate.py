"""The evaluation harness on a tiny model: token metrics against a direct unbatched computation, KSD entry
alphas against the real guard, the per-item cache, calibration, and the report."""

import json

import numpy as np
import pytest

from unskill.runtime import load
from unskill.runtime.generator import GenerationParams, Generator
from unskill.runtime.ksd import KSDGuard
from unskill.stats.datasets import Dataset, Item
from unskill.evals.evaluate import EvalConfig, Harness, ItemCache, ksd_view
from unskill.stats.probe import ProbeConfig, probe
from unskill.evals.tasks import parse_task

ITEMS = [Item("Tom has 12 apples and eats 3.", "12 - 3 = 9 apples"), Item("The capital of France is", " Paris"),
         Item("Write a python function to add", "def add(a, b):\n    return a + b")]


@pytest.fixture(scope="module")
def llama(tiny_export):
    _, onnx_dir = tiny_export("llama")
    return load(onnx_dir, device="cpu"), onnx_dir


@pytest.fixture(scope="module")
def apple_stats(llama):
    generator, _ = llama
    forget = Dataset("apples", [Item(f"How many apples are left if Tom eats {i} of his {i + 9} apples?")
                                for i in range(12)])
    return probe(generator.model, generator.tokenizer, forget, config=ProbeConfig(progress=False))


def write_items(path, items):
    path.write_text("".join(json.dumps({"prompt": i.prompt, "completion": i.completion}) + "\n" for i in items))
    return str(path)


def direct_token_scores(model, tokenizer, items, chat):
    """Unbatched, float64: the prompt as encode_prompt gives it, then the completion (no leading space in chat)."""
    hits, nll = [], []
    for item in items:
        prompt = tokenizer.encode_prompt(item.prompt, chat)
        text = item.completion.lstrip() if chat else item.context[len(item.prompt):] + item.completion
        ids = np.array([prompt + tokenizer.tokenizer.encode(text, add_special_tokens=False).ids])
        logits, _, _ = model.forward(ids, np.ones_like(ids), model.empty_past(1), all_logits=True)
        for t in range(len(prompt), ids.shape[1]):
            row = logits[0, t - 1].astype(np.float64)
            hits.append(row.argmax() == ids[0, t])
            nll.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[0, t]])
    return np.mean(hits), np.mean(nll), len(hits)


@pytest.mark.parametrize("chat", [True, False])
def test_token_metrics_equal_direct_computation(llama, tmp_path, chat):
    generator, _ = llama
    spec = write_items(tmp_path / "items.jsonl", ITEMS)
    config = EvalConfig(batch_size=2, chat=chat, progress=False)
    result = Harness(generator.model, generator.tokenizer, config).run([spec])[spec]
    top1, nll, tokens = direct_token_scores(generator.model, generator.tokenizer, ITEMS, chat)
    assert result["tokens"] == tokens and result["items"] == 3
    np.testing.assert_allclose([result["score"], result["nll"]], [top1, nll], rtol=1e-4)


def test_xquad_paragraphs_share_one_prefill(llama, apple_stats, tmp_path, data_dir):
    """XQuAD samples whole paragraphs, and the questions of one paragraph continue one prefill of its
    context: scores equal the direct unbatched computation, entry alphas equal a run without sharing."""
    from unskill.stats.datasets import load_dataset, sample

    generator, _ = llama
    model, tokenizer = generator.model, generator.tokenizer
    items = sample(load_dataset("xquad-en:test", data_dir), 7, 0).items
    groups = [item.group for item in items]
    assert len(set(groups)) <= 3 and max(groups.count(g) for g in groups) >= 3   # paragraphs, not scattered
    config = EvalConfig(str(data_dir), limit=7, batch_size=3, progress=False)
    stats = {"apples": apple_stats}
    harness = Harness(model, tokenizer, config, stats)
    first_paragraph = {i: harness._scored_sequence(item) for i, item in enumerate(items) if item.group == groups[0]}
    assert harness._shared_prefill(list(first_paragraph), first_paragraph)[0] > 50   # the context, once
    shared = harness.run(["xquad-en:test"])["xquad-en:test"]
    top1, nll, tokens = direct_token_scores(model, tokenizer, items, True)
    assert shared["items"] == 7 and shared["tokens"] == tokens
    np.testing.assert_allclose([shared["score"], shared["nll"]], [top1, nll], rtol=1e-4)
    spec = write_items(tmp_path / "xquad.jsonl", items)   # same items, no groups: nothing shared
    alone = Harness(model, tokenizer, config, stats).run([spec])[spec]
    np.testing.assert_allclose(shared["entry"]["apples"], alone["entry"]["apples"], rtol=1e-4)


def test_token_entries_decide_abstention_like_the_guard(llama, apple_stats, tmp_path):
    """An item abstains at alpha exactly when the runtime guard refuses its prompt."""
    generator, _ = llama
    model, tokenizer = generator.model, generator.tokenizer
    items = ITEMS + [Item("How many apples are left if Tom eats 4 of his 13 apples?", "9")]
    spec = write_items(tmp_path / "items.jsonl", items)
    result = Harness(model, tokenizer, EvalConfig(progress=False), {"apples": apple_stats}).run([spec])[spec]
    entries = np.array(result["entry"]["apples"])
    for alpha in (0.5, 1.0, 2.0, float(np.median(entries)) * 1.0001):
        guard = KSDGuard([apple_stats], model.manifest, alpha=alpha)
        refused = [Generator(model, tokenizer, guard).generate([i.prompt], GenerationParams(max_new_tokens=1))[0].abstained
                   for i in items]
        assert (entries <= alpha).tolist() == refused
        view = ksd_view(result, "apples", alpha)
        hits, tokens = np.array(result["per_item"]["hits"]), np.array(result["per_item"]["tokens"])
        assert view["score"] == pytest.approx((hits * ~np.array(refused)).sum() / tokens.sum())


def test_generation_entries_cover_every_decode_step(llama, apple_stats, data_dir):
    """gen:mbpp on the tiny model: the recorded entry is the minimum over all guard checks, so the real guard
    abstains (at the prompt or later) exactly when alpha reaches it."""
    generator, _ = llama
    model, tokenizer = generator.model, generator.tokenizer
    config = EvalConfig(str(data_dir), gen_limit=4, gen_batch_size=3, timeout_s=5, progress=False)
    result = Harness(model, tokenizer, config, {"apples": apple_stats}).run(["gen:mbpp"])["gen:mbpp"]
    assert result["items"] == 4 and 0 <= result["score"] <= 1
    entries = np.array(result["entry"]["apples"])
    from unskill.stats.datasets import load_dataset, sample
    prompts = [i.prompt for i in sample(load_dataset("mbpp:test", data_dir), 4, 0).items]
    spec = parse_task("gen:mbpp")
    params = GenerationParams(max_new_tokens=spec.max_new_tokens, stop=spec.stop)
    for alpha in sorted(entries)[:2]:
        guard = KSDGuard([apple_stats], model.manifest, alpha=float(alpha) * 1.0001)
        refused = [r.abstained for r in Generator(model, tokenizer, guard).generate(prompts, params)]
        assert refused == (entries <= alpha * 1.0001).tolist()


def test_calibrated_alpha_keeps_retain_refusals_under_target(llama, apple_stats):
    from unskill.stats.calibrate import calibrate

    generator, _ = llama
    model, tokenizer = generator.model, generator.tokenizer
    forget = Dataset("apples", [Item(f"How many apples are left if Tom eats {i} of his {i + 9} apples?") for i in range(10)])
    retain = Dataset("other", [Item(f"Write a python function number {i} for lists") for i in range(20)])
    result = calibrate(model, tokenizer, apple_stats, retain, forget, target=0.1)
    assert result.retain_abstain <= 0.1 and result.retain_items == 20

    def refused(dataset, alpha):
        guard = KSDGuard([apple_stats], model.manifest, alpha=alpha)
        results = Generator(model, tokenizer, guard).generate(dataset.prompts, GenerationParams(max_new_tokens=1))
        return np.mean([r.abstained for r in results])

    assert refused(retain, result.alpha) == result.retain_abstain
    assert refused(forget, result.alpha) == result.forget_abstain
    assert result.alpha == float("inf") or refused(retain, result.alpha * 1.01 + 1e-9) > 0.1


def test_cache_resumes_and_ignores_a_torn_last_line(llama, tmp_path):
    generator, _ = llama
    spec = write_items(tmp_path / "items.jsonl", ITEMS)
    cache_dir = tmp_path / "cache"
    harness = Harness(generator.model, generator.tokenizer, EvalConfig(progress=False), cache_dir=cache_dir)
    first = harness.run([spec])[spec]
    (path,) = cache_dir.glob("*.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 3   # header + one line per item
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])   # killed while writing item 2
    assert len(ItemCache(cache_dir, json.loads(lines[0])["identity"]).records) == 1
    again = harness.run([spec])[spec]
    assert again["score"] == first["score"] and again["per_item"] == first["per_item"]
    path.write_text("\n".join([lines[0], "{broken", lines[2], ""]))
    from unskill.runtime.errors import UnskillError
    with pytest.raises(UnskillError, match="line 2 is not JSON"):
        harness.run([spec])


def test_mmlu_five_shot_uses_the_subject_dev_items(llama, data_dir):
    generator, _ = llama
    from unskill.evals import tasks as T
    from unskill.stats.datasets import load_dataset
    item = load_dataset("mmlu:test", data_dir, limit=1).items[0]
    (prompt,) = T.few_shot_prompts(parse_task("gen:mmlu"), [item], data_dir)
    assert prompt.count("\nAnswer:") == 6 and prompt.endswith(item.prompt) and "abstract algebra" in prompt
    result = Harness(generator.model, generator.tokenizer, EvalConfig(str(data_dir), gen_limit=3, progress=False)
                     ).run(["gen:mmlu"])["gen:mmlu"]
    # the tiny model's byte-level tokenizer makes some 5-shot prompts longer than its 4096 context: skipped
    assert result["items"] + result["skipped"] == 3 and result["items"] >= 1 and set(result["replies"]) <= set("ABCD")


def test_calibrating_several_skills_in_one_pass_matches_one_at_a_time(llama, apple_stats, tmp_path):
    """Each skill's retain set = the shared retain + the other skills' forget prompts: same alphas as calibrate()."""
    from unskill.cli import main
    from unskill.stats.calibrate import calibrate, calibrate_skills

    generator, onnx_dir = llama
    model, tokenizer = generator.model, generator.tokenizer
    apples = Dataset("apples", [Item(f"Tom has {i + 9} apples and eats {i}. How many are left?") for i in range(8)])
    code = Dataset("code", [Item(f"Write a python function number {i} that sorts a list") for i in range(8)])
    general = Dataset("general", [Item(f"What is the capital of country number {i}?") for i in range(6)])
    code_stats = probe(model, tokenizer, code, config=ProbeConfig(progress=False), skill="code")
    together = calibrate_skills(model, tokenizer, {"apples": apple_stats, "code": code_stats},
                                {"apples": apples, "code": code}, general, target=0.2)
    alone = {"apples": calibrate(model, tokenizer, apple_stats, Dataset("r", code.items + general.items), apples, 0.2),
             "code": calibrate(model, tokenizer, code_stats, Dataset("r", apples.items + general.items), code, 0.2)}
    for name in alone:
        assert together[name].as_dict() == pytest.approx(alone[name].as_dict(), rel=1e-6), name
        assert together[name].retain_items == 14 and together[name].retain_abstain <= 0.2

    # the CLI: NAME=NPZ / NAME=SPEC pairs, one JSON per skill; a skill without its forget set is a one-line error
    stats_paths = {"apples": tmp_path / "apples.npz", "code": tmp_path / "code.npz"}
    apple_stats.save(stats_paths["apples"])
    code_stats.save(stats_paths["code"])
    specs = {"apples": write_items(tmp_path / "apples.jsonl", apples.items),
             "code": write_items(tmp_path / "code.jsonl", code.items)}
    args = ["calibrate", "--model", str(onnx_dir), *[a for n, p in stats_paths.items() for a in ("--stats", f"{n}={p}")],
            "--retain", write_items(tmp_path / "general.jsonl", general.items), "--target", "0.2", "--no-chat"]
    assert main([*args, *[a for n, s in specs.items() for a in ("--forget", f"{n}={s}")],
                 "--out-dir", str(tmp_path / "calibration")]) == 0
    written = json.loads((tmp_path / "calibration" / "ksd-code.json").read_text())
    assert written["setting"] == "code" and written["forget"] == specs["code"] and written["retain_items"] == 14
    assert written["retain"].startswith(specs["apples"] + "+")
    assert main([*args, "--forget", f"apples={specs['apples']}", "--out-dir", str(tmp_path / "c2")]) == 2
    assert not (tmp_path / "c2").exists()


def test_cli_eval_calibrate_and_report(llama, tmp_path, data_dir):
    pytest.importorskip("matplotlib")
    from unskill.cli import main

    generator, onnx_dir = llama
    stats_path = tmp_path / "gsm8k.npz"
    forget = Dataset("apples", [Item(f"How many apples are left if Tom eats {i} of his {i + 9} apples?", f"{9} apples")
                                for i in range(12)])
    retain = Dataset("code", [Item(f"Write a python function number {i}", f"def f{i}(x):\n    return x") for i in range(12)])
    probe(generator.model, generator.tokenizer, forget, retain, ProbeConfig(progress=False), skill="gsm8k").save(stats_path)
    common = ["--data-dir", str(data_dir), "--cache", str(tmp_path / "cache"), "--no-progress"]
    tasks = "gsm8k:test,mbpp:test,mmlu:test,gen:mmlu"
    assert main(["eval", "--model", str(onnx_dir), "--tasks", tasks, "--stats", f"gsm8k={stats_path}",
                 "--limit", "4", "--gen-limit", "2", "--out", str(tmp_path / "original.json"), *common]) == 0
    assert main(["calibrate", "--model", str(onnx_dir), "--stats", str(stats_path), "--retain", "mbpp:validation",
                 "--forget", "gsm8k:validation", "--limit", "10", "--data-dir", str(data_dir),
                 "--out", str(tmp_path / "ksd.json")]) == 0
    assert main(["calibrate-na", "--model", str(onnx_dir), "--stats", str(stats_path), "--retain", "mbpp:validation",
                 "--forget", "gsm8k:validation", "--limit", "3", "--ratios", "0.01,0.9", "--target", "0.5",
                 "--keep", str(tmp_path / "na"), "--out", str(tmp_path / "na.json"), *common[:2], "--no-progress"]
                ) == 0
    na_choice = json.loads((tmp_path / "na.json").read_text())
    assert [c["ratio"] for c in na_choice["candidates"]][:1] == [0.01]
    if na_choice["ratio"] is not None:
        assert main(["eval", "--model", str(tmp_path / "na"), "--tasks", tasks, "--limit", "4", "--gen-limit", "2",
                     "--setting", "gsm8k", "--out", str(tmp_path / "na-gsm8k.json"), *common]) == 0
    results = [str(p) for p in tmp_path.glob("*gsm8k.json")] + [str(tmp_path / "original.json")]
    report = tmp_path / "docs" / "results.md"
    assert main(["report", "--results", *results, "--calibration", str(tmp_path / "ksd.json"),
                 str(tmp_path / "na.json"), "--out", str(report)]) == 0
    text = report.read_text()
    alpha = json.loads((tmp_path / "ksd.json").read_text())["alpha"]
    assert f"KSD (α={alpha:.3g}·k)" in text and "| gsm8k:test | top1 | 4 |" in text
    assert (report.parent / f"{json.loads((tmp_path / 'original.json').read_text())['source']}-bars.png").stat().st_size > 1000


def test_task_names_and_scoring_rules():
    from unskill.runtime.errors import UnskillError
    from unskill.evals import tasks as T

    assert parse_task("gsm8k:test").kind == "tokens" and parse_task("gen:xquad-zh").source == "xquad-zh:test"
    with pytest.raises(UnskillError, match="unknown generation task"):
        parse_task("gen:hellaswag")
    gold = Item("q", "so 5 + 7 = 12\n#### 1,212")
    assert T.score_gsm8k("5+7 is 12. The answer is 1,212.", gold)
    assert T.score_gsm8k("we get 3 then $1212", gold) and not T.score_gsm8k("The answer is 12. Then 1212", gold)
    assert T.gsm8k_chain("a <<2*3=6>>6 b\n#### 6") == "a 6 b The answer is 6."
    assert T.extract_code("```python\ndef f():\n    return 1\n```\ntext") == "def f():\n    return 1\n"
    assert T.extract_code("def f():\n    return 1\n\ndef g(:\n") == "def f():\n    return 1\n"
    assert T.score_xquad("It was in Paris, France.", Item("p", " paris")) and not T.score_xquad("Lyon", Item("p", " Paris"))
    assert T.normalise("«Köln»！ ") == "köln"


def test_mbpp_pass_at_1_runs_the_asserts_in_the_sandbox(data_dir):
    from unskill.evals import tasks as T
    from unskill.stats.datasets import load_dataset
    from unskill.evals.sandbox import Limits

    item = load_dataset("mbpp:test", data_dir, limit=1).items[0]
    limits = Limits(timeout_s=5)
    assert T.score_mbpp(item.completion, item, limits)
    assert not T.score_mbpp("def remove_Occ(s, ch):\n    return s", item, limits)


def test_report_compares_only_runs_on_the_same_sample_size():
    """An edited run of a task on another sample size than the original's is left out of after / before."""
    from unskill.evals.report import Model

    def task(items, score):
        return {"kind": "tokens", "metric": "top1", "dataset": "mmlu:test", "items": items, "score": score}

    model = Model("m")
    model.add({"method": "original", "tasks": {"mmlu:test": task(200, 0.5)}, "_path": "o.json"})
    model.add({"method": "na", "setting": "xquad-en", "tasks": {"mmlu:test": task(100, 0.1)}, "_path": "a.json"})
    assert model.score("na", "xquad-en", "mmlu:test", 1.0) == (None, None)
    model.add({"method": "na", "setting": "xquad-en", "tasks": {"mmlu:test": task(200, 0.4)}, "_path": "b.json"})
    assert model.score("na", "xquad-en", "mmlu:test", 1.0) == (0.4, None)
    assert model.relative("na", "xquad-en", ["mmlu:test"], 1.0) == pytest.approx(0.8)


def test_report_merges_ksd_entries_of_two_original_runs():
    """MMLU run with the GSM8K stats in one file and with the XQuAD stats in another: both settings keep their
    KSD view; a run of the same task on another sample size is refused with the file's name."""
    from unskill.evals.report import Model, heatmap_methods
    from unskill.runtime.errors import UnskillError

    def mmlu(items, entry):
        per_item = {"hits": [1] * items, "tokens": [1] * items}
        return {"kind": "tokens", "metric": "top1", "dataset": "mmlu:test", "items": items, "score": 1.0,
                "per_item": per_item, "entry": entry}

    model = Model("m")
    model.add({"method": "original", "tasks": {"mmlu:test": mmlu(4, {"gsm8k": [0.5, 2, 2, 2]})}, "_path": "a.json"})
    model.add({"method": "original", "tasks": {"mmlu:test": mmlu(4, {"xquad-en": [0.5, 0.5, 2, 2]}),
                                               "xquad-en:test": mmlu(4, {"xquad-en": [0.5, 2, 2, 2]})},
               "ksd": {"stats": {"xquad-en": "xquad-en.npz"}}, "_path": "b.json"})
    assert model.score("ksd", "gsm8k", "mmlu:test", 1.0) == (0.75, 0.25)
    assert model.score("ksd", "xquad-en", "mmlu:test", 1.0) == (0.5, 0.5)
    model.alphas["xquad-en"] = 1.0
    assert heatmap_methods(model) == ["ksd"]   # no NA / SP runs: their panels are not drawn
    with pytest.raises(UnskillError, match=r"c\.json: mmlu:test of the original was run on 8 items"):
        model.add({"method": "original", "tasks": {"mmlu:test": mmlu(8, {})}, "_path": "c.json"})


def test_a_bundle_reads_back_as_the_files_it_holds(tmp_path):
    """`bundle_documents` of two result files, read by `load_documents`, gives the same documents with the same
    paths as the two files; a member that is no result names the bundle and the member in one line."""
    import json

    from unskill.evals.report import bundle_documents, load_documents
    from unskill.runtime.errors import UnskillError

    files = []
    for name, doc in (("a.json", {"tasks": {"gsm8k:test": {"accuracy": 0.5}}}), ("b.json", {"method": "ksd"})):
        (tmp_path / name).write_text(json.dumps(doc))
        files.append(str(tmp_path / name))
    (tmp_path / "bundle.json").write_text(json.dumps(bundle_documents(files)))
    assert load_documents([str(tmp_path / "bundle.json")]) == load_documents(files)
    (tmp_path / "bad.json").write_text(json.dumps({"bundle": {"x.json": {"neither": 1}}}))
    with pytest.raises(UnskillError, match=r"bad\.json: x\.json: not an `unskill eval --out`"):
        load_documents([str(tmp_path / "bad.json")])
