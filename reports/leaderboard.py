"""Rank methods and lay the aggregate out as a leaderboard (Markdown, CSV, console text).

Learned methods are ranked per (dataset, missing_rate, workload) on one primary metric
under one decision rule; reference rows (``role = "reference"``: oracle, random,
classifier-only, best expert) are shown in their own block, never ranked or marked best.
The default is constrained accuracy: under workload bounds the constrained decisions are
the ones that honour them, so they are the fair comparison. The direction registry
(``reports.metrics``) decides whether higher or lower ranks first.

A leaderboard table holds numbers (``<column>`` = mean, ``<column>_lo`` / ``_hi`` = 95%
interval, ``n`` = seeds of the primary metric, ``role``, ``tied_with_best``);
``format_leaderboard`` turns it into "mean [lo, hi]" strings for display. Per-decision
metric columns are named ``<decision>/<metric>`` (``constrained/accuracy``), run metrics
by their bare name (``train_seconds``).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from core.files import atomic_write_text
from core.spec import LEARNED, REFERENCE
from reports.frames import RUN_DECISION, natural_order
from reports.metrics import LOWER, METRIC_DIRECTIONS, direction
from reports.uncertainty import ties_with_best

ROW_KEYS = ["dataset", "method", "missing_rate", "workload"]
TABLE_KEYS = ["dataset", "missing_rate", "workload"]
# metrics shown per primary decision rule, beside argmax and constrained accuracy
DECISION_METRICS = ["coverage", "workload_violation", "human_workload_cv", "cost_aware_accuracy"]
# metrics of the trained model or the run: one column each (no decision rule changes them)
RUN_METRICS = ["deferral_auc", "classifier_ece", "imputation_accuracy", "train_seconds",
               "estep_ms", "expert_set_size"]
CONSOLE_WIDTH = 100
MISSING_TEXT = "–"
RANK_DECIMALS = 12
CSV_FLOAT_FORMAT = "%.10g"
VS_BEST = "vs_best"


def column_name(decision: str, metric: str) -> str:
    """Leaderboard column of a (decision, metric): ``decision/metric``, or ``metric`` for run metrics."""
    return metric if decision == RUN_DECISION else f"{decision}/{metric}"


# ---------------------------------------------------------------------------- ranking


def resolve_decision(agg: pd.DataFrame, metric: str, decision: str) -> str:
    """``decision``, or ``"run"`` when ``metric`` is a run metric (e.g. train_seconds)."""
    if not _has_values(agg, decision, metric) and _has_values(agg, RUN_DECISION, metric):
        return RUN_DECISION
    return decision


def _has_values(agg: pd.DataFrame, decision: str, metric: str) -> bool:
    return bool(((agg["decision"] == decision) & (agg["metric"] == metric)).any())


def rank_methods(agg: pd.DataFrame, metric: str = "accuracy", decision: str = "constrained",
                 roles: dict[str, str] | None = None) -> pd.DataFrame:
    """Rank the learned methods per (dataset, missing_rate, workload) on the mean of ``metric``.

    Returns columns dataset, missing_rate, workload, method, role, mean, lo, hi, n, rank
    (1 = best, ties share the best rank; reference rows, per ``roles``, have no rank).
    Raises ``ValueError`` for a metric without a direction or absent from the aggregate,
    ``KeyError`` for an unregistered metric.
    """
    better = direction(metric)
    if better is None:
        ranked = [name for name, value in METRIC_DIRECTIONS.items() if value is not None]
        raise ValueError(f"metric {metric!r} has no better side; rank on one of {', '.join(ranked)}")
    decision = resolve_decision(agg, metric, decision)
    decisions = sorted(agg["decision"].unique())
    if decisions and decision not in decisions:
        raise ValueError(f"unknown decision {decision!r}; available: {', '.join(decisions)}")
    rows = agg[(agg["decision"] == decision) & (agg["metric"] == metric)]
    if rows.empty and not agg.empty:
        available = sorted(agg.loc[agg["decision"] == decision, "metric"].unique())
        raise ValueError(
            f"no values of {metric!r} under decision {decision!r}; available: {', '.join(available)}"
        )
    rows = rows[[*TABLE_KEYS, "method", "mean", "lo", "hi", "n"]].copy()
    rows.insert(4, "role", rows["method"].map(lambda m: (roles or {}).get(m, LEARNED)))
    # round away float noise so that equal results tie instead of ranking by the last bit
    score = rows["mean"].round(RANK_DECIMALS).where(rows["role"] == LEARNED)
    rows["rank"] = (
        score.groupby([rows[key] for key in TABLE_KEYS])
        .rank(method="min", ascending=(better == LOWER))
        .astype("Int64")
    )
    return _sorted(rows, [*TABLE_KEYS, "rank", "method"])


def _sorted(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``frame`` sorted by ``columns``, labels in natural order (``none[coverage=0]`` before
    ``none[coverage=0.25]``), missing values last."""
    def key(column: pd.Series) -> pd.Series:
        return natural_order(column) if pd.api.types.is_string_dtype(column) else column

    return frame.sort_values(columns, na_position="last", key=key).reset_index(drop=True)


def tied_with_best(agg: pd.DataFrame, tidy_frame: pd.DataFrame, metric: str = "accuracy",
                   decision: str = "constrained", roles: dict[str, str] | None = None,
                   correct: pd.DataFrame | None = None) -> pd.DataFrame:
    """``tied_with_best`` per (group, learned method) on the primary metric.

    Accuracy with per-sample outcomes (``correct``) is compared by a paired bootstrap over
    seeds and test samples, anything else by a paired bootstrap over seeds
    (``reports.uncertainty.ties_with_best``).
    """
    decision = resolve_decision(agg, metric, decision)
    ranked = rank_methods(agg, metric, decision, roles)
    learned = ranked[ranked["role"] == LEARNED]
    best = learned[learned["rank"] == 1].drop_duplicates(TABLE_KEYS)
    higher = direction(metric) != LOWER
    if metric == "accuracy" and correct is not None and not correct.empty:
        outcomes = correct[(correct["decision"] == decision)
                           & correct["method"].isin(learned["method"])]
        if not outcomes.empty:
            return ties_with_best(None, best, higher, correct=outcomes)
    values = tidy_frame[(tidy_frame["decision"] == decision) & (tidy_frame["metric"] == metric)
                        & tidy_frame["method"].isin(learned["method"])]
    return ties_with_best(values, best, higher)


# ---------------------------------------------------------------------------- table


def default_columns(metric: str = "accuracy", decision: str = "constrained") -> list[tuple[str, str]]:
    """(decision, metric) pairs of the compact leaderboard, the primary one first.

    Per-decision metrics follow the primary decision (constrained when ranking on a run metric).
    """
    shown_decision = _shown_decision(decision)
    columns = [(decision, metric), ("constrained", "accuracy"), ("argmax", "accuracy")]
    columns += [(shown_decision, name) for name in DECISION_METRICS]
    columns += [(RUN_DECISION, name) for name in RUN_METRICS]
    return list(dict.fromkeys(columns))  # drop repeats, keep order


def _shown_decision(decision: str) -> str:
    return "constrained" if decision == RUN_DECISION else decision


def _metric_order(metric: str) -> tuple[int, str]:
    for position, key in enumerate(METRIC_DIRECTIONS):
        if metric == key or (key.endswith("/") and metric.startswith(key)):
            return position, metric
    return len(METRIC_DIRECTIONS), metric


def all_columns(agg: pd.DataFrame, metric: str = "accuracy",
                decision: str = "constrained") -> list[tuple[str, str]]:
    """Every (decision, metric) pair in the aggregate, primary first, in a readable order."""
    pairs = agg[["decision", "metric"]].drop_duplicates().itertuples(index=False, name=None)
    ordered = sorted(pairs, key=lambda pair: (_decision_order(pair[0]), pair[0], _metric_order(pair[1])))
    return list(dict.fromkeys([(decision, metric), *ordered]))


def _decision_order(decision: str) -> int:
    """constrained, argmax, any other decision rule, then run metrics."""
    known = {"constrained": 0, "argmax": 1, RUN_DECISION: 3}
    return known.get(decision, 2)


def leaderboard_table(agg: pd.DataFrame, metric: str = "accuracy", decision: str = "constrained",
                      columns: list[tuple[str, str]] | None = None,
                      roles: dict[str, str] | None = None,
                      ties: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (dataset, method, missing_rate, workload): rank, role, tie, metric columns.

    ``columns`` lists (decision, metric) pairs (default: ``default_columns``; pass
    ``all_columns(agg)`` for everything); each gives a mean column and ``_lo`` / ``_hi``
    interval columns, and columns without any value are dropped (in the compact default, also
    those that are constant or empty in most rows, e.g. a violation of 0 everywhere).
    ``vs_best`` is the primary metric minus the best learned method's, per group. ``n`` counts the seeds of
    the primary metric. ``roles`` marks reference rows (unranked, listed after the learned
    methods of each group); ``ties`` (``reports.uncertainty.ties_with_best``) fills
    ``tied_with_best``. The primary metric and decision are kept in ``table.attrs``.
    """
    decision = resolve_decision(agg, metric, decision)
    compact = columns is None
    columns = columns if columns is not None else default_columns(metric, decision)
    ranked = rank_methods(agg, metric, decision, roles)
    table = agg[ROW_KEYS].drop_duplicates().merge(
        ranked[[*ROW_KEYS, "role", "rank", "n"]], on=ROW_KEYS, how="left"
    )
    table["role"] = table["method"].map(lambda m: (roles or {}).get(m, LEARNED))
    if ties is not None and not ties.empty:
        table = table.merge(ties, on=ROW_KEYS, how="left")
    else:
        table["tied_with_best"] = pd.Series([pd.NA] * len(table), dtype="object")
    table["tied_with_best"] = table["tied_with_best"].where(table["role"] == LEARNED)
    for column_decision, column_metric in columns:
        name = column_name(column_decision, column_metric)
        part = agg[(agg["decision"] == column_decision) & (agg["metric"] == column_metric)]
        if part.empty:
            continue
        part = part[[*ROW_KEYS, "mean", "lo", "hi"]].rename(
            columns={"mean": name, "lo": f"{name}_lo", "hi": f"{name}_hi"})
        table = table.merge(part, on=ROW_KEYS, how="left")
    table["n"] = table["n"].astype("Int64")
    primary = column_name(decision, metric)
    if primary in table.columns:  # signed difference from the group's best learned method
        best = table[primary].where((table["role"] == LEARNED) & (table["rank"] == 1))
        table[VS_BEST] = table[primary] - best.groupby([table[k] for k in TABLE_KEYS]).transform("max")
    if compact:  # leave out what says nothing: constant or mostly empty columns
        for name in [c for c in list(table.columns) if f"{c}_lo" in table.columns and c != primary]:
            values = table[name]
            if values.notna().mean() < 0.5 or values.dropna().round(6).nunique() <= 1:
                table = table.drop(columns=[name, f"{name}_lo", f"{name}_hi"])
    fixed = [*ROW_KEYS, "role", "rank", "tied_with_best", "n"]
    metric_columns = [c for c in table.columns if c not in fixed]
    table = table[[*TABLE_KEYS, "role", "rank", "method", "tied_with_best", *metric_columns, "n"]]
    table = _sorted(table.assign(_reference=table["role"] == REFERENCE),
                    [*TABLE_KEYS, "_reference", "rank", "method"]).drop(columns="_reference")
    table.attrs.update(primary_metric=metric, primary_decision=decision,
                       primary_column=column_name(decision, metric))
    return table


def mean_columns(table: pd.DataFrame) -> list[str]:
    """The metric (mean) columns of a leaderboard table, in order."""
    return [c for c in table.columns if f"{c}_lo" in table.columns]


# ---------------------------------------------------------------------------- formatting


def decimals_for(values: pd.Series) -> int:
    """Decimals to show for a column: 3 below 10, 1 below 100, else 0 (by the largest |value|)."""
    magnitude = values.abs().max()
    if pd.isna(magnitude) or magnitude < 10:
        return 3
    return 1 if magnitude < 100 else 0


def format_interval(mean: float, lo: float, hi: float, decimals: int = 3) -> str:
    """``"0.912 [0.890, 0.930]"``; without an interval (one seed) just the mean; "–" if no mean."""
    if mean is None or pd.isna(mean):
        return MISSING_TEXT
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} [{lo:.{decimals}f}, {hi:.{decimals}f}]"


BEST_MARK, TIED_MARK = "*", "="  # the one marker style of every table of the report
MARKS_NOTE = "* = best learned method; = = not significantly different from it (paired bootstrap, 95%)"


def format_leaderboard(table: pd.DataFrame, best_format: str = BEST_MARK + "{}",
                       tied_format: str = TIED_MARK + "{}") -> pd.DataFrame:
    """Display strings: one "mean [lo, hi]" column per metric, the signed difference from
    the best (``vs best``), markers on method names (``*`` best, ``=`` tied with it, by
    default). Reference rows show "ref" as their rank.
    """
    def marked(method, rank, tied):
        if rank == 1:
            return best_format.format(method)
        return tied_format.format(method) if tied is True else method

    shown = pd.DataFrame({
        "dataset": table["dataset"].astype(str),
        "missing_rate": table["missing_rate"].map(lambda rate: f"{rate:g}"),
        "workload": table["workload"].astype(str),
        "rank": [("ref" if role == REFERENCE else MISSING_TEXT) if pd.isna(rank) else str(int(rank))
                 for rank, role in zip(table["rank"], table["role"])],
        "method": [marked(m, r, t) for m, r, t in
                   zip(table["method"], table["rank"].fillna(0), table["tied_with_best"])],
    })
    for name in mean_columns(table):
        decimals = decimals_for(table[name])
        shown[name] = [format_interval(mean, lo, hi, decimals) for mean, lo, hi in
                       zip(table[name], table[f"{name}_lo"], table[f"{name}_hi"])]
        if name == table.attrs.get("primary_column") and VS_BEST in table.columns:
            shown["vs best"] = [MISSING_TEXT if pd.isna(d) else f"{d:+.{decimals}f}"
                                for d in table[VS_BEST]]
    shown["n"] = table["n"].map(lambda n: MISSING_TEXT if pd.isna(n) else str(int(n)))
    return shown


def primary_caption(table: pd.DataFrame) -> str:
    """"Ranked by constrained accuracy (higher is better)", from the table's attrs."""
    metric = table.attrs.get("primary_metric", "accuracy")
    decision = table.attrs.get("primary_decision", "constrained")
    better = direction(metric)
    rule = "" if decision == RUN_DECISION else f"{decision} "
    return f"Ranked by {rule}{metric} ({better} is better)"


def _markdown_table(frame: pd.DataFrame) -> str:
    def markdown_row(cells) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    lines = [markdown_row(frame.columns), "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += [markdown_row(row) for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


INTERVAL_NOTE = ("mean [95% bootstrap interval] (accuracy: over seeds and test samples; other "
                 "metrics: over seeds, none with one seed); n = seeds")
TIES_NOTE = ("Ties (=) come from a paired test, the bootstrap of each method's difference from "
             "the best on the same seeds and test samples, not from the means: a method can be "
             "tied with the best while one with a higher mean is not, when its differences from "
             "the best vary more from sample to sample.")


class ReportSection(NamedTuple):
    """A part of the report beside the leaderboard: a title, a note (what it shows, or why
    it is absent), (subtitle, display table) blocks, whether its tables carry tie marks
    (then ``TIES_NOTE`` follows each), the names of the figures that belong to it (the
    HTML page shows them right after its tables) and whether it is the headline (shown
    before the leaderboard; other sections follow it)."""

    title: str
    note: str
    blocks: tuple[tuple[str, pd.DataFrame], ...] = ()
    ties: bool = False
    figures: tuple[str, ...] = ()
    headline: bool = False


def split_sections(sections) -> tuple[list[ReportSection], list[ReportSection]]:
    """(headline sections, the others), each in the given order."""
    sections = list(sections or ())
    return ([s for s in sections if s.headline], [s for s in sections if not s.headline])


def _markdown_sections(sections) -> list[str]:
    lines = []
    for section in sections or ():
        lines += ["", f"## {section.title}", "", section.note]
        for subtitle, frame in section.blocks:
            lines += ["", f"### {subtitle}", "", _markdown_table(frame)]
            if section.ties:
                lines += ["", TIES_NOTE]
    return lines


def group_blocks(shown: pd.DataFrame, table: pd.DataFrame):
    """(dataset, missing_rate, workload, learned rows, reference rows) in table order."""
    reference = (table["role"] == REFERENCE).to_numpy()
    for (dataset, rate, workload), rows in shown.groupby(["dataset", "missing_rate", "workload"],
                                                         sort=False):
        is_reference = reference[rows.index]
        yield dataset, rate, workload, rows[~is_reference], rows[is_reference]


def leaderboard_note(table: pd.DataFrame) -> str:
    """What the leaderboard's cells, marks and reference rows mean (one paragraph)."""
    return (f"{primary_caption(table)} per (missing rate, workload), learned methods only. Cells "
            f"are {INTERVAL_NOTE}; vs best = difference from the best learned method of the "
            f"group. {MARKS_NOTE}. Reference rows are listed apart and not ranked.")


COLLAPSED_NOTE = ("The coverage sweep's cells, one leaderboard per coverage target (their "
                  "numbers are those of the equal-coverage table above)")


def markdown_leaderboard(table: pd.DataFrame, failed: pd.DataFrame | None = None,
                         sections: list[ReportSection] | None = None,
                         collapsed: Iterable[str] = ()) -> str:
    """The report as Markdown: the headline ``sections`` first (e.g. accuracy at equal
    coverage), then per dataset and (missing rate, workload) group, a table of the ranked
    learned methods (best and ties marked, ``TIES_NOTE`` below), then the reference rows in
    their own table; then the other sections. Groups whose workload is in ``collapsed`` (a
    coverage sweep's cells) sit in ``<details>`` blocks. ``failed`` adds a section listing
    the failed cells."""
    collapsed = set(collapsed)
    headline, others = split_sections(sections)
    lines = ["# l2d-bench report"]
    lines += _markdown_sections(headline)
    lines += ["", "## Leaderboard", "", leaderboard_note(table)]
    if table.empty:
        lines += ["", "No successful cells."]
    shown = format_leaderboard(table)
    previous = None
    for dataset, rate, workload, learned, reference in group_blocks(shown, table):
        if dataset != previous:
            lines += ["", f"### {dataset}"]
            previous = dataset
        title = f"missing rate {rate}, workload {workload}"
        fold = workload in collapsed
        lines += (["", f"<details><summary>{title}</summary>", ""] if fold
                  else ["", f"#### {title}", ""])
        drop = ["dataset", "missing_rate", "workload"]
        if not learned.empty:
            lines += [_markdown_table(learned.drop(columns=drop)), "", TIES_NOTE]
        if not reference.empty:
            lines += ["", "Reference rows (not ranked):", "",
                      _markdown_table(reference.drop(columns=[*drop, "rank"]))]
        if fold:
            lines += ["", "</details>"]
    lines += _markdown_sections(others)
    if failed is not None and not failed.empty:
        shown_failed = failed.drop(columns="path").assign(
            missing_rate=failed["missing_rate"].map(lambda rate: f"{rate:g}"),
            error=failed["error"].map(_one_line),
        )
        lines += ["", "## Failed cells", "", failure_summary(failed) + ".", "",
                  _markdown_table(shown_failed)]
    return "\n".join(lines) + "\n"


def write_markdown(table: pd.DataFrame, path: str | Path, failed: pd.DataFrame | None = None,
                   sections: list[ReportSection] | None = None,
                   collapsed: Iterable[str] = ()) -> Path:
    """Write ``markdown_leaderboard(table, failed, sections, collapsed)`` to ``path``."""
    path = Path(path)
    atomic_write_text(path, markdown_leaderboard(table, failed, sections, collapsed))
    return path


def write_csv(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a numeric table (``tied_with_best`` as true / false, empty for reference rows
    and where no paired test is possible; see ``columns.md``)."""
    path = Path(path)
    if "tied_with_best" in table.columns:
        table = table.assign(tied_with_best=table["tied_with_best"].map(
            lambda tied: "" if pd.isna(tied) else str(bool(tied)).lower()))
    atomic_write_text(path, table.to_csv(index=False, float_format=CSV_FLOAT_FORMAT))
    return path


def _shortened(text: str, limit: int) -> str:
    """``text`` cut in the middle to ``limit`` characters (``prob_l2d[tra…e=false]``)."""
    text = str(text)
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def _text_table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells) -> str:
        return "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * width for width in widths]), *map(line, rows)]


KEY_LIMIT = 36  # longest label kept whole in a console table that must be split


def fitted_text_table(rows: list[list[str]], header: list[str], keys: int = 2,
                      width: int = CONSOLE_WIDTH) -> list[str]:
    """A text table at most ``width`` characters wide: when the columns do not fit, the
    first ``keys`` columns (rank, method) repeat in each part and the other columns are
    spread over as many parts as needed (long labels cut in the middle)."""
    table = _text_table(rows, header)
    if max(map(len, table)) <= width:
        return table
    rows = [[_shortened(cell, KEY_LIMIT) if i < keys else cell for i, cell in enumerate(row)]
            for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    base = sum(widths[:keys]) + 2 * keys
    parts: list[list[int]] = []
    current: list[int] = []
    used = base
    for column in range(keys, len(header)):
        if current and used + widths[column] > width:
            parts.append(current)
            current, used = [], base
        current.append(column)
        used += widths[column] + 2
    parts.append(current)
    lines: list[str] = []
    for part in parts:
        chosen = [*range(keys), *part]
        lines += ([""] if lines else []) + _text_table(
            [[row[i] for i in chosen] for row in rows], [header[i] for i in chosen])
    return lines


def failure_summary(failed: pd.DataFrame) -> str:
    """One line: "18 failed cells (oracle: 17, random: 1), left out of the leaderboard"."""
    counts = failed["method"].value_counts().sort_index()
    per_method = ", ".join(f"{method}: {count}" for method, count in counts.items())
    noun = "cell" if len(failed) == 1 else "cells"
    return f"{len(failed)} failed {noun} ({per_method}), left out of the leaderboard"


INDENT = 2  # a group's table sits under its [group] line


def _indented(lines: list[str]) -> list[str]:
    return [" " * INDENT + line if line else line for line in lines]


def _wrapped(text: str) -> str:
    return textwrap.fill(text, width=CONSOLE_WIDTH)


CONSOLE_LABELS = {"argmax/accuracy": "argmax acc", "workload_violation": "violation"}


def format_console(table: pd.DataFrame, failed: pd.DataFrame | None = None,
                   sections: list[ReportSection] | None = None, note: str = "") -> str:
    """Compact text report for the end of a run, at most 100 characters wide: the
    headline ``sections`` first (e.g. accuracy at equal coverage: its tables, then what
    they mean), then per (dataset, missing rate, workload) group the ranked learned methods
    (``*`` best, ``=`` tied with the best) and the reference rows, unranked, with the tie
    note once below; then the other sections (e.g. the critical-difference diagram).

    ``note`` adds a line under the leaderboard's title (e.g. which cells are left to the
    files); ``failed`` (``reports.frames.failures``) a line counting failed cells per method.
    """
    headline, others = split_sections(sections)
    lines = _console_sections(headline)
    lines += _leaderboard_lines(table, failed, note)
    if others:
        lines += ["", *_console_sections(others)]
    return "\n".join(lines).rstrip("\n")


def _console_sections(sections: list[ReportSection]) -> list[str]:
    lines: list[str] = []
    for section in sections:  # the tables first, what they mean below them
        lines.append(f"== {section.title} ==")
        for subtitle, frame in section.blocks:
            lines += [f"[{subtitle}]", *_indented(fitted_text_table(
                frame.values.tolist(), list(frame.columns), width=CONSOLE_WIDTH - INDENT)), ""]
        lines.append(_wrapped(section.note))
        if section.ties and section.blocks:
            lines.append(_wrapped(TIES_NOTE))
        lines.append("")
    return lines


def _leaderboard_lines(table: pd.DataFrame, failed: pd.DataFrame | None, note: str) -> list[str]:
    """The console leaderboard: title, notes, one table per group, the tie note."""
    lines: list[str] = []
    decision = _shown_decision(table.attrs.get("primary_decision", "constrained"))
    lines += ["== Leaderboard ==", _wrapped(
        f"{primary_caption(table)}, learned methods only; {INTERVAL_NOTE}; {MARKS_NOTE}; vs "
        f"best = difference from the best; columns are {decision} decisions unless named")]
    if note:
        lines.append(_wrapped(note))
    if failed is not None and not failed.empty:
        lines.append(_wrapped(failure_summary(failed)))
    if table.empty:
        if not note:
            lines.append("(no cells to show)")
        return lines
    primary = table.attrs.get("primary_column", "constrained/accuracy")
    wanted = [primary, "constrained/accuracy", "argmax/accuracy",
              f"{decision}/workload_violation", f"{decision}/coverage"]
    metric_names = [name for name in dict.fromkeys(wanted) if name in table.columns]
    shown = format_leaderboard(table)
    if "argmax/accuracy" in metric_names and primary != "argmax/accuracy":  # the mean suffices
        shown["argmax/accuracy"] = table["argmax/accuracy"].map(
            lambda value: MISSING_TEXT if pd.isna(value) else f"{value:.3f}")
    if "vs best" in shown.columns:
        metric_names.insert(1, "vs best")
    shown["method"] = [name if name[:1] in "*=" else f" {name}" for name in shown["method"]]
    labels = [CONSOLE_LABELS.get(name, CONSOLE_LABELS.get(name.removeprefix(f"{decision}/"),
              name.removeprefix(f"{decision}/").replace("/", " "))) for name in metric_names]
    header = ["rank", "method", *labels, "n"]
    for dataset, rate, workload, learned, reference in group_blocks(shown, table):
        body = [[row[name] for name in ["rank", "method", *metric_names, "n"]]
                for rows in (learned, reference) for _, row in rows.iterrows()]
        lines += ["", f"[{dataset} · missing rate {rate} · workload {workload}]",
                  *_indented(fitted_text_table(body, header, width=CONSOLE_WIDTH - INDENT))]
    lines += ["", _wrapped(TIES_NOTE)]
    return lines
