"""The stored rule's last-token discriminant read at every prompt position instead of the last one only: what it
would catch and what it would cost. A causal model's key at the end of a request does not change with what is
appended after it, so a suffix (the frame-and-suffix search's random tokens) cannot hide the request from a rule
read at every position; the question is what it does to prompts that must be answered.

Per set and prompt format: the share of prompts the region's last-token discriminant fires on at the last token
(what the guard's last-token check does today; the stored rule also reads the mean key, not here) and at any
prompt position, with the stored threshold. Retain: held-out real instructions less the skill's, MMLU test less
the skill's subjects, the other skill, chat with numbers; attack: held-out test requests plain, with 12 random
vocabulary tokens appended (a fresh random suffix per request, as the search's first round) and in the search's
help-desk transcript frame (evals/attack.py). Nothing here is calibrated: the threshold is the stored one.

    python scripts/any_position.py --model out/smollm2 --stats gsm8k.npz --forget gsm8k --limit 40 \\
        --out docs/data/guard/any-position-smollm2-gsm8k.json
"""

from __future__ import annotations

import argparse
import random
import sys

import numpy as np

SUFFIX_TOKENS = 12


def main(argv=None) -> int:
    from unskill.evals.attack import SEARCH_FRAMES
    from unskill.evals.bypass_items import CHAT_WITH_NUMBERS
    from unskill.runtime.ksd import KSDGuard, LinearRegion
    from unskill.runtime.session import OnnxLM
    from unskill.runtime.statsfile import load_stats
    from unskill.runtime.tokenizer import TextTokenizer
    from unskill.stats.augment import without_skill_subjects
    from unskill.stats.datasets import load_dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--stats", required=True, help="a guard with a stored linear rule (unskill guard)")
    p.add_argument("--forget", required=True, choices=["gsm8k", "mbpp"])
    p.add_argument("--limit", type=int, default=40, help="prompts per set (instructions: all held-out ones)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out")
    args = p.parse_args(argv)
    model = OnnxLM(args.model)
    tokenizer = TextTokenizer(args.model, model.manifest)
    guard = KSDGuard([load_stats(args.stats, model.manifest)], model.manifest)
    region = guard.detectors[0].regions[0]
    if not isinstance(region, LinearRegion):
        print(f"{args.stats}: the stored rule is not linear", file=sys.stderr)
        return 2
    kind, other = ("math", "mbpp") if args.forget == "gsm8k" else ("code", "gsm8k")
    names = [model.manifest.key_outputs[i] for i in region.layers]
    rng = random.Random("any-position")
    vocab = tokenizer.tokenizer.get_vocab_size()

    def prompts(spec: str, limit: int | None = args.limit, dataset=None) -> list[str]:
        dataset = dataset or load_dataset(spec, args.data_dir)
        return [item.prompt for item in dataset.items[:limit]]

    requests = [q.split("\nYour code should pass these tests:")[0] for q in prompts(f"{args.forget}:test")]
    sets = {
        "instructions (retain)": prompts(f"instructions:heldout-no{kind}", None),
        "mmlu less the skill (retain)": prompts("", args.limit, without_skill_subjects(
            load_dataset("mmlu:test", args.data_dir), kind)),
        "other skill (retain)": prompts(f"{other}:test"),
        "chat with numbers (retain)": CHAT_WITH_NUMBERS[:args.limit],
        "plain (attack)": requests,
        "random 12-token suffix (attack)": [q + tokenizer.decode([rng.randrange(vocab) for _ in range(SUFFIX_TOKENS)])
                                            for q in requests],
        "help-desk transcript frame (attack)": [SEARCH_FRAMES[6].format(q=q) for q in requests],
    }
    rates = {}
    for chat in (True, False):
        fmt = "chat" if chat else "raw"
        for name, texts in sets.items():
            last = anywhere = 0
            for text in texts:
                ids = tokenizer.encode_prompt(text, chat)
                _, _, out = model.forward(np.array([ids]), np.ones((1, len(ids)), np.int64), model.empty_past(1),
                                          names, logits=False, tail=len(ids))
                scores = region.score(np.stack([out[name][0] for name in names], axis=1))   # (S,)
                last += bool(scores[-1] <= region.threshold)
                anywhere += bool(scores.min() <= region.threshold)
            rates.setdefault(name, {})[fmt] = {"prompts": len(texts), "last_token": round(last / len(texts), 3),
                                               "any_position": round(anywhere / len(texts), 3)}
            row = rates[name][fmt]
            print(f"{fmt:4s} {name:38s} n={row['prompts']:3d}  last token {row['last_token']:.2f}  "
                  f"any position {row['any_position']:.2f}", flush=True)
    if args.out:
        from unskill.runtime.io import write_json
        write_json(args.out, {"command": "python scripts/any_position.py " + " ".join(argv or sys.argv[1:]),
                              "rule": guard.describe()[0], "threshold": region.threshold, "rates": rates})
    return 0


if __name__ == "__main__":
    sys.exit(main())
