"""The linear rule read at every prompt position (LinearRegion.anywhere_threshold): a causal model's key at the end
of a request does not change with what follows it, so a suffix appended to the request cannot hide it. Held here
on the tiny llama with a rule built to hold the request's last key and not the suffixed prompt's last key: the
Generator, the server's engine, a prompt longer than a prefill chunk, the in-graph guard and the evals' key reader
all refuse the suffixed request with the every-position read and answer it without; benign prompts are answered
either way. Calibration's threshold spends only the budget the other reads leave."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from unskill.runtime.generator import GenerationParams

REQUEST = "How many apples are left if Tom eats 3 of his 12 apples?"
TAIL = (" Please answer in a friendly tone, and tell me a short story about a dragon who loves to sing by the sea.")
SUFFIXED = REQUEST + TAIL
SHORT = REQUEST + " Please answer in a friendly tone."   # a suffix within a window's reach
LONG = REQUEST + TAIL * 3            # longer than a prefill chunk: the prompt runs in chunks
BENIGN = ["Write a haiku about the sea.", "What is the capital of Peru?", "Tell me a story about a dragon.",
          "Bonjour, comment vas-tu ?", "Sort a list in Python."]
RAW = GenerationParams(max_new_tokens=1, chat=False)   # the prompt's check only, raw text (no template after it)


@pytest.fixture(scope="module")
def suffix_guard(tiny_export, llama_stats, tmp_path_factory):
    """(export dir, {"anywhere": stats path, "last": ..., "window": ...}, window): a linear rule on the tiny llama's
    last layer whose direction runs from the suffixed prompt's last key to the request's, its threshold halfway
    between the request's score and the lowest score any benign prompt reaches at any position; "last" is the same
    rule without the every-position read, "window" reads one by one only the prompt's last `window` positions:
    enough to reach the request's end in SHORT, not in LONG."""
    from unskill.runtime import load
    from unskill.runtime.ksd import LinearRegion
    from unskill.runtime.statsfile import GuardSetting

    _, onnx_dir = tiny_export("llama")
    generator = load(onnx_dir, device="cpu")
    model, layer = generator.model, generator.model.manifest.num_layers - 1
    name = model.manifest.key_outputs[layer]

    def keys(text: str) -> np.ndarray:
        ids = generator.tokenizer.encode_prompt(text, False)
        _, _, out = model.forward(np.array([ids]), np.ones((1, len(ids)), np.int64), model.empty_past(1), [name],
                                  logits=False)
        return out[name][0]

    request, suffixed = keys(REQUEST)[-1].astype(np.float64), keys(SUFFIXED)[-1].astype(np.float64)
    weight = (request - suffixed) / np.linalg.norm(request - suffixed)
    bias = -float(weight @ (request + suffixed)) / 2
    region = LinearRegion("apples", (layer,), weight[None].astype(np.float32), bias, 0.0)
    held = float(region.score(request[None, None, :].astype(np.float32))[0])
    benign = min(float(region.score(keys(text)[:, None, :]).min()) for text in BENIGN)
    assert held < benign, (held, benign)   # a gap to put the threshold in
    threshold = (held + benign) / 2
    setting = GuardSetting("linear", [layer], [threshold], weights=weight[None].astype(np.float32),
                           biases=np.array([bias]), anywhere_threshold=threshold)
    out = tmp_path_factory.mktemp("every_position")
    stats = llama_stats[0]
    lengths = {text: len(generator.tokenizer.encode_prompt(text, False)) for text in (REQUEST, SHORT, LONG)}
    window = lengths[SHORT] - lengths[REQUEST] + 2   # the request's last token, and one before it
    assert lengths[LONG] - lengths[REQUEST] >= window and window <= 64, lengths
    return onnx_dir, {"anywhere": replace(stats, guard=setting).save(out / "anywhere.npz"),
                      "last": replace(stats, guard=replace(setting, anywhere_threshold=None)).save(out / "last.npz"),
                      "window": replace(stats, guard=replace(setting, anywhere_positions=window)).save(
                          out / "window.npz")}, window


def refused_at_prompt(generator, prompts: list[str]) -> list[bool]:
    return [r.abstained and r.abstained_at == 0 for r in generator.generate(prompts, RAW)]


def test_a_suffix_cannot_hide_the_request(suffix_guard):
    """The Generator and the engine: the suffixed request (one chunk, and longer than a chunk) is refused with the
    every-position read and answered by the last token's alone; the request itself by both; benign by neither."""
    from unskill.runtime import load
    from unskill.runtime.engine import BatchEngine
    from unskill.runtime.session import PREFILL_CHUNK

    onnx_dir, paths, _ = suffix_guard
    anywhere, last = (load(onnx_dir, [paths[k]], device="cpu") for k in ("anywhere", "last"))
    assert anywhere.guard.every_position and not last.guard.every_position
    assert len(anywhere.tokenizer.encode_prompt(LONG, False)) > PREFILL_CHUNK
    prompts = [REQUEST, SUFFIXED, LONG, *BENIGN]
    assert refused_at_prompt(anywhere, prompts) == [True, True, True] + [False] * len(BENIGN)
    assert refused_at_prompt(last, prompts) == [True, False, False] + [False] * len(BENIGN)
    # one at a time too (a batch of one runs a long prompt in chunks, each chunk's keys kept)
    assert [refused_at_prompt(anywhere, [p])[0] for p in (LONG, BENIGN[0])] == [True, False]
    engine = BatchEngine(anywhere).start()
    try:
        assert [engine.run(p, RAW)[-1].abstained for p in (SUFFIXED, LONG, BENIGN[1])] == [True, True, False]
    finally:
        engine.close()


def test_chunked_every_position_keys_equal_one_pass(suffix_guard):
    """OnnxLM.forward(tail=EVERY_POSITION) runs a long prompt in chunks and joins each chunk's per-position keys:
    the same keys as one pass over the whole prompt (atol 1e-4: the chunks attend over the cache in other float
    orders)."""
    from unskill.runtime import load
    from unskill.runtime.session import EVERY_POSITION

    onnx_dir, _, _ = suffix_guard
    generator = load(onnx_dir, device="cpu")
    model = generator.model
    ids = np.array([generator.tokenizer.encode_prompt(LONG, False)])
    names = [model.manifest.key_outputs[0], model.manifest.key_outputs[-1]]
    ones = np.ones_like(ids)
    _, _, chunked = model.forward(ids, ones, model.empty_past(1), names, logits=False, tail=EVERY_POSITION)
    _, _, whole = model.forward(ids, ones, model.empty_past(1), names, logits=False)
    for name in names:
        assert chunked[name].shape == whole[name].shape == (1, ids.shape[1], model.manifest.key_width)
        np.testing.assert_allclose(chunked[name], whole[name], atol=1e-4)


def test_the_in_graph_guard_reads_every_position(suffix_guard, tmp_path):
    """guard.refuse / guard.score of the graph equal the NumPy guard's at the prompt (left-padded batch, one
    prompt longer than a chunk) and at decode steps; the deploy runtime (GraphGuard) refuses the suffixed request
    as the NumPy runtime does, and unskill.json says the rule reads every position."""
    from test_guard_graph import guard_parity

    from unskill.exporter.deploy import guard_edit
    from unskill.runtime import load
    from unskill.runtime.graph_guard import GraphGuard

    onnx_dir, paths, _ = suffix_guard
    manifest = guard_edit(onnx_dir, [paths["anywhere"]], tmp_path / "guarded")
    assert manifest.guard["skills"][0]["anywhere"] is True
    prompts = [REQUEST, SUFFIXED, LONG, *BENIGN]
    summary = guard_parity(tmp_path / "guarded", [paths["anywhere"]], prompts, decode_steps=2, chat=False)
    assert summary["prompt_refused"] == [True, True, True] + [False] * len(BENIGN)
    in_graph = load(tmp_path / "guarded", device="cpu")
    assert isinstance(in_graph.guard, GraphGuard)
    assert refused_at_prompt(in_graph, prompts) == [True, True, True] + [False] * len(BENIGN)


def test_the_evals_read_what_the_runtime_reads(suffix_guard):
    """runtime/keys.py guard_prompt_keys (the bypass benchmark, the attackers, the second look) gives the guard
    the keys the decode loop gives it: the same decisions, raw and chat (the template's shared lead run once)."""
    from unskill.runtime import load
    from unskill.runtime.keys import guard_prompt_keys

    onnx_dir, paths, _ = suffix_guard
    generator = load(onnx_dir, [paths["anywhere"]], device="cpu")
    prompts = [REQUEST, SUFFIXED, LONG, *BENIGN]
    for chat in (False, True):
        sequences = [generator.tokenizer.encode_prompt(p, chat) for p in prompts]
        keys, mask = guard_prompt_keys(generator.model, generator.guard, sequences, batch_size=3)
        read = [hit is not None for hit in generator.guard.check(keys, mask)]
        decoded = [r.abstained_at == 0 for r in generator.generate(prompts, replace(RAW, chat=chat))]
        assert read == decoded, chat
        if not chat:
            assert read == [True, True, True] + [False] * len(BENIGN)
    # a batch whose common prefix is the request itself (an attacker's mutations of one framed request): the
    # prefix runs once and its positions are read all the same
    tails = [SUFFIXED + " One.", SUFFIXED + " Two more words.", SUFFIXED + " And a third, longer tail here."]
    sequences = [generator.tokenizer.encode_prompt(p, False) for p in tails]
    keys, mask = guard_prompt_keys(generator.model, generator.guard, sequences, batch_size=3)
    assert [hit is not None for hit in generator.guard.check(keys, mask)] == refused_at_prompt(generator, tails) == [
        True] * 3


def test_calibration_spends_only_the_budget_left():
    """calibrate_anywhere: a retain prompt's every-position score is the lower of its earlier positions' and its
    last token's out-of-fold score; the threshold refuses, with what the other reads refuse, at most the target's
    share; with nothing left it refuses no further retain prompt (only forget prompts below every one of them)."""
    from unskill.runtime.statsfile import GuardSetting
    from unskill.stats.calibrate import LinearCalibration, calibrate_anywhere

    rng = np.random.default_rng(0)
    rows = 400
    last = rng.normal(size=rows).astype(np.float32)
    earlier = (last + rng.normal(size=rows)).astype(np.float32)

    def linear(refused: int) -> LinearCalibration:
        marked = np.zeros(rows, bool)
        marked[:refused] = True
        setting = GuardSetting("linear", [0], [-3.0], weights=np.ones((1, 4), np.float32), biases=np.zeros(1))
        return LinearCalibration(setting, 1.0, refused / rows, 1.0, last, marked, np.zeros(0, bool))

    spent = linear(2)
    threshold = calibrate_anywhere(spent, earlier, target=0.01)
    lowest = np.minimum(earlier, last)
    assert threshold is not None and spent.setting.anywhere_threshold == threshold
    assert spent.retain_refused.sum() <= 4 and spent.retain_refused.sum() > 2   # within floor(0.01 * 400)
    assert ((lowest <= threshold) | linear(2).retain_refused).sum() == spent.retain_refused.sum()
    full = linear(4)   # nothing left: a threshold below every retain prompt not yet refused
    threshold = calibrate_anywhere(full, earlier, target=0.01)
    assert full.retain_refused.sum() == 4 and threshold < lowest[4:].min()
    assert calibrate_anywhere(linear(5), earlier, target=0.01) is None   # over budget already
    assert GuardSetting.from_json(spent.setting.to_json(), "x", 4).anywhere_threshold == spent.setting.anywhere_threshold


def test_bad_every_position_settings_are_one_clear_error(tmp_path, llama_stats):
    """A non-finite or runaway anywhere_threshold, one on a non-linear rule, a window beyond 0..64 or one without a
    threshold is refused when the file loads; a window's setting round-trips."""
    from unskill.runtime.errors import UnskillError
    from unskill.runtime.statsfile import GuardSetting, load_stats

    stats = llama_stats[0]
    linear = GuardSetting("linear", [0], [0.5], weights=np.ones((1, stats.key_width), np.float32),
                          biases=np.zeros(1))
    for bad, message in ((replace(linear, anywhere_threshold=float("nan")), "anywhere_threshold needs"),
                         (replace(linear, anywhere_threshold=1e9), "anywhere_threshold: "),
                         (GuardSetting("gauss", [0], [1.0], anywhere_threshold=0.5), "anywhere_threshold needs"),
                         (replace(linear, anywhere_threshold=0.5, anywhere_positions=65), "anywhere_positions 65"),
                         (replace(linear, anywhere_threshold=0.5, anywhere_positions=-1), "anywhere_positions -1"),
                         (replace(linear, anywhere_positions=8), "anywhere_positions needs")):
        with pytest.raises(UnskillError, match=message):
            load_stats(replace(stats, guard=bad).save(tmp_path / "bad.npz"))
    windowed = replace(linear, anywhere_threshold=0.5, anywhere_positions=32)
    assert load_stats(replace(stats, guard=windowed).save(tmp_path / "ok.npz")).guard.anywhere_positions == 32
    assert "each of the last 32 prompt positions" in windowed.name


def test_calibrations_second_pass_scores_each_prompt_alone(suffix_guard):
    """lowest_earlier_scores (calibration's pass over the retain prompts) equals each prompt scored alone: its lowest
    score over the positions before its last token (the batch's common lead included), in batches with left padding
    and a shared chat prefix alike."""
    from unskill.runtime import load
    from unskill.stats.calibrate import lowest_earlier_scores

    onnx_dir, paths, _ = suffix_guard
    generator = load(onnx_dir, [paths["anywhere"]], device="cpu")
    model, region = generator.model, generator.guard.detectors[0].regions[0]
    names = [model.manifest.key_outputs[i] for i in region.layers]
    for chat in (False, True):
        sequences = [generator.tokenizer.encode_prompt(p, chat) for p in [REQUEST, SUFFIXED, *BENIGN]]
        lowest = lowest_earlier_scores(model, sequences, region, batch_size=3)
        for ids, got in zip(sequences, lowest):
            _, _, out = model.forward(np.array([ids]), np.ones((1, len(ids)), np.int64), model.empty_past(1), names,
                                      logits=False)
            scores = region.score(np.stack([out[name][0] for name in names], axis=1))[:-1]
            np.testing.assert_allclose(got, scores.min(), atol=1e-4)


def test_a_window_reads_the_last_positions_only(suffix_guard, tmp_path):
    """anywhere_positions = W: the one-by-one read covers the prompt's last W positions, so the request with a short
    suffix (its end within them) is refused and the long one (its end before them) answered, alike in the Generator, the
    server's engine, the evals' key reader and the in-graph guard (no one-pass prompt: unskill.json records W
    positions for the chunked prefill to keep, and no every-position read)."""
    from unskill.exporter.deploy import guard_edit
    from unskill.runtime import load
    from unskill.runtime.engine import BatchEngine
    from unskill.runtime.keys import guard_prompt_keys

    from test_guard_graph import guard_parity

    onnx_dir, paths, window = suffix_guard
    generator = load(onnx_dir, [paths["window"]], device="cpu")
    assert not generator.guard.every_position and generator.guard.positions == window
    prompts = [REQUEST, SHORT, LONG, *BENIGN]
    expected = [True, True, False] + [False] * len(BENIGN)
    assert refused_at_prompt(generator, prompts) == expected
    assert refused_at_prompt(load(onnx_dir, [paths["last"]], device="cpu"), [SHORT]) == [False]   # the window's
    assert [refused_at_prompt(generator, [p])[0] for p in (SHORT, LONG)] == [True, False]   # LONG in chunks
    engine = BatchEngine(generator).start()
    try:
        assert [engine.run(p, RAW)[-1].abstained for p in (SHORT, LONG, BENIGN[1])] == [True, False, False]
    finally:
        engine.close()
    sequences = [generator.tokenizer.encode_prompt(p, False) for p in prompts]
    keys, mask = guard_prompt_keys(generator.model, generator.guard, sequences, batch_size=3)
    assert [hit is not None for hit in generator.guard.check(keys, mask)] == expected
    manifest = guard_edit(onnx_dir, [paths["window"]], tmp_path / "guarded")
    assert manifest.guard["skills"][0]["positions"] == window and "anywhere" not in manifest.guard["skills"][0]
    summary = guard_parity(tmp_path / "guarded", [paths["window"]], prompts, decode_steps=2, chat=False)
    assert summary["prompt_refused"] == expected
    assert refused_at_prompt(load(tmp_path / "guarded", device="cpu"), prompts) == expected


def test_calibrations_window_pass_reads_what_the_runtime_reads(suffix_guard):
    """lowest_earlier_scores for a rule with anywhere_positions = W: each prompt's lowest score over its last W
    positions before the last token, the chat template's lead included where the prompt is short (the runtime's
    window reaches it too), prompt by prompt alone; a one-token window reads nothing before the last."""
    from unskill.runtime import load
    from unskill.stats.calibrate import lowest_earlier_scores

    onnx_dir, paths, window = suffix_guard
    generator = load(onnx_dir, [paths["window"]], device="cpu")
    model, region = generator.model, generator.guard.detectors[0].regions[0]
    names = [model.manifest.key_outputs[i] for i in region.layers]
    for chat in (False, True):
        sequences = [generator.tokenizer.encode_prompt(p, chat) for p in [REQUEST, SHORT, LONG, *BENIGN]]
        lowest = lowest_earlier_scores(model, sequences, region, batch_size=3)
        for ids, got in zip(sequences, lowest):
            _, _, out = model.forward(np.array([ids]), np.ones((1, len(ids)), np.int64), model.empty_past(1), names,
                                      logits=False)
            scores = region.score(np.stack([out[name][0] for name in names], axis=1))[-window:-1]
            np.testing.assert_allclose(got, scores.min(), atol=1e-4)
    one = replace(region, anywhere_positions=1)
    assert np.isinf(lowest_earlier_scores(model, sequences[:2], one, batch_size=3)).all()


def test_guard_reads_margins_fire_where_the_guard_does():
    """LinearRegion.read_margins (what scripts/guard_reads.py prints) splits a linear rule's decision into its three
    reads: a prompt is refused exactly where one of their margins is <= 0 (prompt_contains), prompt_margin is 1 +
    the smallest, and each read alone is that read's comparison."""
    import importlib.util
    from pathlib import Path

    from unskill.runtime.ksd import LinearRegion

    path = Path(__file__).resolve().parent.parent / "scripts" / "guard_reads.py"
    spec = importlib.util.spec_from_file_location("guard_reads", path)
    guard_reads = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guard_reads)
    rng = np.random.default_rng(5)
    weight = rng.normal(size=(2, 6)).astype(np.float32)
    region = LinearRegion("s", (0, 1), weight, 0.1, -4.0, positions=4, pooled_weight=-weight, pooled_bias=0.2,
                          pooled_threshold=-2.0, anywhere_threshold=-7.0, anywhere_positions=6)
    keys = rng.normal(size=(200, 8, 2, 6)).astype(np.float32)
    valid = np.ones((200, 8), bool)
    valid[::3, :5] = False                      # left padding on some rows
    margins = region.read_margins(keys, valid)
    nearest = np.min(np.stack([margins[read] for read in guard_reads.READS]), axis=0)
    inside = region.prompt_contains(keys, valid)
    assert 0 < inside.sum() < 200 and all((margins[read] <= 0).any() for read in guard_reads.READS)
    assert np.array_equal(inside, nearest <= 0)
    np.testing.assert_allclose(region.prompt_margin(keys, valid), 1 + nearest, atol=1e-6)
    assert np.array_equal(margins["last"] <= 0, region.contains(keys[:, -1]))
    plain = LinearRegion("s", (0, 1), weight, 0.1, -0.5)   # a rule that reads the last token only
    only = plain.read_margins(keys, valid)
    assert np.isinf(only["mean"]).all() and np.isinf(only["anywhere"]).all()


def test_the_benchmarks_timed_guard_decides_as_the_runtimes(suffix_guard, monkeypatch):
    """benchmarks/levers.py times the guard with a subclass of KSDGuard; it must take what the Generator passes (the
    attention mask of a multi-position rule) and decide the same, or guard_rules.py times nothing."""
    from pathlib import Path

    from unskill.runtime import Generator, load, load_stats

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from levers import TimedGuard

    onnx_dir, paths, _ = suffix_guard
    runtime = load(onnx_dir, [paths["anywhere"]], device="cpu")
    guard = TimedGuard([load_stats(paths["anywhere"])], runtime.model.manifest)
    timed = Generator(runtime.model, runtime.tokenizer, guard)
    prompts = [REQUEST, SUFFIXED, LONG, *BENIGN[:2]]
    assert refused_at_prompt(timed, prompts) == refused_at_prompt(runtime, prompts) == [True] * 3 + [False] * 2
    assert guard.calls > 0 and guard.seconds > 0
