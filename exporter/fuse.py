"""The fused decoder graph (`unskill export`'s default; `unskill edit fuse` on a --no-fuse export), every key
output and input name kept. `fuse_graph` is the pass (a graph in, the fused graph out, in memory); `fuse` is
the command (load the folder, the pass, save the copy).

Four steps:
1. onnxruntime.transformers' optimizer with the `qwen3` fusion table (llama-shaped decoders: RMSNorm +
   residual -> SkipSimplifiedLayerNormalization, the rotary subgraph -> RotaryEmbedding). Its `llama` table
   does not fit optimum's llama export, hence qwen3's; `gpt2` is the fallback for other architectures.
   Its attention fusion does not match optimum's SDPA export, hence step 1b.
1b. Own pass (exporter/gqa.py, why there): each layer's attention -> onnxruntime's GroupQueryAttention
   contrib op, for the qwen3 table (llama, Gemma-3); GPT-2-style graphs keep their attention.
2. Own pass (onnxruntime has none): `unify_shape_sources`. optimum's graph takes Shape() of each layer's own
   tensors (hidden states, q/k/v, the KV cache), so every layer recomputes the same mask and reshape
   arithmetic from a different source, and onnxruntime's common-subexpression elimination (which it runs at
   load) cannot merge them. onnxruntime's symbolic shape inference proves which tensors have the same
   symbolic shape; each Shape node is pointed at the first such tensor, after which the per-layer chains are
   identical and onnxruntime's CSE (step 3) computes them once per step.
3. onnxruntime's offline graph optimization (ORT_ENABLE_EXTENDED, hardware-independent) saved to disk:
   constant folding, common-subexpression elimination (onnxruntime runs CSE at load already, so no own CSE
   pass is written), shape-op folding, SimplifiedLayerNorm / Gelu / FastGelu fusions. The runtime then
   loads an already-reduced graph, so its own load-time optimization has less to do.

Requested graph outputs (key.N, preact.N, key_last.N, logits, present.*) are never fused away by these
steps; `fuse` checks that and refuses otherwise. The weights are unchanged, so stats of the unfused export
load on the fused copy (`stats_compatible`).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import onnx

from unskill.runtime.errors import UnskillError
from unskill.runtime.manifest import Manifest

from .folder import load_exported, refuse_nonempty_out, save_edited, stats_compatible_with
from .gqa import fuse_attention
from .pack import pack_projections

MODEL_TYPES = ("qwen3", "gpt2")


def unify_shape_sources(model: onnx.ModelProto) -> int:
    """Point every top-level Shape node at the earliest tensor with the same fully known symbolic shape (see
    the module docstring). Tensors with an unknown or inferred-unknown dim are left alone. Returns how many
    Shape nodes it re-pointed."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=False)
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        if tensor.HasField("shape") and all(isinstance(d, int) and d > 0 or isinstance(d, str) and
                                            d and not d.startswith("unk") for d in dims):
            shapes[value.name] = tuple(dims)
    # First tensor of each shape in topological order: graph inputs, then node outputs as the nodes come.
    first = {}
    for value in model.graph.input:
        if value.name in shapes:
            first.setdefault(shapes[value.name], value.name)
    repointed = 0
    for node in model.graph.node:
        if node.op_type == "Shape" and node.input[0] in shapes:
            source = first.setdefault(shapes[node.input[0]], node.input[0])
            if source != node.input[0]:
                node.input[0] = source
                repointed += 1
        for name in node.output:
            if name in shapes:
                first.setdefault(shapes[name], name)
    return repointed


def transformers_fusions(model: onnx.ModelProto, model_type: str, hidden_size: int) -> onnx.ModelProto:
    """onnxruntime.transformers' fusion passes. The qwen3 table insists on num_heads; only its attention
    fusion reads it, and that fusion does not match optimum's SDPA graph, so hidden / head_dim (head_dim from
    the past_key_values inputs) is enough even where it is not the true query-head count (Gemma-3)."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    head_dims = [i.type.tensor_type.shape.dim[3].dim_value for i in model.graph.input
                 if i.name.startswith("past_key_values.")]
    num_heads = max(1, hidden_size // head_dims[0]) if head_dims and head_dims[0] else 1
    logging.getLogger("onnxruntime.transformers").setLevel(logging.WARNING)
    optimized = optimize_model(model, model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=0, use_gpu=False, only_onnxruntime=False)
    return optimized.model


def offline_optimize(model: onnx.ModelProto, scratch: Path) -> onnx.ModelProto:
    """onnxruntime's ORT_ENABLE_EXTENDED optimization, written to disk with the weights external."""
    import onnxruntime as ort

    source, target = scratch / "fused_in.onnx", scratch / "fused_out.onnx"
    onnx.save(model, str(source), save_as_external_data=True, all_tensors_to_one_file=True,
              location="fused_in.onnx.data", size_threshold=1024)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3   # the logits_to_keep default "appears in graph inputs" by design (runtime/session.py)
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     "fused_out.onnx.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(target))


def with_value_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every tensor's type and shape recorded (onnxruntime's symbolic shape inference, which
    knows the contrib ops): onnx's own inference stops at GroupQueryAttention, and tools that rely on it
    (onnxruntime.quantization's int8 MatMul quantizer) then cannot type the projections' outputs."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        typed = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 -- an annotation only: the graph runs without it
        return model
    return drop_attention_value_info(typed)


def drop_attention_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """No shape annotation on GroupQueryAttention's outputs. present.* is declared like past.*
    ('past_sequence_length': in the in-place decode they are one buffer), which a prompt pass contradicts by
    the new tokens; on an inner tensor (the fp16 copy's present before its Cast to the fp32 output) that
    makes onnxruntime's planner reuse a past-sized buffer and fail ("Shape mismatch attempting to re-use
    buffer {1,2,0,16} != {1,2,12,16}"). Graph outputs are never reused, so they keep their declaration."""
    attention_outputs = {out for node in model.graph.node if node.op_type == "GroupQueryAttention"
                         for out in node.output}
    kept = [info for info in model.graph.value_info if info.name not in attention_outputs]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return model


def node_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def fusion_table(arch: str) -> str:
    """onnxruntime.transformers' table for an HF model_type: gpt2 for GPT-2-style graphs, else qwen3."""
    return "gpt2" if arch in ("gpt2", "gpt_neo", "gptj", "gpt_bigcode") else "qwen3"


def source_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UnskillError(f"{path}: missing; attention fusion reads the head counts from it")
    return json.loads(path.read_text())


def fuse_graph(model: onnx.ModelProto, config: dict, num_layers: int, hidden_size: int, model_type: str = "qwen3",
               attention: bool = True, rotary_in_op: bool = False, pack: bool = True,
               where: str = "model") -> tuple[onnx.ModelProto, dict]:
    """The fused graph of `model` (consumed: onnxruntime's fusions edit it in place) and its edit record.
    config: the source model's config (head counts, Gemma-3's window and query scale). rotary_in_op: packed
    q/k/v and GroupQueryAttention's own rotary (exporter/gqa.py says when and why not by default). pack: the
    projections that read one input (q/k/v, gate/up) as one MatMul + Split each (exporter/pack.py; exact).
    where: the folder or model named in errors."""
    if model_type not in MODEL_TYPES:
        raise UnskillError(f"fusion table {model_type!r}: use one of {MODEL_TYPES}")
    if any(node.op_type == "GroupQueryAttention" for node in model.graph.node):
        raise UnskillError(f"{where}: already fused (`unskill export` fuses by default; --no-fuse keeps "
                           "the plain graph)")
    before = len(model.graph.node)
    names_in = [i.name for i in model.graph.input]
    names_out = [o.name for o in model.graph.output]
    # Fusions first: re-pointed Shape nodes no longer match the qwen3 table's rotary pattern.
    fused = transformers_fusions(model, model_type, hidden_size)
    attention_layers = 0
    if attention and model_type == "qwen3":   # GPT-2-style graphs keep their attention (no GQA heads, biases)
        attention_layers = fuse_attention(fused, config, num_layers, rotary_in_op=rotary_in_op)
    repointed = unify_shape_sources(fused)
    with tempfile.TemporaryDirectory() as scratch:
        fused = offline_optimize(fused, Path(scratch))   # onnx.load reads the weights in before scratch goes
    # After the fusions, which match single MatMuls.
    packed = pack_projections(fused, op_types=("MatMul",)) if pack else 0
    fused = with_value_types(fused)
    missing = sorted(set(names_in) - {i.name for i in fused.graph.input}
                     | set(names_out) - {o.name for o in fused.graph.output})
    if missing:
        raise UnskillError(f"{where}: fusion dropped inputs/outputs {missing[:4]}; keep the unfused export")
    ops = node_counts(fused)
    edit = {"method": "fuse", "model_type": model_type, "ratio": 0.0, "nodes_before": before,
            "nodes_after": len(fused.graph.node), "shape_nodes_repointed": repointed,
            "attention_layers_fused": attention_layers, **({"rotary_in_op": True} if rotary_in_op else {}),
            "packed_projections": packed,
            "fused_ops": {op: n for op, n in ops.items() if op in FUSED_OPS}}
    return fused, edit


def fuse(model_dir: str | Path, out_dir: str | Path, model_type: str = "qwen3", attention: bool = True,
         rotary_in_op: bool = False, pack: bool = True) -> Manifest:
    """`unskill edit fuse`: the fused copy of an unfused export folder, written beside it."""
    if model_type not in MODEL_TYPES:
        raise UnskillError(f"fusion table {model_type!r}: use one of {MODEL_TYPES}")
    out_dir = Path(out_dir)
    refuse_nonempty_out(out_dir)
    config = source_config(model_dir) if attention and model_type == "qwen3" else {}   # before minutes of work
    model, manifest = load_exported(model_dir)
    fused, edit = fuse_graph(model, config, manifest.num_layers, manifest.hidden_size, model_type, attention,
                             rotary_in_op, pack, where=str(model_dir))
    # Same weights, same keys: stats taken on the unfused export load on the fused one.
    return save_edited(fused, manifest, model_dir, out_dir, edit, stats_compatible=stats_compatible_with(manifest),
                       attention="gqa" if edit["attention_layers_fused"] else manifest.attention)


FUSED_OPS = ("SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "RotaryEmbedding",
             "FusedMatMul", "QuickGelu", "FastGelu", "Gelu", "BiasGelu", "SkipLayerNormalization",
             "LayerNormalization", "GroupQueryAttention", "MultiHeadAttention")
