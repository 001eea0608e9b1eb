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

from .folder import DATA_FILE, load_exported, probe_graph, refuse_nonempty_out, save_edited, stats_compatible_with
from .gqa import drop_query_seqlens
from .guard_graph import guarded_model, require_rules
from .tie import tie_embedding

DEPLOY_MODEL_FILE = "onnx/model.onnx"
DEPLOY_DATA_FILE = "model.onnx_data"   # beside the graph, as transformers.js names it


def slim(model_dir: str | Path, out_dir: str | Path, guard: bool = True, guard_stats: list = (),
         tie: bool = True, guard_rule: str | None = None) -> Manifest:
    """Write the deploy folder of `model_dir` into `out_dir`; guard=False drops key_last.* as well.
    guard_stats: stats files of `model_dir` whose KSD rules go into the graph (guard.refuse; guard_graph.py):
    each one's stored rule, or with guard_rule="paper" the paper's cube (a file without a rule is an error).
    For the ecosystem's onnxruntime builds GroupQueryAttention loses its query_seqlens input and the tied
    embedding / LM head is stored once (exporter/tie.py; tie=False keeps both copies, for benchmarks/deploy.py)."""
    if guard_stats:
        require_rules(guard_stats, guard_rule)   # before the model loads
    model, manifest = load_exported(model_dir)
    presents = [o.name for o in model.graph.output if o.name.startswith("present.")]
    key_last = list(manifest.key_last_outputs or []) if guard else []
    carried = [o.name for o in model.graph.output if o.name.startswith("guard.")] if guard else []
    slimmed = probe_graph(model, ["logits", *presents, *key_last, *carried])
    del model
    dropped = drop_query_seqlens(slimmed)
    slimmed, tied = tie_embedding(slimmed) if tie else (slimmed, False)
    edit = {"method": "slim", "target": "deploy", "key_last": bool(key_last), "ratio": 0.0,
            "gqa_query_seqlens": not dropped and manifest.gqa_query_seqlens, "tied_embedding": tied}
    changes = {"guard": manifest.guard if carried else None}
    if guard_stats:
        slimmed, changes["guard"] = guarded_model(slimmed, manifest, guard_stats, guard_rule)
        edit["guard"] = [s["skill"] for s in changes["guard"]["skills"]]
    return save_edited(slimmed, manifest, model_dir, out_dir, edit, model_file=DEPLOY_MODEL_FILE,
                       data_file=DEPLOY_DATA_FILE, probe=False, target="deploy",
                       key_last_outputs=key_last or None, stats_compatible=stats_compatible_with(manifest),
                       gqa_query_seqlens=edit["gqa_query_seqlens"], **changes)


def guard_edit(model_dir: str | Path, stats_paths: list, out_dir: str | Path, rule: str | None = None) -> Manifest:
    """`unskill edit guard`: DIR2 = DIR (a full or a deploy folder) with the guard of `stats_paths` in its graph
    (exporter/guard_graph.py): each file's stored rule, or with rule="paper" the paper's cube. The keys are
    untouched: the parent's stats, and those it accepts, still apply."""
    refuse_nonempty_out(Path(out_dir))
    require_rules(stats_paths, rule)   # before the model loads
    model, manifest = load_exported(model_dir)
    guarded, record = guarded_model(model, manifest, stats_paths, rule)
    del model
    deploy = manifest.target == "deploy"
    edit = {"method": "guard", "skills": [s["skill"] for s in record["skills"]], "ratio": 0.0}
    return save_edited(guarded, manifest, model_dir, out_dir, edit, model_file=manifest.model_file,
                       data_file=DEPLOY_DATA_FILE if deploy else DATA_FILE, probe=not deploy,
                       guard=record, stats_compatible=stats_compatible_with(manifest))
