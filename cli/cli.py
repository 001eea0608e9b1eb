"""The `unskill` command: export, stats, edit, serve. Each subcommand lives in its own package."""

from __future__ import annotations

import argparse
import sys

from unskill.runtime.errors import UnskillError


def build_parser() -> argparse.ArgumentParser:
    from unskill.exporter import cli as export_cli
    from unskill.stats import cli as stats_cli

    from unskill.evals import report

    from . import calibrate_na, guard, serve

    parser = argparse.ArgumentParser(prog="unskill", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    export_cli.add_parser(subparsers)
    export_cli.add_edit_parser(subparsers)
    stats_cli.add_parser(subparsers)
    stats_cli.add_data_parser(subparsers)
    stats_cli.add_eval_parser(subparsers)
    stats_cli.add_calibrate_parser(subparsers)
    guard.add_parser(subparsers)
    calibrate_na.add_parser(subparsers)
    report.add_parser(subparsers)
    serve.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UnskillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # Ctrl-C: one line; outputs are written atomically, so nothing half-done stays
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
