"""The `unskill` command: every subcommand is registered here, each in its own module of cli/ (an
`add_parser(subparsers)` that sets the handler as `run`); `ksd-run` is the guarded generator on its own."""

from __future__ import annotations

import argparse
import sys

from unskill.runtime.errors import UnskillError


def build_parser() -> argparse.ArgumentParser:
    from . import calibrate_na, export, guard, report, serve, stats_eval

    parser = argparse.ArgumentParser(prog="unskill", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser in (export.add_parser, export.add_edit_parser, stats_eval.add_parser, stats_eval.add_data_parser,
                       stats_eval.add_eval_parser, stats_eval.add_calibrate_parser, guard.add_parser, calibrate_na.add_parser,
                       report.add_parser, serve.add_parser):
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Parse, run the chosen command's handler; a bad input is one line on stderr and exit code 2."""
    args = (parser or build_parser()).parse_args(argv)
    try:
        return args.run(args)
    except UnskillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # Ctrl-C: one line; outputs are written atomically, so nothing half-done stays
        print("interrupted", file=sys.stderr)
        return 130


def ksd_run(argv: list[str] | None = None) -> int:
    """The `ksd-run` console script (cli/ksd_run.py)."""
    from .ksd_run import build_parser as ksd_run_parser

    return main(argv, ksd_run_parser())


if __name__ == "__main__":
    sys.exit(main())
