"""A cheap screen for what goes into a linear guard's fit: minutes on stored keys instead of a guard run per idea.

Two steps. `keys` reads the last prompt token's keys at the fit layers (stats/guard.py fit_layers), in one prompt
format (chat where the model has a template), for the guard's own fit sets (the forget probes with framed and
Best-of-N copies, the default retain sets, the calibration half of the real user instructions labelled as the
skill) and for held-out sets (the benchmark's test problems plain and framed, the held-out real user requests of
the skill and the benign ones), and stores them:

    python scripts/fit_sets.py keys --model /work/cache/smollm2 --skill code --out fit-sets-smollm2-code.npz

`report` fits the discriminant (stats/discriminant.py) per layer on each variant of the fit sets, averages
windows of adjacent layers, sets the threshold at 1 % of the retain prompts out of fold (2 folds) and prints
what each variant refuses of the held-out sets, with the window the validation prompts would choose:

    python scripts/fit_sets.py report --keys fit-sets-smollm2-code.npz --out fit-sets-smollm2-code.json

Variants: the guard's fit as it is; with the calibration half's real skill requests (and their framed and noised
copies) on the forget side, repeated 1, 5 or 20 times; with the calibration half's benign real requests repeated
3 or 10 times on the retain side (hard negatives weighted up); and, for the guard's fit, the window chosen by the
calibration half's real skill requests where the validation prompts tie. It is a screen, not the guard: one format,
the last token only (no mean or every-position read), no decoded tokens, no suffix copies, so its false refusals run
above a stored guard's. A variant that does not move the held-out rates here is not worth a guard run.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

FOLDS = 2
TARGET = 0.01
WINDOWS = (1, 3, 5)
FORGET_FIT = ("probes", "probes_framed", "probes_bon")
REAL_SKILL = ("real_skill", "real_skill_framed", "real_skill_bon")
HELD_OUT = ("test", "test_framed", "heldout_skill", "heldout_benign")
BENCHMARK = {"code": "mbpp", "math": "gsm8k"}
OTHER = {"code": "math", "math": "code"}


def fit_and_heldout_sets(skill: str, data_dir: str, limit: int) -> dict:
    """name -> Dataset; names starting with retain_ are the retain side (stats/guard.py's defaults)."""
    from unskill.stats.augment import augment, chat_dataset, noisy_copies, without_skill_subjects
    from unskill.stats.datasets import Dataset, load_dataset, reading_passages
    from unskill.stats.guard import READING_SHARE

    bench = BENCHMARK[skill]
    probes = load_dataset(f"{bench}:train", data_dir, limit)
    real = load_dataset(f"instructions:calibration-{skill}", data_dir)
    test = load_dataset(f"{bench}:test", data_dir, 100)
    return {
        "probes": probes,
        "probes_framed": augment(Dataset(probes.name, probes.items[:limit // 2]), skill, seed=1),
        "probes_bon": noisy_copies(probes, every=1),
        "real_skill": real,
        "real_skill_framed": augment(real, skill, seed=3),
        "real_skill_bon": noisy_copies(real, every=1),
        "retain_other_skill": load_dataset(f"builtin:{OTHER[skill]}", None, 100),
        "retain_general": load_dataset("builtin:general", None, 100),
        "retain_chat": chat_dataset(),
        "retain_instructions": load_dataset(f"instructions:calibration-no{skill}", data_dir),
        "retain_mmlu": without_skill_subjects(load_dataset("mmlu:dev", data_dir), skill),
        "retain_reading": reading_passages(data_dir, max(1, limit // READING_SHARE), "train"),
        "validation": load_dataset(f"{bench}:validation", data_dir, 100),
        "test": test,
        "test_framed": augment(Dataset(test.name, test.items[:60]), skill, seed=7),
        "heldout_skill": load_dataset(f"instructions:heldout-{skill}", data_dir),
        "heldout_benign": load_dataset(f"instructions:heldout-no{skill}", data_dir),
    }


def read_keys(model_dir: str, skill: str, data_dir: str, limit: int, out: str, batch_size: int) -> None:
    from unskill.runtime import OnnxLM, TextTokenizer
    from unskill.runtime.io import write_npz_atomic
    from unskill.runtime.keys import KeyReader
    from unskill.stats.guard import fit_layers

    model = OnnxLM(model_dir, device="cpu")
    tokenizer = TextTokenizer(model_dir, model.manifest)
    layers = fit_layers(model.manifest.num_layers)
    reader = KeyReader(model, batch_size)
    keys = {}
    for name, dataset in fit_and_heldout_sets(skill, data_dir, limit).items():
        sequences = [tokenizer.encode_prompt(prompt, tokenizer.has_chat_template) for prompt in dataset.prompts]
        keys[name] = reader.last_keys(sequences, layers, desc=name).astype(np.float16)   # halves the file
        print(f"{name}: {len(sequences)} prompts", file=sys.stderr)
    write_npz_atomic(out, {"layers": np.array(layers), **keys})


def score_variant(keys: dict, forget: np.ndarray, retain: np.ndarray, repeats: np.ndarray,
                  held_out: tuple = ("validation", "real_skill", "real_skill_framed") + HELD_OUT,
                  seed: int = 0) -> list[dict]:
    """Every window of adjacent layers: its threshold (at most TARGET of the retain prompts out of fold, the
    discriminants averaged over the window) and the share of each held-out set it refuses. forget (n, C, F) and
    retain (m, C, F) keys, each retain prompt counted repeats (m,) times in every fit (a weight; the threshold
    counts each once)."""
    from unskill.stats.discriminant import fit

    columns = forget.shape[1]
    fold = np.random.default_rng(seed).permutation(retain.shape[0]) % FOLDS
    per_layer = []
    for column in range(columns):
        weight, bias = fit(forget[:, column], np.repeat(retain[:, column], repeats, axis=0))
        out_of_fold = np.empty(retain.shape[0])
        for part in range(FOLDS):   # the threshold's side: each retain prompt scored by a fit without it
            inside = fold != part
            w, b = fit(forget[:, column], np.repeat(retain[inside, column], repeats[inside], axis=0))
            out_of_fold[~inside] = retain[~inside, column] @ w + b
        per_layer.append((out_of_fold, {name: keys[name][:, column] @ weight + bias for name in held_out}))
    rows = []
    for window in WINDOWS:
        for start in range(columns - window + 1):
            chosen = range(start, start + window)
            retain_evidence = np.mean([per_layer[c][0] for c in chosen], axis=0)
            threshold = np.sort(retain_evidence)[::-1][int(np.floor(TARGET * retain_evidence.size))]
            refused = {name: float((np.mean([per_layer[c][1][name] for c in chosen], axis=0) > threshold).mean())
                       for name in held_out}
            rows.append({"window": window, "start": start, **refused})
    return rows


def chosen_window(rows: list[dict]) -> dict:
    """What the calibration would store: the most validation prompts refused, then the wider window, the earlier."""
    return max(rows, key=lambda row: (row["validation"], row["window"], -row["start"]))


def window_by_real_requests(rows: list[dict]) -> dict:
    """The validation prompts first (they saturate on both models), then the calibration half's real skill
    requests with their framed copies, then as chosen_window: a tie-break a guard could use without held-out data."""
    return max(rows, key=lambda row: (row["validation"], row["real_skill"] + row["real_skill_framed"],
                                      row["window"], -row["start"]))


def variants(keys: dict) -> tuple[dict, np.ndarray]:
    """({name: (forget rows, each retain row's weight)}, the retain rows)."""
    retain_names = sorted(name for name in keys if name.startswith("retain_"))
    retain = np.concatenate([keys[name] for name in retain_names])
    hard = np.concatenate([np.full(len(keys[name]), name == "retain_instructions") for name in retain_names])
    forget = np.concatenate([keys[name] for name in FORGET_FIT])
    real = np.concatenate([keys[name] for name in REAL_SKILL])
    once = np.ones(retain.shape[0], dtype=np.int64)
    out = {"guard's fit": (forget, once)}
    for times in (1, 5, 20):
        out[f"+ calibration skill requests x{times}"] = (np.concatenate([forget] + [real] * times), once)
    for times in (3, 10):
        out[f"calibration benign requests x{times}"] = (forget, np.where(hard, times, 1))
    return out, retain


def load_keys(keys_path: str) -> dict:
    from unskill.runtime.errors import UnskillError

    try:
        with np.load(keys_path, allow_pickle=False) as stored:
            keys = {name: stored[name].astype(np.float32) for name in stored.files if name != "layers"}
    except (OSError, ValueError) as exc:
        raise UnskillError(f"{keys_path}: not a keys file of `fit_sets.py keys` ({exc})") from None
    needed = FORGET_FIT + REAL_SKILL + HELD_OUT + ("validation", "retain_instructions")
    missing = [name for name in needed if name not in keys]
    if missing:
        raise UnskillError(f"{keys_path}: no {', '.join(missing)} keys; make the file with `fit_sets.py keys`")
    return keys


def report(keys_path: str, out: str | None) -> int:
    keys = load_keys(keys_path)
    found, retain = variants(keys)
    result = {"keys": keys_path, "target": TARGET, "variants": {}}
    print(f"{'variant':40s} window  " + "  ".join(f"{name:>14s}" for name in ("validation",) + HELD_OUT))
    for name, (forget, repeats) in found.items():
        rows = score_variant(keys, forget, retain, repeats)
        best = chosen_window(rows)
        result["variants"][name] = {"chosen": best}
        print(f"{name:40s} {best['window']}@{best['start']:<4d} " +
              "  ".join(f"{best[held]:14.3f}" for held in ("validation",) + HELD_OUT))
        if name == "guard's fit":
            tied = window_by_real_requests(rows)
            result["window_by_real_requests"], result["windows"] = tied, rows
            print(f"{'  window by the real requests':40s} {tied['window']}@{tied['start']:<4d} " +
                  "  ".join(f"{tied[held]:14.3f}" for held in ("validation",) + HELD_OUT))
    result["separation"] = separation(keys, found["guard's fit"][0], retain)
    print("the guard's fit, layer by layer: AUC of held-out skill vs benign requests; benign refused at 0.9 recall")
    print("  " + "  ".join(f"{row['auc']:.2f}/{row['benign_at_0.9']:.2f}" for row in result["separation"]))
    if out:
        from unskill.runtime.io import write_json
        write_json(out, result)
    return 0


def separation(keys: dict, forget: np.ndarray, retain: np.ndarray) -> list[dict]:
    """Per fit layer, how far any threshold on the fitted direction could go on the held-out real requests: the
    AUC of the skill's against the benign ones, and the share of benign ones refused where 90 % of the skill's are
    (a ceiling on the direction, not on the calibration: nothing here sets a threshold from held-out data)."""
    from unskill.stats.discriminant import fit

    rows = []
    for column in range(forget.shape[1]):
        weight, bias = fit(forget[:, column], retain[:, column])
        skill = keys["heldout_skill"][:, column] @ weight + bias
        benign = keys["heldout_benign"][:, column] @ weight + bias
        at_recall = np.sort(skill)[int(np.floor(0.1 * skill.size))]
        rows.append({"column": column, "auc": round(float((skill[:, None] > benign[None]).mean()), 4),
                     "benign_at_0.9": round(float((benign >= at_recall).mean()), 4)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    read = steps.add_parser("keys", help="read and store the keys of the fit and held-out sets")
    read.add_argument("--model", required=True)
    read.add_argument("--skill", choices=sorted(BENCHMARK), required=True)
    read.add_argument("--out", required=True)
    read.add_argument("--limit", type=int, default=150, help="forget probes (as `unskill guard --limit`)")
    read.add_argument("--batch-size", type=int, default=16)
    read.add_argument("--data-dir", default=os.environ.get("UNSKILL_DATA_DIR"))
    scored = steps.add_parser("report", help="score the fit variants on stored keys")
    scored.add_argument("--keys", required=True)
    scored.add_argument("--out")
    args = parser.parse_args(argv)
    from unskill.runtime.errors import UnskillError
    from unskill.runtime.io import check_output_path

    try:
        if args.step == "keys":
            check_output_path(args.out, "--out")
            read_keys(args.model, args.skill, args.data_dir, args.limit, args.out, args.batch_size)
            return 0
        if args.out:
            check_output_path(args.out, "--out")
        return report(args.keys, args.out)
    except UnskillError as exc:
        print(f"fit_sets: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
