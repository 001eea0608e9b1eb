"""Stats: streaming moments, the probe passes, merging, the .npz format and the `unskill stats`/`data` CLI.

Real tiny models exported to ONNX and run by onnxruntime; the expected values come from NumPy over
activations this file computes itself, one unpadded prompt at a time, straight from the ONNX session.
"""

import json

import numpy as np
import pytest

from unskill.cli import main
from unskill.runtime import UnskillError, load
from unskill.runtime.session import OnnxLM
from unskill.runtime.statsfile import GROUP_FIELDS, PROBED_GROUPS, SCHEMA_VERSION, Moments, StatsFile, load_stats
from unskill.runtime.tokenizer import TextTokenizer
from unskill.stats.datasets import load_dataset
from unskill.stats.probe import (MIN_SHARED_PREFIX, ProbeConfig, last_position_keys, merge_stats, probe,
                                 shared_prefix_length)

from tiny_models import CHAT_TEMPLATE

FORGET = [
    ("What is 2+2?", "4"),
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
     "How many clips did Natalia sell altogether in April and May?", "48 + 24 = 72"),
    ("How many apples are left if Tom eats 3 of his 12 apples?", "12 - 3 = 9 apples."),
    ("Compute 7 times 6.", "42"),
    ("Tom has 5 apples and buys 7 more. How many apples does he have?", "5 + 7 = 12"),
    ("Half of 48?", "24"),
    ("If a fox jumps over 3 dogs each day, how many dogs does it jump over in a week?", "3 * 7 = 21"),
    ("What is 100 - 37?", "63"),
    ("Natalia sold 12 clips.", ""),
    ("Add 9 and 10, then double it.", "(9 + 10) * 2 = 38"),
]
RETAIN = [
    ("The capital of France is", "Paris."),
    ("The quick brown fox", "jumps over the lazy dog."),
    ("Name a colour.", "Blue"),
    ("Tell me about the lazy dog that the quick brown fox jumps over every single morning.", "It sleeps."),
    ("Say hello.", "Hello!"),
]


def write_jsonl(path, rows, prompt_key="prompt", completion_key="completion"):
    path.write_text("".join(json.dumps({prompt_key: p, completion_key: c}) + "\n" for p, c in rows))
    return path


def single_run(model: OnnxLM, ids: list[int], names: list[str]) -> dict[str, np.ndarray]:
    """One unpadded sequence through the raw onnxruntime session; returns outputs [S, F] by name."""
    feeds = {}
    for inp in model.session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = np.array([ids], dtype=np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, len(ids)), dtype=np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(len(ids), dtype=np.int64)[None]
        elif inp.name.startswith("past_key_values."):
            assert inp.type == "tensor(float)"
            feeds[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), dtype=np.float32)
        else:
            raise AssertionError(f"unexpected graph input {inp.name}")
    return {name: value[0] for name, value in zip(names, model.session.run(names, feeds))}


def all_arrays(stats: StatsFile) -> dict[str, np.ndarray]:
    out = {}
    for group, moments in stats.groups.items():
        out[f"{group}.count"] = moments.count
        out.update({f"{group}.{name}": value for name, value in moments.values.items()})
    return out


def rewrite(src, dst, **changes):
    """Copy a stats .npz with some arrays replaced (None drops one)."""
    with np.load(src, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value
    np.savez(dst, **arrays)
    return dst


# --------------------------------------------------------------------------- fixtures

class Model:
    def __init__(self, onnx_dir):
        self.dir = onnx_dir
        self.lm = OnnxLM(onnx_dir, device="cpu")
        self.manifest = self.lm.manifest
        self.tok = TextTokenizer(onnx_dir, self.manifest)

    def probe(self, forget, retain=None, skill=None, **config):
        return probe(self.lm, self.tok, forget, retain, ProbeConfig(progress=False, **config), skill)


@pytest.fixture(scope="module")
def llama(tiny_export):
    return Model(tiny_export("llama")[1])


@pytest.fixture(scope="module")
def gpt2(tiny_export):
    return Model(tiny_export("gpt2")[1])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats_data")
    return {
        "forget": write_jsonl(root / "forget.jsonl", FORGET),
        "forget_a": write_jsonl(root / "forget_a.jsonl", FORGET[:6]),
        "forget_b": write_jsonl(root / "forget_b.jsonl", FORGET[6:]),
        "retain": write_jsonl(root / "retain.jsonl", RETAIN, "question", "answer"),
        "retain_a": write_jsonl(root / "retain_a.jsonl", RETAIN[:2], "question", "answer"),
        "retain_b": write_jsonl(root / "retain_b.jsonl", RETAIN[2:], "question", "answer"),
    }


@pytest.fixture(scope="module")
def llama_stats(llama, files, tmp_path_factory):
    """Default config (batch 8, so two left-padded batches of unequal lengths), with a retain set."""
    stats = llama.probe(load_dataset(str(files["forget"])), load_dataset(str(files["retain"])))
    return stats, stats.save(tmp_path_factory.mktemp("llama_stats") / "forget.npz")


@pytest.fixture(scope="module")
def gpt2_stats_path(gpt2, files, tmp_path_factory):
    stats = gpt2.probe(load_dataset(str(files["forget"])))
    return stats.save(tmp_path_factory.mktemp("gpt2_stats") / "gpt2.npz")


# --------------------------------------------------------------------------- 1. Moments

def fields():
    return GROUP_FIELDS["ksd"] + ("abs_sum", "pos_count")


def test_moments_in_chunks_equal_numpy():
    rng = np.random.default_rng(0)
    layers, width = 2, 7
    data = [rng.normal(3.0, 2.0, size=(n, width)).astype(np.float32) for n in (1, 5, 0, 13, 2)]
    moments = Moments.empty(fields(), layers, width)
    for chunk in data:
        moments.add(0, chunk)
        moments.add(1, -chunk[:, ::-1])
    for layer, rows in enumerate([np.concatenate(data), -np.concatenate(data)[:, ::-1]]):
        rows = rows.astype(np.float64)
        assert moments.count[layer] == len(rows) == 21
        np.testing.assert_allclose(moments.mean()[layer], rows.mean(0), rtol=1e-12)
        np.testing.assert_allclose(moments.std()[layer], rows.std(0, ddof=1), rtol=1e-9)
        np.testing.assert_allclose(moments.std(ddof=0)[layer], rows.std(0, ddof=0), rtol=1e-9)
        np.testing.assert_array_equal(moments.values["min"][layer], rows.min(0))
        np.testing.assert_array_equal(moments.values["max"][layer], rows.max(0))
        np.testing.assert_allclose(moments.mean("abs_sum")[layer], np.abs(rows).mean(0), rtol=1e-12)
        np.testing.assert_array_equal(moments.values["pos_count"][layer], (rows > 0).sum(0))
    # a standard deviation, not a variance: sigma is about 2, so a variance would be about 4
    std = moments.std()
    assert np.all((std > 1.0) & (std < 3.5))
    assert not np.allclose(std, np.concatenate(data).astype(np.float64).var(0, ddof=1))


def test_moments_merge_equals_one_pass():
    rng = np.random.default_rng(1)
    layers, width = 3, 5
    first_rows = [rng.normal(size=(n, width)) for n in (4, 9, 0)]
    second_rows = [rng.normal(-1, 3, size=(n, width)) for n in (6, 1, 3)]
    first, second, whole = (Moments.empty(fields(), layers, width) for _ in range(3))
    for layer in range(layers):
        first.add(layer, first_rows[layer])
        second.add(layer, second_rows[layer])
        whole.add(layer, first_rows[layer])
        whole.add(layer, second_rows[layer])
    merged = first.merge(second)
    np.testing.assert_array_equal(merged.count, whole.count)
    assert list(merged.count) == [10, 10, 3]
    for name in merged.fields:
        np.testing.assert_allclose(merged.values[name], whole.values[name], rtol=1e-12)
    np.testing.assert_allclose(merged.std(), whole.std(), rtol=1e-12)
    # merging leaves both operands untouched
    assert list(first.count) == [4, 9, 0] and list(second.count) == [6, 1, 3]


def test_moments_empty_layers(llama, tmp_path):
    m = llama.manifest
    moments = Moments.empty(GROUP_FIELDS["ksd"], m.num_layers, m.key_width)
    rows = np.arange(2 * m.key_width, dtype=np.float32).reshape(2, m.key_width)
    moments.add(0, rows)
    moments.add(1, rows[:0])            # no rows: a no-op
    assert list(moments.count) == [2, 0, 0]
    assert np.all(moments.mean()[1:] == 0) and np.all(moments.std()[1:] == 0)
    assert np.all(moments.values["min"][1:] == np.inf) and np.all(moments.values["max"][1:] == -np.inf)
    assert np.all(moments.std()[0] == pytest.approx(np.sqrt(m.key_width ** 2 / 2)))
    # merging with an empty layer keeps the other side's min/max; the file round-trips infinities of empty layers
    merged = moments.merge(Moments.empty(GROUP_FIELDS["ksd"], m.num_layers, m.key_width))
    np.testing.assert_array_equal(merged.values["min"], moments.values["min"])
    stats = StatsFile(m.fingerprint, m.arch, m.key_width, m.num_layers, {"skill": "x"}, {"ksd": moments})
    loaded = load_stats(stats.save(tmp_path / "partial.npz"), m)
    np.testing.assert_array_equal(loaded.groups["ksd"].values["min"], moments.values["min"])
    assert list(loaded.groups["ksd"].count) == [2, 0, 0]


# --------------------------------------------------------------------------- 2. probe vs independent runs

def test_probe_matches_single_unpadded_runs(llama, files, llama_stats):
    stats, _ = llama_stats
    m = llama.manifest
    forget, retain = load_dataset(str(files["forget"])), load_dataset(str(files["retain"]))
    assert len(forget) == len(FORGET) and retain.items[0].completion == "Paris."

    prompt_ids = [llama.tok.encode_prompt(p, chat=True) for p, _ in FORGET]
    assert len({len(ids) for ids in prompt_ids}) > 3      # padding really happens in the batched run
    assert all(ids[-1] == llama.tok.tokenizer.token_to_id("<|assistant|>") for ids in prompt_ids)
    last = [single_run(llama.lm, ids, m.key_outputs) for ids in prompt_ids]
    ksd = stats.groups["ksd"]
    assert list(ksd.count) == [len(FORGET)] * m.num_layers
    for layer, name in enumerate(m.key_outputs):
        keys = np.stack([out[name][-1] for out in last]).astype(np.float64)
        assert keys.shape == (len(FORGET), m.key_width)
        np.testing.assert_allclose(ksd.mean()[layer], keys.mean(0), atol=1e-4)
        np.testing.assert_allclose(ksd.values["min"][layer], keys.min(0), atol=1e-4)
        np.testing.assert_allclose(ksd.values["max"][layer], keys.max(0), atol=1e-4)
        np.testing.assert_allclose(ksd.std()[layer], keys.std(0, ddof=1), atol=1e-4)

    for side, rows in (("forget", FORGET), ("retain", RETAIN)):
        texts = [f"{p}\n{c}" if c else p for p, c in rows]
        token_ids = [llama.tok.encode_text(t) for t in texts]
        outs = [single_run(llama.lm, ids, m.preact_outputs + m.key_outputs) for ids in token_ids]
        total = sum(map(len, token_ids))
        na, sp = stats.groups[f"na_{side}"], stats.groups[f"sp_{side}"]
        assert list(na.count) == [total] * m.num_layers
        assert list(sp.count) == [total] * m.num_layers
        for layer in range(m.num_layers):
            pre = np.concatenate([o[m.preact_outputs[layer]] for o in outs]).astype(np.float64)
            key = np.concatenate([o[m.key_outputs[layer]] for o in outs]).astype(np.float64)
            assert pre.shape == (total, m.key_width) and key.shape == (total, m.key_width)
            np.testing.assert_allclose(na.mean()[layer], pre.mean(0), atol=1e-4)
            np.testing.assert_allclose(na.std()[layer], pre.std(0, ddof=1), atol=1e-4)
            np.testing.assert_allclose(sp.mean("abs_sum")[layer], np.abs(key).mean(0), atol=1e-4)
            assert np.abs(sp.values["pos_count"][layer] - (key > 0).sum(0)).max() <= 1


def test_probe_graph_with_shared_prefix_matches_single_runs(llama):
    """The keys-only graph (no LM head, weights read from model.onnx.data) run after one shared prefill of
    the chat template's common prefix gives every prompt's last-token keys of the full graph run alone."""
    import onnx

    m = llama.manifest
    keys_model = llama.lm.key_only()
    assert keys_model is not llama.lm and "logits" not in keys_model.output_names
    assert set(m.key_last_outputs) <= keys_model.output_names
    graph = onnx.load(str(llama.dir / m.probe_file), load_external_data=False)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {"model.onnx.data"}

    header = "Answer the following question carefully, briefly and in English. "   # like a system turn
    prompts = [llama.tok.encode_prompt(header + p, chat=True) for p, _ in FORGET]
    assert shared_prefix_length(prompts) >= MIN_SHARED_PREFIX
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2    # one token is always left to run
    got = {}
    for rows, values in last_position_keys(keys_model, prompts, m.key_last_outputs, batch_size=4):
        got.update({index: [values[name][row] for name in m.key_last_outputs] for row, index in enumerate(rows)})
    assert sorted(got) == list(range(len(prompts)))
    for index, ids in enumerate(prompts):
        alone = single_run(llama.lm, ids, m.key_outputs)
        for layer, name in enumerate(m.key_outputs):
            np.testing.assert_allclose(got[index][layer], alone[name][-1], atol=1e-4)


def test_probe_meta_and_groups(llama, gpt2, files, llama_stats):
    stats, _ = llama_stats
    assert set(stats.groups) == set(PROBED_GROUPS)
    assert stats.meta["prompt_template"] == {"chat": True, "template": CHAT_TEMPLATE}
    assert stats.meta["forget"] == {"name": f"file:{files['forget']}", "count": len(FORGET)}
    assert stats.meta["retain"] == {"name": f"file:{files['retain']}", "count": len(RETAIN)}
    assert stats.skill == f"file:{files['forget']}"
    assert (stats.fingerprint, stats.num_layers, stats.key_width) == (
        llama.manifest.fingerprint, llama.manifest.num_layers, llama.manifest.key_width)

    forget = load_dataset(str(files["forget_a"]))
    only_ksd = llama.probe(forget, chat=False)
    assert set(only_ksd.groups) == {"ksd"} and only_ksd.meta["retain"] is None
    assert only_ksd.meta["prompt_template"] == {"chat": False, "template": None}
    assert gpt2.probe(forget).meta["prompt_template"] == {"chat": False, "template": None}   # no template
    chat = llama.probe(forget, skill="arith")
    assert chat.skill == "arith"
    assert not np.allclose(chat.groups["ksd"].mean(), only_ksd.groups["ksd"].mean())        # template matters


def test_text_pass_stops_at_model_context(gpt2, tmp_path):
    """GPT-2's position table ends at max_context; a longer text must be cut there, not crash onnxruntime."""
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
    assert len(gpt2.tok.encode_text(long)) > gpt2.manifest.max_context
    data = load_dataset(str(write_jsonl(tmp_path / "long.jsonl", [("What is 2+2?", long)])))
    stats = gpt2.probe(data, data, max_text_tokens=100_000)
    assert list(stats.groups["na_forget"].count) == [gpt2.manifest.max_context] * gpt2.manifest.num_layers


# --------------------------------------------------------------------------- 3. merging

def test_merge_of_shards_equals_stats_of_union(llama, files):
    """batch_size=1: every sequence runs alone, so the shards see the same activations as the union."""
    a = llama.probe(load_dataset(str(files["forget_a"])), load_dataset(str(files["retain_a"])), batch_size=1)
    b = llama.probe(load_dataset(str(files["forget_b"])), load_dataset(str(files["retain_b"])), batch_size=1)
    union = llama.probe(load_dataset(str(files["forget"])), load_dataset(str(files["retain"])), batch_size=1)
    merged = merge_stats(a, b)
    expected, got = all_arrays(union), all_arrays(merged)
    assert set(got) == set(expected) and len(got) == 5 + sum(len(GROUP_FIELDS[g]) for g in PROBED_GROUPS)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)
    assert merged.meta["forget"]["count"] == len(FORGET) and merged.meta["retain"]["count"] == len(RETAIN)
    assert merged.meta["prompt_template"] == union.meta["prompt_template"]


def test_compose_uses_the_other_shards_forget_text_as_retain(llama, files, tmp_path):
    """One --text shard per skill; composing A against B equals probing forget A with retain B."""
    from unskill.stats.probe import compose_stats

    forget, retain = load_dataset(str(files["forget"])), load_dataset(str(files["retain"]))
    direct = llama.probe(forget, retain, batch_size=1)
    shard_a = probe(llama.lm, llama.tok, forget, config=ProbeConfig(progress=False, batch_size=1), text=True)
    shard_b = probe(llama.lm, llama.tok, retain, config=ProbeConfig(progress=False, batch_size=1), text=True)
    assert set(shard_a.groups) == {"ksd", "na_forget", "sp_forget"}
    shard_a.save(tmp_path / "a.npz")
    shard_b.save(tmp_path / "b.npz")
    out = tmp_path / "a_vs_b.npz"
    assert main(["stats", "--compose", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out", str(out)]) == 0
    composed = load_stats(out)
    expected, got = all_arrays(direct), all_arrays(composed)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-9, atol=1e-12, err_msg=name)
    assert composed.meta["retain"]["count"] == len(RETAIN)
    with pytest.raises(UnskillError, match="probe it with --text"):
        compose_stats(direct, [llama.probe(retain)])


def test_merge_refuses_mismatched_shards(llama, tiny_export, files):
    forget = load_dataset(str(files["forget_a"]))
    gemma = Model(tiny_export("gemma3")[1])
    shape = (llama.manifest.num_layers, llama.manifest.key_width)
    assert (gemma.manifest.num_layers, gemma.manifest.key_width) == shape
    ours = llama.probe(forget)
    with pytest.raises(UnskillError, match="different models"):
        merge_stats(ours, gemma.probe(forget))
    with pytest.raises(UnskillError, match="prompt templates"):
        merge_stats(ours, llama.probe(forget, chat=False))
    with pytest.raises(UnskillError, match="different groups"):
        merge_stats(ours, llama.probe(forget, load_dataset(str(files["retain_a"]))))


# --------------------------------------------------------------------------- 4. the .npz file

def test_save_load_round_trip(llama, llama_stats, tmp_path):
    stats, path = llama_stats
    loaded = load_stats(path, llama.manifest)
    assert (loaded.fingerprint, loaded.arch, loaded.key_width, loaded.num_layers) == (
        stats.fingerprint, stats.arch, stats.key_width, stats.num_layers)
    assert loaded.meta == stats.meta
    before, after = all_arrays(stats), all_arrays(loaded)
    assert set(before) == set(after)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
        assert after[name].dtype == (np.int64 if name.endswith(".count") else np.float64)
    # loads without pickle, and saving again gives the same arrays
    again = load_stats(loaded.save(tmp_path / "sub" / "again.npz"))
    for name, value in all_arrays(again).items():
        np.testing.assert_array_equal(value, before[name])
    assert list(tmp_path.joinpath("sub").iterdir()) == [tmp_path / "sub" / "again.npz"]   # no temp files left


def bad_files(good, tmp_path, llama):
    L, F = llama.manifest.num_layers, llama.manifest.key_width
    nan_sum = np.full((L, F), 0.5)
    nan_sum[1, 3] = np.nan
    not_zip = tmp_path / "text.npz"
    not_zip.write_text("this is not a zip archive\n")
    npy = tmp_path / "bare.npz"
    with open(npy, "wb") as fh:
        np.save(fh, np.zeros(3))
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with np.load(good, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **arrays, extra=np.array([{"evil": 1}, None], dtype=object))
    return {
        tmp_path / "missing.npz": "no such",
        not_zip: "not a valid .npz",
        npy: "not a valid .npz",
        empty: "not a valid .npz",
        pickled: "pickled",
        rewrite(good, tmp_path / "nan.npz", ksd__sum=nan_sum): "NaN",
        rewrite(good, tmp_path / "shape.npz", ksd__sumsq=np.zeros((L, F - 1))): "shape",
        rewrite(good, tmp_path / "count.npz", na_forget__count=np.zeros(L + 1, np.int64)): "na_forget.count",
        rewrite(good, tmp_path / "fcount.npz", ksd__count=np.zeros(L)): "ksd.count",
        rewrite(good, tmp_path / "missing_field.npz", sp_retain__pos_count=None): "sp_retain.pos_count",
        rewrite(good, tmp_path / "schema.npz", schema_version=np.array(SCHEMA_VERSION + 1)): "schema version",
        rewrite(good, tmp_path / "schema_str.npz", schema_version=np.array("1")): "schema_version",
        rewrite(good, tmp_path / "layers.npz", num_layers=np.array([L, L])): "num_layers",
        rewrite(good, tmp_path / "nokey.npz", fingerprint=None): "fingerprint",
        rewrite(good, tmp_path / "nometa.npz", meta=None): "meta",
        rewrite(good, tmp_path / "badmeta.npz", meta=np.array("{not json")): "JSON",
        rewrite(good, tmp_path / "listmeta.npz", meta=np.array("[1, 2]")): "JSON object",
    }


def test_bad_stats_files_give_one_clear_error(llama, llama_stats, tmp_path):
    _, good = llama_stats
    for path, message in bad_files(good, tmp_path, llama).items():
        with pytest.raises(UnskillError) as info:
            load_stats(path)
        assert str(path) in str(info.value), (path, str(info.value))
        assert message in str(info.value), (path, str(info.value))
        assert "\n" not in str(info.value)


def test_stats_of_another_model_are_refused(llama, gpt2_stats_path):
    assert load_stats(gpt2_stats_path).arch == "gpt2"
    with pytest.raises(UnskillError, match="another model") as info:
        load_stats(gpt2_stats_path, llama.manifest)
    assert str(gpt2_stats_path) in str(info.value)
    assert "unskill stats --model" in str(info.value)   # says what to do: probe this export


# --------------------------------------------------------------------------- 5. CLI

def test_cli_stats_merge_and_data(llama, files, tmp_path, capsys):
    out = tmp_path / "out"
    a, b, c = out / "a.npz", out / "b.npz", out / "c.npz"
    common = ["--model", str(llama.dir), "--no-progress"]
    assert main(["stats", *common, "--forget", str(files["forget_a"]), "--retain", str(files["retain_a"]),
                 "--out", str(a)]) == 0
    assert main(["stats", *common, "--forget", str(files["forget_b"]), "--retain", str(files["retain_b"]),
                 "--out", str(b), "--batch-size", "2", "--skill", "arith"]) == 0
    assert "wrote" in capsys.readouterr().out
    sa, sb = load_stats(a, llama.manifest), load_stats(b, llama.manifest)
    assert set(sa.groups) == set(PROBED_GROUPS) and sb.skill == "arith"
    assert list(sa.groups["ksd"].count) == [6] * 3 and list(sb.groups["ksd"].count) == [4] * 3
    assert sa.meta["prompt_template"]["chat"] is True

    assert main(["stats", "--merge", str(a), str(b), "--out", str(c)]) == 0
    assert "merged 2 shards" in capsys.readouterr().out
    sc = load_stats(c, llama.manifest)
    for name, value in all_arrays(sc).items():
        group, field = name.split(".")
        x, y = all_arrays(sa)[name], all_arrays(sb)[name]
        want = np.minimum(x, y) if field == "min" else np.maximum(x, y) if field == "max" else x + y
        np.testing.assert_array_equal(value, want, err_msg=name)
    assert sorted(p.name for p in out.iterdir()) == ["a.npz", "b.npz", "c.npz"]

    jsonl = tmp_path / "math.jsonl"
    assert main(["data", "builtin:math", "--limit", "4", "--out", str(jsonl)]) == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    expected = load_dataset("builtin:math", limit=4)
    assert rows == [{"prompt": i.prompt, "completion": i.completion} for i in expected.items]
    copy = tmp_path / "copy.jsonl"
    assert main(["data", str(files["retain"]), "--out", str(copy)]) == 0
    assert [(r["prompt"], r["completion"]) for r in map(json.loads, copy.read_text().splitlines())] == RETAIN
    assert load_dataset(str(jsonl)).prompts == expected.prompts


def test_cli_errors_exit_2_with_one_line_and_no_output(llama, files, gpt2_stats_path, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "out"
    good = out / "good.npz"
    model = ["--model", str(llama.dir), "--no-progress"]
    assert main(["stats", *model, "--forget", str(files["forget_a"]), "--out", str(good)]) == 0
    capsys.readouterr()
    cases = [
        (["stats", *model, "--forget", str(empty), "--out", str(out / "x.npz")], str(empty)),
        (["stats", *model, "--forget", str(files["forget"]), "--retain", str(empty), "--out", str(out / "x.npz")],
         str(empty)),
        (["stats", "--model", str(tmp_path / "nope"), "--forget", str(files["forget"]), "--out", str(out / "x.npz")],
         str(tmp_path / "nope")),
        (["stats", *model, "--forget", str(files["forget"]), "--limit", "0", "--out", str(out / "x.npz")], "--limit"),
        (["stats", "--forget", str(files["forget"]), "--out", str(out / "x.npz")], "--model"),
        (["stats", "--merge", str(good), str(tmp_path / "missing.npz"), "--out", str(out / "x.npz")],
         str(tmp_path / "missing.npz")),
        (["stats", "--merge", str(good), str(gpt2_stats_path), "--out", str(out / "x.npz")], "different models"),
        (["data", str(empty), "--out", str(out / "x.jsonl")], str(empty)),
        (["data", "builtin:math", "--limit", "0", "--out", str(out / "x.jsonl")], "limit"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, captured.err)
        assert needle in lines[0], (argv, lines[0])
        assert captured.out == ""
        assert sorted(p.name for p in out.iterdir()) == ["good.npz"], argv


# --------------------------------------------------------------------------- 6. runtime guard

def test_runtime_refuses_stats_of_another_model(tiny_export, gpt2_stats_path, llama_stats):
    llama_dir = tiny_export("llama")[1]
    with pytest.raises(UnskillError, match="another model") as info:
        load(llama_dir, stats=[gpt2_stats_path], rule="paper", device="cpu")
    assert str(gpt2_stats_path) in str(info.value)
    assert load(llama_dir, stats=[llama_stats[1]], rule="paper", device="cpu").guard is not None
