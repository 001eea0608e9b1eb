"""`unskill calibrate-na`: choose Neuron Adjust's ratio from validation data, the way `unskill calibrate` chooses
KSD's alpha. Each candidate ratio is baked into a temporary model and scored (token-level top-1) on retain and
forget validation sets; the largest ratio whose retain score stays within --target of the original's wins,
since a larger ratio forgets more. The paper leaves the ratio to hand-tuning.

Lives in the top package because it needs both the exporter (to edit) and stats (to score).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

DEFAULT_RATIOS = "0.0025,0.005,0.01,0.015,0.02,0.03"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("calibrate-na", help="choose the NA ratio so retain top-1 drops at most --target")
    p.add_argument("--model", required=True)
    p.add_argument("--stats", required=True, help="stats with NA groups (unskill stats --forget … --retain …)")
    p.add_argument("--retain", required=True, help="retain validation set with completions, e.g. mbpp:validation")
    p.add_argument("--forget", required=True, help="forget validation set with completions, e.g. gsm8k:validation")
    p.add_argument("--ratios", default=DEFAULT_RATIOS, help=f"candidates (default {DEFAULT_RATIOS})")
    p.add_argument("--target", type=float, default=0.01,
                   help="largest allowed relative drop of retain top-1 (default 0.01)")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir")
    p.add_argument("--keep", help="write the chosen NA model here")
    p.add_argument("--out", help="write the choice and every candidate's scores as JSON here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def _scores(model_dir: Path, args, tasks: list[str]) -> dict[str, float]:
    from unskill.runtime.session import OnnxLM
    from unskill.runtime.tokenizer import TextTokenizer
    from unskill.evals.evaluate import EvalConfig, Harness

    model = OnnxLM(model_dir)
    config = EvalConfig(args.data_dir, args.limit, seed=args.seed, progress=not args.no_progress)
    results = Harness(model, TextTokenizer(model_dir, model.manifest), config).run(tasks)
    return {name: task["score"] for name, task in results.items()}


def run(args: argparse.Namespace) -> int:
    from unskill.exporter.neuron_adjust import neuron_adjust
    from unskill.runtime.io import write_json
    from unskill.runtime.errors import UnskillError

    try:
        ratios = sorted(float(r) for r in args.ratios.split(","))
    except ValueError:
        raise UnskillError(f"--ratios {args.ratios!r}: expected comma-separated numbers") from None
    if not ratios or not all(0 < r < 1 for r in ratios) or not 0 <= args.target < 1:
        raise UnskillError("--ratios must lie in (0, 1) and --target in [0, 1)")
    tasks = [args.retain, args.forget]
    before = _scores(Path(args.model), args, tasks)
    candidates, chosen = [], None
    with tempfile.TemporaryDirectory(prefix="unskill-na-", dir=Path(args.keep or ".").resolve().parent) as scratch:
        for ratio in ratios:
            out = Path(scratch) / f"na-{ratio}"
            neuron_adjust(args.model, args.stats, ratio, out, seed=args.seed)
            after = _scores(out, args, tasks)
            retain_rel, forget_rel = (after[t] / before[t] if before[t] else float("nan") for t in tasks)
            candidates.append({"ratio": ratio, "retain": after[args.retain], "forget": after[args.forget],
                               "retain_rel": retain_rel, "forget_rel": forget_rel})
            print(f"ratio {ratio:.4f}: retain {retain_rel:.4f} x, forget {forget_rel:.4f} x")
            if retain_rel < 1 - args.target:
                break   # larger ratios only edit more neurons
            chosen = candidates[-1]
            if args.keep:
                shutil.rmtree(args.keep, ignore_errors=True)
                shutil.move(str(out), args.keep)
            else:
                shutil.rmtree(out)   # one model on disk at a time
    if chosen is None:
        print(f"no ratio keeps retain within {args.target:.1%}; the smallest tried was {ratios[0]}")
    else:
        print(f"ratio {chosen['ratio']}: retain {chosen['retain_rel']:.4f} x, forget {chosen['forget_rel']:.4f} x"
              + (f" -> {args.keep}" if args.keep else ""))
    if args.out:
        from unskill.runtime.manifest import load_manifest
        from unskill.runtime.statsfile import load_stats
        write_json(args.out, {"method": "na", "source": load_manifest(Path(args.model)).source,
                              "skill": load_stats(args.stats).skill, "stats": args.stats, "retain": args.retain, "forget": args.forget,
                              "target": args.target, "before": before, "ratio": chosen and chosen["ratio"],
                              "chosen": chosen, "candidates": candidates})
    return 0
