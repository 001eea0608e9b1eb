"""The one graph index every graph pass reads: producers, consumers and initializers of a graph, topological
order, and dead-node removal. It imports nothing else from exporter/, so every pass can build on it.

A pass that rewrites the node list and then looks up again calls `refresh()`; initializers are indexed
once (passes add to `init` what they add to the graph).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from unskill.runtime.errors import UnskillError


class GraphIndex:
    """Producer/consumer look-ups over a graph that may be edited in place."""

    def __init__(self, model: onnx.ModelProto | onnx.GraphProto):
        self.model = model if isinstance(model, onnx.ModelProto) else None
        self.graph = model.graph if isinstance(model, onnx.ModelProto) else model
        self.init = {t.name: t for t in self.graph.initializer}
        self.refresh()

    def refresh(self) -> None:
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output; None for a computed tensor."""
        if name in self.init:
            return numpy_helper.to_array(self.init[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def only_consumer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def topological(nodes: list, graph: onnx.GraphProto) -> list:
    """Nodes ordered so each comes after the producers of its inputs (ONNX requires it)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise UnskillError(f"graph pass left a cycle or a missing input at {rest[0].name or rest[0].op_type}")
        pending = rest
    return ordered


def live_nodes(graph: onnx.GraphProto, outputs) -> list:
    """The nodes `outputs` depend on, in graph order (the graph is topologically sorted). An empty name is
    an omitted optional input or output, never a tensor."""
    needed, alive = set(outputs), []
    for node in reversed(graph.node):
        if any(name and name in needed for name in node.output):
            alive.append(node)
            needed.update(name for name in node.input if name)
    return alive[::-1]


def drop_unused_initializers(graph: onnx.GraphProto, only=None) -> None:
    """Remove the initializers no node and no graph output reads (only those named in `only`, if given)."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used and (only is None or t.name in only)]
    for tensor in unused:
        graph.initializer.remove(tensor)


def remove_dead_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the nodes (and initializers) nothing reachable from the graph outputs reads, in place."""
    alive = live_nodes(model.graph, [o.name for o in model.graph.output])
    del model.graph.node[:]
    model.graph.node.extend(alive)
    drop_unused_initializers(model.graph)
    return model


def cut_to_outputs(model: onnx.ModelProto, keep_outputs: list[str]) -> onnx.ModelProto:
    """A copy of `model` that computes only `keep_outputs`: onnxruntime runs every node of a graph whatever
    the caller fetches, so a pass that wants some outputs alone needs a graph that holds nothing else. Load
    `model` with load_external_data=False and the copy's weights still point into the model's data file."""
    graph = model.graph
    nodes = live_nodes(graph, keep_outputs)
    used = {name for node in nodes for name in node.input} | set(keep_outputs)
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    kept = cut.graph
    for field, items in (("node", nodes), ("initializer", [i for i in graph.initializer if i.name in used]),
                         ("input", [i for i in graph.input if i.name in used]),
                         ("output", [o for o in graph.output if o.name in keep_outputs]),
                         ("value_info", [v for v in graph.value_info if v.name in used])):
        kept.ClearField(field)
        getattr(kept, field).extend(items)
    return cut
