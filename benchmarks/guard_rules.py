"""Guard overhead of the calibrated rules against the paper's one-cube rule and no guard, one process,
interleaved rounds, so the ratios hold on a noisy machine.

    python benchmarks/guard_rules.py --model-dir out/smollm2 --stats gsm8k.npz --new-tokens 64 --rounds 3

Rows: no guard; the paper's rule (one cube, last layer); the stats file's stored rule (several layers, box,
diagonal Gaussian, forget/retain ratio, k of n, or the linear discriminant over a few layers) and, for scale,
a gauss and a ratio rule on 8 layers. Thresholds are set so that nothing ever
fires (every step pays the full check). Columns: decode tok/s (median over rounds) as a ratio to no guard, and
the guard's own check time per step as a share of a decode step (a stopwatch around `check`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace

from decode import PROMPT, decode_rate
from levers import TimedGuard

from unskill.runtime import Generator, OnnxLM, TextTokenizer, load_stats
from unskill.runtime.statsfile import LINEAR_LIMIT, REGION_LIMITS, GuardSetting


def never(setting: GuardSetting) -> GuardSetting:
    """The same rule with thresholds nothing reaches (a linear rule has one, on a score of either sign)."""
    if setting.rule == "linear":   # every read of it: the last token, the mean key, every prompt position
        return replace(setting, thresholds=[-LINEAR_LIMIT],
                       pooled_threshold=None if setting.pooled_threshold is None else -LINEAR_LIMIT,
                       anywhere_threshold=None if setting.anywhere_threshold is None else -LINEAR_LIMIT)
    return replace(setting, thresholds=[REGION_LIMITS[setting.rule][0]] * len(setting.layers))   # the smallest allowed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--stats", required=True, help="a stats file (with a stored rule from `unskill calibrate`)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="JSON results")
    args = p.parse_args(argv)
    model = OnnxLM(args.model_dir, device="cpu", threads=args.threads)
    tokenizer = TextTokenizer(args.model_dir, model.manifest)
    stats = load_stats(args.stats, model.manifest)
    last = model.manifest.num_layers - 1
    variants = {"no guard": None,
                "paper: 1 cube, last layer": TimedGuard([stats], model.manifest, alpha=REGION_LIMITS["box"][0], layers=[last])}
    if stats.guard:
        stored = replace(stats, guard=never(stats.guard))
        variants[f"stored: {stats.guard.name} ({stats.guard.rule})"] = TimedGuard([stored], model.manifest)
    eight = GuardSetting("gauss", list(range(last - 7, last + 1)), [REGION_LIMITS["gauss"][0]] * 8, 3)
    variants["gauss, 8 layers, 3 of 8"] = TimedGuard([replace(stats, guard=eight)], model.manifest)
    # the forget/retain ratio scores two Gaussians per layer; for timing any retain moments do
    ratio = replace(stats, guard=never(replace(eight, rule="ratio")),
                    groups={**stats.groups, "ksd_retain": stats.groups.get("ksd_retain", stats.groups["ksd"])})
    variants["ratio, 8 layers, 3 of 8"] = TimedGuard([ratio], model.manifest)
    rates = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, guard in variants.items():
            rates[name].append(decode_rate(Generator(model, tokenizer, guard), [PROMPT], args.new_tokens))
    base = statistics.median(rates["no guard"])
    rows = []
    for name, guard in variants.items():
        rate = statistics.median(rates[name])
        check = guard.seconds / guard.calls if guard and guard.calls else 0.0
        rows.append({"variant": name, "decode_tok_s": rate, "vs_no_guard": rate / base,
                     "check_us": check * 1e6, "check_share_of_step": check * base})
        print(f"{name:45s} {rate:7.1f} tok/s  {rate / base:5.3f}x  check {check * 1e6:6.0f} us = "
              f"{100 * check * base:5.2f} % of a step")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"model": str(args.model_dir), "new_tokens": args.new_tokens, "rounds": args.rounds,
                       "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
