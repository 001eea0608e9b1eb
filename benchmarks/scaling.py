"""How unskill scales: decode tok/s against prompt length and batch size, probing time against prompt count.

    python benchmarks/scaling.py --model-dir out/smollm2 --out benchmarks/results/scaling_smollm2.json

Decode tok/s counts generated tokens of all rows: (batch * (N - 1)) / (T_N - T_1), EOS masked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from decode import decode_rate

from unskill.runtime import GenerationParams, load
from unskill.stats.datasets import load_dataset
from unskill.stats.probe import ProbeConfig, Prober

FILLER = "The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the field. "


def prompt_of(tokenizer, length: int) -> str:
    """A prompt of about `length` tokens with the chat template applied."""
    text = FILLER * (length // 10 + 1)
    ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    base = len(tokenizer.encode_prompt("x"))
    return tokenizer.decode(ids[: max(1, length - base)])


def warm_rate(generator, prompts: list[str], new_tokens: int) -> float:
    generator.generate(prompts, GenerationParams(max_new_tokens=2, ignore_eos=True))   # warm-up for this shape
    return decode_rate(generator, prompts, new_tokens, repeats=3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lengths", default="64,256,1024,2048")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--prompt-counts", default="32,64,128")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    generator = load(args.model_dir, device="cpu")
    tokenizer = generator.tokenizer
    results = {"length": {}, "batch": {}, "probe": {}}

    print("| prompt tokens | decode tok/s (batch 1) |\n|---|---|")
    for length in map(int, args.lengths.split(",")):
        rate = warm_rate(generator, [prompt_of(tokenizer, length)], args.new_tokens)
        results["length"][length] = rate
        print(f"| {length} | {rate:.1f} |")

    print("\n| batch | decode tok/s, all rows (prompt 64) | per row |\n|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        rate = warm_rate(generator, [prompt_of(tokenizer, 64)] * batch, args.new_tokens)
        results["batch"][batch] = rate
        print(f"| {batch} | {rate:.1f} | {rate / batch:.1f} |")

    print("\n| prompts (builtin:math) | KSD probing seconds | prompts/s |\n|---|---|---|")
    prober = Prober(generator.model, tokenizer, ProbeConfig(progress=False))
    for count in map(int, args.prompt_counts.split(",")):
        dataset = load_dataset("builtin:math", limit=count)
        start = time.perf_counter()
        prober.prompt_pass(dataset)
        seconds = time.perf_counter() - start
        results["probe"][count] = seconds
        print(f"| {count} | {seconds:.2f} | {count / seconds:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
