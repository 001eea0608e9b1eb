"""Probing speed: `unskill stats` (ONNX, KSD statistics of every layer at the last prompt token) against a
PyTorch forward-hook probe collecting the same statistics on the same prompts, batch and padding.

    python benchmarks/probe.py --model-dir out/smollm2 --hf smollm2-135m --prompts 96 --batch-size 8

Both accumulate count, sum, sum of squares, min and max in float64; the script checks the two means agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from decode import hf_dir

from unskill.runtime import OnnxLM, TextTokenizer
from unskill.runtime.statsfile import GROUP_FIELDS, Moments
from unskill.stats.datasets import load_dataset
from unskill.runtime.session import left_pad
from unskill.stats.probe import ProbeConfig, Prober, last_position_keys, shared_prefix_length


def onnx_variant(model: OnnxLM, sequences: list[list[int]], batch_size: int, share_prefix: bool) -> float:
    """Seconds for the KSD prompt pass on `model`'s graph, with or without the shared-prefix prefill."""
    outputs = model.manifest.key_last_outputs
    start = time.perf_counter()
    for _ in last_position_keys(model, sequences, outputs, batch_size, share_prefix=share_prefix):
        pass
    return time.perf_counter() - start


def torch_probe(model_name: str, sequences: list[list[int]], pad: int, batch_size: int, layers: int, width: int):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir(model_name), torch_dtype=torch.float32).eval()
    moments = Moments.empty(GROUP_FIELDS["ksd"], layers, width)
    for i, block in enumerate(model.model.layers):
        block.mlp.down_proj.register_forward_pre_hook(
            lambda m, args, i=i: moments.add(i, args[0][:, -1, :].detach().numpy()))
    start = time.perf_counter()
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))   # same batches as unskill
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            ids, mask = left_pad([sequences[i] for i in order[s:s + batch_size]], pad)
            positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
            model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    return time.perf_counter() - start, moments


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--hf", default="smollm2-135m")
    parser.add_argument("--forget", default="builtin:math")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    model = OnnxLM(args.model_dir, device="cpu")
    tokenizer = TextTokenizer(args.model_dir, model.manifest)
    dataset = load_dataset(args.forget, limit=args.prompts)
    prober = Prober(model, tokenizer, ProbeConfig(batch_size=args.batch_size, progress=False))
    prober.prompt_pass(load_dataset(args.forget, limit=args.batch_size))   # warm-up
    start = time.perf_counter()
    ours = prober.prompt_pass(dataset)
    unskill_s = time.perf_counter() - start
    sequences = [tokenizer.encode_prompt(item.prompt) for item in dataset.items]
    tokens = sum(map(len, sequences))
    # The levers one by one, each after a warm-up batch: the full graph (LM head included) without and
    # with the shared prefix, and the keys-only graph without it; `unskill stats` uses both.
    levers = {}
    for label, lm, share in (("full graph", model, False), ("full graph + shared prefix", model, True),
                             ("keys-only graph", model.key_only(), False)):
        onnx_variant(lm, sequences[:args.batch_size], args.batch_size, share)
        levers[label] = onnx_variant(lm, sequences, args.batch_size, share)
    torch_s, theirs = torch_probe(args.hf, sequences, model.manifest.pad_token_id, args.batch_size,
                                  model.manifest.num_layers, model.manifest.key_width)
    gap = float(np.max(np.abs(ours.mean() - theirs.mean())))
    print(f"{len(sequences)} prompts, {tokens} tokens ({shared_prefix_length(sequences)} shared by all), "
          f"batch {args.batch_size}; max |mean difference| {gap:.2e}\n")
    print("| probe | seconds | tokens/s | vs unskill |\n|---|---|---|---|")
    rows = [(f"unskill: {label}", seconds) for label, seconds in levers.items()]
    rows += [("unskill stats (keys-only graph + shared prefix)", unskill_s), ("PyTorch forward hooks", torch_s)]
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {tokens / seconds:.0f} | {unskill_s / seconds:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps({"prompts": len(sequences), "tokens": tokens, "unskill_s": unskill_s,
                                        "torch_s": torch_s, "max_mean_gap": gap,
                                        "levers_s": levers}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
