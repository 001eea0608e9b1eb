"""How often the guard's second look (runtime/canonical.py) fires: per dataset the share of clean prompts that read
as garbled (they pay one keys-only prefill more), and of Best-of-N samples of them (the attacker's own
augmentation, evals/attack.py) and of scrambled-only copies (shuffled middle letters, no casing), with the share
of each sample's words the repair gives back as written. Text only: no model runs.

    python scripts/second_look_rates.py --model out/smollm2 --limit 150 --out docs/data/guard/second-look-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys

import numpy as np

from unskill.runtime.canonical import Lexicon, canonical_prompt, canonical_text

SETS = ["gsm8k:test", "mbpp:test", "mmlu:test", "instructions:heldout", "xquad-en:test", "xquad-de:test",
        "xquad-es:test", "xquad-zh:test", "xquad-vi:test"]
SAMPLES = 50     # noised copies per set (of its first prompts, each cut to 400 characters)


def scrambled(text: str, rng: random.Random) -> str:
    """The Best-of-N scrambling alone (middle letters of words over three letters shuffled, p = 0.6)."""
    return " ".join(w[0] + "".join(rng.sample(w[1:-1], len(w) - 2)) + w[-1] if len(w) > 3 and rng.random() < 0.6
                    else w for w in text.split(" "))


def recovered(sample: str, original: str, lexicon: Lexicon) -> float:
    """Share of the original's words the repaired copy gives back (lower-cased), position by position."""
    copy, _ = canonical_text(sample, lexicon)
    want = canonical_text(original, lexicon)[0].split()
    return float(np.mean([a == b for a, b in zip(copy.split(), want)])) if want else 1.0


def main(argv=None) -> int:
    from tokenizers import Tokenizer

    from unskill.evals.attack import bon_augment
    from unskill.stats.datasets import load_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported model directory (its tokenizer.json)")
    p.add_argument("--limit", type=int, default=150, help="clean prompts per set")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", help="write the rates as JSON")
    args = p.parse_args(argv)
    lexicon = Lexicon.from_vocab(Tokenizer.from_file(f"{args.model}/tokenizer.json").get_vocab())
    rng = random.Random("second-look-rates")
    rates = {}
    for spec in SETS:
        prompts = [item.prompt for item in load_dataset(spec, args.data_dir).items[:args.limit]]
        bon = [(bon_augment(p[:400], rng), p[:400]) for p in prompts[:SAMPLES]]
        mixed = [(scrambled(p[:400], rng), p[:400]) for p in prompts[:SAMPLES]]
        rates[spec] = {
            "clean": {"prompts": len(prompts), "looked": sum(canonical_prompt(p, lexicon) is not None for p in prompts)},
            **{name: {"prompts": len(pairs), "looked": sum(canonical_prompt(s, lexicon) is not None for s, _ in pairs),
                      "words_back": round(float(np.mean([recovered(s, o, lexicon) for s, o in pairs])), 3)}
               for name, pairs in (("best_of_n", bon), ("scrambled", mixed))}}
        row = rates[spec]
        print(f"{spec:22s} clean {row['clean']['looked']:3d}/{row['clean']['prompts']}  best-of-n "
              f"{row['best_of_n']['looked']}/{SAMPLES} ({row['best_of_n']['words_back']:.2f} of words back)  scrambled "
              f"{row['scrambled']['looked']}/{SAMPLES} ({row['scrambled']['words_back']:.2f})")
    if args.out:
        from unskill.runtime.io import write_json
        write_json(args.out, {"command": "python scripts/second_look_rates.py " + " ".join(argv or sys.argv[1:]),
                              "model": args.model, "rates": rates})
    return 0


if __name__ == "__main__":
    sys.exit(main())
