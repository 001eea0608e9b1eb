"""Find each layer's FFL tensors by graph structure and expose them as graph outputs.

The anchor is the down projection: the MatMul/Gemm whose weight is an (ffn, hidden) initializer. Its
input 0 is the key vector. In a gated FFL the key is Mul(act(gate), up): the input that comes straight
from a (hidden, ffn) projection is `up`, the other passes through the activation, whose input is the
pre-activation. In a plain FFL the key is act(fc1) and fc1's output (+bias) is the pre-activation.
Node names are never used, so any exporter's naming works.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from unskill.runtime.errors import UnskillError

from .index import GraphIndex

PROJECTIONS = ("MatMul", "Gemm")
SHAPE_ONLY = ("Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze")
MAX_ACTIVATION_NODES = 64   # the activation is a short chain (SiLU: 2 ops, GELU-tanh: ~8)


@dataclass
class FFLTensors:
    key: str           # input of the down projection
    preact: str        # input of the activation (gate or fc1 output, bias included)
    up: str | None     # up_proj output in a gated FFL


class _FFLIndex:
    """The graph index with the FFL shapes: which projections are up (hidden -> ffn) and down (ffn -> hidden)."""

    def __init__(self, graph: onnx.GraphProto, hidden: int, ffn: int):
        self.hidden, self.ffn = hidden, ffn
        index = GraphIndex(graph)
        self.initializers = {name: tuple(init.dims) for name, init in index.init.items()}
        self.producer = index.producer
        self.constants = set(self.initializers) | {
            out for node in graph.node if node.op_type == "Constant" for out in node.output}

    def weight_shape(self, node) -> tuple[int, ...] | None:
        if node.op_type not in PROJECTIONS or len(node.input) < 2 or node.input[1] not in self.initializers:
            return None
        dims = self.initializers[node.input[1]]
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        return dims[::-1] if transposed else dims

    def is_up_projection(self, node) -> bool:
        return self.weight_shape(node) == (self.hidden, self.ffn)

    def is_down_projection(self, node) -> bool:
        return self.weight_shape(node) == (self.ffn, self.hidden)

    def _value_source(self, node) -> str | None:
        """The one computed input of a bias-add or shape-only node; None for anything that mixes values."""
        computed = [name for name in node.input if name and name not in self.constants]
        if node.op_type in SHAPE_ONLY or (node.op_type == "Add" and len(computed) == 1):
            return computed[0] if computed else None
        return None

    def comes_from_projection(self, tensor: str) -> bool:
        """True if tensor is an up/gate/fc1 projection output, possibly after a bias add or reshape."""
        node = self.producer.get(tensor)
        while node is not None and not self.is_up_projection(node):
            source = self._value_source(node)
            if source is None:
                return False
            node = self.producer.get(source)
        return node is not None

    def strip_shape_ops(self, tensor: str) -> str:
        node = self.producer.get(tensor)
        while node is not None and node.op_type in SHAPE_ONLY:
            tensor = node.input[0]
            node = self.producer.get(tensor)
        return tensor

    def activation_input(self, activation_output: str) -> str:
        """Breadth-first back to the nearest tensor that is a projection output: the activation's input."""
        queue, seen = deque([activation_output]), set()
        while queue and len(seen) < MAX_ACTIVATION_NODES:
            tensor = queue.popleft()
            if tensor in seen or tensor in self.constants:
                continue
            seen.add(tensor)
            if self.comes_from_projection(tensor):
                return tensor
            node = self.producer.get(tensor)
            if node is not None and node.op_type not in PROJECTIONS:
                queue.extend(node.input)
        raise UnskillError(f"no FFL pre-activation found behind tensor {activation_output!r}")


def find_ffl_tensors(model: onnx.ModelProto, hidden: int, ffn: int) -> list[FFLTensors]:
    """One FFLTensors per layer, in graph order (which is layer order for every exporter we use)."""
    if hidden == ffn:
        raise UnskillError(f"hidden size {hidden} equals the FFL width: the structural match needs them to differ")
    index = _FFLIndex(model.graph, hidden, ffn)
    layers = []
    for node in model.graph.node:
        if not index.is_down_projection(node):
            continue
        key = index.strip_shape_ops(node.input[0])   # Gemm exports flatten the key; expose the 3-D one
        key_node = index.producer.get(key)
        if key_node is not None and key_node.op_type == "Mul":
            direct = [t for t in key_node.input if index.comes_from_projection(t)]
            through_activation = [t for t in key_node.input if t not in direct]
            if len(direct) == 1 and len(through_activation) == 1:
                layers.append(FFLTensors(key, index.activation_input(through_activation[0]), direct[0]))
                continue
        layers.append(FFLTensors(key, index.activation_input(key), None))
    if not layers:
        raise UnskillError(f"no down projection with a ({ffn}, {hidden}) weight found in the graph")
    return layers


def key_output_name(layer: int) -> str:
    return f"key.{layer}"


def preact_output_name(layer: int) -> str:
    return f"preact.{layer}"


def add_ffl_outputs(model: onnx.ModelProto, layers: list[FFLTensors], ffn: int) -> tuple[list[str], list[str], list[str]]:
    """Expose key and pre-activation of every layer as graph outputs [batch, seq, ffn] via Identity nodes,
    and the key at the last position as `key_last.{i}` [batch, ffn]: probing needs only that, and fetching
    it alone spares copying every position of every layer out of the session."""
    graph = model.graph
    last = "/unskill/last_position"
    graph.initializer.append(helper.make_tensor(last, TensorProto.INT64, [], [-1]))
    key_names, preact_names, last_names = [], [], []
    for i, layer in enumerate(layers):
        for tensor, name, names in ((layer.key, key_output_name(i), key_names),
                                    (layer.preact, preact_output_name(i), preact_names)):
            graph.node.append(helper.make_node("Identity", [tensor], [name], name=f"/unskill/{name}"))
            graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size", "sequence_length", ffn]))
            names.append(name)
        name = f"key_last.{i}"
        graph.node.append(helper.make_node("Gather", [layer.key, last], [name], name=f"/unskill/{name}", axis=1))
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size", ffn]))
        last_names.append(name)
    return key_names, preact_names, last_names


@dataclass
class FFLWeights:
    """Initializers of one layer's FFL, found from the exported key/preact outputs (shape-independent,
    so it still works after pruning has changed widths)."""
    key: str
    preact: str
    down: str                   # (F, H) weight of the down projection
    inputs: list[str]           # (H, F) weights feeding the key: gate (or fc1) first, then up
    biases: list[str]           # (F,) biases added to those projections


def output_sources(model: onnx.ModelProto, output_names: list[str]) -> list[str]:
    """The graph tensors behind the Identity outputs added by add_ffl_outputs."""
    source = {node.output[0]: node.input[0] for node in model.graph.node if node.name.startswith("/unskill/")}
    missing = [n for n in output_names if n not in source]
    if missing:
        raise UnskillError(f"graph has no unskill outputs {missing[:3]}; re-export it with `unskill export`")
    return [source[n] for n in output_names]


def locate_ffl_weights(model: onnx.ModelProto, manifest) -> list[FFLWeights]:
    index = GraphIndex(model)
    initializers, producer, consumers = set(index.init), index.producer, index.consumers

    def projection_behind(tensor: str) -> tuple[str, list[str]]:
        """(weight, biases) of the projection that produced tensor, through bias adds."""
        biases = []
        node = producer[tensor]
        while node.op_type == "Add":
            biases += [i for i in node.input if i in initializers]
            node = producer[next(i for i in node.input if i not in initializers)]
        if node.op_type not in PROJECTIONS or node.input[1] not in initializers:
            raise UnskillError(f"tensor {tensor!r} does not come from a MatMul with a weight initializer")
        return node.input[1], biases

    layers = []
    keys, preacts = output_sources(model, manifest.key_outputs), output_sources(model, manifest.preact_outputs)
    for key_name, key, preact in zip(manifest.key_outputs, keys, preacts):
        down = next((n for n in consumers.get(key, []) if n.op_type == "MatMul" and n.input[1] in initializers), None)
        if down is None:
            raise UnskillError(f"layer output {key_name}: no MatMul down projection consumes it (Gemm-based "
                               "FFLs, e.g. GPT-2, cannot be pruned by removal)")
        gate_weight, biases = projection_behind(preact)
        inputs = [gate_weight]
        key_node = producer[key]
        if manifest.gated:
            up_tensor = next(t for t in key_node.input if producer.get(t) is not None and
                             _is_projection_chain(producer, t, initializers))
            up_weight, up_biases = projection_behind(up_tensor)
            inputs.append(up_weight)
            biases += up_biases
        layers.append(FFLWeights(key, preact, down.input[1], inputs, biases))
    return layers


def _is_projection_chain(producer, tensor, initializers) -> bool:
    node = producer.get(tensor)
    while node is not None and node.op_type == "Add" and any(i in initializers for i in node.input):
        node = producer.get(next(i for i in node.input if i not in initializers))
    return node is not None and node.op_type in PROJECTIONS and len(node.input) > 1 and node.input[1] in initializers


LOGITS_TO_KEEP = "logits_to_keep"   # transformers' / onnxruntime-genai's name for the same knob


def add_logits_to_keep(model: onnx.ModelProto, logits_output: str = "logits") -> str:
    """Add an optional int64 input `logits_to_keep` ([1]) that limits the LM head to the last k positions,
    as transformers' `logits_to_keep`: 0 keeps every position. Its default (an initializer of the same name,
    which onnxruntime lets a caller override) is 0, so optimum and onnxruntime-genai, which never feed it,
    still get logits for every position; the runtime feeds 1 for prompt passes and decode, so a long prompt
    no longer costs [seq, vocab] floats. A graph pass of our own: onnxruntime's fusion tools have none.

    The slice goes right before the LM head's projection (the MatMul/Gemm nearest the logits output,
    found by walking back from it), so the final norm and any softcapping after the head see k rows.
    Returns the input's name; a graph that already has it is left alone."""
    graph = model.graph
    if any(i.name == LOGITS_TO_KEEP for i in graph.input):
        return LOGITS_TO_KEEP
    producer = GraphIndex(graph).producer
    node = producer.get(logits_output)
    while node is not None and node.op_type not in PROJECTIONS:
        computed = [name for name in node.input if name in producer]
        node = producer.get(computed[0]) if len(computed) == 1 else None
    if node is None:
        raise UnskillError(f"no LM head projection found behind the {logits_output!r} output")
    hidden = node.input[0]
    kept, start, end, axis = (f"/unskill/lm_head_rows/{n}" for n in ("rows", "start", "end", "axis"))
    graph.initializer.extend([helper.make_tensor(LOGITS_TO_KEEP, TensorProto.INT64, [1], [0]),
                              helper.make_tensor(end, TensorProto.INT64, [1], [2**62]),
                              helper.make_tensor(axis, TensorProto.INT64, [1], [1])])
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    # starts = -k: the last k rows; -0 = 0 keeps them all. Inserted just before the head, so order holds.
    slice_nodes = [helper.make_node("Neg", [LOGITS_TO_KEEP], [start], name="/unskill/lm_head_rows/Neg"),
                   helper.make_node("Slice", [hidden, start, end, axis], [kept], name="/unskill/lm_head_rows/Slice")]
    node.input[0] = kept
    at = next(i for i, n in enumerate(graph.node) if list(n.output) == list(node.output))
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node]   # survive ClearField
    graph.ClearField("node")
    graph.node.extend(nodes[:at] + slice_nodes + nodes[at:])
    return LOGITS_TO_KEEP
