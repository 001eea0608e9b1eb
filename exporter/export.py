"""HF model / GGUF -> DIR/model.onnx (+ external data) with per-layer key and pre-activation outputs.

optimum exports the graph; the passes (FFL outputs, logits_to_keep, fusion) run on it in memory and the
folder is written once (exporter/folder.py)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from unskill.runtime.errors import UnskillError
from unskill.runtime.manifest import Manifest

from .folder import DATA_FILE, MODEL_FILE, refuse_nonempty_out, save_model, sha256_file, write_probe_graph
from .fuse import fuse_graph, fusion_table
from .graph import add_ffl_outputs, add_logits_to_keep, find_ffl_tensors
from .metadata import hf_config, publish_permissions, write_metadata
from .sources import ModelSource, resolve_model
from .tokenizer_fix import fix_tokenizer, save_tokenizer, token_id

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
        shutil.rmtree(raw_dir)
        steps.update()

        add_bos = source.add_bos if source.add_bos is not None else _adds_bos(hf_tokenizer)
        tokenizer = fix_tokenizer(_backend_tokenizer(source, model, hf_tokenizer), add_bos)
        eos_ids = _eos_ids(source, model, hf_tokenizer, tokenizer)
        pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else eos_ids[0]
        config = hf_config(model)
        arch = model.config.model_type
        manifest_fields = dict(
            arch=arch, num_layers=layers_n, hidden_size=hidden, key_width=ffn,
            activation=str(act), gated=ffl[0].up is not None, key_outputs=key_names, key_last_outputs=last_names,
            preact_outputs=preact_names,
            max_context=int(getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions", 2048)),
            eos_token_ids=eos_ids, pad_token_id=int(pad_id), bos_token_id=hf_tokenizer.bos_token_id,
            add_bos=add_bos, chat_template=getattr(hf_tokenizer, "chat_template", None), source=spec,
        )
        steps.update()
        if fused:
            del model   # the torch weights are not needed any more: fusion holds the graph twice
            graph, edit = fuse_graph(graph, config, layers_n, hidden, fusion_table(arch), pack=pack, where=spec)
            if edit["attention_layers_fused"]:
                manifest_fields["attention"] = "gqa"
            steps.update()

        final = staging / "final"
        save_model(graph, final / MODEL_FILE)
        del graph
        save_tokenizer(tokenizer, final)
        # The fused graph is the export, not an edit of one: no history, its own weights' fingerprint.
        manifest = Manifest(fingerprint=sha256_file(final / DATA_FILE), **manifest_fields)
        write_probe_graph(final, manifest)
        manifest.save(final)
        write_metadata(final, manifest, config)
        publish_permissions(final)
        if out_dir.exists():
            out_dir.rmdir()
        final.rename(out_dir)
        steps.update()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        steps.close()
    return manifest
