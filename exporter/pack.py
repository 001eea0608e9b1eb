"""Pack the projections that read one input (q/k/v, gate/up) into one MatMul + Split: exact, fewer nodes.

A decode step multiplies one token's vector by every weight, so each projection node costs a kernel launch
and, at 2 threads, a thread-pool dispatch for little work: SmolLM2's k/v projections (192 columns) took as
long per column as the 1,536-column gate. Concatenating the weights along the output dimension and splitting
the product gives the same numbers (every output column is computed from the same input and its own weight
column) with one launch. Measured (benchmarks/README.md): int4 SmolLM2 +7.5 % decode at 2 threads,
fp32 +4 %.

Works on plain MatMul with a 2-D weight initializer and on MatMulNBits (B, scales, zero points and bias are
all per output column: concatenated along N; nodes with g_idx are left alone). The Split keeps the original
output names, so key / pre-activation outputs, NA's inserted nodes and the runtime see the same tensors.

Where: the fused export packs by default (exporter/fuse.py; `--no-pack` keeps one MatMul per projection),
`edit quantize --mode int4` packs the MatMulNBits it writes, `edit pack` packs an older export. Pruning cuts
a projection's columns: it unpacks (unpack_projections), cuts and packs again.

Our own pass: onnxruntime.transformers packs q/k/v only inside its attention fusions (and for fp32 MatMul
only), and its MatMulNBits quantizer writes one node per MatMul.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .index import GraphIndex, drop_unused_initializers

PACKED = "/packed"   # node-name suffix of a packed projection; its Split is PACKED + "/split"


def _attributes(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _group_key(node, initializers: dict):
    """Nodes with equal keys read the same input the same way and can share one node; None: not packable."""
    if node.op_type == "MatMul":
        weight = initializers.get(node.input[1])
        if weight is None or len(weight.dims) != 2:
            return None
        return ("MatMul", node.input[0], weight.dims[0], weight.data_type)
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
        extra = list(node.input[1:])
        if len(extra) >= 4 and extra[3]:                 # g_idx: a column permutation per block, left alone
            return None
        if not all(name in initializers for name in extra if name):
            return None
        attributes = {k: v for k, v in _attributes(node).items() if k != "N"}
        present = tuple(bool(name) for name in extra)    # which optional inputs it has (zero points, bias)
        return ("MatMulNBits", node.input[0], tuple(sorted(attributes.items())), present)
    return None


def _per_column(array: np.ndarray, columns: int) -> np.ndarray:
    """A MatMulNBits constant as [N, ...] (scales and zero points may be stored flat)."""
    return array.reshape(columns, -1)


def _packed_nodes(graph, nodes: list, initializers: dict) -> list:
    base = (nodes[0].name or nodes[0].output[0]) + PACKED
    if nodes[0].op_type == "MatMul":
        weights = [numpy_helper.to_array(initializers[n.input[1]]) for n in nodes]
        widths = [w.shape[1] for w in weights]
        graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), f"{base}/weight"))
        packed = helper.make_node("MatMul", [nodes[0].input[0], f"{base}/weight"], [f"{base}/output"], name=base)
    else:
        widths = [_attributes(n)["N"] for n in nodes]
        inputs = [nodes[0].input[0]]
        for position, name in enumerate(nodes[0].input[1:], start=1):
            if not name:
                inputs.append("")
                continue
            parts = [numpy_helper.to_array(initializers[n.input[position]]) for n in nodes]
            joined = np.concatenate([_per_column(p, w) for p, w in zip(parts, widths)], axis=0)
            # Keep each constant's layout: [N, ...] stays so (B is [N, blocks, blob]), flat ones stay flat.
            shaped = parts[0].ndim > 1 and parts[0].shape[0] == widths[0]
            joined = joined.reshape(sum(widths), *parts[0].shape[1:]) if shaped else joined.reshape(-1)
            inputs.append(f"{base}/input{position}")
            graph.initializer.append(numpy_helper.from_array(joined, inputs[-1]))
        attributes = {**_attributes(nodes[0]), "N": sum(widths)}
        packed = helper.make_node("MatMulNBits", inputs, [f"{base}/output"], name=base, domain="com.microsoft",
                                  **attributes)
    graph.initializer.append(numpy_helper.from_array(np.array(widths, np.int64), f"{base}/widths"))
    split = helper.make_node("Split", [f"{base}/output", f"{base}/widths"], [n.output[0] for n in nodes],
                             name=f"{base}/split", axis=-1)
    return [packed, split]


def pack_projections(model: onnx.ModelProto, op_types=("MatMul", "MatMulNBits")) -> int:
    """Pack every group of `op_types` projections that read the same input (in place). The packed node takes
    the first member's place in the node list: every member reads only that input, so the order stays
    topological. Returns how many projections went into packed nodes."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    groups = defaultdict(list)
    for node in graph.node:
        key = _group_key(node, initializers) if node.op_type in op_types else None
        if key is not None:
            groups[key].append(node)
    replacement, dropped = {}, set()
    for members in groups.values():
        if len(members) > 1:
            replacement[id(members[0])] = _packed_nodes(graph, members, initializers)
            dropped.update(id(n) for n in members)
    _rewrite(graph, replacement, dropped)
    return len(dropped)


def _rewrite(graph, replacement: dict, dropped: set) -> None:
    """Nodes in `replacement` (by id) give way to their new nodes in place, nodes in `dropped` go, and so do
    the initializers no node reads any more."""
    if not replacement:
        return
    nodes = []
    for node in graph.node:
        if id(node) in replacement:
            nodes.extend(replacement[id(node)])
        elif id(node) not in dropped:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)


def unpack_projections(model: onnx.ModelProto) -> int:
    """The inverse for fp32 MatMuls (in place): one MatMul per projection again, reading column slices of the
    packed weight, so that pruning can cut a projection's columns. Returns how many projections it restored;
    a packed MatMulNBits (a quantized graph) is refused: its weights are no longer fp32."""
    from unskill.runtime.errors import UnskillError

    graph = model.graph
    index = GraphIndex(model)
    initializers, producer = index.init, index.producer
    splits = [node for node in graph.node if node.name.endswith(PACKED + "/split")]
    replacement, dropped = {}, set()
    for split in splits:
        packed = producer[split.input[0]]
        if packed.op_type != "MatMul":
            raise UnskillError(f"{packed.name}: a packed {packed.op_type} (quantized graph); edit the fp32 model")
        weight = numpy_helper.to_array(initializers[packed.input[1]])
        widths = numpy_helper.to_array(initializers[split.input[1]])
        columns = np.split(weight, np.cumsum(widths)[:-1], axis=1)
        stem = packed.name[:-len(PACKED)]
        nodes = []
        for index, (part, output) in enumerate(zip(columns, split.output)):
            name = f"{stem}/unpacked{index}"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(part), f"{name}/weight"))
            nodes.append(helper.make_node("MatMul", [packed.input[0], f"{name}/weight"], [output], name=name))
        replacement[id(packed)] = nodes
        dropped.add(id(split))
    _rewrite(graph, replacement, dropped)
    return sum(len(n) for n in replacement.values())


def pack(model_dir, out_dir):
    """`unskill edit pack`: an exported (or edited) fp32 model with its projections packed, written beside it
    (exports made with --no-pack or before packing was the default). Same outputs: the KSD stats of the parent load on it."""
    from unskill.runtime.errors import UnskillError

    from .folder import load_exported, refuse_nonempty_out, save_edited, stats_compatible_with

    refuse_nonempty_out(Path(out_dir))
    model, manifest = load_exported(model_dir)
    packed = pack_projections(model, op_types=("MatMul",))
    if not packed:
        raise UnskillError(f"{model_dir}: no two MatMuls with weight initializers read one input; nothing to pack")
    edit = {"method": "pack", "ratio": 0.0, "packed_projections": packed}
    return save_edited(model, manifest, model_dir, out_dir, edit, stats_compatible=stats_compatible_with(manifest))
