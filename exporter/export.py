"""HF model / GGUF -> DIR/model.onnx (+ external data) with per-layer key and pre-activation outputs."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from unskill.runtime.errors import UnskillError
from unskill.runtime.manifest import Manifest

from .graph import add_ffl_outputs, add_logits_to_keep, find_ffl_tensors, probe_graph
from .metadata import hf_config, publish_permissions, write_metadata
from .sources import ModelSource, resolve_model
from .tokenizer_fix import fix_tokenizer, save_tokenizer, token_id

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PROBE_FILE = "probe.onnx"   # key_last.* only, sharing DATA_FILE: the fast graph for KSD prompt passes
TASK = "text-generation-with-past"


def ffl_shape(config) -> tuple[int, int, int, str]:
    """(layers, hidden, ffn width, activation) for Llama-, Gemma- and GPT-2-style configs."""
    hidden = config.hidden_size
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    act = (getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
           or getattr(config, "activation_function", None) or "unknown")
    return config.num_hidden_layers, hidden, ffn, act


def load_hf(source: ModelSource):
    """The float32 PyTorch model and its fast tokenizer (GGUF is dequantized by transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.directory, torch_dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise UnskillError(f"{source.name}: cannot load model ({str(exc).splitlines()[0]})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UnskillError(f"{source.name}: needs a fast tokenizer (tokenizer.json)")
    return model.eval(), tokenizer


def _eos_ids(source: ModelSource, model, hf_tokenizer, tokenizer) -> list[int]:
    if source.eos_tokens:
        return [token_id(tokenizer, t, source.name) for t in source.eos_tokens]
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if hf_tokenizer.eos_token_id is not None and hf_tokenizer.eos_token_id not in ids:
        ids.append(hf_tokenizer.eos_token_id)
    if not ids:
        raise UnskillError(f"{source.name}: no EOS token in the generation config or tokenizer")
    return ids


def _backend_tokenizer(source: ModelSource, model, hf_tokenizer):
    """transformers 4.57 turns Gemma's SentencePiece-BPE GGUF vocabulary into a wrong Unigram model."""
    if source.gguf_file and model.config.model_type.startswith("gemma"):
        from .gguf_tokenizer import gemma_tokenizer_from_gguf
        return gemma_tokenizer_from_gguf(source.directory / source.gguf_file)
    return hf_tokenizer.backend_tokenizer


def _adds_bos(hf_tokenizer) -> bool:
    bos = hf_tokenizer.bos_token_id
    return bos is not None and hf_tokenizer("a")["input_ids"][:1] == [bos]


def refuse_nonempty_out(out_dir: Path) -> None:
    """Every writer checks its --out before the work (minutes of it, for an export or a fusion): a directory
    that exists and holds anything is never written into."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UnskillError(f"{out_dir}: exists and is not empty; choose a new --out")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def write_probe_graph(directory: Path, manifest: Manifest) -> None:
    """DIR/probe.onnx beside DIR/model.onnx, its weights read from the same data file; records it in the
    manifest (the caller saves it). No-op for models without key_last outputs."""
    import onnx

    if not manifest.key_last_outputs:
        return
    model = onnx.load(str(directory / manifest.model_file), load_external_data=False)
    presents = [o.name for o in model.graph.output if o.name.startswith("present.")]
    onnx.save(probe_graph(model, manifest.key_last_outputs + presents), str(directory / PROBE_FILE))
    manifest.probe_file = PROBE_FILE


def export_model(spec: str, out_dir: str | Path, opset: int | None = None, progress: bool = True,
                 fused: bool = True, pack: bool = True) -> Manifest:
    """Export `spec` into `out_dir`; the directory appears only once everything in it is written.
    fused (default): the graph goes through exporter/fuse.py (GroupQueryAttention, onnxruntime's norm and
    rotary fusions, shape arithmetic once per step, q/k/v and gate/up packed unless pack=False); fused=False
    keeps optimum's plain graph."""
    import onnx
    from optimum.exporters.onnx import onnx_export_from_model

    out_dir = Path(out_dir)
    refuse_nonempty_out(out_dir)
    steps = tqdm(total=6 if fused else 5, desc=f"export {spec}", disable=not progress, unit="step")
    source = resolve_model(spec)
    model, hf_tokenizer = load_hf(source)
    layers_n, hidden, ffn, act = ffl_shape(model.config)
    steps.update()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unskill-export-", dir=out_dir.parent))
    try:
        raw_dir = staging / "optimum"
        onnx_export_from_model(model, raw_dir, opset=opset, task=TASK, do_validation=False)
        steps.update()
        graph = onnx.load(str(raw_dir / MODEL_FILE))
        ffl = find_ffl_tensors(graph, hidden, ffn)
        if len(ffl) != layers_n:
            raise UnskillError(f"{spec}: found {len(ffl)} FFL layers in the graph, config says {layers_n}")
        key_names, preact_names, last_names = add_ffl_outputs(graph, ffl, ffn)
        add_logits_to_keep(graph)
        final = staging / "final"
        final.mkdir()
        onnx.save(graph, str(final / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=DATA_FILE, size_threshold=1024)
        (final / DATA_FILE).chmod(0o644)   # onnx writes it 0600 from a temp file
        del graph
        steps.update()

        add_bos = source.add_bos if source.add_bos is not None else _adds_bos(hf_tokenizer)
        tokenizer = fix_tokenizer(_backend_tokenizer(source, model, hf_tokenizer), add_bos)
        save_tokenizer(tokenizer, final)
        eos_ids = _eos_ids(source, model, hf_tokenizer, tokenizer)
        pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else eos_ids[0]
        steps.update()

        manifest = Manifest(
            arch=model.config.model_type, num_layers=layers_n, hidden_size=hidden, key_width=ffn,
            activation=str(act), gated=ffl[0].up is not None, key_outputs=key_names, key_last_outputs=last_names,
            preact_outputs=preact_names, fingerprint=sha256_file(final / DATA_FILE),
            max_context=int(getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions", 2048)),
            eos_token_ids=eos_ids, pad_token_id=int(pad_id), bos_token_id=hf_tokenizer.bos_token_id,
            add_bos=add_bos, chat_template=getattr(hf_tokenizer, "chat_template", None), source=spec,
        )
        write_probe_graph(final, manifest)
        manifest.save(final)
        write_metadata(final, manifest, hf_config(model))
        publish_permissions(final)
        if fused:
            from .fuse import fuse, fusion_table

            del model   # the torch weights are not needed any more: fusion holds the graph twice
            fused_manifest = fuse(final, staging / "fused", fusion_table(manifest.arch), pack=pack)
            final = staging / "fused"
            # The fused graph is the export, not an edit of one: no history, its own weights' fingerprint.
            manifest = replace(fused_manifest, edits=[], stats_compatible=None,
                               fingerprint=sha256_file(final / DATA_FILE))
            manifest.save(final)
            steps.update()
        if out_dir.exists():
            out_dir.rmdir()
        final.rename(out_dir)
        steps.update()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        steps.close()
    return manifest
