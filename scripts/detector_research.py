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

def box_entry(keys: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """(n, L) entry alpha per layer: max_d |v - mu| / (k sigma), the paper's cube at alpha 1 x k."""
    mu, sd = fit.mean(0), np.maximum(fit.std(0, ddof=1), 1e-6)
    k = (np.abs(fit - mu) / sd).max(axis=(0, 2))                      # (L,) fitted k per layer
    return (np.abs(keys - mu) / sd).max(axis=2) / k


def gauss_score(keys: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """(n, L) mean squared z-score over dimensions (a diagonal Gaussian's negative log-likelihood, up to
    constants), in units of the largest fit prompt's score so 1.0 holds every probe."""
    mu, sd = fit.mean(0), np.maximum(fit.std(0, ddof=1), 1e-6)
    top = (((fit - mu) / sd) ** 2).mean(2).max(0)
    return (((keys - mu) / sd) ** 2).mean(2) / top


def threshold(retain_scores: np.ndarray, target: float) -> float:
    """Largest threshold refusing at most floor(target * n) retain prompts (score <= threshold refuses)."""
    ordered = np.sort(retain_scores)
    allowed = int(np.floor(target * ordered.size))
    return float(ordered[allowed]) * (1 - 1e-6) if allowed < ordered.size else float("inf")


def evaluate(scores: dict[str, np.ndarray], layers, thresholds, votes: int) -> dict[str, float]:
    out = {}
    for name, s in scores.items():
        fired = (s[:, layers] <= np.asarray(thresholds)).sum(1) >= votes
        out[name] = float(fired.mean())
    return out


def choose_layers(cal_forget: np.ndarray, cal_retain: np.ndarray, target: float, count: int):
    """Per layer, the threshold at the retain target and its forget recall; the `count` best layers."""
    per_layer = [threshold(cal_retain[:, l], target) for l in range(cal_retain.shape[1])]
    recall = [(cal_forget[:, l] <= t).mean() for l, t in enumerate(per_layer)]
    best = sorted(np.argsort(recall)[::-1][:count].tolist())
    return best, [per_layer[l] for l in best], recall


def rules(args) -> int:
    with np.load(args.keys) as archive:
        keys = {name: archive[name].astype(np.float32) for name in archive.files}
    target, report = args.target, {}
    for skill, other in (("gsm8k", "mbpp"), ("mbpp", "gsm8k")):
        bench = {n.split("/", 2)[2]: k for n, k in keys.items() if n.startswith(f"bench/{skill}/")}
        results = {}
        for fit_name in (f"fit/{skill}", f"fit/{skill}+aug"):
            fit = keys[fit_name] if fit_name.endswith(skill) else np.concatenate([keys[f"fit/{skill}"], keys[fit_name]])
            for scorer_name, scorer in (("box", box_entry), ("gauss", gauss_score)):
                score = {n: scorer(k, fit) for n, k in bench.items()}
                cal_forget = scorer(np.concatenate([keys[f"cal/{skill}"], keys[f"cal/{skill}+aug"]]), fit)
                cal_plain = scorer(keys[f"cal/{skill}"], fit)
                cal_retain = scorer(np.concatenate([keys[f"cal/{other}"], keys["cal/chat"], keys["cal/general"]]), fit)
                last = cal_retain.shape[1] - 1
                # the paper's rule: last layer, alpha calibrated on the other skill only (the README recipe)
                paper_t = threshold(scorer(keys[f"cal/{other}"], fit)[:, last], target)
                results[f"{fit_name}|{scorer_name}|last"] = {
                    "layers": [last], "thresholds": [paper_t], "votes": 1,
                    "rates": evaluate(score, [last], [paper_t], 1),
                    "cal_forget": float((cal_plain[:, last] <= paper_t).mean())}
                for count, votes in ((1, 1), (3, 1), (3, 2), (5, 2), (5, 3), (8, 3)):
                    sub_target = target / max(count // votes, 1)   # union of layers: spend the budget per layer
                    layers, ts, _ = choose_layers(cal_forget, cal_retain, sub_target, count)
                    results[f"{fit_name}|{scorer_name}|top{count}-k{votes}"] = {
                        "layers": layers, "thresholds": ts, "votes": votes,
                        "rates": evaluate(score, layers, ts, votes)}
        report[skill] = results
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for skill, results in report.items():
        names = list(next(iter(results.values()))["rates"])
        print(f"\n== forget {skill}\n{'rule':40s} " + " ".join(f"{n.split('/')[-1][:9]:>9s}" for n in names))
        for rule, r in results.items():
            print(f"{rule:40s} " + " ".join(f"{r['rates'][n]:9.2f}" for n in names) + f"  L={r['layers']}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--model", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--data-dir", default=None)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--threads", type=int, default=2)
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
