"""Exports, edits and deploy folders load as they are in optimum, AutoTokenizer and onnxruntime-genai, and
give the runtime's greedy text; NA is a function of its input on the real model."""

import json
import stat

import numpy as np
import onnxruntime as ort
import pytest

from ecosystem import genai_greedy, optimum_greedy
from unskill.cli import main
from unskill.exporter.deploy import slim
from unskill.exporter.metadata import METADATA_FILES
from unskill.exporter.neuron_adjust import neuron_adjust
from unskill.exporter.prune import prune
from unskill.exporter.quantize import quantize
from unskill.runtime import GenerationParams, UnskillError, load

PROMPT = "How many apples are left if Tom eats 3 of his 12 apples?"


@pytest.fixture(scope="module")
def tiny_family(tiny_export, tmp_path_factory):
    """The tiny llama export, an NA copy, a pruned copy, a deploy folder of the NA copy and an int4 copy,
    with stats."""
    from unskill.runtime.tokenizer import TextTokenizer
    from unskill.runtime.session import OnnxLM
    from unskill.stats.datasets import Dataset, Item
    from unskill.stats.probe import ProbeConfig, probe

    _, onnx_dir = tiny_export("llama")
    root = tmp_path_factory.mktemp("family")
    model = OnnxLM(onnx_dir, device="cpu")
    forget = Dataset("apples", [Item(f"Tom eats {i} of his {i + 9} apples", f"{i + 9} - {i} = 9") for i in range(8)])
    retain = Dataset("code", [Item(f"Write a python function number {i}", "def f(a):\n    return a") for i in range(8)])
    stats = probe(model, TextTokenizer(onnx_dir, model.manifest), forget, retain,
                  ProbeConfig(progress=False)).save(root / "s.npz")
    neuron_adjust(onnx_dir, stats, 0.2, root / "na", seed=2)
    prune(onnx_dir, stats, 0.1, root / "pruned", progress=False)
    slim(root / "na", root / "deploy")
    quantize(onnx_dir, root / "int4", "int4")   # packed MatMulNBits + Split: contrib ops any CPU stack runs
    return {"export": onnx_dir, "na": root / "na", "pruned": root / "pruned", "deploy": root / "deploy",
            "int4": root / "int4", "stats": stats}


@pytest.mark.parametrize("name", ["export", "na", "pruned", "deploy"])
def test_folders_carry_the_ecosystem_files_with_public_modes(tiny_family, name):
    from transformers import AutoTokenizer

    directory = tiny_family[name]
    manifest = json.loads((directory / "unskill.json").read_text())
    for file in METADATA_FILES:
        assert (directory / file).is_file(), file
    for path in [directory, *directory.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["eos_token_id"] == manifest["eos_token_ids"]
    tokenizer = AutoTokenizer.from_pretrained(directory)
    runtime = load(directory, device="cpu").tokenizer
    assert len(tokenizer) == runtime.tokenizer.get_vocab_size()   # no special token added past the vocabulary
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    assert chat == runtime.encode_prompt(PROMPT)
    assert tokenizer(PROMPT)["input_ids"] == runtime.encode_text(PROMPT)
    assert set(tokenizer(PROMPT)) == {"input_ids", "attention_mask"}
    assert (directory / "chat_template.jinja").read_text() == tokenizer.chat_template
    genai = json.loads((directory / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is False
    assert genai["model"]["decoder"]["filename"] == manifest["model_file"]


def test_pruned_config_lists_real_widths(tiny_family):
    config = json.loads((tiny_family["pruned"] / "config.json").read_text())
    kept = json.loads((tiny_family["pruned"] / "unskill.json").read_text())["kept_neurons"]
    assert config["intermediate_size_per_layer"] == [len(k) for k in kept]
    assert config["intermediate_size"] == 96 and config["unskill_edits"] == ["prune"]


def test_deploy_folder_keeps_only_serving_outputs(tiny_family, tmp_path, capsys):
    deploy, parent = tiny_family["deploy"], tiny_family["na"]
    assert (deploy / "onnx" / "model.onnx").is_file() and (deploy / "onnx" / "model.onnx_data").is_file()
    assert not (deploy / "model.onnx").exists() and not (deploy / "probe.onnx").exists()
    names = [o.name for o in ort.InferenceSession(str(deploy / "onnx" / "model.onnx")).get_outputs()]
    assert names[0] == "logits"
    assert {n.split(".")[0] for n in names[1:]} == {"present", "key_last"}
    manifest = json.loads((deploy / "unskill.json").read_text())
    assert manifest["target"] == "deploy" and [e["method"] for e in manifest["edits"]] == ["na", "slim"]
    parent_fp = json.loads((parent / "unskill.json").read_text())["fingerprint"]
    assert manifest["fingerprint"] != parent_fp and parent_fp in manifest["stats_compatible"]
    # same greedy tokens as the parent; the parent's stats guard it (NA's keys: take stats on the NA model)
    params = GenerationParams(max_new_tokens=12)
    assert load(deploy, device="cpu").generate([PROMPT], params)[0].token_ids == \
        load(parent, device="cpu").generate([PROMPT], params)[0].token_ids
    assert main(["stats", "--model", str(parent), "--forget", "builtin:math", "--limit", "8", "--out",
                 str(tmp_path / "k.npz"), "--no-progress"]) == 0
    guarded = load(deploy, stats=[tmp_path / "k.npz"], rule="paper", device="cpu")
    reference = load(parent, stats=[tmp_path / "k.npz"], rule="paper", device="cpu")
    prompts = ["What is 12 * 7?", "Write a python function to add two numbers."]
    assert [r.abstained for r in guarded.generate(prompts, params)] == \
        [r.abstained for r in reference.generate(prompts, params)]
    # without key_last.* the folder cannot be guarded, and says so
    assert main(["edit", "slim", "--model", str(parent), "--out", str(tmp_path / "bare"), "--no-guard"]) == 0
    capsys.readouterr()
    with pytest.raises(UnskillError, match="key_last outputs"):
        load(tmp_path / "bare", stats=[tmp_path / "k.npz"], rule="paper", device="cpu")


def test_target_deploy_from_an_edit(tiny_family, tmp_path):
    assert main(["edit", "prune", "--model", str(tiny_family["export"]), "--stats", str(tiny_family["stats"]),
                 "--ratio", "0.1", "--out", str(tmp_path / "sp"), "--target", "deploy", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "sp" / "unskill.json").read_text())
    assert [e["method"] for e in manifest["edits"]] == ["prune", "slim"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sp"]   # no staging folder left behind
    params = GenerationParams(max_new_tokens=12)
    assert load(tmp_path / "sp", device="cpu").generate([PROMPT], params)[0].token_ids == \
        load(tiny_family["pruned"], device="cpu").generate([PROMPT], params)[0].token_ids


@pytest.mark.parametrize("name", ["export", "na", "pruned", "deploy", "int4"])
def test_optimum_and_genai_match_the_runtime_on_tiny(tiny_family, name):
    pytest.importorskip("optimum.onnxruntime")
    directory = tiny_family[name]
    expected = load(directory, device="cpu").generate([PROMPT], GenerationParams(max_new_tokens=16))[0]
    assert optimum_greedy(directory, PROMPT, 16) == expected.text
    pytest.importorskip("onnxruntime_genai")
    eos = json.loads((directory / "unskill.json").read_text())["eos_token_ids"]
    assert [t for t in genai_greedy(directory, PROMPT, 16, tokens=True) if t not in eos] == expected.token_ids


# --- the packaged SmolLM2 ---------------------------------------------------------------------------------

SMOL_PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " \
              "How many clips did Natalia sell altogether in April and May?"


def ksd_run_text(directory, prompt, tmp_path, max_new_tokens) -> str:
    from unskill.ksd_run import main as ksd_run

    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    assert ksd_run(["--onnx", str(directory), "--prompts", str(tmp_path / "p.jsonl"), "--output",
                    str(tmp_path / "r.jsonl"), "--max-new-tokens", str(max_new_tokens), "--device", "cpu"]) == 0
    return json.loads((tmp_path / "r.jsonl").read_text())["text"]


@pytest.mark.model
@pytest.mark.parametrize("name", ["export", "na", "pruned"])
def test_smollm2_optimum_and_genai_match_ksd_run(smollm2_edits, name, tmp_path):
    directory = smollm2_edits[name]
    expected = ksd_run_text(directory, SMOL_PROMPT, tmp_path, 48)
    assert optimum_greedy(directory, SMOL_PROMPT, 48) == expected
    assert genai_greedy(directory, SMOL_PROMPT, 48) == expected


@pytest.mark.model
def test_smollm2_na_tokens_do_not_depend_on_history_or_batch(smollm2_edits):
    """The issue's example ("…48 clips in" vs "…24 clips in"): with hash noise the same prompt gives the
    same tokens first in a session, after other prompts, and inside a batch."""
    generator = load(smollm2_edits["na"], device="cpu")
    params = GenerationParams(max_new_tokens=32)
    first = generator.generate([SMOL_PROMPT], params)[0].token_ids
    generator.generate(["Write a python function to reverse a string.", "What is 17 + 25?"], params)
    after = generator.generate([SMOL_PROMPT], params)[0].token_ids
    batch = generator.generate(["Write a python function to reverse a string.", SMOL_PROMPT,
                                "What is the capital of France?"], params)
    assert first == after == batch[1].token_ids


@pytest.mark.model
def test_smollm2_deploy_folder_matches_and_is_guarded(smollm2_edits, tmp_path):
    from unskill.stats.datasets import load_dataset
    from unskill.stats.probe import ProbeConfig, probe

    deploy = tmp_path / "deploy"
    slim(smollm2_edits["na"], deploy)
    expected = ksd_run_text(smollm2_edits["na"], SMOL_PROMPT, tmp_path, 32)
    assert ksd_run_text(deploy, SMOL_PROMPT, tmp_path, 32) == expected
    assert optimum_greedy(deploy, SMOL_PROMPT, 32) == expected
    na = load(smollm2_edits["na"], device="cpu")
    forget = load_dataset("builtin:math", limit=64)   # a probe prompt lies in the cube by construction
    stats = probe(na.model, na.tokenizer, forget, config=ProbeConfig(progress=False))
    guarded = load(deploy, stats=[stats.save(tmp_path / "math.npz")], rule="paper", device="cpu")
    math, code = guarded.generate([forget.prompts[5], "Write a python function to reverse a string."],
                                  GenerationParams(max_new_tokens=8))
    assert math.abstained and not code.abstained
    assert np.isfinite(code.token_ids).all()


def run_genai_guard(directory, stats, prompts, max_new_tokens, alpha=1.0) -> list[dict]:
    """examples/genai_guard.py in a fresh interpreter where onnxruntime's Python session cannot be built:
    genai runs the model, unskill only checks keys."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "genai_guard.py"
    code = ("import json, runpy, sys, onnxruntime\n"
            "def refuse(*a, **k): raise AssertionError('the example must not open an onnxruntime session')\n"
            "onnxruntime.InferenceSession = refuse\n"
            f"ns = runpy.run_path({str(script)!r})\n"
            f"for p in {prompts!r}:\n"
            f"    print(json.dumps(ns['guarded_generate']({str(directory)!r}, [{str(stats)!r}], p, {max_new_tokens}, "
            f"alpha={alpha})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def ksd_run_records(directory, stats, prompts, tmp_path, max_new_tokens, alpha=1.0) -> list[dict]:
    from unskill.ksd_run import main as ksd_run

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert ksd_run(["--onnx", str(directory), "--stats", str(stats), "--alpha", str(alpha), "--prompts",
                    str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens",
                    str(max_new_tokens), "--device", "cpu", "--quiet"]) == 0
    return [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["export", "pruned", "deploy"])
def test_genai_guard_example_matches_ksd_run_on_tiny(tiny_family, name, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from unskill.runtime.statsfile import load_stats

    directory = tiny_family[name]
    stats = tmp_path / "apples.npz"   # KSD stats of this very model (the NA deploy folder takes the NA model's)
    source = tiny_family["na"] if name == "deploy" else directory
    assert main(["stats", "--model", str(source), "--forget", "builtin:math", "--limit", "16", "--out", str(stats),
                 "--no-progress"]) == 0
    load_stats(stats, load(directory, device="cpu").model.manifest)
    prompts = ["What is 12 * 7?", "Write a python function to add two numbers.", PROMPT]
    ours = run_genai_guard(directory, stats, prompts, 12, alpha=2.0)
    theirs = ksd_run_records(directory, stats, prompts, tmp_path, 12, alpha=2.0)
    runtime = load(directory, stats=[stats], alpha=2.0, device="cpu").generate(prompts, GenerationParams(max_new_tokens=12))
    assert [r["abstained"] for r in ours] == [r["abstained"] for r in theirs]
    assert any(r["abstained"] for r in ours) and not all(r["abstained"] for r in ours)
    for mine, record, result in zip(ours, theirs, runtime):
        assert (mine["skill"], mine["layer"]) == (record["skill"], record["layer"])
        assert mine["token_ids"] == result.token_ids and mine["abstained_at"] == result.abstained_at


@pytest.mark.model
def test_smollm2_genai_guard_example_matches_ksd_run(smollm2_edits, tmp_path):
    from unskill.stats.datasets import load_dataset
    from unskill.stats.probe import ProbeConfig, probe

    directory = smollm2_edits["export"]
    generator = load(directory, device="cpu")
    forget = load_dataset("builtin:math", limit=64)
    stats = probe(generator.model, generator.tokenizer, forget, config=ProbeConfig(progress=False)).save(tmp_path / "m.npz")
    prompts = [forget.prompts[5], "Write a python function to reverse a string."]
    ours = run_genai_guard(directory, stats, prompts, 24)
    theirs = ksd_run_records(directory, stats, prompts, tmp_path, 24)
    assert [r["abstained"] for r in ours] == [r["abstained"] for r in theirs] == [True, False]
    assert [r["text"] for r in ours] == [r["text"] for r in theirs]


@pytest.mark.model
def test_gemma3_tokenizer_round_trips_and_optimum_genai_match(tmp_path):
    """Gemma-3-270M: its tokenizer (built from the GGUF vocabulary) through AutoTokenizer, and optimum and genai
    greedy text equal to ksd-run's (raw prompt: the base model has no chat template). Exporting Gemma takes
    minutes and ~6 GB, so this runs on an export named by UNSKILL_GEMMA3_ONNX."""
    import os
    from pathlib import Path

    from transformers import AutoTokenizer

    if not os.environ.get("UNSKILL_GEMMA3_ONNX"):
        pytest.skip("set UNSKILL_GEMMA3_ONNX to a Gemma-3-270M folder written by `unskill export`")
    directory = Path(os.environ["UNSKILL_GEMMA3_ONNX"])
    runtime = load(directory, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert len(tokenizer) == runtime.tokenizer.tokenizer.get_vocab_size()
    text = "def f(x):\n    return x ** 2  # naïve — 日本語 😀  Die Hauptstadt von Frankreich ist Paris."
    ids = tokenizer(text)["input_ids"]
    assert ids == runtime.tokenizer.encode_text(text) and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    prompt = "The capital of France is"
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    from unskill.ksd_run import main as ksd_run

    assert ksd_run(["--onnx", str(directory), "--prompts", str(tmp_path / "p.jsonl"), "--output",
                    str(tmp_path / "r.jsonl"), "--max-new-tokens", "24", "--no-chat", "--device", "cpu"]) == 0
    expected = json.loads((tmp_path / "r.jsonl").read_text())["text"]
    assert optimum_greedy(directory, prompt, 24, chat=False) == expected
    assert genai_greedy(directory, prompt, 24, chat=False) == expected
