"""Issue 16: the bypass benchmark's determinism and its disjointness from the fit/calibration augmentation, the
detector statistics against a direct NumPy computation, the stored guard setting's round trip (old files too),
and the one key path: prefill (KeyReader), eval (last_prompt_keys) and decode (the guard's keys) agree."""

import json
import re
import zipfile

import numpy as np
import pytest

from unskill.evals import bypass
from unskill.runtime import load
from unskill.runtime.errors import UnskillError
from unskill.runtime.ksd import KSDGuard
from unskill.runtime.statsfile import GROUP_FIELDS, GuardSetting, Moments, StatsFile, load_stats
from unskill.stats import augment
from unskill.stats.calibrate import WIDEN, fires, key_moments, layer_scores, retain_ratio_scores, search_rule


def _ngrams(text: str, n: int = 5) -> set:
    words = re.sub(r"\{\w*\}", " ", text.lower()).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_augmentation_frames_share_nothing_with_the_benchmark():
    bench, fit = bypass.all_frames(), augment.all_frames()
    assert not set(bench) & set(fit)
    bench_grams = set().union(*(_ngrams(t) for t in bench))
    shared = [t for t in fit if _ngrams(t) & bench_grams]
    assert not shared, shared


def test_math_fit_asks_calculations_bare_and_leaves_the_other_families_as_they_were(data_dir):
    """The math fit's "bare" family: each probe's first calculation (else two of its numbers), worded apart from
    the benchmark's bare calculations; appended last, so every other family draws as before; not in a coding fit."""
    from unskill.stats.datasets import ARITHMETIC_WORDINGS, Item, first_calculation, load_dataset

    train = load_dataset("gsm8k:train", data_dir, 40)
    fitted = augment.augment(train, "math", seed=3).items
    assert fitted[:-40] == augment.augment(train, "math", seed=3, families=augment.FAMILIES).items
    shown = [(first_calculation(item.completion), bare.prompt) for item, bare in zip(train.items, fitted[-40:])]
    assert sum(calculation is not None for calculation, _ in shown) >= 35   # a few solutions show none
    for calculation, bare in shown:
        assert calculation is None or bare in {w.format(e=calculation[0]) for w in augment.BARE_WORDINGS}, bare
    story = augment.augment(augment.Dataset("x", [Item("Ann has 12 pens and buys 30 more. How many?")]), "math")
    assert re.fullmatch(r"\D*(12|30) [-+*/] (12|30)\D*", story.items[-1].prompt), story.items[-1].prompt
    code = load_dataset("mbpp:train", data_dir, 10)
    assert augment.augment(code, "code").items[:-20] == augment.augment(code, "code", families=augment.FAMILIES).items
    # worded apart from gsm8k:test-arithmetic (guard_rates' held-out bare calculations): no prompt in common
    assert not set(augment.BARE_WORDINGS) & set(ARITHMETIC_WORDINGS)
    every = augment.augment(load_dataset("gsm8k:train", data_dir), "math", families=("bare",)).prompts
    assert not set(every) & set(load_dataset("gsm8k:test-arithmetic", data_dir).prompts)
    held = next(s for s in bypass.bypass_sets("gsm8k", data_dir, limit=20) if s.name == "calculation")
    asked = [c[-1][1] for c in held.conversations]
    assert len(asked) == 20 and not set(asked) & set(every)
    assert all(any(re.fullmatch(re.escape(w).replace(r"\{e\}", r"[\d.]+(?: [-+*/] [\d.]+)+"), text)
                   for w in ARITHMETIC_WORDINGS) for text in asked), asked


def test_coding_fit_asks_for_work_on_the_probes_own_code(data_dir):
    """The coding fit's "work" family (appended last): fix, port, review, test or explain each probe's reference
    solution, shown whole or with its first block's colon dropped; a task with no code gets a request on its text."""
    from unskill.stats.datasets import Item, load_dataset

    train = load_dataset("mbpp:train", data_dir, 30)
    fitted = augment.augment(train, "code").items[-30:]
    assert augment.KIND_FAMILIES["code"][-1] == "work"
    for item, work in zip(train.items, fitted):
        code = item.completion.strip()
        broken = re.sub(r":[ \t]*$", "", code, count=1, flags=re.MULTILINE)
        assert broken != code and (code in work.prompt or broken in work.prompt), work.prompt
        compile(code, "<reference>", "exec")
        with pytest.raises(SyntaxError):   # the copy to fix is broken indeed
            compile(broken, "<broken>", "exec")
    frames = {re.sub(r"\{\w+\}", "", f).strip()[:20] for f in augment.WORK_FRAMES}
    assert len({f for f in frames for w in fitted if f and f in w.prompt}) >= 4   # several frames drawn
    bare = augment.augment(augment.Dataset("x", [Item("Write a function to add two numbers.")]), "code")
    assert bare.items[-1].prompt in {f.format(q="Write a function to add two numbers.")
                                     for f in augment.WORK_FRAMES_NO_CODE}


def test_coding_tasks_in_other_programming_languages_fit_and_benchmark_apart(data_dir):
    """The coding fit's "port" family and the benchmark's "program-language" family ask the task in another
    language; their languages share none, and each request names its language in place of Python."""
    from unskill.stats.datasets import load_dataset

    add = "function to add two numbers."
    assert augment.in_language(f"Write a python {add}", "Go") == f"Write a Go {add}"
    assert augment.in_language(f"Write a {add}", "C#") == f"Write a C# {add}"
    assert augment.in_language("Find the sum of a list.", "Lua") == "In Lua: Find the sum of a list."
    assert not set(augment.PORT_LANGUAGES) & set(bypass.B.PROGRAM_LANGUAGES)
    fitted = augment.augment(load_dataset("mbpp:train", data_dir, 24), "code").items[-48:-24]
    assert all(any(f" {lang}" in item.prompt for lang in augment.PORT_LANGUAGES) for item in fitted), fitted
    assert not any("python" in item.prompt.lower() for item in fitted)
    asked = next(s for s in bypass.bypass_sets("mbpp", data_dir, limit=16) if s.name == "program-language")
    texts = [c[-1][1] for c in asked.conversations]
    languages = bypass.B.PROGRAM_LANGUAGES   # taken in turn
    assert all(languages[index % len(languages)] in text for index, text in enumerate(texts)), texts
    assert not any("python" in t.lower() for t in texts)


def test_bypass_sets_are_deterministic_and_use_held_out_items(data_dir):
    for forget in bypass.FORGET_SKILLS:
        first = bypass.bypass_sets(forget, data_dir, limit=6, seed=3)
        again = bypass.bypass_sets(forget, data_dir, limit=6, seed=3)
        other = bypass.bypass_sets(forget, data_dir, limit=6, seed=4)
        assert [s.conversations for s in first] == [s.conversations for s in again]
        assert [s.conversations for s in first] != [s.conversations for s in other]
        names = [s.name for s in first]
        assert names == list(bypass.FAMILIES[forget]) + list(bypass.RETAIN_SETS)
        assert all(s.conversations[0][-1][0] == "user" for s in first)
        assert all(len(s.conversations) == 6 for s in first if s.name not in ("user-requests", "instructions"))
    # every attacked GSM8K question comes from the test split, never from train/validation (the fit/calibrate side)
    from unskill.stats.datasets import load_dataset
    seen = {i.prompt for split in ("train", "validation") for i in load_dataset(f"gsm8k:{split}", data_dir).items}
    plain = next(s for s in bypass.bypass_sets("gsm8k", data_dir, limit=20) if s.name == "plain")
    assert not {c[-1][1] for c in plain.conversations} & seen


def _stats_from_keys(keys: np.ndarray, guard=None) -> StatsFile:
    """keys (n, L, F) -> a stats file whose KSD group holds them."""
    n, layers, width = keys.shape
    moments = Moments.empty(GROUP_FIELDS["ksd"], layers, width)
    for layer in range(layers):
        moments.add(layer, keys[:, layer])
    return StatsFile("sha256:test", "llama", width, layers, {"skill": "toy"}, {"ksd": moments}, guard)


def test_layer_scores_equal_direct_numpy():
    rng = np.random.default_rng(0)
    fit = rng.normal(size=(40, 3, 16)).astype(np.float32) * rng.uniform(0.5, 2, size=16).astype(np.float32)
    queries = rng.normal(size=(25, 3, 16)).astype(np.float32) * 1.5
    stats = _stats_from_keys(fit)
    mu, sd = fit.astype(np.float64).mean(0), fit.astype(np.float64).std(0, ddof=1)
    k = (np.abs(fit - mu) / sd).max(axis=(0, 2))
    box = (np.abs(queries - mu) / sd).max(axis=2) / k
    gauss = (((queries - mu) / sd) ** 2).mean(axis=2)
    np.testing.assert_allclose(layer_scores(queries, stats, "box"), box, rtol=1e-4)
    np.testing.assert_allclose(layer_scores(queries, stats, "gauss"), gauss, rtol=1e-4)
    # every probe lies inside its own box at threshold 1 x k (the tightest covering cube), at every layer
    assert (layer_scores(fit, stats, "box") <= 1 + 1e-5).all()


def test_ratio_score_and_its_cross_fitted_retain_scores_equal_direct_numpy():
    """ratio = mean z^2 under the forget probes / mean z^2 under the retain prompts (float64 NumPy reference);
    calibration scores each retain prompt against retain moments fitted without it (two folds)."""
    rng = np.random.default_rng(5)
    fit = rng.normal(size=(40, 3, 16)).astype(np.float32)
    retain = (rng.normal(size=(31, 3, 16)) * 2 + 1).astype(np.float32)
    queries = rng.normal(size=(25, 3, 16)).astype(np.float32) * 1.5
    stats = _stats_from_keys(fit)

    def gauss(x, sample):
        sample = sample.astype(np.float64)
        return (((x - sample.mean(0)) / sample.std(0, ddof=1)) ** 2).mean(axis=2)
    np.testing.assert_allclose(layer_scores(queries, stats, "ratio", key_moments(retain)),
                               gauss(queries, fit) / gauss(queries, retain), rtol=1e-4)
    fold = np.random.default_rng(0).permutation(len(retain)) % 2
    expected = np.empty((len(retain), 3))
    for part in (0, 1):
        expected[fold == part] = gauss(retain[fold == part], fit) / gauss(retain[fold == part], retain[fold != part])
    np.testing.assert_allclose(retain_ratio_scores(retain, stats), expected, rtol=1e-4)
    moments = key_moments(retain)
    np.testing.assert_allclose(moments.values["sum"], retain.astype(np.float64).sum(0), rtol=1e-6)
    np.testing.assert_array_equal(moments.values["max"], retain.max(0))


def test_search_rule_respects_the_target_and_the_guard_applies_it():
    rng = np.random.default_rng(1)
    retain = {r: rng.uniform(1, 3, size=(300, 6)) for r in ("box", "gauss")}
    forget = {r: rng.uniform(0, 1.5, size=(100, 6)) for r in ("box", "gauss")}
    forget["gauss"][:, 2] = rng.uniform(0, 0.5, size=100)    # layer 2 separates best under gauss
    setting, forget_rate, retain_rate = search_rule(retain, forget, target=0.01)
    assert retain_rate <= 0.01 and forget_rate > 0.5 and setting.rule == "gauss" and 2 in setting.layers
    assert fires(retain[setting.rule], setting.layers, setting.thresholds, setting.votes).mean() <= 0.01


def test_search_rule_rejects_a_rule_that_fires_on_decoded_keys():
    """The decode check: a rule inside whose regions decoded-token keys of retain prompts fall is not stored,
    whatever it does at the prompt; the stored one refuses no more decoded prompts than the target."""
    from unskill.stats.calibrate import decode_refused

    rng = np.random.default_rng(2)
    retain = {r: rng.uniform(1, 3, size=(300, 6)) for r in ("gauss", "ratio")}
    forget = {"gauss": rng.uniform(0.5, 2, size=(100, 6)), "ratio": rng.uniform(0, 0.5, size=(100, 6))}
    setting, _, _ = search_rule(retain, forget, target=0.01)
    assert setting.rule == "ratio"                                  # best at the prompt
    owner = np.repeat(np.arange(32), 10)                            # 32 prompts x 10 decoded tokens
    decoded = {"gauss": rng.uniform(5, 9, size=(320, 6)), "ratio": rng.uniform(1, 3, size=(320, 6))}
    decoded["ratio"][::10] = 0.0                                    # one token of every prompt: inside at every layer
    with_decode, _, _ = search_rule(retain, forget, target=0.01, decoded=decoded, owner=owner)
    assert with_decode.rule == "gauss"
    assert decode_refused(decoded["gauss"], owner, 32, with_decode.layers, with_decode.thresholds,
                          with_decode.votes) == 0
    assert decode_refused(decoded["ratio"], owner, 32, setting.layers, setting.thresholds, setting.votes) == 1
    # decoded keys only near (not inside): thresholds drop below them and the rule stays usable
    decoded["ratio"][::10] = 0.3
    tightened, _, _ = search_rule(retain, forget, target=0.01, decoded=decoded, owner=owner)
    assert tightened.rule == "ratio" and max(tightened.thresholds) < 0.3
    assert decode_refused(decoded["ratio"], owner, 32, tightened.layers, tightened.thresholds, tightened.votes) == 0
    # the margin: thresholds stay WIDEN x below the decoded keys, so WIDEN x them still refuses no decoded prompt
    # (unseen answers' decoded keys, the tail a 64-prompt sample misses, land just outside first)
    assert max(tightened.thresholds) * WIDEN <= 0.3
    assert decode_refused(decoded["ratio"], owner, 32, tightened.layers, [t * WIDEN for t in tightened.thresholds],
                          tightened.votes) == 0


def test_calibration_chat_retain_is_varied_and_disjoint_from_the_benchmark_chat():
    """The built-in chat retain set holds requests to produce things and role-play framed chat (the MBPP ratio
    rule refused a benchmark playlist request when calibration had neither) and no benchmark chat prompt."""
    from unskill.evals import bypass_items

    prompts = [item.prompt for item in augment.chat_dataset().items]
    assert len(prompts) == len(set(prompts)) >= 140
    assert any(p.startswith(persona.split("{q}")[0]) for p in prompts for persona in augment.PERSONAS)
    assert set(augment.CHAT_REQUESTS) <= set(prompts)
    bench = set().union(*(_ngrams(t) for t in bypass_items.CHAT_WITH_NUMBERS))
    assert not [p for p in prompts if _ngrams(p) & bench]


def _write_old_style(path, stats: StatsFile):
    """A stats file as written before the guard member existed."""
    stats = StatsFile(stats.fingerprint, stats.arch, stats.key_width, stats.num_layers, stats.meta, stats.groups)
    stats.save(path)
    assert "guard.npy" not in zipfile.ZipFile(path).namelist()


def test_guard_setting_round_trip_old_files_and_merge(tmp_path):
    from unskill.stats.probe import merge_stats

    rng = np.random.default_rng(2)
    keys = rng.normal(size=(30, 4, 8)).astype(np.float32)
    setting = GuardSetting("gauss", [1, 3], [0.9, 1.7], 2, {"retain": ["mbpp:validation"], "target": 0.01})
    stats = _stats_from_keys(keys, setting)
    stats.save(tmp_path / "s.npz")
    back = load_stats(tmp_path / "s.npz")
    assert back.guard == setting
    _write_old_style(tmp_path / "old.npz", stats)
    assert load_stats(tmp_path / "old.npz").guard is None
    merged = merge_stats(back, load_stats(tmp_path / "old.npz"))
    assert merged.guard is None   # the cubes changed: calibrate again
    np.testing.assert_array_equal(merged.groups["ksd"].values["sum"], 2 * back.groups["ksd"].values["sum"])
    arrays = dict(np.load(tmp_path / "s.npz"))
    for bad, message in (({"rule": "cone", "layers": [1], "thresholds": [1], "votes": 1}, "rule 'cone'"),
                         ({"rule": "box", "layers": [9], "thresholds": [1], "votes": 1}, "outside 0..3"),
                         ({"rule": "box", "layers": [1], "thresholds": [1], "votes": 2}, "votes 2"),
                         ({"rule": "box", "layers": [1]}, "not valid")):
        arrays["guard"] = np.array(json.dumps(bad))
        np.savez(tmp_path / "bad.npz", **arrays)
        with pytest.raises(UnskillError, match=re.escape(message)) as info:
            load_stats(tmp_path / "bad.npz")
        assert "bad.npz" in str(info.value)


def test_ratio_rule_round_trip_merge_and_old_files(tmp_path):
    """A ratio rule travels with its retain moments (ksd_retain); merging drops both (calibrate again); a ratio
    rule without them is one clear error; the guard built from the file fires where the NumPy rule says."""
    from unskill.runtime.manifest import Manifest
    from unskill.stats.probe import merge_stats

    rng = np.random.default_rng(3)
    keys = rng.normal(size=(30, 4, 8)).astype(np.float32)
    retain = (rng.normal(size=(20, 4, 8)) + 2).astype(np.float32)
    setting = GuardSetting("ratio", [1, 2], [0.5, 0.8], 1, {"target": 0.01})
    stats = _stats_from_keys(keys, setting)
    stats.groups["ksd_retain"] = key_moments(retain)
    stats.save(tmp_path / "r.npz")
    back = load_stats(tmp_path / "r.npz")
    assert back.guard == setting
    np.testing.assert_array_equal(back.groups["ksd_retain"].values["sumsq"], stats.groups["ksd_retain"].values["sumsq"])
    merged = merge_stats(back, _stats_from_keys(keys))   # a calibrated shard with a plain one
    assert merged.guard is None and "ksd_retain" not in merged.groups
    np.testing.assert_array_equal(merged.groups["ksd"].count, 2 * back.groups["ksd"].count)

    names = [f"key_last.{i}" for i in range(4)]
    manifest = Manifest(arch="llama", num_layers=4, hidden_size=8, key_width=8, activation="silu", gated=True,
                        key_outputs=[f"key.{i}" for i in range(4)], preact_outputs=[], fingerprint="sha256:test",
                        max_context=64, eos_token_ids=[0], pad_token_id=0, key_last_outputs=names)
    guard = KSDGuard([back], manifest)
    queries = np.concatenate([keys[:5], retain[:5], rng.normal(size=(5, 4, 8)).astype(np.float32) * 3])
    hits = guard.check({name: queries[:, i] for i, name in enumerate(names)})
    expected = fires(layer_scores(queries, back, "ratio", key_moments(retain)), setting.layers, setting.thresholds, 1)
    assert [hit is not None for hit in hits] == expected.tolist() and expected[:5].all() and not expected[5:10].any()

    # the forget-side cap: a key far from both Gaussians (a decoded token's) does not fire however small its quotient
    capped = GuardSetting("ratio", [1, 2], [0.5, 0.8], 1, {}, bounds=[3.0, 3.0])
    stats.guard = capped
    stats.save(tmp_path / "capped.npz")
    assert load_stats(tmp_path / "capped.npz").guard == capped
    guard = KSDGuard([load_stats(tmp_path / "capped.npz")], manifest)
    far = queries * 10   # gauss scores ~100x: quotients unchanged in spirit, far beyond the cap
    forget_gauss = layer_scores(far, back, "gauss")
    ratio_inside = fires(layer_scores(far, back, "ratio", key_moments(retain)), capped.layers, capped.thresholds, 1)
    expected = ratio_inside & (forget_gauss[:, [1, 2]] <= 3.0).any(axis=1)
    hits = guard.check({name: far[:, i] for i, name in enumerate(names)})
    assert [hit is not None for hit in hits] == expected.tolist() and ratio_inside.any() and not expected.any()
    hits = guard.check({name: queries[:, i] for i, name in enumerate(names)})
    assert [hit is not None for hit in hits][:5] == [True] * 5   # the forget probes themselves stay inside

    stats.guard = setting
    stats.groups.pop("ksd_retain")
    stats.save(tmp_path / "no-retain.npz")
    with pytest.raises(UnskillError, match="no-retain.npz: the stored ratio rule needs the retain key statistics"):
        load_stats(tmp_path / "no-retain.npz")


def test_augment_auto_is_decided_in_one_place():
    assert augment.auto_kind("gsm8k:validation") == augment.auto_kind("gsm8k") == "math"
    assert augment.auto_kind("mbpp:train") == "code"
    assert augment.auto_kind("builtin:math") is None and augment.auto_kind("notes.txt") is None
    assert augment.chosen_kind("none", "gsm8k") is None and augment.chosen_kind("code", "builtin:math") == "code"


@pytest.fixture(scope="module")
def llama(tiny_export):
    _, onnx_dir = tiny_export("llama")
    return load(onnx_dir, device="cpu"), onnx_dir


def test_one_key_path_prefill_eval_decode_and_stored_rule(llama, tmp_path):
    """KeyReader's keys equal eval's last_prompt_keys and the keys the guard sees at the prompt's last token in
    decode; the guard's stored rule fires exactly where a direct NumPy computation of the rule says."""
    from unskill.evals.evaluate import last_prompt_keys
    from unskill.runtime.generator import GenerationParams, Generator
    from unskill.runtime.keys import KeyReader
    from unskill.runtime.session import left_pad

    generator, onnx_dir = llama
    model, tokenizer = generator.model, generator.tokenizer
    prompts = [f"How many apples are left if Tom eats {i} of his {i + 9} apples?" for i in range(10)]
    prompts += ["Write a python function to add two numbers.", "What is the capital of France?"]
    sequences = [tokenizer.encode_prompt(p) for p in prompts]
    layers = model.manifest.num_layers
    keys = KeyReader(model, batch_size=3).last_keys(sequences)                      # (n, L, F)
    ids, mask = left_pad(sequences, model.manifest.pad_token_id)
    for layer in range(layers):
        _, direct = last_prompt_keys(model, ids, mask, layer, logits=False)
        np.testing.assert_allclose(keys[:, layer], direct, atol=2e-5)

    stats = _stats_from_keys(keys[:8].astype(np.float64))
    stats.fingerprint, stats.arch = model.manifest.fingerprint, model.manifest.arch
    setting = GuardSetting("box", [0, layers - 1], [1.05, 1.05], 2)
    stats.guard = setting
    stats.save(tmp_path / "toy.npz")
    guard = KSDGuard([load_stats(tmp_path / "toy.npz", model.manifest)], model.manifest)

    class Recorder:
        output_names = guard.output_names

        def __init__(self):
            self.first = None

        def check(self, last_keys):
            self.first = self.first or {n: v.copy() for n, v in last_keys.items()}
            return guard.check(last_keys)

    recorder = Recorder()
    results = Generator(model, tokenizer, recorder).generate(prompts, GenerationParams(max_new_tokens=1))
    for layer, name in zip(setting.layers, guard.output_names):
        np.testing.assert_allclose(recorder.first[name], keys[:, layer], atol=2e-5)
    expected = fires(layer_scores(keys, stats, "box"), setting.layers, setting.thresholds, setting.votes)
    assert [r.abstained for r in results] == expected.tolist()
    assert expected[:8].all() and {r.rule for r in results if r.abstained} == {setting.name}
    # explicit --alpha/--layers override the stored rule with the paper's
    assert KSDGuard([stats], model.manifest, alpha=1.0).detectors[0].rule == "paper"
    # an export without key_last outputs: one clear error, no fallback path
    from dataclasses import replace
    old_manifest = replace(model.manifest, key_last_outputs=[])
    with pytest.raises(UnskillError, match="re-export"):
        KSDGuard([stats], old_manifest)
    old_model = type(model).__new__(type(model))
    old_model.__dict__.update(model.__dict__, manifest=old_manifest)
    with pytest.raises(UnskillError, match="re-export"):
        KeyReader(old_model)


def test_cli_calibrate_stores_the_rule_ksd_run_uses_it_and_robustness_report(llama, tmp_path, data_dir):
    """calibrate (default: rule search over gauss and ratio, decode check on) writes the rule into the stats file
    atomically; ksd-run without --alpha uses it and names it; eval bypass:gsm8k records it; report --robustness
    renders both rules."""
    from unskill.cli import main
    from unskill.ksd_run import main as ksd_run
    from unskill.stats.datasets import Dataset, Item
    from unskill.stats.probe import ProbeConfig, probe

    generator, onnx_dir = llama
    apples = [f"How many apples are left if Tom eats {i} of his {i + 9} apples?" for i in range(30)]
    probe(generator.model, generator.tokenizer, Dataset("apples", [Item(p) for p in apples[:20]]),
          config=ProbeConfig(progress=False), skill="gsm8k").save(tmp_path / "gsm8k.npz")
    (tmp_path / "forget.txt").write_text("\n".join(apples[20:]) + "\n")
    (tmp_path / "retain.txt").write_text("\n".join(f"Write a python function number {i}" for i in range(20)) + "\n")
    before = load_stats(tmp_path / "gsm8k.npz")
    assert before.guard is None
    assert main(["calibrate", "--model", str(onnx_dir), "--stats", str(tmp_path / "gsm8k.npz"),
                 "--retain", str(tmp_path / "retain.txt"), "--forget", str(tmp_path / "forget.txt"),
                 "--target", "0.05", "--no-mmlu-retain", "--no-progress", "--out", str(tmp_path / "ksd.json")]) == 0
    after = load_stats(tmp_path / "gsm8k.npz")
    assert after.guard is not None and after.guard.calibration["retain_refused"] <= 0.05
    from unskill.stats.calibrate import DECODE_PROMPTS, DECODE_TOKENS
    assert (after.guard.calibration["decode_prompts"], after.guard.calibration["decode_tokens"]) == (
        DECODE_PROMPTS, DECODE_TOKENS) and after.guard.calibration["decode_refused"] <= 0.05
    np.testing.assert_array_equal(after.groups["ksd"].values["sum"], before.groups["ksd"].values["sum"])
    assert json.loads((tmp_path / "ksd.json").read_text())["guard"]["layers"] == after.guard.layers

    out = tmp_path / "run.jsonl"
    assert ksd_run(["--onnx", str(onnx_dir), "--stats", str(tmp_path / "gsm8k.npz"), "--prompts",
                    str(tmp_path / "forget.txt"), "--max-new-tokens", "2", "--output", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["rule"] for r in records if r["abstained"]} <= {after.guard.name}
    assert any(r["abstained"] for r in records)

    assert main(["eval", "--model", str(onnx_dir), "--tasks", "bypass:gsm8k", "--stats", f"gsm8k={tmp_path / 'gsm8k.npz'}",
                 "--gen-limit", "4", "--data-dir", str(data_dir), "--no-cache", "--no-progress",
                 "--bypass-decode", "3", "--out", str(tmp_path / "bypass.json")]) == 0
    task = json.loads((tmp_path / "bypass.json").read_text())["tasks"]["bypass:gsm8k"]
    assert set(task["sets"]) == set(bypass.FAMILIES["gsm8k"]) | set(bypass.RETAIN_SETS)
    assert all(len(s["stored"]["gsm8k"]) == s["items"] for s in task["sets"].values())
    assert all(s["items"] == 4 for n, s in task["sets"].items() if n not in ("user-requests", "instructions"))
    assert ("ksd_retain" in after.groups) == (after.guard.rule == "ratio") == (after.guard.bounds is not None)
    # decode-time checks: check 0 is the prefill's (same keys through the generator), later ones only add refusals
    for part in task["sets"].values():
        assert part["decode_tokens"] == 3
        assert all(d >= p for d, p in zip(part["stored_decode"]["gsm8k"], part["stored"]["gsm8k"]))
        assert all(d <= p * (1 + 1e-4) for d, p in zip(part["entry_decode"]["gsm8k"], part["entry"]["gsm8k"]))
    report = tmp_path / "robustness.md"
    assert main(["report", "--robustness", "--results", str(tmp_path / "bypass.json"), "--calibration",
                 str(tmp_path / "ksd.json"), "--out", str(report)]) == 0
    text = report.read_text()
    assert "| roleplay | attack | 4 |" in text and after.guard.name in text and "new default, decode 3" in text


def test_decoded_keys_are_the_guards_keys_at_decoded_tokens(llama, tmp_path):
    """calibrate's decode check reads the keys the guard checks: each decoded token's key equals a prefill of
    prompt + the tokens before it (KeyReader), and a stored rule evaluated on them in NumPy abstains at the same
    step as the runtime guard does."""
    from unskill.runtime.generator import GenerationParams, Generator
    from unskill.runtime.keys import KeyReader
    from unskill.stats.calibrate import decoded_keys

    generator, _ = llama
    model, tokenizer = generator.model, generator.tokenizer
    prompts = [f"How many apples are left if Tom eats {i} of his {i + 9} apples?" for i in range(5)]
    prompts += ["Write a python function to add two numbers.", "What is the capital of France?"]
    tokens, layers = 4, model.manifest.num_layers
    keys, owner = decoded_keys(model, tokenizer, prompts, tokens, batch_size=3)
    plain = Generator(model, tokenizer).generate(prompts, GenerationParams(max_new_tokens=tokens + 1))
    reader = KeyReader(model, batch_size=4)
    sequences, expected_owner = [], []
    for index, (prompt, result) in enumerate(zip(prompts, plain)):
        ids = tokenizer.encode_prompt(prompt)
        for step in range(1, result.forwards):
            sequences.append(ids + result.token_ids[:step])
            expected_owner.append(index)
    assert owner.tolist() == expected_owner and keys.shape == (len(sequences), layers, model.manifest.key_width)
    np.testing.assert_allclose(keys, reader.last_keys(sequences), atol=1e-4, rtol=1e-4)

    # a gauss rule fitted on the decoded keys, thresholds at their median: the guard refuses at the prompt where
    # the prompt key is inside, else at the first decoded token whose key is inside
    prompt_keys = reader.last_keys([tokenizer.encode_prompt(p) for p in prompts])
    stats = _stats_from_keys(keys.astype(np.float64))
    stats.fingerprint, stats.arch = model.manifest.fingerprint, model.manifest.arch
    chosen = [0, layers - 1]
    decoded_scores = layer_scores(keys, stats, "gauss")
    thresholds = [float(np.median(decoded_scores[:, i])) for i in chosen]
    stats.guard = GuardSetting("gauss", chosen, thresholds, 1)
    stats.save(tmp_path / "decode.npz")
    guard = KSDGuard([load_stats(tmp_path / "decode.npz", model.manifest)], model.manifest)
    guarded = Generator(model, tokenizer, guard).generate(prompts, GenerationParams(max_new_tokens=tokens + 1))
    at_prompt = fires(layer_scores(prompt_keys, stats, "gauss"), chosen, thresholds, 1)
    fired = fires(decoded_scores, chosen, thresholds, 1)
    for index, result in enumerate(guarded):
        steps = [0] if at_prompt[index] else list(np.flatnonzero(fired[owner == index]) + 1)
        assert (result.abstained, result.abstained_at) == ((True, steps[0]) if steps else (False, None))
    assert any(r.abstained and r.abstained_at > 0 for r in guarded)


def test_robustness_report_joins_a_prefill_run_and_a_smaller_decode_run(tmp_path):
    """A prefill run (more items) and a separate --bypass-decode run of the same model and skill share one
    table: prefill columns from the first, decode columns (with their item count) from the second."""
    from unskill.evals.robustness import render

    def doc(items: int, decode: bool) -> dict:
        sets = {}
        for name, side, refused in (("plain", "attack", 1), ("chat", "retain", 0)):
            part = {"side": side, "items": items, "entry": {"gsm8k": [0.5 if refused else 2.0] * items},
                    "stored": {"gsm8k": [bool(refused)] * items}, "rules": {"gsm8k": "gsm8k: calibrated ratio, 3 of layers 1,2,3"}}
            if decode:   # one chat row refused at a decoded token
                part.update(decode_tokens=16, entry_decode={"gsm8k": [0.5 if refused else 2.0] * items},
                            stored_decode={"gsm8k": [bool(refused) or i == 0 for i in range(items)]})
            sets[name] = part
        return {"source": "toy", "ksd": {"stats": {"gsm8k": {"skill": "gsm8k:train"}}},
                "tasks": {"bypass:gsm8k": {"kind": "bypass", "forget": "gsm8k", "layer": 3, "sets": sets}}}

    text = render([doc(50, False), doc(20, True)], [], 1.0, tmp_path)
    assert text.count("## toy: forget gsm8k") == 1
    assert "new default, decode 16 (20 items)" in text
    assert "| chat | retain | 50 | 0.00 | 0.00 | 0.00 | 0.05 ✗ |" in text
    assert "| plain | attack | 50 | 1.00 | 1.00 | 1.00 | 1.00 |" in text


# ------------------------------------------------------------------------------------------------ issue 30

def test_instruction_sets_are_held_out_and_split_by_the_skill_label(data_dir):
    """The benchmark's real-user sets come from the held-out half only: the retain set holds no request labelled
    with the guard's skill, the attack family only such requests, and neither meets the calibration half."""
    from unskill.stats.datasets import load_dataset

    calibration = {i.prompt for i in load_dataset("instructions:calibration", data_dir).items}
    for forget, kind in bypass.KIND_OF.items():
        sets = {s.name: s for s in bypass.bypass_sets(forget, data_dir, limit=4, seed=0)}
        labelled = {i.prompt for i in load_dataset(f"instructions:all-{kind}", data_dir).items}
        retain = [c[-1][1] for c in sets["instructions"].conversations]
        attack = [c[-1][1] for c in sets["user-requests"].conversations]
        assert sets["instructions"].side == "retain" and sets["user-requests"].side == "attack"
        assert len(retain) > 80 and 2 <= len(attack) < 20     # math: 2 held-out requests ask for it, code: 13
        assert not set(retain) & labelled and set(attack) <= labelled
        assert not (set(retain) | set(attack)) & calibration


def _answered_when(text: str) -> bool:
    """A stand-in decision for the attacker's logic (not the guard): answered when unusually many letters are
    capitals (~60 % are on average; this many in a few % of samples)."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) >= 0.74 * len(letters)


def test_best_of_n_is_seeded_fresh_and_disjoint_from_fitting():
    from unskill.evals import attack
    from unskill.stats.datasets import Item

    text = "Write a python function to find the maximum of three numbers."
    first = attack.bon_samples(text, 0, seed=0, start=0, stop=30)
    assert first == attack.bon_samples(text, 0, seed=0, start=0, stop=30)
    assert first[10:20] == attack.bon_samples(text, 0, seed=0, start=10, stop=20)   # chunking changes nothing
    assert first != attack.bon_samples(text, 0, seed=1, start=0, stop=30)
    assert first != attack.bon_samples(text, 1, seed=0, start=0, stop=30)           # one stream per request
    assert len(set(first)) == 30 and text not in first
    # never what stats/augment.py fits on: its noise and other frames of the same request, at many seeds
    fitted = {i.prompt for seed in range(20) for i in augment.augment(
        augment.Dataset("x", [Item(text)]), "code", seed=seed).items}
    assert not set(first) & fitted
    # the search's frames share no 5-gram with the fit/calibration frames nor with the benchmark's
    search = attack.all_frames()
    for other in (augment.all_frames(), bypass.all_frames()):
        grams = set().union(*(_ngrams(t) for t in other))
        assert not [t for t in search if _ngrams(t) & grams]
        assert not set(search) & set(other)
    # the paper's rates, measured: ~60 % of letters flipped, ~6 % of characters moved
    samples = attack.bon_samples("a" * 2000, 0, seed=0, start=0, stop=1)[0]
    assert 0.5 < sum(c == "A" for c in samples) / 2000 < 0.7


def test_best_of_n_stops_at_the_first_answered_sample_and_its_curve_is_monotone():
    from unskill.evals import attack

    requests = [(("user", f"Request number {i}: compute the sum of the first {i + 5} odd numbers please."),)
                for i in range(12)]
    sent = []

    def decide(conversations):
        sent.extend(c[-1][1] for c in conversations)
        refused = np.array([not _answered_when(c[-1][1]) for c in conversations])
        return refused, refused.astype(float) * 2

    result = attack.best_of_n(requests, decide, seed=7)
    steps = attack.BON_N
    for r, request in enumerate(requests):
        stream = attack.bon_samples(request[0][1], r, 7, 0, max(steps))
        answered = [i + 1 for i, text in enumerate(stream) if _answered_when(text)]
        assert result["first_answered"][r] == (answered[0] if answered else None)
        mine = [text for text in sent if text in set(stream)]
        if answered:   # sent up to its chunk's end, never past it
            chunk_end = min(s for s in steps if s >= answered[0])
            assert stream[answered[0] - 1] in mine and len(mine) == chunk_end
        else:
            assert len(mine) == max(steps)
    assert result["queries"] == len(sent)
    curve = [result["success"][str(n)] for n in steps]
    assert curve == sorted(curve) and 0 < curve[-1] and curve[0] < 1
    # --attack-budget: the reported steps end at the budget; a shorter run is the same curve cut there
    assert attack.steps_within(steps, 50) == (1, 2, 5, 10, 20, 50) and attack.steps_within(steps, 30)[-1] == 30
    short = attack.best_of_n(requests, decide, seed=7, steps=attack.steps_within(steps, 50))
    assert all(short["success"][str(n)] == result["success"][str(n)] for n in (1, 2, 5, 10, 20, 50))


def test_search_keeps_the_prompt_that_got_through():
    """The search's answered prompt is the text the guard let through (the report prints it); a request the guard
    never answers spends the whole budget and keeps none. The toy guard answers a suffix holding token 7."""
    from unskill.evals import attack

    requests = [(("user", f"Compute {i} plus {i + 3}."),) for i in range(3)]
    sent = []

    def decide(conversations):
        texts = [c[-1][1] for c in conversations]
        sent.extend(texts)
        refused = np.array(["t7" not in text.split() or "plus 3" in text for text in texts])
        return refused, np.full(len(texts), 2.0)

    result = attack.random_search(requests, decide, vocab_size=10, seed=3, steps=(1, 50, 200),
                                  vocabulary=lambda ids: " ".join(f"t{i}" for i in ids))
    for r, (first, text) in enumerate(zip(result["first_answered"], result["answered"])):
        mine = [t for t in sent if f"Compute {r} plus" in t]
        if r == 0:   # "plus 3" is never answered
            assert first is None and text is None and len(mine) == 200
        else:
            assert first is not None and mine[first - 1] == text and "t7" in text.split()
            assert requests[r][0][1] in text


def test_guard_decision_is_the_runtime_guards_and_its_score_crosses_one_where_it_fires(llama, tmp_path):
    """`guard_decision` returns KSDGuard.check's refusals; its score is <= 1 exactly on refused rows for box,
    gauss and ratio rules with votes."""
    from unskill.evals.attack import guard_decision
    from unskill.runtime.keys import KeyReader
    from unskill.stats.calibrate import key_moments

    generator, _ = llama
    model, tokenizer = generator.model, generator.tokenizer
    prompts = [f"How many apples are left if Tom eats {i} of his {i + 9} apples?" for i in range(16)]
    prompts += [f"Write a python function number {i} that adds two lists." for i in range(16)]
    keys = KeyReader(model, batch_size=8).last_keys([tokenizer.encode_prompt(p) for p in prompts])
    layers = model.manifest.num_layers
    by_output = {model.manifest.key_last_outputs[i]: keys[:, i] for i in range(layers)}
    for setting in (GuardSetting("box", [0, layers - 1], [0.8, 0.8], 2),
                    GuardSetting("gauss", list(range(layers)), [1.0] * layers, 1),
                    GuardSetting("ratio", [0, layers - 1], [1.0, 1.0], 1, bounds=[3.0, 3.0])):
        stats = _stats_from_keys(keys[:10].astype(np.float64), setting)
        stats.fingerprint, stats.arch = model.manifest.fingerprint, model.manifest.arch
        if setting.rule == "ratio":
            stats.groups["ksd_retain"] = key_moments(keys[16:26])
        stats.save(tmp_path / "g.npz")
        guard = KSDGuard([load_stats(tmp_path / "g.npz", model.manifest)], model.manifest)
        refused, score = guard_decision(guard, {n: by_output[n] for n in guard.output_names})
        assert refused.tolist() == [h is not None for h in guard.check(by_output)]
        assert 0 < refused.sum() < len(prompts), setting.rule
        assert ((score <= 1 + 1e-5) == refused).all(), setting.rule


def test_raw_mode_sends_prompts_without_the_chat_template(llama, data_dir):
    """--bypass-format both: the raw sets' keys are those of the plain text (turns joined by blank lines, no
    template), the chat sets' those of the templated prompt; both are scored by the stored rule."""
    from unskill.evals.evaluate import EvalConfig, Harness
    from unskill.evals.tasks import parse_task
    from unskill.runtime.keys import KeyReader

    generator, _ = llama
    model, tokenizer = generator.model, generator.tokenizer
    turns = (("user", "Hi there"), ("assistant", "Hello!"), ("user", "What is 3 plus 4?"))
    raw = tokenizer.encode_turns(turns, chat=False)
    assert raw == tokenizer.encode_text("Hi there\n\nHello!\n\nWhat is 3 plus 4?")
    assert tokenizer.has_chat_template and raw != tokenizer.encode_turns(turns, chat=True)
    apples = [f"How many apples are left if Tom eats {i} of his {i + 9} apples?" for i in range(12)]
    keys = KeyReader(model, batch_size=6).last_keys([tokenizer.encode_prompt(p) for p in apples])
    stats = _stats_from_keys(keys.astype(np.float64), GuardSetting("box", [1], [1.0], 1))
    stats.fingerprint, stats.arch, stats.meta = model.manifest.fingerprint, model.manifest.arch, {"skill": "gsm8k"}
    config = EvalConfig(str(data_dir), gen_limit=4, progress=False, bypass_format="both")
    task = Harness(model, tokenizer, config, {"gsm8k": stats}).run_task(parse_task("bypass:gsm8k"))
    assert task["format"] == "chat" and task["raw"]["format"] == "raw"
    assert set(task["raw"]["sets"]) == set(task["sets"])
    from unskill.evals.bypass import bypass_sets
    part = next(p for p in bypass_sets("gsm8k", str(data_dir), 4) if p.name == "multiturn")
    for chat, sets in ((True, task["sets"]), (False, task["raw"]["sets"])):
        expected = KeyReader(model, 4).last_keys([tokenizer.encode_turns(c, chat) for c in part.conversations], [1])
        inside = (np.abs(expected[:, 0] - stats.groups["ksd"].mean()[1]) <=
                  KSDGuard([stats], model.manifest).cubes[0].halfwidth).all(axis=-1)
        assert sets["multiturn"]["stored"]["gsm8k"] == inside.tolist()


def test_cli_attack_both_formats_and_robustness_report(llama, tmp_path, data_dir):
    """eval --tasks attack:gsm8k --bypass-format both records both attackers' curves per format; the robustness
    report renders them under the command that made them."""
    from unskill.cli import main
    from unskill.stats.datasets import Dataset, Item
    from unskill.stats.probe import ProbeConfig, probe

    generator, onnx_dir = llama
    apples = [f"How many apples are left if Tom eats {i} of his {i + 9} apples?" for i in range(20)]
    probe(generator.model, generator.tokenizer, Dataset("apples", [Item(p) for p in apples]),
          config=ProbeConfig(progress=False), skill="gsm8k").save(tmp_path / "gsm8k.npz")
    out = tmp_path / "attack.json"
    assert main(["eval", "--model", str(onnx_dir), "--tasks", "attack:gsm8k", "--stats",
                 f"gsm8k={tmp_path / 'gsm8k.npz'}", "--gen-limit", "3", "--data-dir", str(data_dir), "--no-cache",
                 "--no-progress", "--bypass-format", "both", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    task = doc["tasks"]["attack:gsm8k"]
    assert set(task["guards"]["gsm8k"]) == {"chat", "raw"} and "--bypass-format both" in doc["command"]
    for run in task["guards"]["gsm8k"].values():
        for attacker in ("bon", "search"):
            curve = list(run[attacker]["success"].values())
            assert curve == sorted(curve) and run[attacker]["requests"] == 3
            assert len(run[attacker]["first_answered"]) == 3
    report = tmp_path / "robustness.md"
    assert main(["report", "--robustness", "--results", str(out), "--out", str(report)]) == 0
    text = report.read_text()
    assert "## Adaptive attackers" in text and "| Best-of-N: prompts | N = 1 |" in text
    assert "| raw |" in text and doc["command"] in text
