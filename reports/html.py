"""A self-contained HTML report: inline CSS, figures embedded as base64 PNG data URIs.

``render_html`` is a pure function of frames and PNG bytes; the caller writes the file.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from datetime import datetime, timezone
from html import escape

import pandas as pd

from reports.frames import natural_sorted
from reports.leaderboard import (
    COLLAPSED_NOTE,
    TIES_NOTE,
    ReportSection,
    failure_summary,
    format_leaderboard,
    group_blocks,
    leaderboard_note,
    split_sections,
)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin: 1.6em 0 0.3em; }
h4 { margin: 1.2em 0 0.2em; padding-top: 0.6em; border-top: 3px solid #bbb; }
.scroll { overflow: auto; max-height: 32em; max-width: 100%; border: 1px solid #ddd; margin: 0.4em 0; }
.scroll table { margin: 0; }
.scroll thead th { position: sticky; top: 0; z-index: 1; }
.scroll tbody th, .scroll td:first-child { position: sticky; left: 0; background: #fff; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; white-space: nowrap; }
th { background: #f3f3f3; }
.reference { margin-left: 1.5em; }
.reference p { color: #555; font-style: italic; margin: 0.6em 0 0.2em; }
.reference td { color: #555; background: #f4f6fb; }
tr:nth-child(even) td { background: #fafafa; }
td.error { white-space: pre-wrap; font-family: monospace; max-width: 60em; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
.note { color: #555; }
.ties { color: #555; font-size: 0.85em; margin: 0.2em 0 0.8em; }
details { margin: 0.6em 0; }
summary { cursor: pointer; font-weight: 600; }
"""


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table_html(frame: pd.DataFrame) -> str:
    """A table in its own scrolling box (headers stay visible)."""
    return '<div class="scroll">' + frame.to_html(index=False, escape=True, border=0, na_rep="–") + "</div>"


def _distinct(values: pd.Series, format_value=str) -> str:
    return ", ".join(format_value(value) for value in natural_sorted(values))


def _summary_html(provenance: pd.DataFrame) -> str:
    ok = int((provenance["status"] == "ok").sum())
    failed = len(provenance) - ok
    items = [
        f"{len(provenance)} cells: {ok} ok, {failed} failed",
        f"datasets: {_distinct(provenance['dataset'])}",
        f"methods: {_distinct(provenance['method'])}",
        f"missing rates: {_distinct(provenance['missing_rate'], '{:g}'.format)}",
        f"workloads: {_distinct(provenance['workload'])}",
        f"seeds: {_distinct(provenance['seed'])}",
    ]
    return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ul>"


TIES_HTML = f'<p class="ties">{escape(TIES_NOTE)}</p>'


def _group_html(learned: pd.DataFrame, reference: pd.DataFrame) -> list[str]:
    drop = ["dataset", "missing_rate", "workload"]
    parts = []
    if not learned.empty:
        parts += [_table_html(learned.drop(columns=drop)), TIES_HTML]
    if not reference.empty:
        parts.append('<div class="reference"><p>Reference rows (not ranked)</p>'
                     + _table_html(reference.drop(columns=[*drop, "rank"])) + "</div>")
    return parts


def _leaderboard_html(table: pd.DataFrame, collapsed: Iterable[str] = ()) -> str:
    """Per dataset and group the leaderboard; groups whose workload is in ``collapsed`` (a
    coverage sweep's per-target cells) folded into one ``<details>`` per dataset."""
    parts = [f'<p class="note">{escape(leaderboard_note(table))}</p>']
    if table.empty:
        return parts[0] + "<p>No successful cells.</p>"
    collapsed = set(collapsed)
    shown = format_leaderboard(table)
    folded: dict[str, list[str]] = {}
    previous = None
    for dataset, rate, workload, learned, reference in group_blocks(shown, table):
        heading = f"<h4>missing rate {escape(rate)}, workload {escape(workload)}</h4>"
        if workload in collapsed:
            folded.setdefault(dataset, []).extend([heading, *_group_html(learned, reference)])
            continue
        if dataset != previous:
            parts.append(f"<h3>{escape(dataset)}</h3>")
            previous = dataset
        parts += [heading, *_group_html(learned, reference)]
    for dataset, inner in folded.items():
        parts.append(f"<details><summary>{escape(dataset)}: {escape(COLLAPSED_NOTE)} "
                     f"({sum(part.startswith('<h4>') for part in inner)} groups)</summary>"
                     + "\n".join(inner) + "</details>")
    return "\n".join(parts)


def _figure_html(name: str, png: bytes, caption: str) -> str:
    return (f'<figure><img alt="{escape(name)}" src="{png_data_uri(png)}">'
            f"<figcaption><b>{escape(name)}</b>: {escape(caption)}</figcaption></figure>")


def _figures_html(images: dict[str, tuple[bytes, str]]) -> str:
    if not images:
        return "<p>No other figures.</p>"
    return "\n".join(_figure_html(name, *image) for name, image in images.items())


def _failures_html(failures: pd.DataFrame) -> str:
    if failures.empty:
        return "<p>No failed cells.</p>"
    rows = []
    for failure in failures.itertuples(index=False):
        cells = [failure.dataset, failure.method, f"{failure.missing_rate:g}", failure.workload,
                 failure.seed]
        rows.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells)
                    + f'<td class="error">{escape(failure.error)}</td>'
                    + f"<td>{escape(failure.path)}</td></tr>")
    header = "".join(f"<th>{name}</th>" for name in
                     ["dataset", "method", "missing rate", "workload", "seed", "error", "record"])
    return (f"<p>{escape(failure_summary(failures))}.</p>"
            f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _provenance_html(provenance: pd.DataFrame) -> str:
    columns = ["git_sha", "backend", "devices", "versions"]
    summary = provenance.groupby(columns).size().reset_index(name="cells")
    note = ('<p class="note">Distinct environments the cells ran in; more than one row means '
            "the results come from different code or software versions.</p>")
    return note + _table_html(summary)


def _section_html(section: ReportSection, images: dict[str, tuple[bytes, str]]) -> str:
    """A section's note, its tables (each with the tie note when marked) and its figures."""
    parts = [f'<p class="note">{escape(section.note)}</p>']
    for subtitle, frame in section.blocks:
        parts += [f"<h4>{escape(subtitle)}</h4>", _table_html(frame)]
        if section.ties:
            parts.append(TIES_HTML)
    parts += [_figure_html(name, *images[name]) for name in section.figures if name in images]
    return "\n".join(parts)


def render_html(table: pd.DataFrame, failures: pd.DataFrame, provenance: pd.DataFrame,
                images: dict[str, tuple[bytes, str]],
                extra: list[ReportSection] | None = None,
                title: str = "l2d-bench report", collapsed: Iterable[str] = ()) -> str:
    """The whole report page as a string, headline first.

    ``table`` is a leaderboard table (``leaderboard_table``), ``failures`` and
    ``provenance`` come from ``reports.frames``, ``images`` maps figure names to (PNG
    bytes, caption). The headline ``extra`` sections (accuracy at equal coverage) come
    first, each with its own figures; then the per-cell leaderboard (groups whose workload
    is in ``collapsed`` folded away), the other sections (the critical-difference diagram),
    the other figures, the summary of cells, failures and provenance.
    """
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    placed = {name for section in extra or () for name in section.figures}
    headline, others = split_sections(extra)
    sections = [
        *((section.title, _section_html(section, images)) for section in headline),
        ("Leaderboard", _leaderboard_html(table, collapsed)),
        *((section.title, _section_html(section, images)) for section in others),
        ("Figures", _figures_html({k: v for k, v in images.items() if k not in placed})),
        ("Summary", _summary_html(provenance)),
        ("Failures", _failures_html(failures)),
        ("Provenance", _provenance_html(provenance)),
    ]
    body = "\n".join(f"<h2>{name}</h2>\n{content}" for name, content in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{escape(title)}</h1>\n<p class=\"note\">Generated {generated}.</p>\n"
        f"{body}\n</body>\n</html>\n"
    )
