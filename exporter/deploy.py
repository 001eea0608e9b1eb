"""`unskill edit slim` / `--target deploy`: a serving folder whose graph computes only what serving reads.

The full export exposes `key.*` and `preact.*` ([B, S, ffn] per layer) for probing; a stack that fetches
every output (optimum on CPU, transformers.js) copies them out at every step. The deploy graph keeps
`logits`, `present.*` and, for a KSD guard, `key_last.*` ([B, ffn]); dead nodes go with the dropped outputs.
Layout: the graph in onnx/model.onnx with its weights in onnx/model.onnx_data (what transformers.js
fetches; optimum finds onnx/model.onnx by its standard name), everything else at the top: tokenizer.json,
config.json and the other metadata files, unskill.json with its own fingerprint and the edit record.
Stats taken on the parent still apply (the key_last values are the same computation): the manifest lists
the parent's fingerprint under `stats_compatible`.
"""

from __future__ import annotations

from pathlib import Path

from unskill.runtime.manifest import Manifest

from .folder import load_exported, probe_graph, save_edited, stats_compatible_with

DEPLOY_MODEL_FILE = "onnx/model.onnx"
DEPLOY_DATA_FILE = "model.onnx_data"   # beside the graph, as transformers.js names it


def slim(model_dir: str | Path, out_dir: str | Path, guard: bool = True) -> Manifest:
    """Write the deploy folder of `model_dir` into `out_dir`; guard=False drops key_last.* as well."""
    model, manifest = load_exported(model_dir)
    presents = [o.name for o in model.graph.output if o.name.startswith("present.")]
    key_last = list(manifest.key_last_outputs or []) if guard else []
    slimmed = probe_graph(model, ["logits", *presents, *key_last])
    del model
    edit = {"method": "slim", "target": "deploy", "key_last": bool(key_last), "ratio": 0.0}
    return save_edited(slimmed, manifest, model_dir, out_dir, edit, model_file=DEPLOY_MODEL_FILE,
                       data_file=DEPLOY_DATA_FILE, probe=False, target="deploy",
                       key_last_outputs=key_last or None, stats_compatible=stats_compatible_with(manifest))
