"""Reports: result records -> tidy frame -> aggregate over seeds -> leaderboard and figures.

Typical use (the runner, at the end of a sweep)::

    from reports import build_report, format_console, load_leaderboard
    paths = build_report(run_dir)               # leaderboard.md/.csv/.txt, report.html, figures/
    print(paths["leaderboard.txt"].read_text())   # or format_console(load_leaderboard(run_dir))
    print("report:", paths["report.html"])

or from a shell: ``python -m reports <run dir> [--out DIR] [--primary-metric accuracy]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from core.files import atomic_write_text
from core.spec import ResultRecord
from reports.columns import write_columns
from reports.coverage import (
    AREA_SENTENCE,
    CELL,
    DEFERRAL_AUC_SENTENCE,
    NORMALISED_SENTENCE,
    area_table,
    coverage_blocks,
    coverage_points,
    target_table,
)
from reports.figures import COVERAGE_FIGURE, MadeFigure, all_figures, critical_difference, save_figures
from reports.frames import (
    RECORD_NAME,
    NoRecordsError,
    Record,
    aggregate,
    bounds_frame,
    correct_frame,
    curves_frame,
    dataset_test_sets,
    failures,
    load_records,
    method_roles,
    provenance_frame,
    tidy,
)
from reports.html import render_html
from reports.leaderboard import (
    ReportSection,
    all_columns,
    format_console,
    leaderboard_table,
    rank_methods,
    tied_with_best,
    write_csv,
    write_markdown,
)
from reports.metrics import METRIC_DIRECTIONS, direction

__all__ = [
    "METRIC_DIRECTIONS", "NoRecordsError", "ReportError", "aggregate", "analyse", "build_report",
    "direction", "failures", "format_console", "leaderboard_from_records", "leaderboard_table",
    "load_leaderboard", "load_records", "rank_methods", "tidy", "write_report",
]


def _records_or_raise(run_dir: str | Path) -> list[ResultRecord]:
    records = load_records(run_dir)
    if not records:
        raise NoRecordsError(f"no {RECORD_NAME} records found under {run_dir}")
    return records


@dataclasses.dataclass(frozen=True)
class Analysis:
    """Everything the report shows, computed once from the records."""

    agg: pd.DataFrame  # mean, std, interval, n per (row, decision, metric)
    table: pd.DataFrame  # the compact leaderboard
    full_table: pd.DataFrame  # every aggregated metric (the CSV)
    roles: dict[str, str]


def analyse(records: Sequence[Record], primary_metric: str = "accuracy",
            decision: str = "constrained") -> Analysis:
    """Aggregate, intervals, ranks, roles and ties of loaded records."""
    tidy_frame, correct, roles = tidy(records), correct_frame(records), method_roles(records)
    agg = aggregate(tidy_frame, correct)
    ties = tied_with_best(agg, tidy_frame, primary_metric, decision, roles, correct)
    options = {"roles": roles, "ties": ties}
    return Analysis(
        agg=agg,
        table=leaderboard_table(agg, primary_metric, decision, **options),
        full_table=leaderboard_table(agg, primary_metric, decision,
                                     columns=all_columns(agg, primary_metric, decision), **options),
        roles=roles,
    )


def leaderboard_from_records(records: Sequence[Record], primary_metric: str = "accuracy",
                             decision: str = "constrained") -> pd.DataFrame:
    """The compact leaderboard table (see ``leaderboard_table``) of loaded records."""
    return analyse(records, primary_metric, decision).table


def load_leaderboard(run_dir: str | Path, primary_metric: str = "accuracy",
                     decision: str = "constrained") -> pd.DataFrame:
    """The compact leaderboard table of a run directory (for ``format_console``)."""
    return leaderboard_from_records(_records_or_raise(run_dir), primary_metric, decision)


COVERAGE_NOTE = (
    "Every method's constrained accuracy at each coverage target c (exactly round(c N) test "
    "samples to the classifier; methods that use the workload in training trained at c), "
    "mean over seeds, the " + AREA_SENTENCE + ", and the " + NORMALISED_SENTENCE + ". "
    "Intervals: 95% bootstrap over seeds and test samples, the same as in leaderboard.csv; "
    "* = best learned method, = = not significantly different from it (paired bootstrap, "
    "95%), per target and for the area; vs best = area minus the best learned method's; "
    "reference rows unranked. Not to be confused with " + DEFERRAL_AUC_SENTENCE + ".")


class ReportError(RuntimeError):
    """The report could not be written; the message says where and why (the cause is chained)."""


def coverage_section(area: pd.DataFrame, targets: pd.DataFrame,
                     figures: tuple[str, ...] = ()) -> ReportSection:
    """The accuracy-at-equal-coverage part of the report (one table per group), with the
    names of its ``figures``."""
    blocks = tuple((f"{dataset}: missing rate {rate:g}, workload {workload}", shown)
                   for dataset, rate, workload, shown in coverage_blocks(area, targets))
    return ReportSection("Accuracy at equal coverage", COVERAGE_NOTE, blocks, ties=True,
                         figures=figures, headline=True)


def write_report(records: Sequence[Record], out_dir: str | Path, primary_metric: str = "accuracy",
                 decision: str = "constrained") -> dict[str, Path]:
    """Write every report file for ``records`` into ``out_dir``.

    Files: leaderboard.md (compact), leaderboard.csv (every aggregated metric, numeric),
    leaderboard.txt (the console text), report.html (self-contained), figures/*.png and
    columns.md (what every CSV column holds);
    for a coverage sweep also coverage_auc.csv (equal-coverage AUC and nAC-AUC per method)
    and coverage_targets.csv (accuracy at every target). The headline comes first in every
    text: accuracy at equal coverage when the records hold a coverage sweep.
    Returns {path relative to ``out_dir``: path}, e.g. ``paths["report.html"]``.

    Raises ``KeyError`` for an unknown primary metric, ``ValueError`` for an option the
    records cannot answer (e.g. a metric without a better side), ``OSError`` for a folder
    that cannot be written and ``ReportError`` for anything else that stops the report
    (any mix of records is meant to give a report: that is a fault of ``reports``).
    """
    direction(primary_metric)  # an unknown metric: KeyError with a "did you mean" hint
    try:
        return _write_report(records, Path(out_dir), primary_metric, decision)
    except (OSError, ValueError):  # their messages say what to change
        raise
    except Exception as error:
        raise ReportError(
            f"the report in {out_dir} could not be written ({type(error).__name__}: {error}); "
            "the records are intact: please report this with them") from error


def _write_report(records: Sequence[Record], out_dir: Path, primary_metric: str,
                  decision: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis = analyse(records, primary_metric, decision)
    agg, table, full_table = analysis.agg, analysis.table, analysis.full_table
    failed = failures(records)
    paths = {
        "leaderboard.csv": write_csv(full_table, out_dir / "leaderboard.csv"),
    }
    csv_tables = {"leaderboard.csv": full_table}
    points = coverage_points(records)
    # a coverage sweep's cells are drawn in the headline figure only, not one panel per target
    swept = set(points[CELL]) if not points.empty else set()
    other_agg, other_curves, other_bounds = (frame[~frame["workload"].isin(swept)]
                                             for frame in (agg, curves_frame(records), bounds_frame(records)))
    targets = area = None
    if not points.empty:
        area, targets = area_table(points, analysis.roles), target_table(points, analysis.roles)
        paths["coverage_auc.csv"] = write_csv(area, out_dir / "coverage_auc.csv")
        paths["coverage_targets.csv"] = write_csv(targets, out_dir / "coverage_targets.csv")
        csv_tables.update({"coverage_auc.csv": area, "coverage_targets.csv": targets})
    paths["columns.md"] = write_columns(csv_tables, out_dir / "columns.md")
    figures = all_figures(other_agg, other_curves, other_bounds, analysis.roles, primary_metric, decision, targets)
    sections: list[ReportSection] = []
    if area is not None:
        sections.append(coverage_section(area, targets, tuple(
            name for name in figures if name.startswith(COVERAGE_FIGURE))))
    if direction(primary_metric) is not None:
        diagram = critical_difference(agg, analysis.roles, primary_metric, decision,
                                      units=dataset_test_sets(records))
        if isinstance(diagram, str):
            sections.append(ReportSection("Critical-difference diagram", diagram))
        else:
            figures["critical_difference"] = MadeFigure(*diagram)
            sections.append(ReportSection(
                "Critical-difference diagram",
                f"Drawn: figures/critical_difference.png. {diagram[1]}",
                figures=("critical_difference",)))
    figure_paths = save_figures({name: made.figure for name, made in figures.items()},
                                out_dir / "figures")
    paths.update({f"figures/{path.name}": path for path in figure_paths})

    paths["leaderboard.md"] = write_markdown(table, out_dir / "leaderboard.md", failed, sections,
                                             collapsed=swept)
    console_table = table[~table["workload"].isin(swept)].reset_index(drop=True)
    console_table.attrs.update(table.attrs)
    note = ""
    if swept and not table.empty:
        note = (f"The coverage sweep's {len(swept)} per-target groups are in report.html and "
                "leaderboard.csv; their numbers are those of the equal-coverage table above.")
    text_path = out_dir / "leaderboard.txt"
    atomic_write_text(text_path, format_console(console_table, failed, sections, note) + "\n")
    paths["leaderboard.txt"] = text_path
    images = {path.stem: (path.read_bytes(), figures[path.stem].caption) for path in figure_paths}
    page = render_html(table, failed, provenance_frame(records), images, sections,
                       collapsed=swept)
    html_path = out_dir / "report.html"
    atomic_write_text(html_path, page)
    paths["report.html"] = html_path
    return paths


def build_report(run_dir: str | Path, out_dir: str | Path | None = None,
                 primary_metric: str = "accuracy", decision: str = "constrained") -> dict[str, Path]:
    """Load the records below ``run_dir`` and write the report (default ``<run_dir>/report``).

    Raises ``NoRecordsError`` when there are no records, ``KeyError`` for an unknown primary
    metric, ``ValueError`` for a malformed record or an option the records cannot answer,
    ``ReportError`` for anything else that stops the report. Returns the written paths (see
    ``write_report``).
    """
    records = _records_or_raise(run_dir)
    out_dir = Path(run_dir) / "report" if out_dir is None else Path(out_dir)
    return write_report(records, out_dir, primary_metric, decision)
