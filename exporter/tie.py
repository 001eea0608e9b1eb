"""The tied token embedding / LM head stored once (a pure pass over a ModelProto).

Where the export ties them (SmolLM2, Gemma-3), the fused graph still holds two copies: the embedding
[V, H] read by the token Gather and its transpose [H, V] read by the LM head's MatMul (onnxruntime's
optimizer materializes the transpose), 113 MB twice for SmolLM2. Here the Gather reads the head's [H, V]
weight along axis 1 ([H, B, S]) and a Transpose of that small result gives [B, S, H]: the same numbers, and
the LM head MatMul, the expensive op of a decode step, stays as it was. (The other way round, a MatMul over a
Transpose of the embedding, would transpose V x H floats every step.)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def tie_embedding(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """(copy of model with one stored copy of the tied weight, whether it tied). The weights must be loaded
    (not external references); untied or unrecognized graphs come back unchanged."""
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] in init and "input_ids" in n.input[1:]
                   and all(a.i == 0 for a in n.attribute if a.name == "axis")), None)
    head = next((n for n in graph.node if n.op_type == "MatMul" and "logits" in n.output and n.input[1] in init), None)
    if gather is None or head is None:
        return model, False
    embedding, weight = init[gather.input[0]], init[head.input[1]]
    if list(embedding.dims) != list(weight.dims)[::-1] or embedding.data_type != weight.data_type:
        return model, False
    if not np.array_equal(numpy_helper.to_array(embedding).T, numpy_helper.to_array(weight)):
        return model, False
    tied = onnx.ModelProto()
    tied.CopyFrom(model)
    nodes = tied.graph.node
    index = next(i for i, n in enumerate(nodes) if n.op_type == "Gather" and n.input[0] == embedding.name
                 and "input_ids" in n.input[1:])
    original_output = nodes[index].output[0]
    columns = original_output + "/tied_columns"
    new_gather = helper.make_node("Gather", [weight.name, nodes[index].input[1]], [columns],
                                  name=(nodes[index].name or "embed") + "/tied", axis=1)
    transpose = helper.make_node("Transpose", [columns], [original_output],
                                 name=(nodes[index].name or "embed") + "/tied_transpose", perm=[1, 2, 0])
    del nodes[index]
    nodes.insert(index, transpose)
    nodes.insert(index, new_gather)
    if not any(n.input and embedding.name in n.input for n in nodes):
        kept = [t for t in tied.graph.initializer if t.name != embedding.name]
        tied.graph.ClearField("initializer")
        tied.graph.initializer.extend(kept)
    return tied, True
