"""The KSD guard as graph outputs (exporter/guard_graph.py) against the NumPy guard (runtime/ksd.py), the reference:
decisions identical and scores within 1e-5, for every rule kind (box, gauss, ratio with its cap, k-of-n votes,
the linear discriminant over two layers, a box whose threshold is not 1, the paper's cube asked for with
rule="paper"), at the prompt and at decode steps; the runtime's use of guard.refuse; bad input, a stats file
without a stored rule among it."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from unskill.runtime.generator import GenerationParams
from unskill.runtime.graph_guard import GraphGuard, pooled_applies, skill_scores
from unskill.runtime.ksd import KSDGuard, pool_keys, prompt_window, reads_positions, region_keys
from unskill.runtime.session import left_pad
from unskill.runtime.statsfile import GuardSetting, load_stats

APPLES = [f"How many apples are left if Tom eats {i} of his {i + 9} apples?" for i in range(12)]
OTHERS = ["Write a haiku about the sea.", "def add(a, b): return a + b  # explain", "Bonjour, comment vas-tu ?",
          "What is the capital of Peru?", "Sort a list in Python.", "Tom has 3 apples and eats 1. How many?",
          "apples apples apples", "Tell me a story about a dragon."]


def region_inside(region, by_layer: dict[int, np.ndarray], mask: np.ndarray) -> np.ndarray:
    """(B,) bool: the region holds the row, from layer -> (B, F) last keys or (B, S, F) per-position keys (a
    linear rule over several positions reads its last `positions` of them, or all of them, with the mask in a
    prompt's forward, the rest the last)."""
    spread = by_layer[region.layers[0]] if reads_positions(region) else None
    if spread is not None and spread.ndim == 3 and pooled_applies(spread.shape[1], mask):
        return region.prompt_contains(*prompt_window(region, by_layer.get, mask))
    return region.contains(region_keys(region, lambda layer: by_layer[layer] if by_layer[layer].ndim == 2
                                       else by_layer[layer][:, -1]))


def guard_parity(model_dir: Path, stats_paths: list[Path], prompts: list, decode_steps: int = 0,
                 chat: bool = True, batch_size: int = 8, rule: str | None = None) -> dict:
    """Run `prompts` greedily through the guarded graph for 1 + decode_steps forwards; at every forward assert that
    guard.refuse, guard.refuse.<SKILL> and guard.score.<SKILL> equal the NumPy guard's on the same key_last
    outputs (rule: as the graph was made, None for stored rules or "paper"); at the prompt a linear rule over
    several positions reads the per-position key.* outputs with the attention mask, as the decode loop does.
    Returns {"checks": rows checked, "refused": rows refused, "skills": {skill: refused rows},
    "prompt_refused": per prompt the decision at its prompt}."""
    from unskill.runtime import load

    generator = load(model_dir, device="cpu", threads=2, graph_guard=False)
    model, manifest = generator.model, generator.model.manifest
    guard = KSDGuard([load_stats(path, manifest) for path in stats_paths], manifest, rule=rule)
    skills = manifest.guard["skills"]
    key_names = list(manifest.key_last_outputs)
    fetch = [*key_names, manifest.guard["refuse_output"], *(s["score_output"] for s in skills),
             *(s["refuse_output"] for s in skills)]
    spread = [name for name in guard.prompt_output_names if name not in key_names]   # key.* at the prompt
    summary = {"checks": 0, "refused": 0, "skills": {s["skill"]: 0 for s in skills}, "prompt_refused": []}
    for start in range(0, len(prompts), batch_size):
        encoded = generator.encode(prompts[start:start + batch_size], GenerationParams(chat=chat))
        input_ids, mask = left_pad(encoded, manifest.pad_token_id)
        past = model.empty_past(len(encoded))
        for step in range(1 + decode_steps):
            logits, past, out = model.forward(input_ids, mask, past, [*fetch, *spread] if step == 0 else fetch)
            if step == 0:
                expected = [hit is not None for hit in guard.check({n: out[n] for n in guard.prompt_output_names},
                                                                   mask)]
                summary["prompt_refused"] += expected
            else:
                expected = [hit is not None for hit in guard.check({name: out[name] for name in key_names})]
            assert out["guard.refuse"].tolist() == expected
            by_layer = {layer: out[name] for layer, name in enumerate(key_names)}
            if step == 0:
                by_layer.update({manifest.key_outputs.index(name): out[name] for name in spread})
            for skill, detector, score in zip(skills, guard.detectors, skill_scores(guard, by_layer, mask)):
                inside = np.stack([region_inside(region, by_layer, mask) for region in detector.regions])
                fired = inside.sum(axis=0) >= detector.votes
                assert out[skill["refuse_output"]].tolist() == fired.tolist(), skill["skill"]
                # atol: a linear margin (1 + score - threshold) may sit near 0, where rtol alone means nothing
                np.testing.assert_allclose(out[skill["score_output"]], score, rtol=1e-5, atol=1e-5,
                                           err_msg=skill["skill"])
                summary["skills"][skill["skill"]] += int(fired.sum())
            summary["checks"] += len(expected)
            summary["refused"] += sum(expected)
            input_ids = logits.argmax(axis=-1)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((len(encoded), 1), np.int64)], axis=1)
    return summary


def rule_stats(stats, keys_of_layer: dict[int, np.ndarray], retain_group, out_dir: Path) -> list[Path]:
    """One stats file per rule kind (box, gauss, ratio with a cap, 2-of-3 votes), thresholds near the median score
    of `keys_of_layer` (gap_threshold) so that each rule refuses some rows and passes others, and last one without
    a stored rule ("paper": a guard only when the paper's cube is asked for)."""
    from unskill.runtime.ksd import build_cubes, gauss_score, gaussian, ratio_score

    mean, inverse_sigma = gaussian(stats.groups["ksd"])
    retain_mean, retain_inverse_sigma = gaussian(retain_group)
    layers = sorted(keys_of_layer)
    gauss = {i: gauss_score(keys_of_layer[i], mean[i], inverse_sigma[i]) for i in layers}
    box_alpha = {i: gap_threshold((np.abs(keys_of_layer[i] - c.center) / c.halfwidth).max(axis=-1))
                 for i in layers for c in build_cubes(stats, [i], 1.0, "k")}
    ratio = {i: ratio_score(keys_of_layer[i], mean[i], inverse_sigma[i], retain_mean[i], retain_inverse_sigma[i])
             for i in layers}
    settings = {
        "box": GuardSetting("box", layers[-2:], [box_alpha[i] for i in layers[-2:]]),
        "gauss": GuardSetting("gauss", layers, [gap_threshold(gauss[i]) for i in layers]),
        "ratio": GuardSetting("ratio", layers[-2:], [gap_threshold(ratio[i]) for i in layers[-2:]],
                              bounds=[gap_threshold(gauss[i], near=0.7) for i in layers[-2:]]),
        "votes": GuardSetting("gauss", layers, [gap_threshold(gauss[i], near=0.6) for i in layers], votes=2),
        "linear": linear_setting(keys_of_layer, layers[-2:], forget_rows=len(APPLES)),
        "paper": None,
    }
    paths = []
    for name, setting in settings.items():
        groups = {**stats.groups, "ksd_retain": retain_group} if name == "ratio" else dict(stats.groups)
        variant = replace(stats, guard=setting, groups=groups, meta={**stats.meta, "skill": name})
        paths.append(variant.save(out_dir / f"{name}.npz"))
    return paths


def gap_threshold(values: np.ndarray, near: float = 0.5) -> float:
    """A threshold halfway across the widest gap between neighbouring scores within a quarter of the rows of the
    `near` quantile: no prompt's score sits on or near it, so the graph's float32 and NumPy's rounding cannot split
    on a row (a median of an odd count is a row's own score, and two near-equal middle scores put the threshold
    within rounding of both: both failed the parity test once)."""
    ordered = np.sort(np.asarray(values, np.float64).ravel())
    centre, reach = int(near * len(ordered)), max(1, len(ordered) // 4)
    low, high = max(0, centre - reach), min(len(ordered) - 1, centre + reach)
    widest = low + int(np.argmax(np.diff(ordered[low:high + 1])))
    return float(ordered[widest] + ordered[widest + 1]) / 2


def linear_setting(keys_of_layer: dict[int, np.ndarray], layers: list[int], forget_rows: int, positions: int = 1,
                   position_keys: dict[int, np.ndarray] | None = None, valid: np.ndarray | None = None) -> GuardSetting:
    """A linear rule over `layers` fitted on these keys (the first forget_rows the forget side), its threshold
    across the widest gap near the middle score (gap_threshold) so no prompt key sits on the boundary.
    positions > 1: a rule that also reads the mean key of that many prompt positions, given the prompts'
    per-position keys (layer -> (n, S, F)) and valid (n, S) (left padding False): the last token's threshold
    across the widest gap near the quarter-way score (about a quarter of the prompts fire on their last token), the
    mean key's discriminant fitted on the prompts' mean keys (pool_keys) and its threshold from split_threshold (some
    prompts fire only through the mean key, some only through the last token)."""
    from unskill.runtime.ksd import LinearRegion
    from unskill.stats.discriminant import fit

    def discriminant(keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        fitted = [fit(k[:forget_rows], k[forget_rows:]) for k in keys]
        return (np.stack([w for w, _ in fitted]) / len(layers)).astype(np.float32), \
            np.array([b for _, b in fitted]) / len(layers)

    weights, biases = discriminant([keys_of_layer[i] for i in layers])
    region = LinearRegion("linear", tuple(layers), weights, float(biases.sum()), 0.0)
    scores = region.score(np.stack([keys_of_layer[i] for i in layers], axis=1))
    if positions == 1:
        return GuardSetting("linear", layers, [gap_threshold(scores)], weights=weights, biases=biases)
    last = region.score(np.stack([position_keys[i][:, -1] for i in layers], axis=-2))
    threshold = gap_threshold(last, near=0.25)
    pooled = pool_keys(np.stack([position_keys[i][:, -positions:] for i in layers], axis=-2), valid[:, -positions:])
    pooled_weights, pooled_biases = discriminant([pooled[:, j] for j in range(len(layers))])
    pooled_region = replace(region, pooled_weight=pooled_weights, pooled_bias=float(pooled_biases.sum()))
    return GuardSetting("linear", layers, [threshold], weights=weights, biases=biases, positions=positions,
                        pooled_threshold=split_threshold(pooled_region.pooled_score(pooled), last <= threshold),
                        pooled_weights=pooled_weights, pooled_biases=pooled_biases)


def split_threshold(pooled_scores: np.ndarray, by_last: np.ndarray) -> float:
    """A pooled threshold halfway between two neighbouring pooled scores (no row on the boundary) such that rows
    the last token fires on stay above it, rows it does not fire on fall below it, and other such rows stay
    above it (the most of the fewest of those three); fails where no threshold gives all three."""
    ordered = np.unique(pooled_scores)
    candidates = (ordered[:-1] + ordered[1:]) / 2
    counts = [min(int((by_last & (pooled_scores > t)).sum()), int((~by_last & (pooled_scores <= t)).sum()),
                  int((~by_last & (pooled_scores > t)).sum())) for t in candidates]
    assert max(counts, default=0) > 0, ("no pooled threshold splits these prompts", pooled_scores, by_last)
    return float(candidates[int(np.argmax(counts))])


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny_rules(request, tiny_export, tmp_path_factory):
    """(export dir, [stats path per rule kind]) on a tiny llama (chat template) and a tiny Gemma-3 (none)."""
    from unskill.runtime import load
    from unskill.stats.datasets import Dataset, Item
    from unskill.stats.probe import ProbeConfig, probe

    _, onnx_dir = tiny_export(request.param)
    generator = load(onnx_dir, device="cpu")
    config = ProbeConfig(progress=False)
    stats = probe(generator.model, generator.tokenizer, Dataset("apples", [Item(p) for p in APPLES]), config=config)
    retain = probe(generator.model, generator.tokenizer, Dataset("retain", [Item(p) for p in OTHERS]),
                   config=config).groups["ksd"]
    encoded = generator.encode(APPLES + OTHERS, GenerationParams())
    input_ids, mask = left_pad(encoded, generator.model.manifest.pad_token_id)
    names = generator.model.manifest.key_last_outputs
    _, _, out = generator.model.forward(input_ids, mask, generator.model.empty_past(len(encoded)), names)
    keys = {i: out[name] for i, name in enumerate(names)}
    return onnx_dir, rule_stats(stats, keys, retain, tmp_path_factory.mktemp(f"rules_{request.param}"))


def test_every_rule_kind_in_the_graph_equals_numpy(tiny_rules, tmp_path):
    """One graph carrying four skills, one per stored rule kind, and one with the paper's cube of the rule-less
    file (rule="paper"); prompt and 6 decode steps, batch with left padding."""
    from unskill.exporter.deploy import guard_edit

    onnx_dir, paths = tiny_rules
    stored, rule_less = paths[:-1], paths[-1]
    manifest = guard_edit(onnx_dir, stored, tmp_path / "guarded")
    assert [s["skill"] for s in manifest.guard["skills"]] == ["box", "gauss", "ratio", "votes", "linear"]
    assert manifest.guard["skills"][3]["votes"] == 2
    paper = guard_edit(onnx_dir, [rule_less], tmp_path / "paper", rule="paper")
    assert [(s["skill"], s["rule"]) for s in paper.guard["skills"]] == [("paper", "paper")]
    for directory, chosen, rule in ((tmp_path / "guarded", stored, None), (tmp_path / "paper", [rule_less], "paper")):
        summary = guard_parity(directory, chosen, APPLES + OTHERS, decode_steps=6, rule=rule)
        assert summary["checks"] == 7 * len(APPLES + OTHERS)
        for skill, refused in summary["skills"].items():   # every rule decides both ways somewhere
            assert 0 < refused < summary["checks"], (skill, refused)


SHORT = ["Hi", "2+2", "Sum?"]   # fewer tokens than the multi-position rule reads


def test_linear_rule_over_several_positions_in_the_graph_equals_numpy(tiny_rules, tmp_path):
    """A linear rule that also reads the mean key of 6 prompt positions (positions, pooled_threshold) in the graph:
    at the prompt (left-padded batches, some prompts shorter than 6 tokens) and 3 decode steps guard.refuse /
    guard.score equal KSDGuard.check(keys, mask) and skill_scores (scores within 1e-5); some prompts are refused
    only through the mean key, some only through the last token, some not at all. A deploy folder guarded with
    the same stats file (its key.* outputs gone, the per-position keys read inside) answers as the NumPy guard on
    the full export."""
    from unskill.exporter.deploy import guard_edit, slim
    from unskill.runtime import load

    onnx_dir, paths = tiny_rules
    positions, prompts = 6, APPLES + OTHERS + SHORT
    generator = load(onnx_dir, device="cpu", threads=2)
    manifest = generator.model.manifest
    layers = list(load_stats(paths[4], manifest).guard.layers)
    input_ids, mask = left_pad(generator.encode(prompts, GenerationParams(chat=False)), manifest.pad_token_id)
    _, _, out = generator.model.forward(input_ids, mask, generator.model.empty_past(len(prompts)),
                                        [manifest.key_outputs[i] for i in layers])
    per_position = {i: out[manifest.key_outputs[i]] for i in layers}
    valid = mask > 0
    assert (valid.sum(axis=1) < positions).any()   # prompts shorter than the positions read
    setting = linear_setting({i: per_position[i][:, -1] for i in layers}, layers, len(APPLES), positions,
                             per_position, valid)
    stats = load_stats(paths[4], manifest)
    path = replace(stats, guard=setting, meta={**stats.meta, "skill": "spread"}).save(tmp_path / "spread.npz")
    region = KSDGuard([load_stats(path, manifest)], manifest).detectors[0].regions[0]
    assert (region.positions, region.pooled_threshold) == (positions, setting.pooled_threshold)
    by_last = region.contains(np.stack([per_position[i][:, -1] for i in layers], axis=-2))
    pooled = pool_keys(np.stack([per_position[i][:, -positions:] for i in layers], axis=-2), valid[:, -positions:])
    by_pooled = region.pooled_score(pooled) <= region.pooled_threshold

    guard_edit(onnx_dir, [path], tmp_path / "guarded")
    summary = guard_parity(tmp_path / "guarded", [path], prompts, decode_steps=3, chat=False)
    refused = np.array(summary["prompt_refused"])
    assert refused.tolist() == (by_last | by_pooled).tolist()
    assert (by_pooled & ~by_last).any() and (by_last & ~by_pooled).any() and (~refused).any(), (by_last, by_pooled)
    assert load(tmp_path / "guarded", device="cpu").model.manifest.guard["skills"][0]["positions"] == positions

    # a prompt longer than a prefill chunk runs in chunks (only last-position outputs fetched): its last chunk
    # still holds the 6 positions the rule reads (runtime/session.py), here against one pass over the whole
    from tiny_models import VOCAB
    from unskill.runtime.session import PREFILL_CHUNK

    model = load(tmp_path / "guarded", device="cpu", threads=2, graph_guard=False).model
    guard = KSDGuard([load_stats(path, manifest)], manifest)
    rng = np.random.default_rng(0)
    for width in (PREFILL_CHUNK + 1, PREFILL_CHUNK + 3, PREFILL_CHUNK + 5):
        ids = rng.integers(3, VOCAB, (1, width))
        ones = np.ones_like(ids)
        _, _, chunked = model.forward(ids, ones, model.empty_past(1), ["guard.refuse", "guard.score.spread"])
        _, _, whole = model.forward(ids, ones, model.empty_past(1), guard.prompt_output_names)
        by_layer = {manifest.key_outputs.index(name): whole[name] for name in guard.prompt_output_names}
        # atol 1e-4: the chunked pass attends over its KV cache in other float orders than the single pass
        np.testing.assert_allclose(chunked["guard.score.spread"], skill_scores(guard, by_layer, ones)[0], atol=1e-4)

    slim(onnx_dir, tmp_path / "deploy", guard_stats=[path])
    params = GenerationParams(max_new_tokens=3, chat=False)
    in_graph = load(tmp_path / "deploy", device="cpu", threads=2).generate(prompts, params)
    numpy = load(onnx_dir, [path], device="cpu", threads=2).generate(prompts, params)
    assert isinstance(load(tmp_path / "deploy", device="cpu").guard, GraphGuard)
    assert [(r.abstained, r.abstained_at, r.token_ids) for r in in_graph] == \
           [(r.abstained, r.abstained_at, r.token_ids) for r in numpy]
    assert [r.abstained_at == 0 for r in numpy] == refused.tolist()   # at the prompt: the positions' rule


def test_a_stats_file_without_a_rule_is_refused_before_the_model_loads(tiny_rules, tmp_path):
    """As ksd-run: a rule-less stats file among --stats / --guard is one error naming it, before any work
    (nothing written), unless rule="paper" asks for the paper's cube."""
    from unskill.exporter.deploy import guard_edit, slim
    from unskill.runtime.errors import UnskillError

    onnx_dir, paths = tiny_rules
    for make in (lambda out: guard_edit(onnx_dir, paths, out), lambda out: slim(onnx_dir, out, guard_stats=paths)):
        with pytest.raises(UnskillError, match=f"^{re.escape(str(paths[-1]))} has no calibrated rule: .*--rule paper"):
            make(tmp_path / "out")
        assert not (tmp_path / "out").exists()


def _box_only_graph(manifest, layers: list[int]):
    """A graph whose outputs key_last.{layer} are its inputs: the guard pass over keys chosen by the test."""
    import onnx
    from onnx import TensorProto, helper

    names = [manifest.key_last_outputs[layer] for layer in layers]
    inputs = [helper.make_tensor_value_info(f"in.{layer}", TensorProto.FLOAT, ["batch", manifest.key_width])
              for layer in layers]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", manifest.key_width]) for name in names]
    nodes = [helper.make_node("Identity", [f"in.{layer}"], [name]) for layer, name in zip(layers, names)]
    graph = helper.make_graph(nodes, "keys", inputs, outputs)
    return onnx.helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 18)])


def test_box_threshold_other_than_one_in_the_graph_equals_numpy(tiny_export, llama_stats):
    """Cubes whose Hypercube.threshold is 1.37 and 0.73 (one skill, either cube refuses): guard.refuse equals
    KSDGuard.check and guard.score.SKILL equals skill_scores (margin = score / threshold) on random keys, rows
    a few float32 steps either side of each threshold included."""
    import onnxruntime as ort

    from unskill.exporter.guard_graph import add_guard
    from unskill.runtime.manifest import load_manifest

    _, onnx_dir = tiny_export("llama")
    manifest = load_manifest(onnx_dir)
    layers = [0, manifest.num_layers - 1]
    guard = KSDGuard([llama_stats[0]], manifest, rule="paper", layers=layers)
    detector = guard.detectors[0]
    detector.regions = [replace(region, threshold=threshold)
                        for region, threshold in zip(detector.regions, (1.37, 0.73))]
    guard.cubes = detector.regions
    rng = np.random.default_rng(0)
    rows, width = 256, manifest.key_width
    units = {region.layer: rng.uniform(-1, 1, (rows, width)) * rng.uniform(0.3, 2.2, (rows, 1))
             for region in detector.regions}
    for region in detector.regions:   # 9 rows at this cube's edge (one dimension), far outside the other cube
        edge = np.float32(region.threshold) + np.arange(-4, 5) * np.spacing(np.float32(region.threshold))
        for other in detector.regions:
            near = np.zeros((len(edge), width))
            near[:, rng.integers(width)] = edge if other is region else 5.0
            units[other.layer] = np.concatenate([units[other.layer], near])
    keys = {region.layer: (region.center + (units[region.layer] * region.halfwidth).astype(np.float32))
            for region in detector.regions}
    graph = add_guard(_box_only_graph(manifest, layers), guard, manifest)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    refuse, score = session.run(["guard.refuse", "guard.score.probe"],
                                {f"in.{layer}": keys[layer] for layer in layers})
    expected = [hit is not None for hit in guard.check({manifest.key_last_outputs[i]: keys[i] for i in layers})]
    assert refuse.tolist() == expected and 0.2 < np.mean(expected) < 0.8
    np.testing.assert_array_equal(score, skill_scores(guard, keys)[0])


def test_runtime_uses_the_graph_guard(tiny_rules, tmp_path):
    """load() picks GraphGuard for a guarded folder (no stats, or the same stats) and its results equal the NumPy
    guard's; other stats or an alpha override fall back to NumPy. A deploy folder (slim) carries the guard."""
    from unskill.exporter.deploy import slim
    from unskill.exporter.deploy import guard_edit
    from unskill.runtime import load

    onnx_dir, paths = tiny_rules
    chosen = [paths[1], paths[3]]   # gauss and 2-of-3 votes
    guard_edit(onnx_dir, chosen, tmp_path / "guarded")
    deploy = slim(tmp_path / "guarded", tmp_path / "deploy")
    assert deploy.guard and deploy.model_file == "onnx/model.onnx" and deploy.gqa_query_seqlens is False
    for directory in (tmp_path / "guarded", tmp_path / "deploy"):
        assert isinstance(load(directory, device="cpu").guard, GraphGuard)
        assert isinstance(load(directory, chosen, device="cpu").guard, GraphGuard)
        assert isinstance(load(directory, chosen[:1], device="cpu").guard, KSDGuard)
        assert isinstance(load(directory, chosen, alpha=1.0, device="cpu").guard, KSDGuard)
        params = GenerationParams(max_new_tokens=5)
        in_graph = load(directory, device="cpu").generate(APPLES[:4] + OTHERS[:4], params)
        numpy = load(directory, chosen, device="cpu", graph_guard=False).generate(APPLES[:4] + OTHERS[:4], params)
        assert [(r.abstained, r.skill, r.abstained_at, r.token_ids) for r in in_graph] == \
               [(r.abstained, r.skill, r.abstained_at, r.token_ids) for r in numpy]
        assert any(r.abstained for r in numpy) and not all(r.abstained for r in numpy)


def test_deploy_drops_query_seqlens_and_stores_the_tied_weight_once(tiny_export, tmp_path):
    """The deploy graph's GroupQueryAttention has at most 16 inputs (onnxruntime-node 1.30/1.31) and, where the
    embedding and LM head are tied, one copy of the weight; greedy tokens as the full export."""
    import onnx

    from unskill.exporter.deploy import slim
    from unskill.runtime import load

    from tiny_models import VOCAB

    _, onnx_dir = tiny_export("gemma3")
    manifest = slim(onnx_dir, tmp_path / "deploy")
    graph = onnx.load(str(tmp_path / "deploy" / "onnx" / "model.onnx"), load_external_data=False).graph
    assert all(len(n.input) <= 16 for n in graph.node if n.op_type == "GroupQueryAttention")
    assert manifest.gqa_query_seqlens is False and json.loads((tmp_path / "deploy" / "unskill.json").read_text())[
        "edits"][-1]["tied_embedding"] is True
    vocab = [t for t in graph.initializer if len(t.dims) == 2 and VOCAB in t.dims]
    assert len(vocab) == 1, [(t.name, list(t.dims)) for t in vocab]
    params = GenerationParams(max_new_tokens=8)
    prompts = ["Hello there, how are you?", "One two three four five six seven"]
    full = load(onnx_dir, device="cpu").generate(prompts, params)
    deployed = load(tmp_path / "deploy", device="cpu").generate(prompts, params)
    assert [r.token_ids for r in full] == [r.token_ids for r in deployed]


def test_unknown_region_kind_is_one_clear_error(tiny_export, llama_stats):
    import onnx

    from unskill.exporter.guard_graph import add_guard
    from unskill.runtime.errors import UnskillError
    from unskill.runtime.manifest import load_manifest

    _, onnx_dir = tiny_export("llama")
    manifest = load_manifest(onnx_dir)
    guard = KSDGuard([llama_stats[0]], manifest, rule="paper")
    class Window:   # a region kind the graph pass does not know
        skill, layer = "probe", 0

    guard.detectors[0].regions.append(Window())
    model = onnx.load(str(onnx_dir / manifest.model_file), load_external_data=False)
    with pytest.raises(UnskillError, match="no graph form for the guard region kind Window"):
        add_guard(model, guard, manifest)


def test_cli_edit_guard_bad_input(tiny_export, llama_stats, tmp_path, capsys):
    """`unskill edit guard`: a non-empty --out and a file that is not a stats file exit 2 with one line."""
    from unskill.cli import main as unskill

    _, onnx_dir = tiny_export("llama")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    for stats, out, needle in ((llama_stats[1], tmp_path / "taken", "not empty"),
                               (tmp_path / "bad.npz", tmp_path / "new", "bad.npz"),
                               (llama_stats[1], tmp_path / "new", f"{llama_stats[1]} has no calibrated rule")):
        assert unskill(["edit", "guard", "--model", str(onnx_dir), "--stats", str(stats), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    for args, needle in ((["--guard", str(llama_stats[1])], f"{llama_stats[1]} has no calibrated rule"),
                         (["--rule", "paper"], "give --guard NPZ")):
        assert unskill(["edit", "slim", "--model", str(onnx_dir), "--out", str(tmp_path / "new"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "new").exists()


def test_export_with_guard_and_its_conflicts(tiny_export, llama_stats, tmp_path, capsys):
    """`unskill export --guard NPZ --rule paper` (full target) puts the paper's cube in the export; --guard with
    --no-guard, a bad stats file, and a stats file without a stored rule and no --rule paper fail in one line
    before any export work."""
    from unskill.cli import main as unskill
    from unskill.runtime import load

    hf_dir, _ = tiny_export("llama")
    stats = str(llama_stats[1])
    assert unskill(["export", "--model", str(hf_dir), "--guard", stats, "--rule", "paper", "--out",
                    str(tmp_path / "g"), "--no-progress"]) == 0
    capsys.readouterr()
    manifest = json.loads((tmp_path / "g" / "unskill.json").read_text())
    assert manifest["guard"]["skills"][0]["rule"] == "paper" and manifest["target"] == "full"
    assert isinstance(load(tmp_path / "g", device="cpu").guard, GraphGuard)
    assert (tmp_path / "g" / "probe.onnx").is_file()
    for method in ("na", "prune"):   # they change the keys the guard reads: the guard goes in last
        assert unskill(["edit", method, "--model", str(tmp_path / "g"), "--stats", stats, "--out",
                        str(tmp_path / method)]) == 2
        assert "guard" in capsys.readouterr().err and not (tmp_path / method).exists()
    for extra, needle in ((["--target", "deploy", "--no-guard"], "contradict"),
                          (["--target", "deploy"], f"{stats} has no calibrated rule"), ([], "bad.npz")):
        if not extra:
            (tmp_path / "bad.npz").write_bytes(b"not a zip")
            stats = str(tmp_path / "bad.npz")
        assert unskill(["export", "--model", str(hf_dir), "--guard", stats, "--out", str(tmp_path / "x"),
                        *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "x").exists()


def _position_keys_graph(manifest, layers: list[int], widths: list[int]):
    """A graph whose per-position keys [batch, seq, width] are its inputs in.{layer}, with key_last.{layer}
    gathered from them as the export does (Gather axis 1, index -1) and attention_mask as an input."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs, nodes = [], []
    last = helper.make_tensor("last_position", TensorProto.INT64, [], [-1])
    for layer, width in zip(layers, widths):
        name = manifest.key_last_outputs[layer]
        inputs.append(helper.make_tensor_value_info(f"in.{layer}", TensorProto.FLOAT, ["batch", "seq", width]))
        nodes += [helper.make_node("Identity", [f"in.{layer}"], [f"keys.{layer}"]),
                  helper.make_node("Gather", [f"keys.{layer}", "last_position"], [name], axis=1)]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width]))
    graph = helper.make_graph(nodes, "keys", inputs, outputs, initializer=[last])
    return onnx.helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 18)])


def test_linear_rule_over_positions_of_a_pruned_layer_equals_numpy(tiny_export, llama_stats):
    """A linear rule that also reads the mean key of 5 positions of two layers, one of them pruned (kept_neurons:
    the graph scatters its per-position keys back to full width), on random keys: guard.refuse equals
    KSDGuard.check as the runtime calls it (per-position keys and mask at the prompt, key_last at a decode step)
    and guard.score equals skill_scores within 1e-5, for a left-padded prompt batch (rows of 1 to 7 tokens), a
    continued prompt of 3 tokens after 4 cached ones (fewer positions than the rule reads), a one-token prompt
    (no past: the mean of its one key is read) and a decode step (one token after a past: the last token only).
    Thresholds from the prompt batch's scores: some rows fire only through the mean key, some only through the
    last token, some not at all."""
    import onnxruntime as ort

    from unskill.exporter.guard_graph import add_guard
    from unskill.runtime.ksd import LinearRegion
    from unskill.runtime.manifest import load_manifest

    _, onnx_dir = tiny_export("llama")
    manifest = load_manifest(onnx_dir)
    width, layers, positions = manifest.key_width, [0, manifest.num_layers - 1], 5
    rng = np.random.default_rng(3)
    kept = [sorted(rng.choice(width, width - 17, replace=False).tolist()) if layer == layers[1]
            else list(range(width)) for layer in range(manifest.num_layers)]
    manifest = replace(manifest, kept_neurons=kept)
    weights, pooled_weights = (rng.normal(size=(2, len(layers), width)) / np.sqrt(width)).astype(np.float32)
    biases, pooled_biases = np.array([0.3, 0.0]), np.array([-0.1, 0.05])

    def batch(rows: int, seq: int, lengths: list[int], cached: int):
        keys = {layer: rng.normal(size=(rows, seq, width)).astype(np.float32) for layer in layers}
        for layer in layers:
            keys[layer][..., np.setdiff1d(np.arange(width), kept[layer])] = 0   # removed neurons read 0
        mask = np.zeros((rows, cached + seq), np.int64)
        for row, length in enumerate(lengths):
            mask[row, cached + seq - length:] = 1
        return keys, mask

    cases = [batch(8, 7, [7, 5, 3, 1, 2, 6, 7, 4], 0), batch(4, 3, [3, 3, 3, 3], 4), batch(16, 1, [1] * 16, 0),
             batch(16, 1, [1] * 16, 9)]
    prompt_keys, prompt_mask = cases[0]
    region = LinearRegion("spread", tuple(layers), weights, float(biases.sum()), 0.0, positions, pooled_weights,
                          float(pooled_biases.sum()))
    last = region.score(np.stack([prompt_keys[layer][:, -1] for layer in layers], axis=-2))
    threshold = float(np.quantile(last, 0.3))
    pooled = pool_keys(np.stack([prompt_keys[layer][:, -positions:] for layer in layers], axis=-2),
                       prompt_mask[:, -positions:] > 0)
    setting = GuardSetting("linear", layers, [threshold], weights=weights, biases=biases, positions=positions,
                           pooled_threshold=split_threshold(region.pooled_score(pooled), last <= threshold),
                           pooled_weights=pooled_weights, pooled_biases=pooled_biases)
    stats = replace(llama_stats[0], guard=setting, meta={**llama_stats[0].meta, "skill": "spread"})
    guard = KSDGuard([stats], manifest)
    graph = add_guard(_position_keys_graph(manifest, layers, [len(kept[layer]) for layer in layers]), guard, manifest)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    region = guard.detectors[0].regions[0]
    for index, (keys, mask) in enumerate(cases):
        refuse, score = session.run(["guard.refuse", "guard.score.spread"],
                                    {"attention_mask": mask, **{f"in.{layer}": keys[layer][..., kept[layer]]
                                                                for layer in layers}})
        spread = [hit is not None for hit in guard.check({manifest.key_outputs[l]: keys[l] for l in layers}, mask)]
        last_only = [hit is not None for hit in guard.check({manifest.key_last_outputs[l]: keys[l][:, -1]
                                                             for l in layers})]
        decode = index == 3   # one token after a past: the runtime fetches key_last alone
        assert refuse.tolist() == (last_only if decode else spread), index
        np.testing.assert_allclose(score, skill_scores(guard, keys, mask)[0], rtol=1e-5, atol=1e-5)
        if index == 0:   # the mean key decides some rows, the last token others, and some rows pass
            pooled = pool_keys(np.stack([keys[layer][:, -positions:] for layer in layers], axis=-2),
                               mask[:, -positions:] > 0)
            by_pooled = region.pooled_score(pooled) <= region.pooled_threshold
            by_last = np.array(last_only)
            assert (by_pooled & ~by_last).any() and (by_last & ~by_pooled).any() and (~refuse).any()
        if index >= 2:   # a one-token prompt reads its mean key, a decode step does not
            assert spread != last_only, index
