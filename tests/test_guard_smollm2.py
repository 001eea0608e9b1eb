"""The guard in the graph on the real SmolLM2, and the deploy folder in the ecosystem's stacks:
- graph decisions equal the NumPy guard's (scores within 1e-5 relative) on a sample of the bypass benchmark's
  prompts (both skills: attack families and retain sets), every stored rule kind, at the prompt and at decode steps;
- `unskill export --target deploy --guard math.npz --rule paper`: examples/node/guard.mjs (onnxruntime-node, no unskill code)
  refuses the math prompt and answers the coding prompt with ksd-run's tokens;
- the default deploy folder loads in transformers.js (examples/node/transformers.mjs) and onnxruntime-genai 0.18
  with the runtime's greedy tokens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ecosystem import genai_greedy
from test_guard_graph import guard_parity, rule_stats
from unskill.runtime import GenerationParams, load
from unskill.runtime.session import left_pad

pytestmark = pytest.mark.model

NODE_DIR = Path(__file__).resolve().parent.parent / "examples" / "node"
MATH = "A baker makes 24 muffins and sells 3/4 of them. How many muffins are left?"
CODE = "Write a python function to reverse a string."


def bypass_sample(data_dir, per_set: int = 4) -> list:
    """A few conversations of every attack family and retain set of both skills (the first `per_set` of each), each
    once: both skills' real-user retain sets hold the same benign requests (two copies of one prompt are one score
    twice; gap_threshold keeps every threshold off the scores anyway)."""
    from unskill.evals.bypass import bypass_sets
    from unskill.runtime.tokenizer import messages_of

    prompts = [messages_of(conversation)
               for forget in ("gsm8k", "mbpp") for bypass in bypass_sets(forget, data_dir, limit=4)
               for conversation in bypass.conversations[:per_set]]
    return [prompt for index, prompt in enumerate(prompts) if prompt not in prompts[:index]]


def prompt_keys(generator, prompts: list, layers: list[int], batch_size: int = 8) -> dict:
    """layer -> (len(prompts), F) key_last at each prompt's last token (chat template, left-padded batches)."""
    import numpy as np

    names = generator.model.manifest.key_last_outputs
    keys = {layer: [] for layer in layers}
    for start in range(0, len(prompts), batch_size):
        encoded = generator.encode(prompts[start:start + batch_size], GenerationParams())
        input_ids, mask = left_pad(encoded, generator.model.manifest.pad_token_id)
        _, _, out = generator.model.forward(input_ids, mask, generator.model.empty_past(len(encoded)),
                                            [names[i] for i in layers])
        for layer in layers:
            keys[layer].append(out[names[layer]])
    return {layer: np.concatenate(parts) for layer, parts in keys.items()}


@pytest.fixture(scope="module")
def smollm2_rules(smollm2_export, smollm2_math_stats, data_dir, tmp_path_factory):
    """(prompts, [stats path per rule kind]) on SmolLM2: math stats, code prompts' keys as the retain side."""
    from unskill.runtime.statsfile import load_stats
    from unskill.stats.datasets import load_dataset
    from unskill.stats.probe import ProbeConfig, probe

    generator = load(smollm2_export, device="cpu", threads=2)
    retain = probe(generator.model, generator.tokenizer, load_dataset("builtin:code", limit=24),
                   config=ProbeConfig(progress=False)).groups["ksd"]
    prompts = bypass_sample(data_dir)
    keys = prompt_keys(generator, prompts, layers=[10, 20, 29])
    stats = load_stats(smollm2_math_stats, generator.model.manifest)
    return prompts, rule_stats(stats, keys, retain, tmp_path_factory.mktemp("smollm2_rules"))


def test_graph_guard_equals_numpy_on_bypass_prompts(smollm2_export, smollm2_rules, tmp_path):
    from unskill.exporter.deploy import guard_edit

    prompts, paths = smollm2_rules
    stored = paths[:-1]   # the last has no stored rule (the paper's cube: test_node_example_enforces_the_graph_guard)
    guard_edit(smollm2_export, stored, tmp_path / "guarded")
    summary = guard_parity(tmp_path / "guarded", stored, prompts, decode_steps=3)
    assert summary["checks"] == 4 * len(prompts)
    for skill, refused in summary["skills"].items():
        assert 0 < refused < summary["checks"], (skill, refused)


@pytest.fixture(scope="module")
def node_modules():
    """examples/node's packages (npm ci with ONNXRUNTIME_NODE_INSTALL=skip: the CPU library ships in the package)."""
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node/npm not on PATH")
    if not (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True,
                       env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}, capture_output=True)
    return NODE_DIR / "node_modules"


def node_json(script: str, *args) -> list[dict]:
    run = subprocess.run(["node", script, *map(str, args)], cwd=NODE_DIR, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def test_node_example_enforces_the_graph_guard(smollm2_export, smollm2_math_stats, node_modules, tmp_path):
    from unskill.cli import main

    deploy = tmp_path / "deploy"
    assert main(["export", "--model", "smollm2-135m", "--target", "deploy", "--guard", str(smollm2_math_stats),
                 "--rule", "paper", "--out", str(deploy), "--no-progress"]) == 0
    manifest = json.loads((deploy / "unskill.json").read_text())
    assert manifest["guard"]["skills"][0]["rule"] == "paper" and manifest["gqa_query_seqlens"] is False
    params = GenerationParams(max_new_tokens=32)
    expected = load(deploy, device="cpu", threads=2).generate([MATH, CODE], params)   # ksd-run's decode loop
    numpy = load(deploy, [smollm2_math_stats], device="cpu", threads=2, graph_guard=False, rule="paper").generate(
        [MATH, CODE], params)
    assert [r.abstained for r in expected] == [r.abstained for r in numpy] == [True, False]
    math_row, code_row = node_json("guard.mjs", deploy, "--json", "--max-new-tokens", 32, MATH, CODE)
    assert math_row["refused"] and math_row["text"] == "Your query is not valid."
    assert not code_row["refused"] and code_row["tokens"] == expected[1].token_ids == numpy[1].token_ids
    # onnxruntime-genai reading guard.refuse with Generator.get_output (examples/genai_guard.py without --stats)
    import runpy
    guarded_generate = runpy.run_path(str(NODE_DIR.parent / "genai_guard.py"))["guarded_generate"]
    math_genai, code_genai = (guarded_generate(deploy, [], prompt, 32) for prompt in (MATH, CODE))
    assert math_genai["abstained"] and math_genai["abstained_at"] == 0
    assert not code_genai["abstained"] and code_genai["token_ids"] == expected[1].token_ids


def test_default_deploy_folder_loads_in_transformers_js_and_genai(smollm2_export, node_modules, tmp_path):
    from unskill.exporter.deploy import slim

    slim(smollm2_export, tmp_path / "deploy")   # what `unskill export --target deploy` writes after the export
    expected = load(tmp_path / "deploy", device="cpu", threads=2).generate([CODE], GenerationParams(max_new_tokens=24))
    eos = json.loads((tmp_path / "deploy" / "unskill.json").read_text())["eos_token_ids"]
    (row,) = node_json("transformers.mjs", tmp_path / "deploy", "--max-new-tokens", 24, CODE)
    assert [t for t in row["tokens"] if t not in eos] == expected[0].token_ids
    assert [t for t in genai_greedy(tmp_path / "deploy", CODE, 24, tokens=True) if t not in eos] == \
        expected[0].token_ids


def test_graph_guard_equals_numpy_on_gemma3(data_dir, tmp_path):
    """The same parity on Gemma-3-270M (no chat template: keys at the user's last word). Exporting it takes
    minutes and ~6 GB, so this runs on an export named by UNSKILL_GEMMA3_ONNX (as tests/test_ecosystem.py)."""
    from unskill.exporter.deploy import guard_edit
    from unskill.stats.datasets import load_dataset
    from unskill.stats.probe import ProbeConfig, probe

    if not os.environ.get("UNSKILL_GEMMA3_ONNX"):
        pytest.skip("set UNSKILL_GEMMA3_ONNX to a Gemma-3-270M folder written by `unskill export`")
    directory = Path(os.environ["UNSKILL_GEMMA3_ONNX"])
    generator = load(directory, device="cpu", threads=2)
    config = ProbeConfig(progress=False)
    stats = probe(generator.model, generator.tokenizer, load_dataset("builtin:math"), config=config)
    retain = probe(generator.model, generator.tokenizer, load_dataset("builtin:code", limit=24), config=config)
    prompts = bypass_sample(data_dir)
    paths = rule_stats(stats, prompt_keys(generator, prompts, layers=[6, 12, 17]), retain.groups["ksd"], tmp_path)
    del generator
    guard_edit(directory, paths[:-1], tmp_path / "guarded")   # the stored rules (the last file has none)
    summary = guard_parity(tmp_path / "guarded", paths[:-1], prompts, decode_steps=3)
    for skill, refused in summary["skills"].items():
        assert 0 < refused < summary["checks"], (skill, refused)
