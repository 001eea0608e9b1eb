"""Neuron Adjust (Li, Sun, Weng 2025, Algorithm 1) as ONNX nodes, with its NumPy reference.

Per element v of a selected neuron's pre-activation, with Gaussians N(mu_f, sd_f) on forget data and
N(mu_r, sd_r) on retain data: if p_f(v) > p_r(v), with probability p_f / (p_f + p_r) replace v by
    2*mu_r - ((v - mu_f) / sd_f * sd_r + mu_r)  =  mu_r - (v - mu_f) * sd_r / sd_f
i.e. mirror its forget z-score onto the retain distribution. Densities are compared in log space
(d = log p_f - log p_r, probability = sigmoid(d)), so values far in both tails never divide 0 by 0.
Differences from the reference code: true standard deviations (it uses a variance, and sd_f = mu_f by a
slip), and one uniform draw per element (it draws once per layer per forward pass).

Noise (`noise=`): "hash" (default) makes the draw a function of (seed, layer, token position, neuron): an
integer hash evaluated by Mul/Add/Mod/Div nodes on int64 (every opset, exact in NumPy too), so a prompt
gives the same output whatever the session ran before and in any batch row, prefill or decode step (the
position comes from `position_ids`, or from the cumulative attention mask). "session" is the stateful
RandomUniformLike op (draws depend on what ran before in the session); "input" takes the noise from
`na_noise.{layer}` graph inputs (exact tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from unskill.runtime.errors import UnskillError
from unskill.runtime.statsfile import StatsFile

SIGMA_FLOOR = 1e-5
NOISE_MODES = ("hash", "session", "input")
HASH_MODULUS = 1 << 31
# The hash's steps on [0, 2^31) (HASH_ROUND for the position, then CELL_ROUND per layer and neuron): multiply by an odd constant, "shift" adds x // 2^k (an xorshift made of
# the arithmetic every ONNX opset has), "square" adds the top bits of x*x (the nonlinearity: without it
# (row, neuron) draws keep an additive structure). Every product stays below 2^62: no int64 overflow.
HASH_ROUND = (("mul", 0x045D9F3B), ("shift", 16), ("square", 0), ("mul", 0x2C1B3C6D), ("shift", 13), ("square", 0),
              ("mul", 0x297A2D39), ("shift", 15))
CELL_ROUND = (("mul", 0x045D9F3B), ("shift", 16), ("square", 0), ("mul", 0x2C1B3C6D), ("shift", 15))
UNIFORM_BITS = 24   # floats k / 2^24 are exact in float32
FORMS = ("masked", "gather")


@dataclass
class NAParams:
    mu_f: np.ndarray      # (L, F) float32, the same for the others
    sd_f: np.ndarray
    mu_r: np.ndarray
    sd_r: np.ndarray
    selected: np.ndarray  # (L, F) bool


def select_neurons(stats: StatsFile, ratio: float, where: str = "stats") -> NAParams:
    """Top `ratio` of all neurons of all layers by mu_f - mu_r (one global threshold, signed)."""
    if not 0 < ratio <= 1:
        raise UnskillError(f"--ratio must be in (0, 1], got {ratio}")
    missing = [g for g in ("na_forget", "na_retain") if g not in stats.groups]
    if missing:
        raise UnskillError(f"{where}: no {', '.join(missing)} statistics; run `unskill stats` with --retain")
    forget, retain = stats.groups["na_forget"], stats.groups["na_retain"]
    mu_f, mu_r = forget.mean(), retain.mean()
    gap = (mu_f - mu_r).ravel()
    count = max(1, int(round(ratio * gap.size)))
    selected = np.zeros(gap.size, dtype=bool)
    selected[np.argsort(-gap, kind="stable")[:count]] = True

    def f32(a):
        return a.astype(np.float32)

    return NAParams(f32(mu_f), f32(np.maximum(forget.std(), SIGMA_FLOOR)), f32(mu_r),
                    f32(np.maximum(retain.std(), SIGMA_FLOOR)), selected.reshape(mu_f.shape))


NEVER = np.float32(-1e30)   # log-ratio offset of unselected neurons: sigmoid gives 0, so never replaced


def na_coefficients(mu_f, sd_f, mu_r, sd_r, selected) -> dict[str, np.ndarray]:
    """Per-neuron float32 constants of the rule in the form the graph evaluates with few operations:
        log p_f - log p_r = (a*v + b)*v + c      (Gaussian log-densities; a quadratic in v)
        mirrored value    = m - v*s              (s = sd_r/sd_f, m = mu_r + mu_f*s)
    Unselected neurons get a = b = 0 and c = -1e30, so they are never replaced and need no mask."""
    mu_f, sd_f, mu_r, sd_r = (np.asarray(x, np.float64) for x in (mu_f, sd_f, mu_r, sd_r))
    inv_f, inv_r = 1 / sd_f**2, 1 / sd_r**2
    a = 0.5 * (inv_r - inv_f)
    b = mu_f * inv_f - mu_r * inv_r
    c = 0.5 * (mu_r**2 * inv_r - mu_f**2 * inv_f) + np.log(sd_r / sd_f)
    s = sd_r / sd_f
    selected = np.asarray(selected, bool)
    coefficients = {"a": np.where(selected, a, 0), "b": np.where(selected, b, 0), "c": np.where(selected, c, NEVER),
                    "s": s, "m": mu_r + mu_f * s}
    return {name: value.astype(np.float32) for name, value in coefficients.items()}


def na_reference(v: np.ndarray, mu_f, sd_f, mu_r, sd_r, selected, uniform: np.ndarray) -> np.ndarray:
    """NumPy Neuron Adjust for one layer: v (..., F), per-neuron vectors (F,), uniform noise like v.
    Uses the graph's float32 operations in the graph's order, so the two agree element for element.
    Replace iff p_f > p_r (prob > 1/2) and u < prob, i.e. max(u, 1/2) < prob."""
    k = na_coefficients(mu_f, sd_f, mu_r, sd_r, selected)
    v = v.astype(np.float32)
    with np.errstate(over="ignore"):
        log_ratio = (v * k["a"] + k["b"]) * v + k["c"]
        prob = 1 / (1 + np.exp(-log_ratio))
    replace = np.maximum(uniform, np.float32(0.5)) < prob
    return np.where(replace, k["m"] - v * k["s"], v).astype(np.float32)


def _mix_numpy(x: np.ndarray, steps=HASH_ROUND) -> np.ndarray:
    for op, value in steps:
        if op == "mul":
            x = x * value
        elif op == "shift":
            x = x + x // (1 << value)
        else:
            x = x + (x * x) // HASH_MODULUS
        x = x % HASH_MODULUS
    return x


def _position_hash(seed: int, positions: np.ndarray) -> np.ndarray:
    seed_key = int(_mix_numpy(np.int64(seed * 1000003 % HASH_MODULUS)))
    return _mix_numpy((np.asarray(positions, np.int64) + seed_key) % HASH_MODULUS)


def _neuron_keys(layer: int, neurons: np.ndarray) -> np.ndarray:
    return _mix_numpy((np.asarray(neurons, np.int64) + (layer << 16) + 0x9E3779B) % HASH_MODULUS)


def na_hash_uniform(seed: int, layer: int, positions: np.ndarray, neurons: np.ndarray) -> np.ndarray:
    """The "hash" noise: positions (B, S) int, neurons (F,) original neuron indices -> (B, S, F) float32
    uniform in [0, 1), identical to what the graph computes. Both halves are fully mixed (the position's
    once per graph, the (layer, neuron) keys as constants); a short mix of their sum is all a layer runs."""
    cell = (_position_hash(seed, positions)[..., None] + _neuron_keys(layer, neurons)) % HASH_MODULUS
    cell = _mix_numpy(cell, CELL_ROUND)
    return (cell // (1 << (31 - UNIFORM_BITS))).astype(np.float32) * np.float32(2.0 ** -UNIFORM_BITS)


def _mix_nodes(p: str, x: str, modulus: str, inits: list, steps=HASH_ROUND) -> tuple[list, str]:
    n = helper.make_node
    nodes = []
    for step, (op, value) in enumerate(steps):
        name = f"{p}h{step}"
        if op == "mul":
            inits.append(numpy_helper.from_array(np.array(value, np.int64), name + "_c"))
            nodes.append(n("Mul", [x, name + "_c"], [name + "_raw"]))
        elif op == "square":
            nodes += [n("Mul", [x, x], [name + "_sq"]), n("Div", [name + "_sq", modulus], [name + "_hi"]),
                      n("Add", [x, name + "_hi"], [name + "_raw"])]
        else:
            inits.append(numpy_helper.from_array(np.array(1 << value, np.int64), name + "_c"))
            nodes += [n("Div", [x, name + "_c"], [name + "_hi"]), n("Add", [x, name + "_hi"], [name + "_raw"])]
        nodes.append(n("Mod", [name + "_raw", modulus], [name]))
        x = name
    return nodes, x


NA_SHARED = "/unskill/na/"
MODULUS = NA_SHARED + "modulus"


def _hash_nodes(position_hash: str, neuron_keys: np.ndarray) -> tuple[list, list, str]:
    """Nodes computing the noise of every selected neuron of every layer at once from the shared (B, S, 1)
    position hash and the concatenated (layer, neuron) keys: one block per graph, each layer gathers its own
    columns (a block per layer would add ~20 nodes per layer to every decode step, and hashing whole layers
    would cost prefill time on columns whose draw never matters)."""
    p, n = NA_SHARED, helper.make_node
    inits = [numpy_helper.from_array(neuron_keys.astype(np.int64), p + "neuron_keys"),
             numpy_helper.from_array(np.array(1 << (31 - UNIFORM_BITS), np.int64), p + "drop"),
             numpy_helper.from_array(np.array(2.0 ** -UNIFORM_BITS, np.float32), p + "scale")]
    nodes = [n("Add", [position_hash, p + "neuron_keys"], [p + "cell_in"]),
             n("Mod", [p + "cell_in", MODULUS], [p + "cell0"])]
    mixed, cell = _mix_nodes(p + "cell/", p + "cell0", MODULUS, inits, CELL_ROUND)
    nodes += mixed
    nodes += [n("Div", [cell, p + "drop"], [p + "bits"]), n("Cast", [p + "bits"], [p + "bits_f"], to=TensorProto.FLOAT),
              n("Mul", [p + "bits_f", p + "scale"], [p + "uniform"])]
    return nodes, inits, p + "uniform"


def position_hash_nodes(graph: onnx.GraphProto, seed: int) -> tuple[list, list, str]:
    """(nodes, initializers, name) of the (B, S, 1) hash of (seed, token position), computed once per graph.
    The position is the `position_ids` input, else cumsum(attention_mask) - 1 over the last S columns
    (what the runtime feeds)."""
    p, n = NA_SHARED, helper.make_node
    seed_key = int(_mix_numpy(np.int64(seed * 1000003 % HASH_MODULUS)))
    inits = [numpy_helper.from_array(np.array(HASH_MODULUS, np.int64), MODULUS),
             numpy_helper.from_array(np.array(seed_key, np.int64), p + "seed_key"),
             numpy_helper.from_array(np.array([-1], np.int64), p + "last_axis")]
    nodes, positions = [], "position_ids"
    if "position_ids" not in {i.name for i in graph.input}:
        inits += [numpy_helper.from_array(np.array(1, np.int64), p + "one"),
                  numpy_helper.from_array(np.array([1], np.int64), p + "axis1"),
                  numpy_helper.from_array(np.array([1 << 62], np.int64), p + "end")]
        nodes += [n("CumSum", ["attention_mask", p + "one"], [p + "count"]),
                  n("Sub", [p + "count", p + "one"], [p + "pos_all"]),
                  n("Shape", ["input_ids"], [p + "ids_shape"]),
                  n("Slice", [p + "ids_shape", p + "axis1", p + "end"], [p + "seq_len"]),
                  n("Neg", [p + "seq_len"], [p + "start"]),
                  n("Slice", [p + "pos_all", p + "start", p + "end", p + "axis1"], [p + "pos_raw"]),
                  n("Relu", [p + "pos_raw"], [p + "positions"])]
        positions = p + "positions"
    nodes += [n("Add", [positions, p + "seed_key"], [p + "row_in"]), n("Mod", [p + "row_in", MODULUS], [p + "row0"])]
    mixed, row = _mix_nodes(p + "row/", p + "row0", MODULUS, inits)
    nodes += mixed + [n("Unsqueeze", [row, p + "last_axis"], [p + "position_hash"])]
    return nodes, inits, p + "position_hash"


def _rule_nodes(p: str, x: str, uniform: str, c: dict[str, str]) -> list:
    """The rule on tensor x with noise `uniform` (same shape), ending in tensor p + "adjusted"."""
    n = helper.make_node
    return [
        n("Mul", [x, c["a"]], [p + "av"]), n("Add", [p + "av", c["b"]], [p + "av_b"]),
        n("Mul", [p + "av_b", x], [p + "quadratic"]), n("Add", [p + "quadratic", c["c"]], [p + "log_ratio"]),
        n("Sigmoid", [p + "log_ratio"], [p + "prob"]),
        n("Max", [uniform, c["half"]], [p + "u_half"]), n("Less", [p + "u_half", p + "prob"], [p + "replace"]),
        n("Mul", [x, c["s"]], [p + "vs"]), n("Sub", [c["m"], p + "vs"], [p + "mirrored"]),
        n("Where", [p + "replace", p + "mirrored", x], [p + "adjusted"]),
    ]


def _layer_nodes(layer: int, preact: str, noise: str, seed: int, consts: dict[str, np.ndarray], form: str,
                 noise_index: np.ndarray | None = None):
    """Nodes computing the adjusted pre-activation of one layer; returns (nodes, initializers, output, input).
    masked: the rule over the whole layer (unselected neurons have c = -1e30, so never change).
    gather: Gather the selected columns, apply the rule to them only, ScatterElements them back."""
    p = f"/unskill/na.{layer}/"
    inits = [numpy_helper.from_array(value, p + name) for name, value in consts.items()]
    c = {name: p + name for name in consts}
    n = helper.make_node
    graph_input = f"na_noise.{layer}" if noise == "input" else None
    nodes, x = [], preact
    if form == "gather":
        x = p + "picked"
        nodes.append(n("Gather", [preact, c["columns"]], [x], axis=-1))
    if graph_input and form == "gather":
        uniform = p + "noise_picked"
        nodes.append(n("Gather", [graph_input, c["columns"]], [uniform], axis=-1))
    elif graph_input:
        uniform = graph_input
    elif noise == "hash":   # this layer's columns of the shared noise block
        uniform = p + "uniform"
        inits.append(numpy_helper.from_array(noise_index, p + "noise_index"))
        nodes.append(n("Gather", [NA_SHARED + "uniform", p + "noise_index"], [uniform], axis=-1))
    else:
        uniform = p + "uniform"
        nodes.append(n("RandomUniformLike", [x], [uniform], dtype=TensorProto.FLOAT, low=0.0, high=1.0,
                       seed=float(seed * 1000 + layer)))
    nodes += _rule_nodes(p, x, uniform, c)
    if form == "gather":
        nodes += [n("Shape", [x], [p + "picked_shape"]), n("Expand", [c["columns"], p + "picked_shape"], [p + "index"]),
                  n("ScatterElements", [preact, p + "index", p + "adjusted"], [p + "scattered"], axis=-1)]
        return nodes, inits, p + "scattered", graph_input
    return nodes, inits, p + "adjusted", graph_input


def insert_na(model: onnx.ModelProto, preacts: list[str], params: NAParams, kept: list[list[int]] | None,
              noise: str = "hash", seed: int = 0, form: str = "masked") -> list[str]:
    """Rewire every consumer of each selected layer's pre-activation to the adjusted value.
    The `preact.{i}` graph output keeps the raw value, so probing an edited model sees natural inputs."""
    if noise not in NOISE_MODES:
        raise UnskillError(f"noise mode {noise!r}: use one of {NOISE_MODES}")
    if form not in FORMS:
        raise UnskillError(f"NA form {form!r}: use one of {FORMS}")
    graph = model.graph
    noise_inputs, blocks = [], {}
    neuron_keys = []   # hash mode: (layer, neuron) keys of every adjusted column, in the order layers slice them
    for layer, preact in enumerate(preacts):
        columns = np.asarray(kept[layer]) if kept is not None else slice(None)
        selected = params.selected[layer][columns]
        if not selected.any():
            continue
        vectors = [v[layer][columns] for v in (params.mu_f, params.sd_f, params.mu_r, params.sd_r)]
        picked = np.flatnonzero(selected) if form == "gather" else slice(None)
        consts = na_coefficients(*(v[picked] for v in vectors), selected[picked])
        consts["half"] = np.array(0.5, np.float32)
        if form == "gather":
            consts["columns"] = np.flatnonzero(selected).astype(np.int64)
        # Hash noise is drawn for the selected columns only; in the masked form the others read any column of
        # the block (index 0 of this layer's): c = -1e30 there, so the draw never matters.
        chosen = np.flatnonzero(selected)
        neurons = np.asarray(kept[layer])[chosen] if kept is not None else chosen
        start = sum(len(k) for k in neuron_keys)
        neuron_keys.append(_neuron_keys(layer, neurons))
        noise_index = np.full(len(selected), start, np.int64)
        noise_index[chosen] = start + np.arange(len(chosen))
        nodes, inits, adjusted, graph_input = _layer_nodes(layer, preact, noise, seed, consts, form,
                                                           noise_index[picked])
        for node in graph.node:
            if node.name.startswith("/unskill/preact."):
                continue
            for i, name in enumerate(node.input):
                if name == preact:
                    node.input[i] = adjusted
        blocks[preact] = nodes
        graph.initializer.extend(inits)
        if graph_input:
            graph.input.append(helper.make_tensor_value_info(graph_input, TensorProto.FLOAT,
                                                             ["batch_size", "sequence_length", len(selected)]))
            noise_inputs.append(graph_input)
    if blocks and noise == "hash":   # the noise block comes first: it depends on graph inputs only
        position_nodes, shared_inits, position_hash = position_hash_nodes(graph, seed)
        cell_nodes, cell_inits, _ = _hash_nodes(position_hash, np.concatenate(neuron_keys))
        graph.initializer.extend(shared_inits + cell_inits)
        ordered = [*position_nodes, *cell_nodes, *graph.node]
        del graph.node[:]
        graph.node.extend(ordered)
    _insert_after_producers(graph, blocks)
    return noise_inputs


def _insert_after_producers(graph: onnx.GraphProto, blocks: dict[str, list]) -> None:
    """Place each block of NA nodes right after the node producing its input tensor: ONNX wants
    topological order, and every consumer of that tensor already comes after its producer."""
    ordered = []
    for node in graph.node:
        ordered.append(node)
        for output in node.output:
            ordered.extend(blocks.pop(output, []))
    if blocks:
        raise UnskillError(f"no producer found for {sorted(blocks)[:3]}")
    del graph.node[:]
    graph.node.extend(ordered)


def neuron_adjust(model_dir, stats_path, ratio: float, out_dir, noise: str = "hash", seed: int = 0,
                  form: str = "masked"):
    """`unskill edit na`: write a copy of the exported model with NA nodes on the selected neurons."""
    from unskill.runtime.statsfile import load_stats

    from .folder import load_exported, save_edited
    from .graph import output_sources

    model, manifest = load_exported(model_dir)
    stats = load_stats(stats_path, manifest)
    params = select_neurons(stats, ratio, str(stats_path))
    preacts = output_sources(model, manifest.preact_outputs)
    noise_inputs = insert_na(model, preacts, params, manifest.kept_neurons, noise, seed, form)
    per_layer = params.selected.sum(axis=1)
    edit = {"method": "na", "ratio": ratio, "form": form, "noise": noise, "seed": seed, "noise_inputs": noise_inputs,
            "selected": int(per_layer.sum()), "selected_per_layer": per_layer.tolist(),
            "stats": str(stats_path), "skill": stats.skill}
    return save_edited(model, manifest, model_dir, out_dir, edit)
