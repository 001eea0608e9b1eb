"""Each decoder layer's attention -> one onnxruntime GroupQueryAttention (contrib op), KV interface kept.

Why an own pass: onnxruntime.transformers' attention fusions (FusionRotaryAttention, the llama/phi
conversions) match torch's eager-attention export, not optimum's SDPA export (scale split over q and k,
IsNaN guard, GQA repeat as Expand/Reshape), and onnxruntime-genai's model builder writes a whole new graph
without our key outputs, needs transformers 5 and fails on Gemma-3 (KeyError 'rope_type',
benchmarks/README.md). So this pass anchors on what every optimum decoder export has -- the Concat that
makes `present.{i}.key/value` and the probs x V MatMul fed by it -- and replaces the subgraph between the
projections and o_proj:

    q_proj, k_proj, v_proj -> [rotary] -> GroupQueryAttention(past_key_values.i.*) -> present.i.*, o_proj

Rotary and Gemma-3's q/k RMSNorm stay where the export put them (do_rotary=0) by default. A RotaryEmbedding
node (the qwen3 fusion table's) is re-pointed at the 3-D projection output, so no Transpose is left; an
unfused rotary (Gemma-3) keeps one Transpose+Reshape per q and k (onnxruntime 1.32 honours q_norm_weight on
CUDA/WebGPU only).

`rotary_in_op` (`unskill edit fuse --rotary-in-op`): where q and k are full-width RotaryEmbedding nodes over
plain MatMuls of one input (SmolLM2/llama), q/k/v become one MatMul (GroupQueryAttention's packed-QKV input)
and the rotary moves into the op (do_rotary=1, the same cos/sin caches): 120 fewer nodes a step on SmolLM2,
fp32 decode 1.11-1.15x in two loaded runs, 0.97x in a third. Not the default: the op rotates a row at its
buffer position (past length + s; a prompt's position_ids are read at their first element only), so a
left-padded row is rotated `padding` positions further, queries and keys alike. Rotary scores depend on
position differences only, so that is exact in exact arithmetic and the token ids stay identical (tests);
in float32 a padded row's keys then move with its batch's padding by ~1e-6 relative (as they do by the
GEMM's blocking), which a guard stats file with near-constant key features amplifies past the 1e-4 that
tests/test_bypass.py asks of prefill vs decode keys on the tiny model.

Padding: every row's KV buffer holds the whole padded length (seqlens_k = total - 1 for all rows, so
GroupQueryAttention's causal and sliding-window masks index buffer positions as the export's masks do), and
`attention_mask` becomes the additive `attention_bias` [B, 1, S, T] (float min where the mask is 0). A
left-padded batch therefore attends exactly as the unfused graph does (tests/test_fuse.py), and the
past/present tensors keep optimum's shapes, so optimum and onnxruntime-genai load the graph unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from unskill.runtime.errors import UnskillError

from .index import GraphIndex, remove_dead_nodes, topological

MS = "com.microsoft"
BIAS, SEQLENS, TOTAL = "gqa/attention_bias", "gqa/seqlens_k", "gqa/total_sequence_length"
QUERY_SEQLENS = "gqa/query_seqlens"


def attention_heads(config: dict) -> tuple[int, int, int]:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return heads, config.get("num_key_value_heads") or heads, head_dim


def attention_scale(config: dict, head_dim: int) -> float:
    """Gemma-3 scales scores by query_pre_attn_scalar^-0.5, llama by head_dim^-0.5."""
    return float(config.get("query_pre_attn_scalar") or head_dim) ** -0.5


def local_window(config: dict, layer: int) -> int:
    """GroupQueryAttention's local_window_size for a sliding layer (-1: global): the config's sliding_window
    as it is (measured on the tiny Gemma-3, window 8: 7 or -1 change the logits from the 8th or 9th token
    on, 8 matches the unfused export at every position; onnxruntime-genai's builder passes it as is too)."""
    types = config.get("layer_types")
    if config.get("sliding_window") and types and types[layer] == "sliding_attention":
        return int(config["sliding_window"])
    return -1


def add_constant(nodes: list, name: str, value) -> None:
    """A Constant node holding `value` (a NumPy scalar or array: its dtype is the tensor's)."""
    nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name)))


def add_mask_inputs(nodes: list) -> None:
    """seqlens_k, total_sequence_length and attention_bias from attention_mask, once per step."""
    add_constant(nodes, "gqa/one_i32", np.int32(1))
    add_constant(nodes, "gqa/axis1", np.array([1], np.int64))
    add_constant(nodes, "gqa/axes12", np.array([1, 2], np.int64))
    add_constant(nodes, "gqa/ones2", np.array([1, 1], np.int64))
    add_constant(nodes, "gqa/one_f", np.float32(1.0))
    add_constant(nodes, "gqa/min_f", np.float32(np.finfo(np.float32).min))
    add = lambda op, ins, out, **kw: nodes.append(helper.make_node(op, ins, [out], **kw))  # noqa: E731
    add("Shape", ["attention_mask"], "gqa/mask_shape")
    add("Gather", ["gqa/mask_shape", "gqa/axis1"], "gqa/total_1", axis=0)
    add("Cast", ["gqa/total_1"], "gqa/total_1_i32", to=TensorProto.INT32)
    add("Squeeze", ["gqa/total_1_i32"], TOTAL)                       # scalar int32
    add("Sub", ["gqa/total_1_i32", "gqa/one_i32"], "gqa/last_1")
    add("Shape", ["attention_mask"], "gqa/batch_1", end=1)
    add("Expand", ["gqa/last_1", "gqa/batch_1"], SEQLENS)            # [B] int32, every row full length
    add("Cast", ["attention_mask"], "gqa/mask_f", to=TensorProto.FLOAT)
    add("Sub", ["gqa/one_f", "gqa/mask_f"], "gqa/masked_f")
    add("Mul", ["gqa/masked_f", "gqa/min_f"], "gqa/bias_2d")         # [B, T]: 0 or float min
    add("Unsqueeze", ["gqa/bias_2d", "gqa/axes12"], "gqa/bias_4d")   # [B, 1, 1, T]
    add("Shape", ["input_ids"], "gqa/seq_1", start=1, end=2)
    # query_seqlens (every row's new tokens, all valid): without it onnxruntime refuses a batch of several
    # rows with several new tokens each after a past (batched prompts continuing a shared prefix's cache).
    add("Cast", ["gqa/seq_1"], "gqa/seq_1_i32", to=TensorProto.INT32)
    add("Expand", ["gqa/seq_1_i32", "gqa/batch_1"], QUERY_SEQLENS)
    add("Concat", ["gqa/ones2", "gqa/seq_1", "gqa/axis1"], "gqa/bias_shape", axis=0)   # [1, 1, S, 1]
    add("Expand", ["gqa/bias_4d", "gqa/bias_shape"], BIAS)           # [B, 1, S, T]


def past_shape_from_mask(g: GraphIndex, kv_heads: int, head_dim: int, nodes: list) -> int:
    """Re-point Shape(past_key_values.*) (Gemma-3's export takes its rotary positions from the past length)
    at [B, kv_heads, total - new, head_dim] computed from attention_mask and input_ids: with past and present
    sharing one preallocated buffer the past tensor is longer than the cache (runtime/session.py), the mask
    never is. Returns how many Shape nodes it replaced."""
    shapes = [n for n in g.graph.node if n.op_type == "Shape" and n.input[0].startswith("past_key_values.")]
    if not shapes:
        return 0
    const = lambda name, value: add_constant(nodes, name, np.array(value, np.int64))  # noqa: E731
    const("gqa/kv_heads", [kv_heads])
    const("gqa/head_dim", [head_dim])
    nodes.append(helper.make_node("Shape", ["attention_mask"], ["gqa/total_i64"], start=1, end=2))
    nodes.append(helper.make_node("Shape", ["input_ids"], ["gqa/new_i64"], start=1, end=2))
    nodes.append(helper.make_node("Sub", ["gqa/total_i64", "gqa/new_i64"], ["gqa/past_len"]))
    nodes.append(helper.make_node("Concat", ["gqa/batch_1", "gqa/kv_heads", "gqa/past_len", "gqa/head_dim"],
                                  ["gqa/past_shape"], axis=0))
    for index, node in enumerate(shapes):   # the same int64 tensor as before, start/end attributes kept
        attrs = {a.name: a.i for a in node.attribute}
        bounds = f"gqa/past_shape_bounds_{index}"
        const(bounds + "_start", [attrs.get("start", 0)])
        const(bounds + "_end", [attrs.get("end", 4)])
        node.op_type = "Slice"
        del node.input[:], node.attribute[:]
        node.input.extend(["gqa/past_shape", bounds + "_start", bounds + "_end"])
    return len(shapes)


def strip_scale(g: GraphIndex, name: str) -> str:
    """The tensor under an optional Mul by a constant (optimum's SDPA export scales q and k by sqrt(scale))."""
    node = g.producer.get(name)
    if node is not None and node.op_type == "Mul":
        for i, j in ((0, 1), (1, 0)):
            if g.constant(node.input[j]) is not None:
                return node.input[i]
    return name


def heads_to_3d(g: GraphIndex, bnsh: str, heads: int, nodes: list, tag: str) -> str:
    """A [B, N, S, H] tensor as [B, S, N*H]: the projection output it was made from where the chain is
    Reshape -> Transpose (v), the RotaryEmbedding re-pointed at that output (q, k with fused rotary), else a
    Transpose + Reshape (unfused rotary, Gemma-3's q/k norm)."""
    node = g.producer.get(bnsh)
    if node is not None and node.op_type == "RotaryEmbedding":
        source = projection_3d(g, node.input[0])
        if source is not None:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attrs["num_heads"] = heads
            out = f"{tag}/rotary_3d"
            nodes.append(helper.make_node("RotaryEmbedding", [source, *node.input[1:]], [out], domain=MS, **attrs))
            return out
    source = projection_3d(g, bnsh)
    if source is not None:
        return source
    nodes.append(helper.make_node("Transpose", [bnsh], [f"{tag}/bsnh"], perm=[0, 2, 1, 3]))
    nodes.append(helper.make_node("Reshape", [f"{tag}/bsnh", "gqa/shape_bsd"], [f"{tag}/bsd"]))
    return f"{tag}/bsd"


def projection_3d(g: GraphIndex, bnsh: str) -> str | None:
    """X where bnsh = Transpose(Reshape(X), perm 0,2,1,3) and X is 3-D, else None."""
    transpose = g.producer.get(bnsh)
    if transpose is None or transpose.op_type != "Transpose":
        return None
    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
    reshape = g.producer.get(transpose.input[0])
    if perm != [0, 2, 1, 3] or reshape is None or reshape.op_type != "Reshape":
        return None
    return reshape.input[0]


def in_op_rotary(g: GraphIndex, q_bnsh: str, k_bnsh: str, head_dim: int) -> tuple | None:
    """(q, k, [cos, sin], attributes) for GroupQueryAttention's own rotary (do_rotary=1) where q and k are
    full-width RotaryEmbedding nodes over 3-D projections with the same caches, else None (Gemma-3's q/k norm
    and unfused rotary stay outside). The op then rotates each row at its buffer position P + s (P = past
    length), not at the exported position_ids: a left-padded row is shifted by its padding, the same for its
    queries and keys, and rotary scores depend on position differences only (the padded batch tests)."""
    nodes = [g.producer.get(name) for name in (q_bnsh, k_bnsh)]
    if any(node is None or node.op_type != "RotaryEmbedding" for node in nodes):
        return None
    attrs = [{a.name: helper.get_attribute_value(a) for a in node.attribute} for node in nodes]
    sources = [projection_3d(g, node.input[0]) for node in nodes]
    caches = [list(node.input[2:4]) for node in nodes]
    if (None in sources or caches[0] != caches[1] or attrs[0].get("interleaved", 0) != attrs[1].get("interleaved", 0)
            or any(a.get("rotary_embedding_dim", 0) not in (0, head_dim) or a.get("is_packed_batching", 0)
                   or a.get("scale", 1.0) != 1.0 for a in attrs)):
        return None
    return sources[0], sources[1], caches[0], {"do_rotary": 1, "rotary_interleaved": attrs[0].get("interleaved", 0)}


def pack_qkv(g: GraphIndex, outputs: list[str], nodes: list, tag: str) -> str | None:
    """One MatMul for q, k and v (GroupQueryAttention's packed-QKV query input) where each is MatMul(x, W)
    of the same x with a constant W: one node instead of three. Not pack.py's pack_projections: the op reads
    the packed product itself, so there is no Split back to q/k/v (and quantize cannot unpack it, hence
    same_grid). Returns its output, or None where the
    projections are not plain MatMuls of one input (biases, LoRA-style adds)."""
    producers = [g.producer.get(name) for name in outputs]
    if any(node is None or node.op_type != "MatMul" or node.input[1] not in g.init for node in producers):
        return None
    if len({node.input[0] for node in producers}) != 1:
        return None
    weights = [numpy_helper.to_array(g.init[node.input[1]]) for node in producers]
    if any(w.ndim != 2 for w in weights) or not same_grid(weights):
        return None
    name = f"{tag}/weight"
    g.graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), name))
    g.init[name] = g.graph.initializer[-1]
    nodes.append(helper.make_node("MatMul", [producers[0].input[0], name], [f"{tag}/output"], name=f"{tag}/MatMul"))
    return f"{tag}/output"


def same_grid(weights: list[np.ndarray]) -> bool:
    """Whether the weights lie on the same block grid (exporter/grid.py) or none on any: a dequantized GGUF
    may mix grids across q/k/v (Q4_K_M: v in Q6_K), and a packed weight must keep each part's grid exact
    for `edit quantize --grid source` (a mixed one would fall to the widest grid or to re-rounding)."""
    from .grid import find_grid

    grids = [find_grid(w) for w in weights]
    return len({None if grid is None else (grid.bits, grid.block) for grid in grids}) == 1


def find_layer(g: GraphIndex, layer: int) -> dict:
    """The tensors around layer `layer`'s attention: new k/v (before the present Concat), rotated q,
    and the attention output (the o_proj input)."""
    concat_k, concat_v = (g.producer.get(f"present.{layer}.{kind}") for kind in ("key", "value"))
    past_k, past_v = f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"
    if (concat_k is None or concat_v is None or concat_k.op_type != "Concat" or concat_v.op_type != "Concat"
            or list(concat_k.input[:1]) != [past_k] or list(concat_v.input[:1]) != [past_v]):
        raise UnskillError(f"layer {layer}: present.{layer}.* is not Concat(past, new)")
    # probs x V: the MatMul reached from present.value through the GQA head repeat (Unsqueeze/Expand/Reshape).
    frontier, probs_v = [f"present.{layer}.value"], None
    for _ in range(6):
        users = [n for name in frontier for n in g.consumers.get(name, []) if n.op_type not in ("Shape",)]
        probs_v = next((n for n in users if n.op_type == "MatMul"), None)
        if probs_v is not None:
            break
        frontier = [o for n in users if n.op_type in ("Unsqueeze", "Expand", "Reshape") for o in n.output]
    if probs_v is None:
        raise UnskillError(f"layer {layer}: no probs x V MatMul after present.{layer}.value")
    # Back from the probabilities to the scores MatMul (Where(IsNaN) guard, Softmax, mask Add).
    name, scores = probs_v.input[0], None
    for _ in range(8):
        node = g.producer.get(name)
        if node is None:
            break
        if node.op_type == "MatMul":
            scores = node
            break
        data = node.input[1:] if node.op_type == "Where" else node.input   # Where(IsNaN(p), 0, p)
        name = next((n for n in data if g.constant(n) is None), data[0])
    transpose = g.only_consumer(probs_v.output[0], "Transpose")
    reshape = transpose is not None and g.only_consumer(transpose.output[0], "Reshape")
    if scores is None or not reshape:
        raise UnskillError(f"layer {layer}: attention is not MatMul -> Softmax -> MatMul -> Transpose -> Reshape")
    return {"q": strip_scale(g, scores.input[0]), "k": concat_k.input[1], "v": concat_v.input[1],
            "out": reshape.output[0], "concats": (concat_k, concat_v)}


def fuse_attention(model: onnx.ModelProto, config: dict, num_layers: int, rotary_in_op: bool = False) -> int:
    """Replace each layer's attention (see the module docstring). Returns the number of layers fused.
    rotary_in_op: GroupQueryAttention's own rotary where it applies (in_op_rotary; off by default)."""
    g = GraphIndex(model)
    heads, kv_heads, head_dim = attention_heads(config)
    scale = attention_scale(config, head_dim)
    layers = [find_layer(g, layer) for layer in range(num_layers)]   # all or nothing: check before editing
    new_nodes: list = []
    add_mask_inputs(new_nodes)
    add_constant(new_nodes, "gqa/shape_bsd", np.array([0, 0, -1], np.int64))
    past_shape_from_mask(g, kv_heads, head_dim, new_nodes)
    rename = {}
    for layer, found in enumerate(layers):
        tag = f"/model/layers.{layer}/gqa"
        rotary = in_op_rotary(g, found["q"], found["k"], head_dim) if rotary_in_op else None
        if rotary is not None:
            q, k, caches, rotary_attrs = rotary
        else:
            q = heads_to_3d(g, found["q"], heads, new_nodes, f"{tag}/q")
            k = heads_to_3d(g, found["k"], kv_heads, new_nodes, f"{tag}/k")
            caches, rotary_attrs = ["", ""], {}
        v = heads_to_3d(g, found["v"], kv_heads, new_nodes, f"{tag}/v")
        projections = [q, k, v]
        # Packed only with the rotary in the op: a Split back to q/k/v for outside rotary nodes measured
        # nothing (SmolLM2 int4 109 vs 111 tok/s, fp32 +1 %).
        packed = pack_qkv(g, projections, new_nodes, f"{tag}/qkv") if rotary else None
        out = f"{tag}/output"
        new_nodes.append(helper.make_node(
            "GroupQueryAttention",
            [*([packed, "", ""] if packed else [q, k, v]), f"past_key_values.{layer}.key",
             f"past_key_values.{layer}.value", SEQLENS, TOTAL, *caches, "", BIAS, "", "", "", "", "", QUERY_SEQLENS],
            [out, f"present.{layer}.key", f"present.{layer}.value"], name=f"{tag}/GroupQueryAttention",
            domain=MS, num_heads=heads, kv_num_heads=kv_heads, scale=scale, local_window_size=local_window(config, layer),
            **rotary_attrs))
        rename[found["out"]] = out
    drop = {id(n) for found in layers for n in found["concats"]}
    kept = [n for n in model.graph.node if id(n) not in drop]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del model.graph.node[:]
    model.graph.node.extend(topological([*new_nodes, *kept], model.graph))
    remove_dead_nodes(model)
    if not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    return len(layers)


def drop_query_seqlens(model: onnx.ModelProto) -> int:
    """GroupQueryAttention nodes without their 17th input (query_seqlens, onnxruntime >= 1.32): the schema that
    onnxruntime-node/-web 1.30-1.31 and onnxruntime-genai 0.18 know has 16 at most. Without it a batch of several
    rows cannot continue a past with several new tokens each (the runtime then prefills in one pass,
    manifest.gqa_query_seqlens). Edits in place, drops the nodes that computed it; returns the nodes changed."""
    changed = 0
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and node.domain == MS and len(node.input) > 16:
            del node.input[16:]
            while node.input and not node.input[-1]:
                node.input.pop()
            changed += 1
    if changed:
        remove_dead_nodes(model)
    return changed
