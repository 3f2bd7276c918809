"""What a run prints: one cell's metrics, or an error as a short paragraph."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Mapping
from typing import Any

from core.spec import NOT_APPLICABLE, SKIPPED


def error_paragraph(error: str) -> str:
    """An error message wrapped as one readable paragraph."""
    return textwrap.fill(error, width=100, subsequent_indent="  ", break_on_hyphens=False,
                         break_long_words=False)  # paths stay whole, to copy


def print_cell(record: Mapping[str, Any], file=sys.stdout) -> None:
    """Print one cell's result as a small table (or its error)."""
    cell = record["cell"]
    title = ", ".join(f"{k}={v}" for k, v in cell.items())
    if record["status"] == "failed":
        print(f"FAILED {title}\n{error_paragraph(record.get('error') or '?')}", file=sys.stderr)
        return
    if record["status"] == NOT_APPLICABLE:
        print(f"NOT RUN {title}: {record['error']}", file=sys.stderr)
        return
    if record["status"] == SKIPPED:
        print(f"[skipped: result exists; force=true redoes it] {title}", file=file)
    print(f"\n{title}", file=file)
    metrics = record["metrics"]
    names = [n for n in metrics["argmax"] if not n.startswith("expert_accuracy/")]
    print(f"  {'metric':<26}{'argmax':>10}{'constrained':>13}", file=file)
    for name in names:
        a, c = metrics["argmax"][name], metrics["constrained"][name]
        print(f"  {name:<26}{a:>10.4f}{c:>13.4f}", file=file)
    for name, value in (record.get("run_metrics") or {}).items():
        if value is not None:
            print(f"  {name:<26}{value:>10.4f}", file=file)
    if record.get("tracking_error"):
        print(f"MLflow: not tracked ({error_paragraph(str(record['tracking_error']))}); the record is "
              "complete.", file=sys.stderr)
