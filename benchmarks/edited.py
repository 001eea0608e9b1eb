"""Decode speed of edited models (Neuron Adjust, pruned) against the unedited export, same run, same prompt.

    python benchmarks/edited.py out/smollm2 out/smollm2-na3 out/smollm2-sp2 --new-tokens 128 --runs 5

Runs are interleaved (A B C A B C …) so drift in machine load hits every model alike. NA outputs are
random by design, so token ids are not compared; EOS is masked so every run makes the same count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from decode import PROMPT, decode_rate

from unskill.runtime import load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dirs", nargs="+", type=Path, help="the first one is the baseline")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    generators = {str(d): load(d, device="cpu", threads=args.threads) for d in args.model_dirs}
    rates = {name: [] for name in generators}
    for generator in generators.values():
        decode_rate(generator, [PROMPT], 8)   # warm-up
    for _ in range(args.runs):
        for name, generator in generators.items():
            rates[name].append(decode_rate(generator, [PROMPT], args.new_tokens))
    base = statistics.median(rates[str(args.model_dirs[0])])
    print("| model | edits | decode tok/s (median) | vs unedited |")
    print("|---|---|---|---|")
    summary = {}
    for name, values in rates.items():
        edits = ", ".join(f"{e['method']} {e.get('mode') or format(e['ratio'], '.1%')}"
                          for e in generators[name].model.manifest.edits) or "none"
        median = statistics.median(values)
        summary[name] = {"edits": edits, "decode_tok_s": median, "ratio": median / base, "runs": values}
        print(f"| {name} | {edits} | {median:.1f} | {median / base:.3f}x |")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
