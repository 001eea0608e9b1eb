"""`unskill report`: eval results -> Markdown table (after / before) and PNG plots (evals/report.py), or with
--robustness the bypass-benchmark report (evals/robustness.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="eval results -> Markdown table (after / before) and PNG plots")
    p.add_argument("--results", nargs="+", required=True, help="JSON files written by `unskill eval --out`")
    p.add_argument("--calibration", nargs="*", default=[], help="JSON files from calibrate / calibrate-na --out")
    p.add_argument("--alpha", type=float, default=1.0, help="KSD alpha (x k) where no calibration is given")
    p.add_argument("--out", required=True, help="Markdown file to write, e.g. docs/results.md")
    p.add_argument("--plots", help="folder for the PNG plots (default: next to --out)")
    p.add_argument("--commands", nargs="+", default=[],
                   help="text files with the commands that produced the results, quoted in the report")
    p.add_argument("--robustness", action="store_true",
                   help="the results are bypass-benchmark runs (eval --tasks bypass:...): write the robustness "
                        "report (e.g. docs/robustness.md) instead")
    p.add_argument("--notes", help="robustness: a Markdown file explaining the remaining leaks, quoted in the report")
    p.set_defaults(run=run)


def run_robustness(args: argparse.Namespace) -> int:
    from unskill.evals.report import load_documents
    from unskill.evals.robustness import render
    from unskill.runtime.io import write_text_atomic

    out = Path(args.out)
    notes = Path(args.notes).read_text(encoding="utf-8") if args.notes else ""
    commands = "\n".join(Path(p).read_text(encoding="utf-8").rstrip() for p in args.commands)
    text = render(load_documents(args.results), load_documents(args.calibration), args.alpha,
                  Path(args.plots) if args.plots else out.parent, notes, commands)
    write_text_atomic(str(out), text)
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from unskill.evals.report import load_documents, results_markdown
    from unskill.runtime.io import write_text_atomic

    if args.robustness:
        return run_robustness(args)
    out = Path(args.out)
    text, models = results_markdown(load_documents(args.results), load_documents(args.calibration), args.alpha,
                                    out, Path(args.plots) if args.plots else out.parent, args.commands)
    write_text_atomic(str(out), text)
    print(f"wrote {out} ({models} model(s))")
    return 0
