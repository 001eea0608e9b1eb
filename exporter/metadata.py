"""The files the onnxruntime ecosystem reads beside an ONNX decoder, written by `unskill export` and every edit.

optimum's ORTModelForCausalLM reads config.json (AutoConfig) and generation_config.json (every EOS id);
AutoTokenizer reads tokenizer_config.json + special_tokens_map.json (only tokens that exist in the
vocabulary: otherwise `<s>`, `</s>`, `<unk>` get new ids past the embedding), `model_input_names` (else
`token_type_ids` reaches generate) and the chat template (inline and in chat_template.jinja);
onnxruntime-genai reads genai_config.json (the graph's input/output name patterns, head sizes, EOS ids;
`past_present_share_buffer` false: the optimum graph concatenates its cache, it has no preallocated buffer).
transformers.js reads the same files and onnx/model.onnx (+ onnx/model.onnx_data) of a deploy folder.

Everything is derived from the manifest, tokenizer.json and the source model's config, so an edit rewrites
it from its parent: a pruned model's config lists its per-layer FFL widths.
"""

from __future__ import annotations

import json
from pathlib import Path

from unskill.runtime.manifest import Manifest

CONFIG = "config.json"
METADATA_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                  "chat_template.jinja", "genai_config.json")
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


def _write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def _graph_io(directory: Path, manifest: Manifest) -> tuple[list[str], int, int, int | None]:
    """(graph input names, kv heads, head size, vocab) read from the graph file without its weights."""
    import onnx

    graph = onnx.load(str(directory / manifest.model_file), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    past = next(i for i in graph.input if i.name.startswith("past_key_values."))
    dims = [d.dim_value for d in past.type.tensor_type.shape.dim]
    logits = [o for o in graph.output if o.name == "logits"]
    vocab = logits[0].type.tensor_type.shape.dim[-1].dim_value if logits else None
    return inputs, dims[1], dims[3], vocab or None


def _token(tokenizer, token_id: int | None) -> str | None:
    return tokenizer.id_to_token(token_id) if token_id is not None else None


def _unk_token(tokenizer) -> str | None:
    """The model's unknown token, only when the vocabulary has one (byte-level BPE needs none)."""
    unk = json.loads(tokenizer.to_str())["model"].get("unk_token")
    return unk if unk and tokenizer.token_to_id(unk) is not None else None


def special_tokens(directory: Path, manifest: Manifest) -> dict[str, str]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    named = {"bos_token": _token(tokenizer, manifest.bos_token_id),
             "eos_token": _token(tokenizer, manifest.eos_token_ids[0]),
             "pad_token": _token(tokenizer, manifest.pad_token_id), "unk_token": _unk_token(tokenizer)}
    return {name: token for name, token in named.items() if token is not None}


def tokenizer_config(manifest: Manifest, specials: dict[str, str]) -> dict:
    document = {"tokenizer_class": "PreTrainedTokenizerFast", "model_input_names": MODEL_INPUT_NAMES,
                "clean_up_tokenization_spaces": False, "model_max_length": manifest.max_context,
                # tokenizer.json's post-processor already adds BOS where the model wants it
                "add_bos_token": manifest.add_bos, "add_eos_token": False, **specials}
    if manifest.chat_template:
        document["chat_template"] = manifest.chat_template
    return document


def generation_config(manifest: Manifest) -> dict:
    document = {"eos_token_id": list(manifest.eos_token_ids), "pad_token_id": manifest.pad_token_id}
    if manifest.bos_token_id is not None:
        document["bos_token_id"] = manifest.bos_token_id
    return document


def model_config(source: dict, manifest: Manifest) -> dict:
    """The source model's config, with what the edits changed: a pruned model's FFL is narrower and no
    longer uniform. optimum reads only the attention shapes; `intermediate_size` stays the original width
    (the key width stats are taken at) and `intermediate_size_per_layer` holds the real ones."""
    config = {**source, "torch_dtype": "float32", "use_cache": True}
    if "dtype" in config:
        config["dtype"] = "float32"
    config["eos_token_id"] = list(manifest.eos_token_ids)
    if manifest.kept_neurons is not None:
        config["intermediate_size_per_layer"] = [len(kept) for kept in manifest.kept_neurons]
    if manifest.edits:
        config["unskill_edits"] = [edit["method"] for edit in manifest.edits]
    if manifest.model_file != "model.onnx":   # a deploy folder: transformers.js loads onnx/model.onnx_data
        config["transformers.js_config"] = {"use_external_data_format": True}
    return config


def genai_config(manifest: Manifest, config: dict, inputs: list[str], kv_heads: int, head_size: int,
                 vocab: int | None) -> dict:
    """onnxruntime-genai 0.18 running the optimum graph as written (DecoderOnly model, concatenating cache)."""
    input_names = {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if "position_ids" in inputs:
        input_names["position_ids"] = "position_ids"
    decoder = {"filename": manifest.model_file, "head_size": head_size, "hidden_size": manifest.hidden_size,
               "num_attention_heads": int(config.get("num_attention_heads", kv_heads)),
               "num_hidden_layers": manifest.num_layers, "num_key_value_heads": kv_heads,
               "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
               "inputs": input_names,
               "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                           "present_value_names": "present.%d.value"}}
    model = {"type": "llama", "context_length": manifest.max_context, "decoder": decoder,
             "eos_token_id": list(manifest.eos_token_ids), "pad_token_id": manifest.pad_token_id,
             "bos_token_id": manifest.bos_token_id if manifest.bos_token_id is not None else manifest.pad_token_id,
             "vocab_size": vocab or int(config.get("vocab_size", 0))}
    search = {"do_sample": False, "early_stopping": True, "max_length": manifest.max_context, "min_length": 0,
              "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
              "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"model": model, "search": search}


def hf_config(model) -> dict:
    """The source config as save_pretrained writes it (non-default fields), naming the architecture and
    without the local path it was loaded from."""
    config = model.config.to_diff_dict()
    config["architectures"] = [type(model).__name__]
    config.pop("_name_or_path", None)
    return config


def write_metadata(directory: str | Path, manifest: Manifest, source_config: dict | None) -> None:
    """Write every ecosystem file into `directory` (which holds the graph, tokenizer.json and the manifest
    fields in `manifest`). source_config: the source model's config dict; None keeps config.json as it is
    (an edit reads its parent's)."""
    directory = Path(directory)
    if source_config is None:
        source_config = json.loads((directory / CONFIG).read_text()) if (directory / CONFIG).is_file() else {}
    specials = special_tokens(directory, manifest)
    _write_json(directory / "generation_config.json", generation_config(manifest))
    _write_json(directory / "tokenizer_config.json", tokenizer_config(manifest, specials))
    _write_json(directory / "special_tokens_map.json", specials)
    if manifest.chat_template:
        (directory / "chat_template.jinja").write_text(manifest.chat_template)
    if not source_config:   # an export older than this module: its source config is unknown
        return
    config = model_config(source_config, manifest)
    _write_json(directory / CONFIG, config)
    inputs, kv_heads, head_size, vocab = _graph_io(directory, manifest)
    _write_json(directory / "genai_config.json", genai_config(manifest, config, inputs, kv_heads, head_size, vocab))


def copy_source_config(source_dir: str | Path, staging: str | Path) -> None:
    """An edit starts from its parent's config.json (exports before this module have none)."""
    parent = Path(source_dir) / CONFIG
    if parent.is_file():
        (Path(staging) / CONFIG).write_text(parent.read_text())


def publish_permissions(directory: str | Path) -> None:
    """Folders 0755, files 0644: tempfile.mkdtemp makes the staging folder 0700 and onnx writes the data
    file 0600, and both keep their mode through the atomic rename."""
    directory = Path(directory)
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
