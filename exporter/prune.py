"""Selective Pruning (Pochinkov & Schoots 2024) by removing FFL neurons from the exported weights.

Score per neuron = importance on forget / (importance on retain + eps); the top fraction across all layers
is removed: its column of the gate/up (fc1) weights and bias, and its row of the down weight. The model
gets smaller and faster, and equals the unpruned model with those keys zeroed. Iterative mode prunes
ratio/steps at a time and re-probes the pruned model between steps, as the paper does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from unskill.runtime.errors import UnskillError
from unskill.runtime.manifest import Manifest
from unskill.runtime.statsfile import StatsFile, load_stats

from .folder import load_exported, save_edited
from .graph import locate_ffl_weights

EPS = 1e-3
SCORERS = ("abs", "freq", "rms")


def importance(stats: StatsFile, side: str, scorer: str) -> np.ndarray:
    """(L, F) importance of every neuron on one side: mean |key|, positive frequency, or rms."""
    group = stats.groups.get(f"sp_{side}")
    if group is None:
        raise UnskillError(f"stats have no sp_{side} statistics; run `unskill stats` with --retain")
    n = np.maximum(group.count, 1)[:, None]
    if scorer == "abs":
        return group.values["abs_sum"] / n
    if scorer == "freq":
        return group.values["pos_count"] / n
    if scorer == "rms":
        return np.sqrt(group.values["sumsq"] / n)
    raise UnskillError(f"scorer {scorer!r}: use one of {SCORERS}")


def prune_scores(stats: StatsFile, scorer: str = "abs") -> np.ndarray:
    return importance(stats, "forget", scorer) / (importance(stats, "retain", scorer) + EPS)


def choose(scores: np.ndarray, already: np.ndarray, count: int) -> np.ndarray:
    """Add the best-scoring neurons not yet pruned until `count` are pruned in all; (L, F) bool."""
    chosen = already.copy()
    extra = count - int(already.sum())
    if extra > 0:
        candidates = np.where(already, -np.inf, scores).ravel()
        chosen.ravel()[np.argsort(-candidates, kind="stable")[:extra]] = True
    if chosen.all(axis=1).any():
        raise UnskillError("pruning would remove every neuron of a layer; use a smaller --ratio")
    return chosen


def remove_neurons(model: onnx.ModelProto, manifest: Manifest, pruned: np.ndarray) -> list[list[int]]:
    """Slice the FFL weights of `model` in place so only unpruned neurons remain; returns kept indices.
    A packed graph (exporter/pack.py, the default export) is unpacked for the cut and packed again after."""
    from .pack import pack_projections, unpack_projections

    packed = unpack_projections(model)
    initializers = {init.name: init for init in model.graph.initializer}
    kept_before = manifest.kept_neurons or [list(range(manifest.key_width))] * manifest.num_layers
    kept_after = []
    for layer, weights in enumerate(locate_ffl_weights(model, manifest)):
        current = np.asarray(kept_before[layer])
        keep_mask = ~pruned[layer][current]
        kept_after.append(current[keep_mask].tolist())
        for name in weights.inputs:
            _slice(initializers[name], keep_mask, axis=-1)
        for name in weights.biases:
            _slice(initializers[name], keep_mask, axis=-1)
        _slice(initializers[weights.down], keep_mask, axis=0)
    del model.graph.value_info[:]   # stale shape hints of the sliced tensors; onnxruntime infers its own
    for output in model.graph.output:
        if output.name in {*manifest.key_outputs, *manifest.preact_outputs, *(manifest.key_last_outputs or [])}:
            output.type.tensor_type.shape.dim[-1].dim_param = f"ffn_{output.name}"
    if packed:
        pack_projections(model, op_types=("MatMul",))
    return kept_after


def _slice(init: onnx.TensorProto, keep_mask: np.ndarray, axis: int) -> None:
    array = numpy_helper.to_array(init)
    if array.shape[axis] != keep_mask.size:
        raise UnskillError(f"weight {init.name!r} has {array.shape[axis]} neurons, expected {keep_mask.size}")
    init.CopyFrom(numpy_helper.from_array(np.compress(keep_mask, array, axis=axis), init.name))


def prune(model_dir: str | Path, stats_path: str | Path, ratio: float, out_dir: str | Path, steps: int = 1,
          scorer: str = "abs", data_dir: str | None = None, progress: bool = True) -> Manifest:
    if not 0 < ratio < 1:
        raise UnskillError(f"--ratio must be in (0, 1), got {ratio}")
    if steps < 1:
        raise UnskillError(f"--steps must be >= 1, got {steps}")
    model, manifest = load_exported(model_dir)
    stats = load_stats(stats_path, manifest)
    total = max(1, int(round(ratio * manifest.num_layers * manifest.key_width)))
    pruned = np.zeros((manifest.num_layers, manifest.key_width), dtype=bool)
    Path(out_dir).resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".unskill-prune-", dir=Path(out_dir).resolve().parent) as scratch:
        current_dir, current_manifest = Path(model_dir), manifest
        for step in range(1, steps + 1):
            if step > 1:   # the paper re-collects activations on the pruned model before each step
                stats = _reprobe(current_dir, stats, data_dir, progress)
            pruned = choose(prune_scores(stats, scorer), pruned, int(round(total * step / steps)))
            step_model = onnx.load(str(Path(model_dir) / manifest.model_file)) if step > 1 else model
            kept = remove_neurons(step_model, manifest, pruned)
            edit = {"method": "prune", "ratio": ratio, "steps": steps, "scorer": scorer, "removed": int(pruned.sum()),
                    "stats": str(stats_path), "skill": stats.skill}
            target = Path(out_dir) if step == steps else Path(scratch) / f"step{step}"
            current_manifest = save_edited(step_model, manifest, model_dir, target, edit, kept_neurons=kept)
            current_dir = target
    return current_manifest


def _reprobe(model_dir: Path, stats: StatsFile, data_dir: str | None, progress: bool) -> StatsFile:
    from unskill.runtime.session import OnnxLM
    from unskill.runtime.tokenizer import TextTokenizer
    from unskill.stats.datasets import load_dataset
    from unskill.stats.probe import ProbeConfig, Prober

    model = OnnxLM(model_dir)
    prober = Prober(model, TextTokenizer(model_dir, model.manifest),
                    ProbeConfig(progress=progress, max_text_tokens=stats.meta.get("max_text_tokens", 512)))
    groups = {}
    for side in ("forget", "retain"):
        info = stats.meta.get(side) or {}
        spec = info.get("name", "")
        spec = spec[len("file:"):] if spec.startswith("file:") else spec
        dataset = load_dataset(spec, data_dir, info.get("count"))
        groups.update(prober.text_pass(dataset, side))
    return StatsFile(model.manifest.fingerprint, stats.arch, stats.key_width, stats.num_layers, stats.meta, groups)
