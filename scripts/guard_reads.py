"""Which read of a stored linear guard refuses each prompt of a dataset, and by how much.

A linear rule reads three things at the prompt (runtime/ksd.py LinearRegion.prompt_contains): the last token's
key, the mean key of the last `positions` tokens and each of the last `anywhere_positions` keys one by one, each
against its own threshold. This prints the three margins (score - threshold: <= 0 fires) of the prompts nearest
to firing (refused ones first), so a false refusal can be traced to the read that made it. Keys come from the
guard's own tap (runtime/keys.py guard_prompt_keys), as ksd-run reads them; the second look at garbled prompts is
left out (it reads a repaired copy of the prompt, not these keys).

    python scripts/guard_reads.py --model /work/cache/smollm2 --stats mbpp.npz \
        --dataset instructions:heldout-nocode --show 6 --out reads.json
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from unskill.runtime.errors import UnskillError
from unskill.runtime.keys import KeyReader, guard_prompt_keys
from unskill.runtime.ksd import KSDGuard, LinearRegion, prompt_window
from unskill.runtime.session import OnnxLM
from unskill.runtime.statsfile import load_stats
from unskill.runtime.tokenizer import TextTokenizer
from unskill.stats.datasets import load_dataset

READS = ("last", "mean", "anywhere")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--stats", required=True, help="a stats file with a stored linear rule (unskill guard)")
    p.add_argument("--dataset", required=True, help="a dataset spec (stats/datasets.py), e.g. instructions:heldout-nocode")
    p.add_argument("--show", type=int, default=6, help="prompts printed per mode, nearest to firing first")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir")
    p.add_argument("--out", help="write the counts and the --show nearest prompts' margins here (JSON)")
    args = p.parse_args(argv)
    try:
        model = OnnxLM(args.model, device="cpu")
        tokenizer = TextTokenizer(args.model, model.manifest)
        stats = load_stats(args.stats, model.manifest)
        guard = KSDGuard([stats], model.manifest)
        region = guard.detectors[0].regions[0]
        if not isinstance(region, LinearRegion):
            raise UnskillError(f"{args.stats}: the stored rule is {guard.describe()[0]!r}, not a linear one")
        dataset = load_dataset(args.dataset, args.data_dir)
    except UnskillError as exc:
        print(f"guard_reads: {exc}", file=sys.stderr)
        return 2
    reader = KeyReader(model, args.batch_size)
    modes = ("chat", "raw") if tokenizer.has_chat_template else ("raw",)
    result = {"model": args.model, "stats": args.stats, "dataset": args.dataset, "rule": guard.describe()[0],
              "modes": {}}
    for mode in modes:
        sequences = [tokenizer.encode_prompt(prompt, mode == "chat") for prompt in dataset.prompts]
        keys, mask = guard_prompt_keys(model, guard, sequences, args.batch_size, f"{dataset.name} {mode}", reader)
        names = guard._prompt_output_of_layer   # the tap's per-position outputs, as evals/attack.py reads them
        window, valid = prompt_window(region, lambda layer: keys[names[layer]], mask)
        margins = region.read_margins(window, valid)
        nearest = np.min(np.stack([margins[read] for read in READS]), axis=0)
        refused = [hit is not None for hit in guard.check(keys, mask)]
        print(f"{dataset.name} {mode}: {sum(refused)} of {len(refused)} refused")
        shown = np.argsort(nearest)[:args.show]
        for row in shown:
            cells = "  ".join(f"{read} {margins[read][row]:+.3f}" for read in READS)
            print(f"  {'refused ' if refused[row] else 'answered'} {cells}  {dataset.items[row].group or '-':6s} "
                  f"{dataset.prompts[row][:70]!r}")
        result["modes"][mode] = {"prompts": len(refused), "refused": int(sum(refused)), "nearest": [
            {"prompt": dataset.prompts[row][:80], "group": dataset.items[row].group, "refused": refused[row],
             **{read: round(float(margins[read][row]), 4) for read in READS}} for row in shown]}
    if args.out:
        from unskill.runtime.io import write_json
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
