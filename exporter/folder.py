"""The output folder: its file names, loading a model folder for a graph pass, writing the result once
(atomically, with the probe graph, manifest and metadata), fingerprints, and the `--out` check every writer
makes before its work. Below every command in exporter/: it imports only the graph index and the metadata
writer."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import onnx

from unskill.runtime.errors import UnskillError
from unskill.runtime.io import sha256_file
from unskill.runtime.manifest import Manifest, load_manifest

from .index import cut_to_outputs
from .metadata import copy_source_config, publish_permissions, write_metadata

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PROBE_FILE = "probe.onnx"   # key_last.* only, sharing DATA_FILE: the fast graph for KSD prompt passes


def refuse_nonempty_out(out_dir: Path) -> None:
    """Every writer checks its --out before the work (minutes of it, for an export or a fusion): a directory
    that exists and holds anything is never written into."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UnskillError(f"{out_dir}: exists and is not empty; choose a new --out")


def probe_graph(model: onnx.ModelProto, keep_outputs: list[str]) -> onnx.ModelProto:
    """A copy of `model` that computes only `keep_outputs` (key_last.* and present.*): no LM head, no final
    norm, no full-sequence key/pre-activation outputs, so a prompt pass that wants keys alone runs nothing
    else. Load `model` with load_external_data=False: the copy's weights still point into its data file."""
    return cut_to_outputs(model, keep_outputs)


def write_probe_graph(directory: Path, manifest: Manifest) -> None:
    """DIR/probe.onnx beside DIR/model.onnx, its weights read from the same data file; records it in the
    manifest (the caller saves it). No-op for models without key_last outputs."""
    if not manifest.key_last_outputs:
        return
    model = onnx.load(str(directory / manifest.model_file), load_external_data=False)
    presents = [o.name for o in model.graph.output if o.name.startswith("present.")]
    onnx.save(probe_graph(model, manifest.key_last_outputs + presents), str(directory / PROBE_FILE))
    manifest.probe_file = PROBE_FILE


def save_model(model: onnx.ModelProto, path: Path, data_file: str = DATA_FILE) -> None:
    """The graph at `path`, every tensor over 1 KB in one external data file beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data_file, size_threshold=1024)


def load_exported(directory: str | Path) -> tuple[onnx.ModelProto, Manifest]:
    directory = Path(directory)
    manifest = load_manifest(directory)
    path = directory / manifest.model_file
    if not path.is_file():
        raise UnskillError(f"{path}: missing ONNX model")
    try:
        return onnx.load(str(path)), manifest
    except onnx.checker.ValidationError as error:
        # e.g. onnx >= 1.17 refuses external data with several hard links (`cp -al` copies): copy the files.
        raise UnskillError(f"{path}: onnx refuses to load it: {error}") from None
    except (OSError, ValueError) as error:
        raise UnskillError(f"{path}: cannot read the ONNX model: {error}") from None


def stats_compatible_with(manifest: Manifest) -> list[str]:
    """`stats_compatible` of an edit that leaves every key output as it was (fuse, pack, quantize, slim): the
    parent's stats load on the copy, and so do those the parent accepts."""
    return [*(manifest.stats_compatible or []), manifest.fingerprint]


def edited_fingerprint(graph_path: Path, data_path: Path, edits: list[dict]) -> str:
    """Weights, graph and edit history together: NA changes the graph, not the weights, yet changes the keys,
    and two edits with the same record can still write different graphs (e.g. quantize's grid forms differ in
    node attributes only), which must not share eval-cache entries."""
    parts = [sha256_file(data_path), sha256_file(graph_path), json.dumps(edits, sort_keys=True)]
    digest = hashlib.sha256("".join(parts).encode())
    return "sha256:" + digest.hexdigest()


def save_edited(model: onnx.ModelProto, manifest: Manifest, source_dir: str | Path, out_dir: str | Path,
                edit: dict, model_file: str = MODEL_FILE, data_file: str = DATA_FILE, probe: bool = True,
                **changes) -> Manifest:
    """Write DIR2 atomically: model + data, the tokenizer, and the manifest with the edit appended.
    model_file / data_file: where the graph and its weights go (a deploy folder: onnx/model.onnx and
    onnx/model.onnx_data); probe=False writes no probe graph."""
    out_dir = Path(out_dir)
    refuse_nonempty_out(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unskill-edit-", dir=out_dir.parent))
    try:
        graph_path = staging / model_file
        save_model(model, graph_path, data_file)
        shutil.copy(Path(source_dir) / "tokenizer.json", staging / "tokenizer.json")
        edits = [*manifest.edits, edit]
        fingerprint = edited_fingerprint(graph_path, graph_path.parent / data_file, edits)
        new_manifest = replace(manifest, edits=edits, fingerprint=fingerprint, model_file=model_file, probe_file=None,
                               **changes)
        if probe:
            write_probe_graph(staging, new_manifest)
        new_manifest.save(staging)
        copy_source_config(source_dir, staging)
        write_metadata(staging, new_manifest, None)
        publish_permissions(staging)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return new_manifest
