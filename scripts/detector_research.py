"""Detector research for issue 16: cache every layer's key at the last prompt token once, then score rules offline.

    python scripts/detector_research.py cache --model /work/exp/smollm2 --out /work/scratch-16/keys-smollm2.npz
    python scripts/detector_research.py rules --keys /work/scratch-16/keys-smollm2.npz --out docs/runs/robustness-smollm2/rules.json

`cache` prefills each prompt set through the keys-only graph (all `key_last.*` outputs) and stores float16 keys
(sets x prompts x layers x width). `rules` fits each candidate detector on the fit sets, calibrates it on the
calibration sets, and reports refusal rates on the bypass benchmark's families and retain sets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SETS_LIMIT = {"fit": 200, "aug": 100, "cal": 90, "bench": 50}
RULES = ("box", "gauss", "ratio")   # ratio: forget over retain Gaussian score (retain side from calibration prompts)


def prompt_sets(data_dir) -> dict[str, list]:
    from unskill.evals.bypass import bypass_sets
    from unskill.stats.augment import augment, chat_dataset
    from unskill.stats.datasets import load_dataset

    def turns(dataset):
        return [(("user", item.prompt),) for item in dataset.items]
    sets = {}
    for skill, kind in (("gsm8k", "math"), ("mbpp", "code")):
        sets[f"fit/{skill}"] = turns(load_dataset(f"{skill}:train", data_dir, limit=SETS_LIMIT["fit"]))
        sets[f"fit/{skill}+aug"] = turns(augment(load_dataset(f"{skill}:train", data_dir, limit=SETS_LIMIT["aug"]), kind))
        validation = load_dataset(f"{skill}:validation", data_dir, limit=SETS_LIMIT["cal"])
        sets[f"cal/{skill}"] = turns(validation)
        sets[f"cal/{skill}+aug"] = turns(augment(load_dataset(f"{skill}:validation", data_dir, limit=30), kind, seed=1))
        for part in bypass_sets(skill, data_dir, SETS_LIMIT["bench"], seed=0):
            sets[f"bench/{skill}/{part.side}/{part.name}"] = part.conversations
    from unskill.stats.augment import without_skill_subjects
    for kind in ("math", "code"):
        sets[f"cal/mmlu-{kind}"] = turns(without_skill_subjects(load_dataset("mmlu:dev", data_dir), kind))
    sets["cal/chat"] = turns(chat_dataset())
    sets["cal/general"] = turns(load_dataset("builtin:general", data_dir, limit=60))
    return sets


def cache(args) -> int:
    from unskill.runtime.session import OnnxLM
    from unskill.runtime.tokenizer import TextTokenizer
    from unskill.stats.probe import last_position_keys

    model = OnnxLM(args.model, threads=args.threads)
    tokenizer = TextTokenizer(args.model, model.manifest)
    outputs = model.manifest.key_last_outputs
    sets = prompt_sets(args.data_dir)
    arrays, started = {}, time.time()
    if args.only:   # recompute these sets only, keep the others from the existing cache
        with np.load(args.out) as old:
            arrays = {name: old[name] for name in old.files}
        sets = {n: c for n, c in sets.items() if any(n.startswith(prefix) for prefix in args.only)}
    for name, conversations in sets.items():
        sequences = [tokenizer.encode_turns(c) for c in conversations]
        keys = np.empty((len(sequences), len(outputs), model.manifest.key_width), np.float16)
        for rows, values in last_position_keys(model.key_only(), sequences, outputs, args.batch_size):
            keys[rows] = np.stack([values[o] for o in outputs], axis=1)
        arrays[name] = keys
        print(f"{name}: {len(sequences)} prompts, {time.time() - started:.0f} s", flush=True)
    np.savez(args.out, **arrays)
    return 0


# ------------------------------------------------------------------------------------------ rules
# The same scoring and search as `unskill calibrate` (stats/calibrate.py), on the cached keys.

def stats_of(keys: np.ndarray):
    """A stats file whose KSD group holds these (n, L, F) keys, as `unskill stats` would write it."""
    from unskill.runtime.statsfile import GROUP_FIELDS, Moments, StatsFile
    moments = Moments.empty(GROUP_FIELDS["ksd"], keys.shape[1], keys.shape[2])
    for layer in range(keys.shape[1]):
        moments.add(layer, keys[:, layer])
    return StatsFile("research", "research", keys.shape[2], keys.shape[1], {"skill": "research"}, {"ksd": moments})


def rules(args) -> int:
    from unskill.stats.calibrate import (CANDIDATES, RULE_KINDS, _choose, fires, key_moments, layer_scores,
                                         retain_ratio_scores, search_rule)

    with np.load(args.keys) as archive:
        keys = {name: archive[name].astype(np.float32) for name in archive.files}
    target, report = args.target, {}
    for skill, other in (("gsm8k", "mbpp"), ("mbpp", "gsm8k")):
        bench = {n.split("/", 2)[2]: k for n, k in keys.items() if n.startswith(f"bench/{skill}/")}
        results = {}
        for fit_name in ("plain", "augmented"):
            fit = keys[f"fit/{skill}"]
            if fit_name == "augmented":
                fit = np.concatenate([fit, keys[f"fit/{skill}+aug"]])
            stats = stats_of(fit)
            last = fit.shape[1] - 1
            kind = {"gsm8k": "math", "mbpp": "code"}[skill]
            retain_keys = np.concatenate([keys[f"cal/{other}"], keys["cal/chat"], keys["cal/general"],
                                          keys[f"cal/mmlu-{kind}"]])
            forget_keys = np.concatenate([keys[f"cal/{skill}"], keys[f"cal/{skill}+aug"]])
            plain = len(keys[f"cal/{skill}"])
            moments = key_moments(retain_keys)   # the ratio rule's retain side, as calibrate stores it
            retain = {r: layer_scores(retain_keys, stats, r) for r in ("box", "gauss")}
            retain["ratio"] = retain_ratio_scores(retain_keys, stats)   # cross-fitted, as calibrate does
            forget = {r: layer_scores(forget_keys, stats, r, moments) for r in RULES}
            scores = {r: {n: layer_scores(k, stats, r, moments) for n, k in bench.items()} for r in RULES}
            paper = _choose(layer_scores(keys[f"cal/{other}"], stats, "box")[:, last], forget["box"][:plain, last],
                            target, last)

            def record(rule, layers, thresholds, votes, extra=None):
                rates = {n: float(fires(s, layers, thresholds, votes).mean()) for n, s in scores[rule].items()}
                cal = {"cal_retain": float(fires(retain[rule], layers, thresholds, votes).mean()),
                       "cal_forget": float(fires(forget[rule], layers, thresholds, votes).mean())}
                return {"rule": rule, "layers": layers, "thresholds": thresholds, "votes": votes, **cal,
                        "rates": rates, **(extra or {})}
            results[f"{fit_name}|paper"] = record("box", [last], [paper.alpha], 1)
            setting, _, _ = search_rule(retain, forget, target, RULE_KINDS)   # gauss and ratio
            results[f"{fit_name}|searched"] = record(setting.rule, setting.layers, setting.thresholds, setting.votes)
            for rule in RULES:
                for count, votes in CANDIDATES:
                    try:
                        chosen, _, _ = search_rule(retain, forget, target, (rule,), ((count, votes),))
                    except Exception:
                        continue
                    results[f"{fit_name}|{rule}-{count}L-{votes}v"] = record(rule, chosen.layers, chosen.thresholds, votes)
        report[skill] = results
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown(report, args.target))
    for skill, results in report.items():
        names = list(next(iter(results.values()))["rates"])
        print(f"\n== forget {skill}\n{'rule':26s} {'calR':>5s} {'calF':>5s} " +
              " ".join(f"{n.split('/')[-1][:6]:>6s}" for n in names))
        for rule, r in results.items():
            print(f"{rule:26s} {r['cal_retain']:5.2f} {r['cal_forget']:5.2f} " +
                  " ".join(f"{r['rates'][n]:6.2f}" for n in names) + f"  L={r['layers']}")
    return 0


def markdown(report: dict, target: float) -> str:
    """Refusal rates per rule and set, as a Markdown table per forget skill."""
    lines = []
    for skill, results in report.items():
        names = list(next(iter(results.values()))["rates"])
        short = [n.split("/")[-1] + ("*" if n.startswith("retain") else "") for n in names]
        lines += [f"Forget {skill} (fit: 200 train prompts, `augmented`: + 600 framed variants of the first 100; "
                  f"calibrated at {target:.0%} on the validation/chat/general/MMLU-dev retain prompts; * = retain set, "
                  "lower is better):", "",
                  "| rule | layers | " + " | ".join(short) + " |", "|---" * (len(names) + 2) + "|"]
        for rule, r in results.items():
            lines.append(f"| {rule.replace('|', ' / ')} | {','.join(map(str, r['layers']))} | " +
                         " | ".join(f"{r['rates'][n]:.2f}" for n in names) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--model", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--data-dir", default=None)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--only", nargs="+", help="recompute the sets whose names start with these, keep the rest")
    c.set_defaults(run=cache)
    r = sub.add_parser("rules")
    r.add_argument("--keys", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--target", type=float, default=0.01)
    r.set_defaults(run=rules)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
