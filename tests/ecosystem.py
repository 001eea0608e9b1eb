"""Greedy text of a model folder as other stacks produce it, from the folder's files alone (no unskill code):
optimum's ORTModelForCausalLM with AutoTokenizer's chat template, and onnxruntime-genai with its own
tokenizer and chat template (tests/test_ecosystem.py)."""

from __future__ import annotations

import json
from pathlib import Path


def optimum_greedy(model_dir: Path, prompt: str, max_new_tokens: int, chat: bool = True, model=None) -> str:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = model or ORTModelForCausalLM.from_pretrained(model_dir, provider="CPUExecutionProvider")
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:
        ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def genai_greedy(model_dir: Path, prompt: str, max_new_tokens: int, chat: bool = True, tokens: bool = False):
    """The decoded text, or with tokens=True the new token ids (random tiny models emit byte sequences that
    are not UTF-8, which genai's decoder and `tokenizers` render differently)."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    text = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]),
                                         add_generation_prompt=True) if chat else prompt
    if not chat:   # a raw prompt gets the tokenizer's BOS as in `tokenizers` and transformers (genai: off by default)
        tokenizer.update_options(add_special_tokens="true")
    ids = tokenizer.encode(text)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    new = generator.get_sequence(0)[len(ids):]
    return [int(t) for t in new] if tokens else tokenizer.decode(new)
