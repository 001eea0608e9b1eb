"""A model folder the runtime can load, built with onnx's helpers alone (no torch, no exporter): runtime tests
that need no `export` extra run on it.

The graph has the export's interface (input_ids, attention_mask, past_key_values.{i}.key/value -> logits,
present.{i}.key/value, key.{i}, preact.{i}, key_last.{i}) around a deliberately simple network whose next
token depends on the current token only, so a NumPy twin (`reference_logits`) gives the expected tokens:
    x = E[token];  per layer: preact = x @ U_i, key = relu(preact), x = x + key @ D_i;  logits = x @ W
Each layer's KV cache grows by a projection of its input, concatenated as optimum's unfused graph does.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WORDS = ["<pad>", "<eos>", "apple", "pear", "plum", "fig", "two", "three", "seven", "nine", "add", "sum",
         "code", "print", "loop", "list"]
VOCAB, HIDDEN, FFN, LAYERS, KV_HEADS, HEAD_DIM = len(WORDS), 8, 12, 2, 1, 4


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {"embed": rng.normal(0, 1, (VOCAB, HIDDEN)), "head": rng.normal(0, 1, (HIDDEN, VOCAB))}
    for layer in range(LAYERS):
        w[f"up.{layer}"] = rng.normal(0, 1, (HIDDEN, FFN))
        w[f"down.{layer}"] = rng.normal(0, 0.3, (FFN, HIDDEN))
        w[f"kv.{layer}"] = rng.normal(0, 1, (HIDDEN, HEAD_DIM))
    return {name: value.astype(np.float32) for name, value in w.items()}


def reference_logits(w: dict[str, np.ndarray], token: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(logits [V], each layer's key [F]) for one token: the graph's computation in NumPy."""
    x, keys = w["embed"][token], []
    for layer in range(LAYERS):
        key = np.maximum(x @ w[f"up.{layer}"], 0)
        keys.append(key)
        x = x + key @ w[f"down.{layer}"]
    return x @ w["head"], keys


def _graph(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes, inits = [], [numpy_helper.from_array(value, name) for name, value in w.items()]
    inits += [numpy_helper.from_array(np.array(-1, np.int64), "last"),
              numpy_helper.from_array(np.array([0, 0, KV_HEADS, HEAD_DIM], np.int64), "bshd")]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]
    nodes.append(helper.make_node("Gather", ["embed", "input_ids"], ["x.0"]))
    for i in range(LAYERS):
        x = f"x.{i}"
        nodes += [helper.make_node("MatMul", [x, f"up.{i}"], [f"pre.{i}"]),
                  helper.make_node("Relu", [f"pre.{i}"], [f"k.{i}"]),
                  helper.make_node("Identity", [f"pre.{i}"], [f"preact.{i}"]),
                  helper.make_node("Identity", [f"k.{i}"], [f"key.{i}"]),
                  helper.make_node("Gather", [f"k.{i}", "last"], [f"key_last.{i}"], axis=1),
                  helper.make_node("MatMul", [f"k.{i}", f"down.{i}"], [f"ffl.{i}"]),
                  helper.make_node("Add", [x, f"ffl.{i}"], [f"x.{i + 1}"]),
                  # KV: [B, S, H] @ [H, D] -> [B, S, 1, D] -> [B, 1, S, D], appended to the past
                  helper.make_node("MatMul", [x, f"kv.{i}"], [f"kvp.{i}"]),
                  helper.make_node("Reshape", [f"kvp.{i}", "bshd"], [f"kv4.{i}"]),
                  helper.make_node("Transpose", [f"kv4.{i}"], [f"new.{i}"], perm=[0, 2, 1, 3])]
        for kind in ("key", "value"):
            past, present = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"
            inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, ["batch", KV_HEADS, "past", HEAD_DIM]))
            outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT,
                                                         ["batch", KV_HEADS, "total", HEAD_DIM]))
            nodes.append(helper.make_node("Concat", [past, f"new.{i}"], [present], axis=2))
        outputs += [helper.make_tensor_value_info(f"key.{i}", TensorProto.FLOAT, ["batch", "seq", FFN]),
                    helper.make_tensor_value_info(f"preact.{i}", TensorProto.FLOAT, ["batch", "seq", FFN]),
                    helper.make_tensor_value_info(f"key_last.{i}", TensorProto.FLOAT, ["batch", FFN])]
    nodes.append(helper.make_node("MatMul", [f"x.{LAYERS}", "head"], ["logits"]))
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    return tokenizer


def build_tiny_folder(directory: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write model.onnx, tokenizer.json and unskill.json into `directory`; returns the weights."""
    from unskill.runtime.manifest import Manifest

    directory.mkdir(parents=True, exist_ok=True)
    w = weights(seed)
    model = _graph(w)
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / "model.onnx"))
    _tokenizer().save(str(directory / "tokenizer.json"))
    digest = hashlib.sha256((directory / "model.onnx").read_bytes()).hexdigest()
    Manifest(arch="tiny", num_layers=LAYERS, hidden_size=HIDDEN, key_width=FFN, activation="relu", gated=False,
             key_outputs=[f"key.{i}" for i in range(LAYERS)], preact_outputs=[f"preact.{i}" for i in range(LAYERS)],
             key_last_outputs=[f"key_last.{i}" for i in range(LAYERS)], fingerprint=f"sha256:{digest}",
             max_context=64, eos_token_ids=[1], pad_token_id=0, source="onnx-helper-tiny").save(directory)
    return w
