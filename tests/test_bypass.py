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


def test_bypass_sets_are_deterministic_and_use_held_out_items(data_dir):
    for forget in bypass.FORGET_SKILLS:
        first = bypass.bypass_sets(forget, data_dir, limit=6, seed=3)
        again = bypass.bypass_sets(forget, data_dir, limit=6, seed=3)
        other = bypass.bypass_sets(forget, data_dir, limit=6, seed=4)
        assert [s.conversations for s in first] == [s.conversations for s in again]
        assert [s.conversations for s in first] != [s.conversations for s in other]
        names = [s.name for s in first]
        assert names == list(bypass.FAMILIES[forget]) + list(bypass.RETAIN_SETS)
        assert all(len(s.conversations) == 6 and s.conversations[0][-1][0] == "user" for s in first)
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
    assert all(len(s["stored"]["gsm8k"]) == s["items"] == 4 for s in task["sets"].values())
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
