"""`unskill.json`: what the exporter knows about a model, so the runtime and stats never need torch or HF."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

from .errors import UnskillError

MANIFEST_NAME = "unskill.json"
FORMAT = "unskill-onnx/1"


@dataclass
class Manifest:
    arch: str                       # HF model_type, e.g. "llama", "gemma3_text", "gpt2"
    num_layers: int
    hidden_size: int
    key_width: int                  # FFL width: length of the key vector (input of down_proj)
    activation: str                 # hidden_act of the FFL
    gated: bool                     # act(W_gate z) * (W_up z) vs act(W_fc z)
    key_outputs: list[str]          # graph output per layer: key vector (down_proj input)
    preact_outputs: list[str]       # graph output per layer: pre-activation (gate_proj, or fc1 without gate)
    fingerprint: str                # sha256 of the weights; stats files carry it to prove they match
    max_context: int
    eos_token_ids: list[int]
    pad_token_id: int
    bos_token_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    source: str = ""
    model_file: str = "model.onnx"
    edits: list[dict] = field(default_factory=list)   # NA / prune history, in order applied
    # After pruning: per layer, the original neuron indices still in the graph (None = all). Key and
    # pre-activation outputs of a pruned layer are narrower; the runtime scatters them back to key_width.
    kept_neurons: list[list[int]] | None = None
    # Per layer, the key at the last position only ([batch, ffn]); absent in exports before it existed.
    key_last_outputs: list[str] | None = None
    # A graph with only key_last.* and present.* outputs (no LM head), sharing the weights file.
    probe_file: str | None = None
    # Fingerprints whose stats still apply (a quantized model accepts its fp32 parent's stats).
    stats_compatible: list[str] | None = None
    # "deploy": the graph keeps only logits, present.* and (when guarded) key_last.*; key.* / preact.*
    # are listed for the stats' layout but not in the graph (`unskill edit slim`).
    target: str = "full"
    # "gqa": attention is onnxruntime's GroupQueryAttention (the fused graph, exporter/gqa.py), so past and
    # present may be one preallocated buffer (runtime/session.py); "unfused": optimum's Concat of past and new.
    attention: str = "unfused"
    # GroupQueryAttention graphs: whether the op gets its 17th input, query_seqlens (onnxruntime >= 1.32; lets a
    # batch of several rows continue a past with several new tokens each). The deploy target leaves it out, so
    # onnxruntime-node/-web 1.30-1.31 and onnxruntime-genai load it; the runtime then prefills such a batch in one
    # pass instead of chunks.
    gqa_query_seqlens: bool = True
    # The KSD guard baked into the graph (`unskill edit guard`, exporter/guard_graph.py): its outputs and, per
    # skill, the rule, layers and the stats file's sha256. None: the graph has no guard outputs.
    guard: dict | None = None
    format: str = FORMAT

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


def resolve_layers(layers, num_layers: int) -> list[int]:
    """Layer indices as given (negative from the end) -> 0..L-1; out of range is an error, never wrapped.
    The one numbering of probing, calibration, eval and the guard."""
    resolved = []
    for index in layers:
        layer = index + num_layers if index < 0 else index
        if not 0 <= layer < num_layers:
            raise UnskillError(f"layer {index} out of range: the model has {num_layers} FFL layers")
        resolved.append(layer)
    return resolved


def require_key_last(manifest: Manifest, where) -> list[str]:
    """The `key_last.{i}` output names every key reader uses; an export without them must be re-exported."""
    if not manifest.key_last_outputs:
        raise UnskillError(f"{where}: the export has no key_last outputs; re-export it with `unskill export`")
    return manifest.key_last_outputs


def _int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _list_of(check, allow_none: bool = False, non_empty: bool = False):
    def valid(value) -> bool:
        if value is None:
            return allow_none
        return isinstance(value, list) and (bool(value) or not non_empty) and all(check(v) for v in value)
    return valid


def _str(value) -> bool:
    return isinstance(value, str)


# What each field must hold; a manifest edited by hand (or damaged) fails here in one line, not deep inside.
FIELD_TYPES = {
    "arch": _str, "activation": _str, "fingerprint": _str, "source": _str, "model_file": _str, "format": _str,
    "num_layers": lambda v: _int(v, 1), "hidden_size": lambda v: _int(v, 1), "key_width": lambda v: _int(v, 1),
    "max_context": lambda v: _int(v, 2), "pad_token_id": _int,
    "bos_token_id": lambda v: v is None or _int(v), "gated": lambda v: isinstance(v, bool),
    "add_bos": lambda v: isinstance(v, bool),
    "key_outputs": _list_of(_str), "preact_outputs": _list_of(_str),
    "key_last_outputs": _list_of(_str, allow_none=True), "eos_token_ids": _list_of(_int, non_empty=True),
    "chat_template": lambda v: v is None or _str(v), "probe_file": lambda v: v is None or _str(v),
    "edits": _list_of(lambda v: isinstance(v, dict)), "kept_neurons": _list_of(_list_of(_int), allow_none=True),
    "stats_compatible": _list_of(_str, allow_none=True), "attention": lambda v: v in ("unfused", "gqa"),
    "gqa_query_seqlens": lambda v: isinstance(v, bool),
    "guard": lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("skills"), list)
                                     and all(isinstance(s, dict) for s in v["skills"])),
}


def load_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise UnskillError(f"{path}: no manifest; is {directory} a directory written by `unskill export`?")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnskillError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise UnskillError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise UnskillError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}")
    known = Manifest.__dataclass_fields__
    required = [name for name, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise UnskillError(f"{path}: missing fields {', '.join(missing)}")
    for name, value in raw.items():
        if name in FIELD_TYPES and not FIELD_TYPES[name](value):
            raise UnskillError(f"{path}: field {name!r} has the wrong type or value ({str(value)[:60]!r})")
    manifest = Manifest(**{k: v for k, v in raw.items() if k in known})
    if len(manifest.key_outputs) != manifest.num_layers or len(manifest.preact_outputs) != manifest.num_layers:
        raise UnskillError(f"{path}: {manifest.num_layers} layers but {len(manifest.key_outputs)} key outputs")
    problem = _kept_neurons_problem(manifest.kept_neurons, manifest.num_layers, manifest.key_width)
    if problem:
        raise UnskillError(f"{path}: kept_neurons {problem}")
    return manifest


def _kept_neurons_problem(kept, num_layers: int, key_width: int) -> str | None:
    """Pruning's record must name, per layer, increasing neuron indices inside the key width."""
    if kept is None:
        return None
    if len(kept) != num_layers:
        return f"has {len(kept)} layers, the model {num_layers}"
    for layer, indices in enumerate(kept):
        if not indices or indices[-1] >= key_width or any(b <= a for a, b in zip(indices, indices[1:])):
            return f"of layer {layer}: needs increasing indices in 0..{key_width - 1}"
    return None
