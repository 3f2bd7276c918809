"""``python -m reports <run dir> [--out DIR] [--primary-metric accuracy] [--decision constrained]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reports import NoRecordsError, ReportError, load_records, write_report
from reports.frames import RECORD_NAME


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m reports",
        description=f"Build the l2d-bench report from the {RECORD_NAME} records below a run "
        "directory: leaderboard.md, leaderboard.csv, leaderboard.txt, report.html, figures/*.png.",
    )
    parser.add_argument("run_dir", type=Path, help="directory searched recursively for records")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: <run_dir>/report)")
    parser.add_argument("--primary-metric", default="accuracy",
                        help="metric the methods are ranked on (default: accuracy)")
    parser.add_argument("--decision", default="constrained",
                        help="decision rule of the primary metric: constrained (default) or argmax")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the report, print the console leaderboard and the report path; 0 on success."""
    args = parse_args(argv)
    try:
        records = load_records(args.run_dir)
        if not records:
            raise NoRecordsError(f"no {RECORD_NAME} records found under {args.run_dir}")
        out_dir = args.out if args.out is not None else args.run_dir / "report"
        paths = write_report(records, out_dir, args.primary_metric, args.decision)
    except KeyError as error:  # unknown metric: the message is the first argument
        print(f"error: {error.args[0]}", file=sys.stderr)
        return 2
    except (NoRecordsError, ValueError, ReportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. a read-only results folder
        print(f"error: cannot write the report to {out_dir} ({error.strerror or error}); "
              "choose a writable folder with --out DIR", file=sys.stderr)
        return 2
    print(paths["leaderboard.txt"].read_text(encoding="utf-8"), end="")  # the console table
    print(f"\nreport: {paths['report.html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
