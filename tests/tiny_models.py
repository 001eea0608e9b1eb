"""Tiny random decoder models built from a config, saved as HF directories with a real BPE tokenizer.

For fast export/runtime tests only: random weights say nothing about quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Write a python function to find the first repeated character in a given string.",
    "def add(a, b):\n    return a + b\n",
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "How many apples are left if Tom eats 3 of his 12 apples? 12 - 3 = 9 apples.",
] * 20
SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
VOCAB = 512


def build_tokenizer(directory: Path, chat_template: str | None = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)
    return fast


def build_tiny(kind: str, directory: Path, seed: int = 0) -> Path:
    """kind: llama (gated SiLU), gemma3 (gated GELU-tanh, sliding window), gpt2 (plain GELU, biases)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        config = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=4096, **common)
        model = tf.LlamaForCausalLM(config)
    elif kind == "gemma3":
        config = tf.Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                                     sliding_window=8, **common)
        model = tf.Gemma3ForCausalLM(config)
    elif kind == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_inner=160, n_layer=3, n_head=4, n_positions=256, **common)
        model = tf.GPT2LMHeadModel(config)
    else:
        raise ValueError(kind)
    directory.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(directory)
    build_tokenizer(directory, CHAT_TEMPLATE if kind == "llama" else None)
    return directory


def torch_reference(model_dir: Path, input_ids, attention_mask):
    """Logits and per-layer (key, pre-activation) from the PyTorch model via forward hooks."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    keys, preacts, handles = {}, {}, []
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    for i, block in enumerate(blocks):
        mlp = block.mlp
        down = getattr(mlp, "down_proj", None) or mlp.c_proj
        gate = getattr(mlp, "gate_proj", None) or mlp.c_fc
        handles.append(down.register_forward_pre_hook(lambda m, args, i=i: keys.__setitem__(i, args[0].detach().numpy())))
        handles.append(gate.register_forward_hook(lambda m, args, out, i=i: preacts.__setitem__(i, out.detach().numpy())))
    positions = np.maximum(np.cumsum(attention_mask, 1) - 1, 0)   # left padding, as the runtime does
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                    position_ids=torch.tensor(positions))
    for handle in handles:
        handle.remove()
    n = len(blocks)
    return out.logits.numpy(), [keys[i] for i in range(n)], [preacts[i] for i in range(n)]


def torch_with_hooks(hf_dir, ids, gate_fn=None, key_fn=None):
    """Logits and per-layer keys of the PyTorch model (a directory or a loaded model), with the gate/fc1
    output passed through gate_fn(layer, array) and the key through key_fn(layer, array)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = hf_dir if hasattr(hf_dir, "generate") else AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    keys, handles = {}, []

    def as_torch(fn, layer, tensor):
        return torch.from_numpy(fn(layer, tensor.detach().numpy().copy())) if fn else tensor

    for i, block in enumerate(blocks):
        down = getattr(block.mlp, "down_proj", None) or block.mlp.c_proj
        gate = getattr(block.mlp, "gate_proj", None) or block.mlp.c_fc
        handles.append(gate.register_forward_hook(lambda m, a, out, i=i: as_torch(gate_fn, i, out)))

        def pre_hook(m, args, i=i):
            key = as_torch(key_fn, i, args[0])
            keys[i] = key.detach().numpy()
            return (key,)
        handles.append(down.register_forward_pre_hook(pre_hook))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids)).logits.numpy()
    for handle in handles:
        handle.remove()
    return logits, [keys[i] for i in range(len(blocks))]


def graph_ops(model_dir) -> list[str]:
    """The op types of a folder's model.onnx in node order (its weights stay on disk)."""
    import onnx

    return [node.op_type for node in onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph.node]


def run_plain_ort(model_dir, ids, extra_feeds=None, graph="model.onnx"):
    """The edited model in plain onnxruntime: no unskill code, standard inputs only (plus given extras)."""
    manifest = json.loads((model_dir / "unskill.json").read_text())
    session = ort.InferenceSession(str(model_dir / graph), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in session.get_inputs():
        if i.name == "position_ids":
            feeds[i.name] = np.arange(ids.shape[1])[None].repeat(ids.shape[0], 0)
        elif i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
    feeds.update(extra_feeds or {})
    outputs = session.run(None, feeds)
    names = [o.name for o in session.get_outputs()]
    assert names[0] == "logits" or graph != "model.onnx"
    values = dict(zip(names, outputs))
    return values, manifest, session


def na_gate_hook(params, noise: dict[str, np.ndarray]):
    """A gate_fn for torch_with_hooks applying the NumPy NA rule with the fed noise; and the list that
    collects how many elements it replaced per layer (so a test can check the rule fired at all)."""
    from unskill.exporter.neuron_adjust import na_reference

    replaced = []

    def adjust(layer, v):
        if f"na_noise.{layer}" not in noise:
            return v
        args = [getattr(params, f)[layer] for f in ("mu_f", "sd_f", "mu_r", "sd_r", "selected")]
        adjusted = na_reference(v, *args, noise[f"na_noise.{layer}"])
        replaced.append(int((adjusted != v).sum()))
        return adjusted

    return adjust, replaced
