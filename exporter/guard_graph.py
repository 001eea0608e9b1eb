"""The KSD guard as graph nodes: `guard.refuse` (bool [batch]) and `guard.score.<SKILL>` (float [batch]) outputs
that any onnxruntime stack (Node, C, C#, Java, onnxruntime-genai) reads with no unskill code.

A pure pass, `add_guard(model, guard, manifest) -> new model`: the rule is not re-derived here; the regions come
from the runtime's own `KSDGuard(...).detectors` (runtime/ksd.py), so the graph holds exactly the NumPy guard's
centres, widths and thresholds, as initializers. Per region (one layer's `key_last.{i}`, [B, F]):

    box    (Hypercube)    score: max over dimensions of |v - mu| / halfwidth; inside: score <= threshold;
                          margin: score / threshold. At threshold 1 (every cube the guard builds today) inside
                          is |v - mu| <= halfwidth in every dimension (ReduceMax of |v - mu| - halfwidth <= 0:
                          a float difference is <= 0 exactly when a <= b); else the float32 score against the
                          largest float32 <= threshold (float32_at_most): NumPy's decision bit for bit either way
    gauss  (Ellipsoid)    inside: mean((v - mu) * inv_sigma)^2 <= threshold;          margin: score / threshold
    ratio  (RatioRegion)  inside: forget <= bound and forget <= threshold * max(retain, tiny)
                          margin: max(forget / (threshold * max(retain, tiny)), forget / bound)
    linear (LinearRegion) inside: -(v . w + b) <= threshold (MatMul);                  margin: 1 + score - threshold
                          With positions > 1, at the prompt also the mean key of its last positions
                          (LinearRegion.prompt_contains / prompt_margin): from the per-position keys ([B, S, F],
                          the tensor key_last.{i} gathers its last position from) the last min(positions, S),
                          averaged over those where attention_mask is 1 (sum / max(count, 1), pool_keys), scored
                          by the pooled discriminant -(mean . pooled_w + pooled_b) <= pooled_threshold; with
                          an anywhere_threshold also the lowest last-token score over the forward's last
                          min(anywhere_positions, S) positions (every position where 0; padding skipped:
                          Where, ReduceMin) <= anywhere_threshold; inside
                          when any check is, margin the smallest. The graph takes a forward for the prompt's
                          when S > 1 or it has no past (attention_mask no longer than the input): a decode step
                          (one token after a past) is the last-token rule alone, as the runtime checks it.

A skill (one detector) fires when at least `votes` of its regions hold their key; `guard.refuse.<SKILL>` is that
decision and `guard.score.<SKILL>` the votes-th smallest region margin (min over regions for one vote): the skill
fires where its score <= 1, up to float rounding exactly at the boundary (the decision itself is made with the
comparisons above, not from the score). `guard.refuse` is the OR over skills. runtime/graph_guard.py computes
the same scores in NumPy (`skill_scores`), the twin the tests hold the graph to.

A pruned layer's key output is narrower (manifest.kept_neurons): the pass scatters it back to full width with
zeros (Pad + Gather on the last axis), as the runtime does before the NumPy guard reads it; per-position keys alike.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from unskill.runtime.errors import UnskillError
from unskill.runtime.ksd import (Ellipsoid, Hypercube, KSDGuard, LinearRegion, RatioRegion, reads_positions,
                                 region_layers)
from unskill.runtime.manifest import Manifest

REFUSE = "guard.refuse"
SCORE_PREFIX = "guard.score."
FIRE_PREFIX = "guard.refuse."
TINY = float(np.finfo(np.float32).tiny)
INT64_MAX = int(np.iinfo(np.int64).max)   # a Slice end: to the axis's end
MASK_INPUT = "attention_mask"   # the graph input a multi-position rule reads left padding from


class _Builder:
    """Nodes and initializers of the guard subgraph, every name under `guard/`."""

    def __init__(self, opset: int):
        self.opset, self.nodes, self.initializers, self.count = opset, [], [], 0

    def name(self, tag: str) -> str:
        self.count += 1
        return f"guard/{tag}_{self.count}"

    def const(self, tag: str, value) -> str:
        name = self.name(tag)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], tag: str | None = None, output: str | None = None, **attrs) -> str:
        output = output or self.name(tag or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output + "/node", **attrs))
        return output

    def reduce(self, op_type: str, x: str, axis: int) -> str:
        """Reduce* over one axis, keepdims=0: axes as an input from opset 18 (ReduceSum from 13), else attribute."""
        takes_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if takes_input:
            return self.op(op_type, [x, self.const("axis", np.array([axis], np.int64))], keepdims=0)
        return self.op(op_type, [x], axes=[axis], keepdims=0)

    def unsqueeze0(self, x: str, axis: int = 0) -> str:
        """Unsqueeze at `axis` (0 unless told): axes as an input from opset 13, else attribute."""
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const(f"axis{axis}", np.array([axis], np.int64))])
        return self.op("Unsqueeze", [x], axes=[axis])


def _gauss(b: _Builder, keys: str, center: np.ndarray, inverse_sigma: np.ndarray) -> str:
    """mean over dimensions of ((v - mu) * inv_sigma)^2, [B]."""
    z = b.op("Mul", [b.op("Sub", [keys, b.const("mu", center.astype(np.float32))]),
                     b.const("inv_sigma", inverse_sigma.astype(np.float32))])
    return b.reduce("ReduceMean", b.op("Mul", [z, z]), 1)


def float32_at_most(value: float) -> np.float32:
    """The largest float32 <= value: for a float32 score s, s <= value (NumPy compares it in float64 against the
    stored threshold) exactly when s <= float32_at_most(value), so the graph's float32 comparison decides alike."""
    rounded = np.float32(value)
    return rounded if float(rounded) <= value else np.nextafter(rounded, np.float32(-np.inf))


def _region(b: _Builder, layer_keys: list[str], region) -> tuple[str, str]:
    """(inside bool [B], margin float [B]) of one region over its layers' keys (one, except LinearRegion)."""
    if isinstance(region, LinearRegion):
        return _linear(b, layer_keys, region)
    keys = layer_keys[0]
    if isinstance(region, Hypercube):
        distance = b.op("Abs", [b.op("Sub", [keys, b.const("mu", region.center.astype(np.float32))])])
        halfwidth = b.const("halfwidth", region.halfwidth.astype(np.float32))
        score = b.reduce("ReduceMax", b.op("Div", [distance, halfwidth]), 1)
        if region.threshold == 1.0:   # |v - mu| <= halfwidth in every dimension: no division in the decision
            excess = b.reduce("ReduceMax", b.op("Sub", [distance, halfwidth]), 1)
            return b.op("LessOrEqual", [excess, b.const("zero", np.float32(0))]), score
        threshold = float(region.threshold)
        inside = b.op("LessOrEqual", [score, b.const("threshold", float32_at_most(threshold))])
        return inside, b.op("Div", [score, b.const("threshold", np.float32(threshold))])
    if isinstance(region, RatioRegion):
        forget = _gauss(b, keys, region.center, region.inverse_sigma)
        retain = _gauss(b, keys, region.retain_center, region.retain_inverse_sigma)
        limit = b.op("Mul", [b.const("threshold", np.float32(region.threshold)),
                             b.op("Max", [retain, b.const("tiny", np.float32(TINY))])])
        bound = b.const("bound", np.float32(region.bound))
        inside = b.op("And", [b.op("LessOrEqual", [forget, bound]), b.op("LessOrEqual", [forget, limit])])
        margin = b.op("Max", [b.op("Div", [forget, limit]), b.op("Div", [forget, bound])])
        return inside, margin
    if isinstance(region, Ellipsoid):
        score = _gauss(b, keys, region.center, region.inverse_sigma)
        threshold = b.const("threshold", np.float32(region.threshold))
        return b.op("LessOrEqual", [score, threshold]), b.op("Div", [score, threshold])
    raise UnskillError(f"no graph form for the guard region kind {type(region).__name__} "
                       f"(skill {getattr(region, 'skill', '?')!r}, layer {getattr(region, 'layer', '?')})")


def _linear(b: _Builder, layer_keys: list[str], region: LinearRegion) -> tuple[str, str]:
    """score = -(sum_l v_l . w_l + bias): one MatMul per layer. The MatMul sums in another order than NumPy, so a
    key within float rounding of the threshold may be decided the other way (tests/test_guard_graph.py)."""
    projected = None
    for keys, weight in zip(layer_keys, region.weight):
        term = b.op("MatMul", [keys, b.const("weight", weight.astype(np.float32))])
        projected = term if projected is None else b.op("Add", [projected, term])
    score = b.op("Neg", [b.op("Add", [projected, b.const("bias", np.float32(region.bias))])])
    threshold = b.const("threshold", np.float32(region.threshold))
    margin = b.op("Add", [b.op("Sub", [score, threshold]), b.const("one", np.float32(1))])
    inside = b.op("LessOrEqual", [score, b.const("threshold_f32", float32_at_most(region.threshold))])
    return inside, margin


def _full_width_keys(b: _Builder, name: str, kept: list[int] | None, width: int, rank: int = 2) -> str:
    """Keys of a pruned layer (key_last [B, F'], or per position [B, P, F'] with rank=3) put back to `width`
    columns on the last axis, zeros where neurons were removed."""
    if kept is None or len(kept) == width:
        return name
    pads = np.zeros(2 * rank, np.int64)
    pads[-1] = 1   # one zero column after the last axis's end
    padded = b.op("Pad", [name, b.const("pads", pads)], mode="constant")
    index = np.full(width, len(kept), np.int64)   # the zero column appended by Pad
    index[np.asarray(kept, np.int64)] = np.arange(len(kept))
    return b.op("Gather", [padded, b.const("scatter", index)], axis=rank - 1)


def _per_position_source(graph: onnx.GraphProto, key_last: str) -> str:
    """The [B, S, F] key tensor that `key_last` gathers its last position from (exporter/graph.py
    add_ffl_outputs: Gather axis 1, index -1): the tensor behind `key.{i}`, present in a deploy graph too."""
    node = next((n for n in graph.node if key_last in n.output), None)
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0) if node else None
    if node is None or node.op_type != "Gather" or axis != 1:
        raise UnskillError(f"the graph's {key_last!r} is not a Gather of the per-position keys (axis 1): a linear "
                           "rule over several prompt positions cannot find them; re-export with `unskill export`")
    return node.input[0]


def _linear_positions(b: _Builder, last_keys: list[str], pooled_keys: list[str] | None, every_keys: list[str] | None,
                      source: str, region: LinearRegion, mask: str) -> tuple[str, str]:
    """The multi-position linear rule (LinearRegion.prompt_contains / prompt_margin): the last-token check on
    last_keys ([B, F] per layer) OR, in a prompt's forward, the pooled check on the mean of pooled_keys ([B, P,
    F] per layer, P = min(positions, S) already sliced) over the mask's last P columns, OR the lowest score over
    every position's keys (every_keys, [B, S, F] per layer; padding skipped). source: a per-position key tensor
    [B, S, F] whose S tells a prompt's forward from a decode step (see `_is_prompt`)."""
    inside, margin = _linear(b, last_keys, region)
    prompt = _is_prompt(b, source, mask)   # [1]: a decode step keeps the last-token rule alone
    checks = []
    if pooled_keys is not None:
        checks.append(_pooled(b, pooled_keys, region, mask))
    if every_keys is not None:
        checks.append(_lowest_position(b, every_keys, region, mask))
    for check_inside, check_margin in checks:
        inside = b.op("Or", [inside, b.op("And", [check_inside, prompt])])
        gated = b.op("Where", [prompt, check_margin, b.const("inf", np.float32(np.inf))])
        margin = b.op("Min", [margin, gated])
    return inside, margin


def _own_tokens(b: _Builder, keys: str, mask: str) -> str:
    """bool [B, P]: which of the P positions of keys [B, P, F] are the row's own tokens (the mask's last P
    columns are 1; left padding is 0)."""
    tail = b.op("Slice", [mask, b.op("Neg", [_length(b, keys)]), b.const("end", np.array([INT64_MAX], np.int64)),
                          b.const("axis1", np.array([1], np.int64))])
    return b.op("Greater", [tail, b.const("zero", np.int64(0))])


def _pooled(b: _Builder, position_keys: list[str], region: LinearRegion, mask: str) -> tuple[str, str]:
    """(inside, margin) of the pooled mean key: sum over the row's own positions / max(count, 1) (pool_keys)."""
    valid = b.op("Cast", [_own_tokens(b, position_keys[0], mask)], to=TensorProto.FLOAT)
    weights = b.unsqueeze0(valid, axis=2)
    divisor = b.op("Max", [b.reduce("ReduceSum", weights, 1), b.const("one", np.float32(1))])   # [B, 1]
    projected = None
    for keys, weight in zip(position_keys, region.pooled_weight):
        mean = b.op("Div", [b.reduce("ReduceSum", b.op("Mul", [keys, weights]), 1), divisor])   # [B, F]
        term = b.op("MatMul", [mean, b.const("pooled_weight", weight.astype(np.float32))])
        projected = term if projected is None else b.op("Add", [projected, term])
    score = b.op("Neg", [b.op("Add", [projected, b.const("pooled_bias", np.float32(region.pooled_bias))])])
    inside = b.op("LessOrEqual", [score, b.const("pooled_threshold_f32", float32_at_most(region.pooled_threshold))])
    margin = b.op("Sub", [b.op("Add", [score, b.const("one", np.float32(1))]),
                          b.const("pooled_threshold", np.float32(region.pooled_threshold))])
    return inside, margin


def _lowest_position(b: _Builder, every_keys: list[str], region: LinearRegion, mask: str) -> tuple[str, str]:
    """(inside, margin) of the lowest last-token score over the row's own positions (LinearRegion.lowest_score):
    one MatMul per layer gives [B, S] scores, padding set to +inf, then ReduceMin over positions."""
    projected = None
    for keys, weight in zip(every_keys, region.weight):
        term = b.op("MatMul", [keys, b.const("weight", weight.astype(np.float32))])   # [B, S]
        projected = term if projected is None else b.op("Add", [projected, term])
    score = b.op("Neg", [b.op("Add", [projected, b.const("bias", np.float32(region.bias))])])
    masked = b.op("Where", [_own_tokens(b, every_keys[0], mask), score, b.const("inf", np.float32(np.inf))])
    lowest = b.reduce("ReduceMin", masked, 1)   # [B]
    inside = b.op("LessOrEqual", [lowest, b.const("anywhere_threshold_f32",
                                                  float32_at_most(region.anywhere_threshold))])
    margin = b.op("Sub", [b.op("Add", [lowest, b.const("one", np.float32(1))]),
                          b.const("anywhere_threshold", np.float32(region.anywhere_threshold))])
    return inside, margin


def _is_prompt(b: _Builder, source: str, mask: str) -> str:
    """bool [1]: this forward is (a part of) a prompt's: S > 1 new positions, or no past (attention_mask [B, past
    + S] as long as the input). A decode step (one token after a past) is not (graph_guard.pooled_applies)."""
    new = _length(b, source)
    return b.op("Or", [b.op("Greater", [new, b.const("one", np.array([1], np.int64))]),
                       b.op("Equal", [_length(b, mask), new])])


def _length(b: _Builder, tensor: str) -> str:
    """int64 [1]: the tensor's size on axis 1 (its positions)."""
    return b.op("Slice", [b.op("Shape", [tensor]), b.const("one", np.array([1], np.int64)),
                          b.const("two", np.array([2], np.int64)), b.const("axis0", np.array([0], np.int64))])


def output_names(skills: list[str]) -> dict[str, str]:
    """Skill -> its score output name; a skill named twice gets a #2, #3 ... suffix."""
    names, seen = {}, {}
    for skill in skills:
        seen[skill] = seen.get(skill, 0) + 1
        key = skill if seen[skill] == 1 else f"{skill}#{seen[skill]}"
        names[key] = SCORE_PREFIX + key
    return names


def add_guard(model: onnx.ModelProto, guard: KSDGuard, manifest: Manifest) -> onnx.ModelProto:
    """A copy of `model` whose graph also computes the guard: outputs guard.refuse, guard.refuse.<SKILL> and
    guard.score.<SKILL> (see the module docstring). The model's key_last.* outputs stay as they are."""
    if any(o.name.startswith("guard.") for o in model.graph.output):
        raise UnskillError("the model already carries a guard; add all stats files in one `unskill edit guard`")
    keys = {o.name: o for o in model.graph.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    b = _Builder(opset)
    skill_names = list(output_names([d.skill for d in guard.detectors]))
    layer_keys: dict[int, str] = {}
    position_keys: dict[tuple[int, int], str] = {}   # (layer, positions) -> full-width keys [B, P, F]
    fired_outputs, batch_dim = [], None

    def kept(layer: int) -> list[int] | None:
        return manifest.kept_neurons[layer] if manifest.kept_neurons else None

    def keys_of(layer: int, positions: int) -> str:
        """The last `positions` positions of the layer's per-position keys (0: all of them), full width."""
        if (layer, positions) not in position_keys:
            source = _per_position_source(model.graph, manifest.key_last_outputs[layer])
            tail = source if positions == 0 else b.op("Slice", [
                source, b.const("start", np.array([-positions], np.int64)),
                b.const("end", np.array([INT64_MAX], np.int64)), b.const("axis1", np.array([1], np.int64))])
            position_keys[layer, positions] = _full_width_keys(b, tail, kept(layer), manifest.key_width, rank=3)
        return position_keys[layer, positions]

    for skill, detector in zip(skill_names, guard.detectors):
        insides, margins = [], []
        for region in detector.regions:
            for layer in region_layers(region):
                if layer not in layer_keys:
                    name = manifest.key_last_outputs[layer]
                    if name not in keys:
                        raise UnskillError(f"the graph has no output {name!r}: the guard reads key_last.* "
                                           "(a deploy folder made with --no-guard cannot carry one)")
                    batch_dim = batch_dim or keys[name].type.tensor_type.shape.dim[0]
                    layer_keys[layer] = _full_width_keys(b, name, kept(layer), manifest.key_width)
            if reads_positions(region):
                if MASK_INPUT not in {i.name for i in model.graph.input}:
                    raise UnskillError(f"the graph has no input {MASK_INPUT!r}: a linear rule over several prompt "
                                       "positions reads it to skip left padding")
                source = _per_position_source(model.graph, manifest.key_last_outputs[region.layers[0]])
                pooled = [keys_of(layer, region.positions) for layer in region.layers] if region.positions > 1 \
                    else None
                every = [keys_of(layer, region.anywhere_positions) for layer in region.layers] \
                    if region.reads_anywhere else None
                inside, margin = _linear_positions(b, [layer_keys[layer] for layer in region.layers], pooled, every,
                                                   source, region, MASK_INPUT)
            else:
                inside, margin = _region(b, [layer_keys[layer] for layer in region_layers(region)], region)
            insides.append(b.unsqueeze0(b.op("Cast", [inside], to=TensorProto.FLOAT)))
            margins.append(b.unsqueeze0(margin))
        stacked = b.op("Concat", insides, axis=0) if len(insides) > 1 else insides[0]
        votes = b.reduce("ReduceSum", stacked, 0)
        fired = b.op("GreaterOrEqual", [votes, b.const("votes", np.float32(detector.votes))],
                     output=FIRE_PREFIX + skill)
        all_margins = b.op("Concat", margins, axis=0) if len(margins) > 1 else margins[0]
        smallest = b.op("TopK", [all_margins, b.const("k", np.array([detector.votes], np.int64))],
                        tag="topk", axis=0, largest=0, sorted=1)
        b.nodes[-1].output.append(b.name("topk_index"))
        b.op("Gather", [smallest, b.const("last", np.int64(detector.votes - 1))], output=SCORE_PREFIX + skill,
             axis=0)
        fired_outputs.append(fired)
    refuse = fired_outputs[0]
    for other in fired_outputs[1:]:
        refuse = b.op("Or", [refuse, other])
    b.op("Identity", [refuse], output=REFUSE)

    guarded = onnx.ModelProto()
    guarded.CopyFrom(model)
    guarded.graph.node.extend(b.nodes)
    guarded.graph.initializer.extend(b.initializers)
    batch = [batch_dim.dim_param or batch_dim.dim_value] if batch_dim is not None else ["batch_size"]
    guarded.graph.output.append(helper.make_tensor_value_info(REFUSE, TensorProto.BOOL, batch))
    for skill in skill_names:
        guarded.graph.output.append(helper.make_tensor_value_info(FIRE_PREFIX + skill, TensorProto.BOOL, batch))
        guarded.graph.output.append(helper.make_tensor_value_info(SCORE_PREFIX + skill, TensorProto.FLOAT, batch))
    return guarded


def guard_record(guard: KSDGuard, stats_paths: list, stats_fingerprints: list[str]) -> dict:
    """What unskill.json says about the guard in the graph: its outputs, and per skill the rule, the layers
    and which stats file made it (sha256 of the file), so the runtime knows which stats the graph enforces."""
    skills = list(output_names([d.skill for d in guard.detectors]))
    return {
        "refuse_output": REFUSE,
        "skills": [{"skill": skill, "rule": detector.rule, "votes": detector.votes,
                    "layers": [layer for region in detector.regions for layer in region_layers(region)],
                    "score_output": SCORE_PREFIX + skill, "refuse_output": FIRE_PREFIX + skill,
                    "stats": str(path), "stats_sha256": sha, **_positions_record(detector)}
                   for skill, detector, path, sha in zip(skills, guard.detectors, stats_paths, stats_fingerprints)],
    }


def _positions_record(detector) -> dict:
    """{"positions": n} for a rule over the prompt's last n positions (its mean key's, its one-by-one read's): a
    prompt run in chunks must keep that many tokens in its last chunk, the one whose guard outputs are read
    (runtime/session.py); {"anywhere": true} for a rule read at every prompt position: the prompt runs in one
    forward, whose positions the graph reads."""
    positions = max(getattr(region, "window", 1) for region in detector.regions)
    record = {"positions": positions} if positions > 1 else {}
    if any(getattr(region, "every_position", False) for region in detector.regions):
        record["anywhere"] = True
    return record



GRAPH_NO_RULE_HINT = ("has no calibrated rule: make the guard with `unskill guard --model DIR --forget SPEC --out "
                      "FILE.npz`, or pass --rule paper to put the paper's cube in the graph")


def require_rules(stats_paths: list, rule: str | None = None) -> None:
    """Before any model work: each stats file reads, and carries a stored rule unless rule="paper" asks for the
    paper's cube. One policy with ksd-run (runtime/ksd.py KSDGuard): a file without a rule is never silently a
    guard; its cube at alpha 1 refuses much of what the model must keep."""
    from unskill.runtime.statsfile import load_stats

    if not stats_paths:
        raise UnskillError("the guard needs at least one stats file (--stats / --guard NPZ)")
    if rule not in (None, "stored", "paper"):
        raise UnskillError(f"rule {rule!r}: use 'stored' or 'paper'")
    for path in stats_paths:
        if load_stats(path).guard is None and rule != "paper":
            raise UnskillError(f"{path} {GRAPH_NO_RULE_HINT}")


def guarded_model(model: onnx.ModelProto, manifest: Manifest, stats_paths: list,
                  rule: str | None = None) -> tuple[onnx.ModelProto, dict]:
    """(model with the guard of these stats files, the manifest's `guard` record), as `ksd-run --stats` applies
    them: each file's stored rule (a file without one is an error: KSDGuard's), or with rule="paper" the paper's
    cube (one cube at the last layer, alpha 1 x k) for every file. Callers run `require_rules` first, before the
    model loads (exporter/deploy.py)."""
    from unskill.runtime.io import sha256_file
    from unskill.runtime.statsfile import load_stats

    guard = KSDGuard([load_stats(path, manifest) for path in stats_paths], manifest, rule=rule,
                     where=[str(path) for path in stats_paths])
    return add_guard(model, guard, manifest), guard_record(guard, stats_paths,
                                                            [sha256_file(p) for p in stats_paths])
