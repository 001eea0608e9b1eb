"""Which prompt positions a linear guard should read: the last token, each of the last tokens, their max, their
mean key, or the last token or the mean key (what `unskill guard` stores), compared on the same keys:

    python scripts/prompt_positions.py --model out/smollm2 --forget gsm8k --out prompt-positions.json

One pass per prompt reads the keys of its last `--positions` tokens at the fit layers (runtime/keys.py
prompt_window_keys) for the guard's own fit sets (the forget probes with their framed and Best-of-N copies, the
default retain sets) and for the benchmark's held-out sets (evals/bypass.py: every family and retain set in chat
and raw mode, `--bp` items each; Best-of-N samples of `--bon R N` held-out requests). Every rule gets the same
layers (chosen by the last-token rule's calibration) and an out-of-fold threshold (4 folds) at the same 1 % retain
target; a rule with two thresholds splits that budget. Decoded tokens are not read here: rates at the prompt.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from unskill.evals import attack as A
from unskill.evals.bypass import attack_requests, bypass_sets
from unskill.runtime import OnnxLM, TextTokenizer
from unskill.runtime.keys import prompt_window_keys
from unskill.runtime.ksd import pool_keys
from unskill.stats import calibrate as C
from unskill.stats import guard as G
from unskill.stats.augment import FORMAT_SETS, augment, encode_formats
from unskill.stats.datasets import Dataset
from unskill.stats.discriminant import fit

TARGET = 0.01


class Keys:
    """Keys (n, P, layers, F) float16 and valid (n, P) of named prompt sets, read once."""

    def __init__(self, model: OnnxLM, layers: list[int], positions: int, batch_size: int):
        self.model, self.layers, self.positions, self.batch_size = model, layers, positions, batch_size
        self.sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def read(self, name: str, sequences: list[list[int]]) -> None:
        _, window, valid = prompt_window_keys(self.model, sequences, [], self.layers, self.positions,
                                              self.batch_size, desc=name)
        self.sets[name] = (window.astype(np.float16), valid)
        print(f"read {name}: {len(sequences)} prompts", file=sys.stderr, flush=True)

    def last(self, name: str) -> np.ndarray:
        return self.sets[name][0][:, -1].astype(np.float32)

    def mean(self, name: str) -> np.ndarray:
        keys, valid = self.sets[name]
        return pool_keys(keys.astype(np.float32), valid)

    def every(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        keys, valid = self.sets[name]
        return keys.astype(np.float32), valid


def read_keys(model, tokenizer, forget: str, args) -> tuple[Keys, list[str], dict]:
    kind = G.skill_kind(forget)
    keys = Keys(model, G.fit_layers(model.manifest.num_layers), args.positions, args.batch_size)
    formats = FORMAT_SETS["all"]
    probes, validation = G.forget_sets(forget, args.limit, args.data_dir)
    probes = Dataset(probes.name, probes.items + augment(probes, kind, seed=2, families=("bon",)).items)
    head = Dataset(probes.name, probes.items[:min(100, len(probes.items) // 4)])
    keys.read("probes", encode_formats(tokenizer, probes.prompts, formats)
              + encode_formats(tokenizer, augment(head, kind).prompts, formats, one=True))
    retain_names = []
    for index, dataset in enumerate(G.retain_sets(kind, G.GuardConfig(limit=args.limit), args.data_dir)):
        retain_names.append(f"retain {index} {dataset.name}")
        keys.read(retain_names[-1], encode_formats(tokenizer, dataset.prompts, formats, one=True))
    keys.read("validation", encode_formats(tokenizer, validation.prompts, formats))
    modes = ("chat", "raw") if tokenizer.has_chat_template else ("raw",)
    owners = {}
    for mode in modes:
        for part in bypass_sets(forget, args.data_dir, args.bp, 0):
            keys.read(f"{mode} {part.side} {part.name}", [tokenizer.encode_turns(c, mode == "chat")
                                                          for c in part.conversations])
        sequences, owner = [], []
        for request_index, request in enumerate(attack_requests(forget, args.data_dir, args.bon[0], 0)):
            for text in A.bon_samples(request[-1][1], request_index, 0, 0, args.bon[1]):
                sequences.append(tokenizer.encode_turns(A._with_last_turn(request, text), mode == "chat"))
                owner.append(request_index)
        keys.read(f"{mode} best-of-n", sequences)
        owners[mode] = np.array(owner)
    return keys, retain_names, owners


def discriminant(forget: np.ndarray, retain: np.ndarray, columns: list[int], every: np.ndarray | None = None):
    """(weight (l, F), bias, out-of-fold scores of the retain prompts (m,), and of `every` (m, P, C, F): their keys
    at every position, (m, P)) of the layers' averaged discriminants; a prompt is scored by the fit without it."""
    weights, biases = [], []
    oof, oof_every = np.zeros(len(retain)), None if every is None else np.zeros(every.shape[:2])
    forget_fold, retain_fold = C._folds(len(forget), 0), C._folds(len(retain), 1)
    for column in columns:
        weight, bias = fit(forget[:, column], retain[:, column])
        weights.append(weight)
        biases.append(bias)
        for part in range(C.FOLDS):
            held = retain_fold == part
            weight, bias = fit(forget[forget_fold != part][:, column], retain[~held][:, column])
            oof[held] += retain[held][:, column] @ weight + bias
            if every is not None:
                oof_every[held] += every[held][:, :, column] @ weight + bias
    scale = -1 / len(columns)
    return (np.stack(weights) / len(columns), sum(biases) / len(columns), oof * scale,
            None if every is None else oof_every * scale)


def score(weight, bias, keys: np.ndarray, columns: list[int]) -> np.ndarray:
    """-(sum_l w_l . v_l + b) of keys (..., C, F) at the chosen columns."""
    return -(np.einsum("...lf,lf->...", keys[..., columns, :], weight) + bias)


def rules(keys: Keys, retain_names: list[str]) -> tuple[list[int], dict]:
    """Each rule as name -> (decide: set name -> (n,) refused)."""
    retain_last = np.concatenate([keys.last(name) for name in retain_names])
    retain_mean = np.concatenate([keys.mean(name) for name in retain_names])
    retain_every = [keys.every(name) for name in retain_names]
    retain_every = (np.concatenate([k for k, _ in retain_every]), np.concatenate([v for _, v in retain_every]))
    forget_last, forget_mean = keys.last("probes"), keys.mean("probes")
    columns = list(range(len(keys.layers)))
    validation = keys.last("validation")
    chosen = C.calibrate_linear(forget_last, columns, retain_last, validation, len(validation), TARGET).setting.layers
    weight, bias, oof_last, oof_every = discriminant(forget_last, retain_last, chosen, retain_every[0])
    mean_weight, mean_bias, oof_mean, _ = discriminant(forget_mean, retain_mean, chosen)
    every_scores = np.where(retain_every[1], oof_every, np.inf)
    last_only = C.linear_threshold(oof_last, TARGET)
    full = oof_last <= last_only
    earlier = C._left_threshold(every_scores[:, :-1].min(axis=1), full, TARGET)
    max_threshold = C.linear_threshold(np.minimum(oof_last, every_scores[:, :-1].min(axis=1)), TARGET)
    mean_only = C.linear_threshold(oof_mean, TARGET)
    half = C.linear_threshold(oof_last, TARGET * C.LAST_SHARE)
    left = C._left_threshold(oof_mean, oof_last <= half, TARGET)

    def last_score(name):
        return score(weight, bias, keys.last(name), chosen)

    def every_score(name):
        window, valid = keys.every(name)
        return np.where(valid, score(weight, bias, window, chosen), np.inf)

    def mean_score(name):
        return score(mean_weight, mean_bias, keys.mean(name), chosen)

    return chosen, {
        "last token": lambda n: last_score(n) <= last_only,
        "last token, or one of the tokens before it at a second threshold":
            lambda n: (last_score(n) <= last_only) | (every_score(n)[:, :-1].min(axis=1) <= earlier),
        "max over the last tokens, one threshold":
            lambda n: np.minimum(last_score(n), every_score(n)[:, :-1].min(axis=1)) <= max_threshold,
        "mean key alone (own discriminant)": lambda n: mean_score(n) <= mean_only,
        "last token or the mean key (stored)": lambda n: (last_score(n) <= half) | (mean_score(n) <= left),
    }


def measure(keys: Keys, decide, owners: dict) -> dict:
    out = {}
    for name in keys.sets:
        if name.endswith("best-of-n"):
            mode, refused = name.split()[0], decide(name)
            owner = owners[mode]
            broken = [not refused[owner == r].all() for r in np.unique(owner)]
            out[name] = {"requests_broken": float(np.mean(broken)), "sample_passing": float(1 - refused.mean())}
        elif name.startswith(("chat ", "raw ", "validation")):
            out[name] = float(decide(name).mean())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--forget", default="gsm8k")
    p.add_argument("--limit", type=int, default=150, help="probes, validation prompts, items per retain set")
    p.add_argument("--bp", type=int, default=20, help="items per bypass set")
    p.add_argument("--bon", type=int, nargs=2, default=(12, 50), metavar=("REQUESTS", "N"))
    p.add_argument("--positions", type=int, default=C.PROMPT_POSITIONS)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data-dir")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.out:
        from unskill.runtime.io import check_output_path
        check_output_path(args.out)
    model = OnnxLM(args.model, device="cpu")
    tokenizer = TextTokenizer(args.model, model.manifest)
    keys, retain_names, owners = read_keys(model, tokenizer, args.forget, args)
    chosen, decisions = rules(keys, retain_names)
    results = {name: measure(keys, decide, owners) for name, decide in decisions.items()}
    for name, rates in results.items():
        print(name)
        for set_name, value in rates.items():
            print(f"  {set_name:40s} {value}")
    if args.out:
        from unskill.runtime.io import write_json
        write_json(args.out, {"model": args.model, "forget": args.forget, "positions": args.positions,
                              "layers": [keys.layers[c] for c in chosen], "target": TARGET,
                              "args": {k: v for k, v in vars(args).items() if k != "out"}, "rules": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
