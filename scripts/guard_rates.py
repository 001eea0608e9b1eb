"""Refusal rates of a guard made by `unskill guard`, at the prompt (prefill check only), in chat and raw mode:

    python scripts/guard_rates.py --model out/smollm2 --stats gsm8k.npz --skill math --limit 200 --out rates.json

Sets: the forget benchmark's test split (refusal wanted), the other skill's test split, MMLU test less the
skill's subjects, the bypass benchmark's chat set, the held-out real user instructions less the skill's
(`instructions:heldout-no<skill>`; never seen by calibration) and XQuAD test passages with a question (`--limit`
over seven languages; calibration reads train's articles). `--sets` keeps some of them. Rates come from the
guard's own Detector.
"""

from __future__ import annotations

import argparse
import json
import sys

from unskill.runtime import OnnxLM, TextTokenizer, load_stats
from unskill.stats.augment import without_skill_subjects
from unskill.stats.datasets import XQUAD_LANGUAGES, Dataset, Item, load_dataset, reading_passages, sample
from unskill.stats.guard import refusal_rates

FORGET = {"math": "gsm8k:test", "code": "mbpp:test"}


SETS = ("forget", "other", "mmlu", "chat", "instructions", "reading", "arithmetic")


def datasets(skill: str, limit: int, data_dir, names=SETS) -> list[Dataset]:
    from unskill.evals.bypass_items import CHAT_WITH_NUMBERS as CHAT

    other = "code" if skill == "math" else "math"
    make = {"forget": lambda: sample(load_dataset(FORGET[skill], data_dir), limit),
            "other": lambda: sample(load_dataset(FORGET[other], data_dir), limit),
            "mmlu": lambda: sample(without_skill_subjects(load_dataset("mmlu:test", data_dir), skill), limit),
            "chat": lambda: Dataset("bypass-chat", [Item(text) for text in CHAT]),
            "instructions": lambda: load_dataset(f"instructions:heldout-no{skill}", data_dir),
            "reading": lambda: reading_passages(data_dir, -(-limit // len(XQUAD_LANGUAGES)), "test"),
            "arithmetic": lambda: sample(load_dataset("gsm8k:test-arithmetic", data_dir), limit)}
    return [make[name]() for name in names]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--skill", choices=("math", "code"), required=True)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {','.join(SETS)}")
    p.add_argument("--data-dir")
    p.add_argument("--out")
    args = p.parse_args(argv)
    names = [name for name in args.sets.split(",") if name]
    if not names or any(name not in SETS for name in names):
        p.error(f"--sets {args.sets!r}: use names of {','.join(SETS)}")
    model = OnnxLM(args.model, device="cpu")
    tokenizer = TextTokenizer(args.model, model.manifest)
    stats = load_stats(args.stats, model.manifest)
    modes = ("chat", "raw") if tokenizer.has_chat_template else ("raw",)
    rates = refusal_rates(model, tokenizer, stats, datasets(args.skill, args.limit, args.data_dir, names), modes)
    for name, by_mode in rates.items():
        print(f"{name:32s} " + "  ".join(f"{mode} {rate:.3f}" for mode, rate in by_mode.items()))
    if args.out:
        from unskill.runtime.io import write_json
        write_json(args.out, {"model": args.model, "stats": args.stats, "rule": stats.guard.name,
                              "calibration": stats.guard.calibration, "rates": rates})
    return 0


if __name__ == "__main__":
    sys.exit(main())
