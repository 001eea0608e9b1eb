"""Run an exported or edited (NA / pruned) unskill model with plain onnxruntime: no unskill import.

    python examples/plain_onnxruntime.py out/smollm2-na3 "Write a python function to reverse a string."

What a deployment needs is all in the directory: model.onnx (+ .data), tokenizer.json, and the EOS ids and
chat template in unskill.json. Greedy decoding with a KV cache, batch of one, in ~40 lines of NumPy.
"""

import json
import sys
from pathlib import Path

import jinja2
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def main(model_dir: str, prompt: str, max_new_tokens: int = 64) -> str:
    directory = Path(model_dir)
    manifest = json.loads((directory / "unskill.json").read_text())
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    session = ort.InferenceSession(str(directory / manifest["model_file"]), providers=["CPUExecutionProvider"])
    if manifest["chat_template"]:
        text = jinja2.Template(manifest["chat_template"]).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    else:
        ids = tokenizer.encode(prompt).ids
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs}
    wants_positions = any(i.name == "position_ids" for i in session.get_inputs())
    outputs = ["logits"] + [i.name.replace("past_key_values.", "present.") for i in past_inputs]
    generated, step_ids, length = [], ids, 0
    for _ in range(max_new_tokens):
        feeds = {"input_ids": np.array([step_ids]), "attention_mask": np.ones((1, length + len(step_ids)), np.int64)}
        if wants_positions:
            feeds["position_ids"] = np.arange(length, length + len(step_ids))[None]
        logits, *presents = session.run(outputs, {**feeds, **past})
        past = {i.name: value for i, value in zip(past_inputs, presents)}
        length += len(step_ids)
        token = int(np.argmax(logits[0, -1]))
        if token in manifest["eos_token_ids"]:
            break
        generated.append(token)
        step_ids = [token]
    return tokenizer.decode(generated, skip_special_tokens=True)


if __name__ == "__main__":
    print(main(sys.argv[1], sys.argv[2]))
