"""Seaborn / matplotlib figures of a run. Every plot function returns a ``Figure``.

Figures are built with ``matplotlib.figure.Figure`` (rendered by the Agg canvas), never
with pyplot: no display is needed, no global figure registry fills up, and the seaborn
style is applied only inside each plot function. Colours are fixed per method across
figures. ``save_figures`` is the only function that writes files.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple, ParamSpec, TypeVar

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.artist import Artist
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tqdm.auto import tqdm

from core.files import atomic_write_bytes
from core.spec import LEARNED, REFERENCE
from methods import METHODS, load_all
from reports.frames import natural_key, natural_sorted
from reports.metrics import direction
from reports.uncertainty import group_rng, percentile_interval, seed_resamples

PANEL_SIZE = (4.2, 3.3)  # inches per panel
COVERAGE_FIGURE = "accuracy_at_coverage_"  # name prefix of the headline figures
WORKLOAD_PREFIX = "workload/"


_Params = ParamSpec("_Params")
_Drawn = TypeVar("_Drawn")


def _styled(plot: Callable[_Params, _Drawn]) -> Callable[_Params, _Drawn]:
    """Run a plot function under the report's seaborn style without touching global rcParams."""

    @functools.wraps(plot)
    def wrapper(*args: _Params.args, **kwargs: _Params.kwargs) -> _Drawn:
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
            return plot(*args, **kwargs)

    return wrapper


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">", "p", "*")
# saturated colours that stay apart on white (no light shades, no greys: greys are the
# references'); the i-th learned method of the registry gets the i-th
PALETTE = ("#4363d8", "#f58231", "#3cb44b", "#911eb4", "#42d4f4", "#9a6324", "#e6194b",
           "#f032e6", "#469990", "#808000", "#000075", "#800000", "#bfef45")
REFERENCE_GREYS = ("#262626", "#737373", "#a6a6a6", "#4d4d4d", "#8c8c8c", "#bfbfbf")


class Style(NamedTuple):
    """How one method is drawn: colour, marker and line style (dashed: a reference row)."""

    colour: tuple
    marker: str
    linestyle: str


@functools.cache
def registered_methods() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(learned, reference) names in the method registry, each sorted: the order that fixes
    every method's colour for the whole project."""
    try:
        load_all()
    except Exception:  # an external module (L2D_METHODS) that fails to import: the others stay
        pass
    names = METHODS.names()
    reference = tuple(name for name in names if hasattr(METHODS.get(name), "reference_scores"))
    return tuple(name for name in names if name not in reference), reference


def registered_name(label: str) -> str:
    """The registered method of a method label: ``prob_l2d[estep=meanfield]`` -> ``prob_l2d``."""
    return str(label).split("[", 1)[0]


def _shade(colour: str, step: int) -> tuple:
    """Variant ``step`` (1, 2, ...) of a colour: alternately darker and lighter, further each
    pair, so variants of one method share its hue and stay apart."""
    rgb = np.array(to_rgb(colour))
    amount = min(0.3 + 0.2 * ((step - 1) // 2), 0.7)
    toward = np.zeros(3) if step % 2 else np.ones(3)
    return tuple(float(c) for c in rgb + (toward - rgb) * amount)


def method_styles(methods: Iterable[str], roles: dict[str, str] | None = None) -> dict[str, Style]:
    """A fixed, distinguishable style per method label.

    The colour and marker of a learned method come from its position in the method registry
    (``registered_methods``), not from the methods present, so a method looks the same in
    every figure and report. Variants of one method (``prob_l2d[estep=meanfield]``) share its
    hue in darker and lighter shades with their own markers; labels outside the registry
    follow the registry's colours. Reference rows (``roles``; by default the registry's
    references) are dashed greys, never a learned method's colour.
    """
    learned_names, reference_names = registered_methods()
    labels = natural_sorted(methods)
    roles = roles or {}

    def is_reference(label: str) -> bool:
        return roles.get(label, REFERENCE if registered_name(label) in reference_names
                         else LEARNED) == REFERENCE

    def slots(names: tuple[str, ...], present: list[str]) -> dict[str, int]:
        bases = dict.fromkeys(registered_name(label) for label in present)
        extra = [base for base in natural_sorted(bases) if base not in names]
        return {base: index for index, base in enumerate([*names, *extra])}

    styles = {}
    for reference in (False, True):
        present = [label for label in labels if is_reference(label) == reference]
        slot = slots(reference_names if reference else learned_names, present)
        variants: dict[str, int] = {}  # variants of each method so far
        for label in present:
            base = registered_name(label)
            index = slot[base]
            step = 0
            if label != base:
                step = variants[base] = variants.get(base, 0) + 1
            if reference:
                colour = REFERENCE_GREYS[index % len(REFERENCE_GREYS)]
                marker = MARKERS[(index + 4 + step) % len(MARKERS)]
            else:
                colour = PALETTE[index % len(PALETTE)]
                marker = MARKERS[(index + step + index // len(PALETTE)) % len(MARKERS)]
            styles[label] = Style(_shade(colour, step) if step else to_rgb(colour), marker,
                                  "--" if reference else "-")
    return styles


def _yerr(rows: pd.DataFrame) -> np.ndarray:
    """(2, n) error-bar lengths of the intervals ``lo``/``hi`` around ``mean`` (0 where absent)."""
    below = (rows["mean"] - rows["lo"]).fillna(0).clip(lower=0)
    above = (rows["hi"] - rows["mean"]).fillna(0).clip(lower=0)
    return np.vstack([below.to_numpy(float), above.to_numpy(float)])


def _pick(values: Iterable, wanted, what: str):
    """``wanted`` if given (checked), else the first of the sorted ``values``."""
    available = natural_sorted(values)
    if not available:
        raise ValueError(f"no {what} to plot")
    if wanted is None:
        return available[0]
    if wanted not in available:
        raise ValueError(f"{what} {wanted!r} not in the results; available: {available}")
    return wanted


MAX_COLUMNS = 3  # panels per row: a figure stays readable at a page's width


def _panels(count: int, sharey: bool = True) -> tuple[Figure, np.ndarray]:
    """``count`` panels in rows of at most ``MAX_COLUMNS`` (unused cells removed), room for
    a legend on the right."""
    columns = min(count, MAX_COLUMNS)
    rows = -(-count // columns)
    figure = Figure(figsize=(PANEL_SIZE[0] * columns + 2.4, PANEL_SIZE[1] * rows + 0.4),
                    layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharey=sharey).ravel()
    for unused in axes[count:]:
        figure.delaxes(unused)
    return figure, axes[:count]


def _figure_legend(figure: Figure, handles: list, labels: list[str]) -> None:
    unique = dict(zip(labels, handles))
    if unique:
        figure.legend(list(unique.values()), list(unique), loc="outside right upper", frameon=False)


def _all_handles(axes, order: Iterable[str]) -> tuple[list, list[str]]:
    """Legend entries of every panel (a method may be absent from some) in ``order`` (the
    styles' order: learned methods, then references)."""
    entries: dict[str, Artist] = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        entries.update(zip(labels, handles))
    labels = [label for label in order if label in entries]
    return [entries[label] for label in labels], labels


def _select(agg: pd.DataFrame, **equal) -> pd.DataFrame:
    mask = np.ones(len(agg), dtype=bool)
    for column, value in equal.items():
        mask &= (agg[column] == value).to_numpy()
    return agg[mask]


# ---------------------------------------------------------------------------- figures


@_styled
def plot_accuracy_vs_missing_rate(agg: pd.DataFrame, dataset: str | None = None,
                                  metric: str = "accuracy", decision: str = "constrained",
                                  roles: dict[str, str] | None = None) -> Figure:
    """Mean ``metric`` vs missing rate, one line per method, one panel per workload (bars = 95% interval)."""
    dataset = _pick(agg["dataset"], dataset, "dataset")
    rows = _select(agg, dataset=dataset, decision=decision, metric=metric)
    workloads = natural_sorted(rows["workload"])
    styles = method_styles(agg["method"], roles)
    rates = sorted(rows["missing_rate"].unique())
    span = (max(rates) - min(rates)) if len(rates) > 1 else 1.0
    methods = natural_sorted(rows["method"])
    figure, axes = _panels(len(workloads))
    for ax, workload in zip(axes, workloads):
        for position, method in enumerate(methods):
            line = _select(rows, workload=workload, method=method).sort_values("missing_rate")
            if line.empty:  # a method without results under this workload
                continue
            dodge = (position - (len(methods) - 1) / 2) * 0.012 * span  # keep error bars apart
            style = styles[method]
            ax.errorbar(line["missing_rate"] + dodge, line["mean"], yerr=_yerr(line),
                        marker=style.marker, markersize=4, capsize=3, color=style.colour,
                        linestyle=style.linestyle, label=method)
        ax.set(title=f"workload: {workload}", xlabel="missing annotation rate", xticks=rates)
    axes[0].set_ylabel(f"{decision} {metric}")
    _figure_legend(figure, *_all_handles(axes, styles))
    figure.suptitle(f"{dataset}: {decision} {metric} vs missing rate (mean, 95% interval)")
    return figure


def average_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Accuracy-coverage curves averaged over seeds, with a 95% bootstrap-over-seeds
    interval per coverage point (clipped to [0, 1]; none with one seed).

    Returns dataset, method, missing_rate, workload, coverage, mean, lo, hi, n.
    """
    keys = ["dataset", "method", "missing_rate", "workload", "coverage"]
    points = curves.assign(coverage=curves["coverage"].round(6))
    out = points.groupby(keys)["accuracy"].agg(mean="mean", n="count").reset_index()
    out["lo"], out["hi"] = np.nan, np.nan
    for key, part in points.groupby(keys[:-1], sort=False):
        matrix = part.pivot_table(index="seed", columns="coverage", values="accuracy")
        resampled = seed_resamples(matrix.to_numpy(), group_rng("curve", *key))
        if resampled is None:
            continue
        lo, hi = percentile_interval(resampled, "accuracy")
        where = np.ones(len(out), dtype=bool)
        for column, value in zip(keys[:-1], key):
            where &= (out[column] == value).to_numpy()
        out.loc[where, "lo"], out.loc[where, "hi"] = lo, hi
    return out[[*keys, "mean", "lo", "hi", "n"]]


@_styled
def plot_accuracy_coverage_curves(curves: pd.DataFrame, dataset: str | None = None,
                                  workload: str | None = None,
                                  roles: dict[str, str] | None = None) -> Figure:
    """Accuracy vs coverage per method (mean over seeds, band = 95% interval), one panel per
    missing rate; reference rows dashed."""
    dataset = _pick(curves["dataset"], dataset, "dataset")
    workload = _pick(_select(curves, dataset=dataset)["workload"], workload, "workload")
    averaged = average_curves(_select(curves, dataset=dataset, workload=workload))
    rates = sorted(averaged["missing_rate"].unique())
    styles = method_styles(curves["method"], roles)
    figure, axes = _panels(len(rates))
    for ax, rate in zip(axes, rates):
        for method, line in _select(averaged, missing_rate=rate).groupby("method"):
            style = styles[method]
            line = line.sort_values("coverage")
            ax.plot(line["coverage"], line["mean"], color=style.colour, label=method,
                    linewidth=1.5, linestyle=style.linestyle, marker=style.marker, markevery=10,
                    markersize=4)
            ax.fill_between(line["coverage"], line["lo"].fillna(line["mean"]),
                            line["hi"].fillna(line["mean"]),
                            color=style.colour, alpha=0.15, linewidth=0)
        ax.set(title=f"missing rate {rate:g}", xlabel="coverage (share to classifier)", xlim=(0, 1))
    axes[0].set_ylabel("accuracy")
    _figure_legend(figure, *_all_handles(axes, styles))
    figure.suptitle(f"{dataset}, workload {workload}: accuracy-coverage curves (mean over seeds)")
    return figure


def _agent_order(shares: pd.DataFrame, bounds: pd.DataFrame) -> list[str]:
    """Agents in record order (humans, then the classifier); unknown ones sorted at the end."""
    known = list(dict.fromkeys(bounds["agent"]))
    extra = sorted(set(shares["agent"]) - set(known))
    return [agent for agent in known if agent in set(shares["agent"])] + extra


@_styled
def plot_workload_shares(agg: pd.DataFrame, bounds: pd.DataFrame, dataset: str | None = None,
                         missing_rate: float | None = None, decision: str = "constrained",
                         roles: dict[str, str] | None = None) -> Figure:
    """Mean workload share per agent and method (bars, 95% CI) against the bounds, per workload.

    Upper bounds below 1 are drawn as dashed lines, lower bounds above 0 as dotted lines.
    A method without results under a workload leaves its bars out of that panel; reference
    rows are grey, hatched.
    """
    dataset = _pick(agg["dataset"], dataset, "dataset")
    missing_rate = _pick(_select(agg, dataset=dataset)["missing_rate"], missing_rate, "missing rate")
    rows = _select(agg, dataset=dataset, missing_rate=missing_rate, decision=decision)
    shares = rows[rows["metric"].str.startswith(WORKLOAD_PREFIX)]
    shares = shares.assign(agent=shares["metric"].str.slice(len(WORKLOAD_PREFIX)))
    workloads = natural_sorted(shares["workload"])
    styles = method_styles(agg["method"], roles)
    methods = [m for m in styles if m in set(shares["method"])]  # learned, then references
    figure, axes = _panels(len(workloads))
    for ax, workload in zip(axes, workloads):
        panel = _select(shares, workload=workload)
        panel_bounds = _select(bounds, dataset=dataset, workload=workload)
        agents = _agent_order(panel, panel_bounds)
        positions = {agent: index for index, agent in enumerate(agents)}
        present = [method for method in methods if method in set(panel["method"])]
        width = 0.8 / max(len(present), 1)  # the methods with results under this workload
        for offset, method in enumerate(present):
            bars = _select(panel, method=method)
            x = bars["agent"].map(positions).to_numpy(float) + (offset - (len(present) - 1) / 2) * width
            reference = styles[method].linestyle != "-"
            ax.bar(x, bars["mean"].to_numpy(float), width=width, yerr=_yerr(bars), capsize=2,
                   color=styles[method].colour, label=method, hatch="//" if reference else None,
                   edgecolor="white" if reference else None, linewidth=0)
        for bound in panel_bounds.itertuples(index=False):
            if bound.agent not in positions:
                continue
            left, right = positions[bound.agent] - 0.45, positions[bound.agent] + 0.45
            if bound.hi < 1:
                ax.hlines(bound.hi, left, right, colors="black", linestyles="dashed",
                          label="upper bound")
            if bound.lo > 0:
                ax.hlines(bound.lo, left, right, colors="black", linestyles="dotted",
                          label="lower bound")
        ax.set_xticks(range(len(agents)), agents, rotation=30, ha="right")
        ax.set(title=f"workload: {workload}", ylim=(0, 1.05))
    axes[0].set_ylabel(f"{decision} workload share")
    legend: dict[str, Artist] = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        legend.update(zip(labels, handles))
    labels = [label for label in [*methods, "upper bound", "lower bound"] if label in legend]
    _figure_legend(figure, [legend[label] for label in labels], labels)
    figure.suptitle(f"{dataset}, missing rate {missing_rate:g}: workload share per agent vs bounds")
    return figure


@_styled
def plot_accuracy_vs_violation(agg: pd.DataFrame, dataset: str | None = None,
                               roles: dict[str, str] | None = None) -> Figure:
    """Accuracy vs workload violation, one point per (method, missing rate, decision), per workload.

    Colour and marker = method; filled = constrained decisions, hollow = argmax decisions.
    """
    dataset = _pick(agg["dataset"], dataset, "dataset")
    rows = _select(agg, dataset=dataset)
    rows = rows[rows["metric"].isin(["accuracy", "workload_violation"])
                & rows["decision"].isin(["argmax", "constrained"])]
    points = rows.pivot_table(index=["method", "missing_rate", "workload", "decision"],
                              columns="metric", values="mean").reset_index()
    points = points.dropna(subset=["accuracy", "workload_violation"])
    workloads = natural_sorted(points["workload"])
    styles = method_styles(agg["method"], roles)
    shown = set(points["method"])
    figure, axes = _panels(len(workloads))
    for ax, workload in zip(axes, workloads):
        for (method, decision), part in _select(points, workload=workload).groupby(["method", "decision"]):
            style = styles[method]
            filled = decision == "constrained"
            ax.scatter(part["workload_violation"], part["accuracy"], s=40, marker=style.marker,
                       color=style.colour if filled else "none", edgecolors=style.colour)
        ax.set(title=f"workload: {workload}", xlabel="workload violation")
    styles = {method: style for method, style in styles.items() if method in shown}
    handles = [Line2D([], [], marker=style.marker, linestyle="", color=style.colour)
               for style in styles.values()]
    handles += [Line2D([], [], marker="o", linestyle="", color="grey"),
                Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="grey")]
    _figure_legend(figure, handles, [*styles, "constrained decisions", "argmax decisions"])
    figure.suptitle(f"{dataset}: accuracy vs workload violation (means over seeds)")
    return figure


CD_ALPHA = 0.05


def nemenyi_critical_difference(num_methods: int, num_units: int, alpha: float = CD_ALPHA) -> float:
    """Nemenyi's critical difference of mean ranks: ``q_alpha sqrt(k (k + 1) / (6 N))`` with
    ``q_alpha`` the studentized range quantile over sqrt(2) (Demšar, JMLR 2006)."""
    from scipy.stats import studentized_range

    q_alpha = studentized_range.ppf(1.0 - alpha, num_methods, np.inf) / np.sqrt(2.0)
    return float(q_alpha * np.sqrt(num_methods * (num_methods + 1) / (6.0 * num_units)))


def _unit_names(labels: Iterable[str], units: dict[str, str] | None) -> dict[str, list[str]]:
    """Independent unit -> the dataset labels it holds (a label without a known test set is
    its own unit)."""
    grouped: dict[str, list[str]] = {}
    for label in natural_sorted(labels):
        grouped.setdefault((units or {}).get(label, f"label:{label}"), []).append(label)
    return grouped


def _shared_note(grouped: dict[str, list[str]]) -> str:
    shared = [", ".join(labels) for labels in grouped.values() if len(labels) > 1]
    if not shared:
        return ""
    return (" Dataset variants with the same test set (test manifest and test images) count "
            "once: " + "; ".join(shared) + ".")


@_styled
def critical_difference(agg: pd.DataFrame, roles: dict[str, str] | None = None,
                        metric: str = "accuracy", decision: str = "constrained",
                        units: dict[str, str] | None = None) -> tuple[Figure, str] | str:
    """Critical-difference diagram of the learned methods over independent units.

    A unit is a test set: datasets whose records name the same test manifest and test
    images (``units``: dataset label -> test-set fingerprint, see
    ``reports.frames.dataset_test_sets``) are one unit, e.g. the missing-seed variants of one
    dataset; a label missing from ``units`` is its own unit. The groups of a unit (missing
    rates, workloads, dataset variants) share test samples, so they are not independent. A
    method's score on a unit is its mean ``metric`` over the unit's groups, and only methods
    present in every group take part. Friedman test first; only when it rejects at 5% is
    the diagram drawn (mean ranks, Nemenyi post-hoc cliques, the CD length), as autorank
    does, in the methods' own colours. Returns (figure, caption), or the reason it is not
    drawn.
    """
    import scikit_posthocs as sp
    from scipy.stats import friedmanchisquare

    rows = agg[(agg["decision"] == decision) & (agg["metric"] == metric)]
    rows = rows[rows["method"].map(lambda m: (roles or {}).get(m, "method")) == "method"]
    complete = rows.pivot_table(index=["dataset", "missing_rate", "workload"], columns="method",
                                values="mean").dropna(axis=1)
    grouped = _unit_names(complete.index.get_level_values("dataset"), units)
    unit_of = {label: unit for unit, labels in grouped.items() for label in labels}
    scores = complete.groupby(complete.index.get_level_values("dataset").map(unit_of)).mean()
    what = f"{decision} {metric}"
    shared = _shared_note(grouped)
    if scores.shape[1] < 3 or scores.shape[0] < 2:
        return (f"Critical-difference diagram not drawn: it needs at least 2 independent units "
                f"(datasets) whose test sets differ and 3 learned methods present in all of "
                f"them; these results have {scores.shape[0]} test set(s) and {scores.shape[1]} "
                f"such method(s). The groups of one test set (missing rates, workloads, dataset "
                f"variants) share test samples, so they are not independent units.{shared}")
    higher = direction(metric) != "lower"
    statistic, p_value = friedmanchisquare(*(scores[column] for column in scores.columns))
    if not p_value < CD_ALPHA:
        return (f"Critical-difference diagram not drawn: not significant (Friedman p = "
                f"{p_value:.3g} over {scores.shape[0]} test sets, {scores.shape[1]} methods, on "
                f"{what}); no post-hoc test is run when Friedman does not reject at 5%.{shared}")
    ranks = scores.rank(axis=1, ascending=not higher).mean(axis=0)
    significance = sp.posthoc_nemenyi_friedman(scores.to_numpy())
    significance.index = significance.columns = scores.columns
    cd = nemenyi_critical_difference(scores.shape[1], scores.shape[0])
    styles = method_styles(agg["method"], roles)
    figure = Figure(figsize=(8.0, 0.35 * len(ranks) + 2.2), layout="constrained")
    ax = figure.subplots()
    sp.critical_difference_diagram(ranks, significance, ax=ax, color_palette={
        method: styles[method].colour for method in ranks.index})
    # the CD length as its own bar above the axis, its label above the bar (not on it)
    start = float(ranks.min())
    ax.plot([start, start + cd], [1.0, 1.0], color="black", linewidth=2, solid_capstyle="butt")
    ax.text(start + cd / 2, 1.25, f"CD = {cd:.2f}", ha="center", va="bottom")
    low, _ = ax.get_ylim()
    ax.set_ylim(low, 2.2)
    ax.set_title(f"mean rank on {what} over {scores.shape[0]} test sets (1 = best)", pad=24)
    caption = (f"Critical-difference diagram: mean rank of each learned method on {what} over "
               f"{scores.shape[0]} independent test sets (a method's score on a test set is its "
               f"mean over that test set's groups); methods joined by a bar are not "
               f"significantly different (Nemenyi post-hoc, 5%; CD = {cd:.2f}). Friedman test: "
               f"chi2 = {statistic:.2f}, p = {p_value:.3g}.{shared}")
    return figure, caption


MAX_BANDS = 6  # interval bands drawn up to this many learned methods (beyond: a blur)


def _padded(low: float, high: float, share: float = 0.08, least: float = 0.01) -> tuple[float, float]:
    pad = max((high - low) * share, least)
    return low - pad, high + pad


@_styled
def plot_accuracy_at_coverage(targets: pd.DataFrame, dataset: str, workload: str,
                              roles: dict[str, str] | None = None) -> Figure:
    """Constrained accuracy at each coverage target (``reports.coverage.target_table``), one
    row per missing rate: left the accuracy of every method (band = 95% interval, with up to
    ``MAX_BANDS`` learned methods), right
    its accuracy minus the best learned method's at each target, so close curves separate.
    The y-axes span the learned methods; reference rows (dashed greys) are drawn but may
    leave them (e.g. the best expert alone at full coverage). The legend sits outside."""
    rows = _select(targets, dataset=dataset, workload=workload)
    rates = sorted(rows["missing_rate"].unique())
    styles = method_styles(targets["method"], roles)
    figure = Figure(figsize=(13.5, 4.4 * len(rates) + 0.7), layout="constrained")
    axes = figure.subplots(len(rates), 2, squeeze=False)
    for (ax, gap_ax), rate in zip(axes, rates):
        panel = _select(rows, missing_rate=rate)
        learned = panel[panel["role"] == "method"]
        scale = learned if not learned.empty else panel
        best = scale.groupby("target")["accuracy"].max()
        gaps = []
        for method in [m for m in styles if m in set(panel["method"])]:
            line = _select(panel, method=method).sort_values("target")
            style = styles[method]
            options = dict(color=style.colour, marker=style.marker, markersize=5,
                           linestyle=style.linestyle, linewidth=1.6, label=method)
            ax.plot(line["target"], line["accuracy"], **options)
            if style.linestyle == "-" and len(set(learned["method"])) <= MAX_BANDS:
                ax.fill_between(line["target"], line["accuracy_lo"].fillna(line["accuracy"]),
                                line["accuracy_hi"].fillna(line["accuracy"]), color=style.colour,
                                alpha=0.1, linewidth=0)
            gap = line["accuracy"].to_numpy(float) - line["target"].map(best).to_numpy(float)
            gap_ax.plot(line["target"], gap, **options)
            if method in set(scale["method"]):
                gaps.append(gap)
        grid = sorted(panel["target"].unique())
        low = scale["accuracy_lo"].fillna(scale["accuracy"]).min()
        high = scale["accuracy_hi"].fillna(scale["accuracy"]).max()
        ax.set(title=f"missing rate {rate:g}: constrained accuracy",
               xlabel="coverage target (share to classifier)", ylabel="constrained accuracy",
               xticks=grid, ylim=_padded(low, high))
        worst = float(np.nanmin(np.concatenate(gaps))) if gaps else -0.01
        gap_ax.axhline(0.0, color="black", linewidth=0.8)
        gap_ax.set(title=f"missing rate {rate:g}: accuracy minus the best learned method",
                   xlabel="coverage target (share to classifier)", ylabel="difference from the best",
                   xticks=grid, ylim=_padded(min(worst, -0.01), 0.0))
    _figure_legend(figure, *_all_handles(axes.ravel(), styles))
    figure.suptitle(f"{dataset}: accuracy at equal coverage ({workload})")
    return figure


# ---------------------------------------------------------------------------- all figures


def _slug(text: object) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(text)).strip("_")


class MadeFigure(NamedTuple):
    """A report figure and the caption that says what it shows."""

    figure: Figure
    caption: str


INTERVAL_CAPTION = ("Bars/bands: 95% bootstrap intervals (accuracy over seeds and test samples, "
                    "other metrics over seeds), clipped to the metric's range.")


def all_figures(agg: pd.DataFrame, curves: pd.DataFrame, bounds: pd.DataFrame,
                roles: dict[str, str] | None = None, metric: str = "accuracy",
                decision: str = "constrained",
                coverage_targets: pd.DataFrame | None = None) -> dict[str, MadeFigure]:
    """Every report figure with its caption, keyed by a file-safe name, headline first;
    kinds without data are skipped.

    Accuracy at equal coverage per (dataset, workload family) when the records hold a
    coverage sweep (``coverage_targets``: ``reports.coverage.target_table``; the caller
    leaves the sweep's cells out of the other frames); then per dataset: accuracy vs
    missing rate; post-hoc accuracy-coverage curves per workload; workload shares per
    missing rate; accuracy vs workload violation. The
    critical-difference diagram is separate (``critical_difference``).
    """
    figures: dict[str, MadeFigure] = {}
    if coverage_targets is not None and not coverage_targets.empty:
        pairs = coverage_targets[["dataset", "workload"]].drop_duplicates()
        for dataset, workload in sorted(pairs.itertuples(index=False, name=None),
                                        key=lambda pair: tuple(map(natural_key, pair))):
            figures[f"{COVERAGE_FIGURE}{_slug(dataset)}_{_slug(workload)}"] = MadeFigure(
                plot_accuracy_at_coverage(coverage_targets, dataset, workload, roles),
                f"{dataset}, workload {workload}: constrained accuracy at each coverage target c "
                "(exactly round(c N) test samples to the classifier; methods that use the "
                "workload in training trained at c), one row per missing rate, mean over "
                "seeds; left: accuracy, band = 95% bootstrap interval over seeds and test "
                f"samples (drawn for up to {MAX_BANDS} learned methods; the tables give every "
                "interval); right: accuracy minus the best learned method at each target. The "
                "y-axes span the learned methods; reference rows (dashed greys) may leave them. "
                "The areas (equal-coverage AUC, nAC-AUC) are in coverage_auc.csv.")
    for dataset in natural_sorted(agg["dataset"]):
        rows = _select(agg, dataset=dataset)
        name = _slug(dataset)
        if (rows["metric"] == "accuracy").any() and rows["missing_rate"].nunique() > 1:
            figures[f"accuracy_vs_missing_rate_{name}"] = MadeFigure(
                plot_accuracy_vs_missing_rate(agg, dataset, roles=roles),
                f"{dataset}: constrained accuracy of every method against the missing-annotation "
                f"rate, one panel per workload; reference rows dashed. {INTERVAL_CAPTION}")
        dataset_curves = _select(curves, dataset=dataset)
        for workload in natural_sorted(dataset_curves["workload"]):
            figures[f"deferral_curve_{name}_{_slug(workload)}"] = MadeFigure(
                plot_accuracy_coverage_curves(curves, dataset, workload, roles),
                f"{dataset}, workload {workload}: post-hoc accuracy-coverage curve of each "
                "trained model (the top-c share by classifier-vs-best-human score goes to the "
                "classifier; its area is deferral_auc), mean over seeds; reference rows "
                "dashed; bands: 95% bootstrap intervals over seeds.")
        if rows["metric"].str.startswith(WORKLOAD_PREFIX).any():
            for rate in sorted(rows["missing_rate"].unique()):
                figures[f"workload_shares_{name}_missing_{rate:g}"] = MadeFigure(
                    plot_workload_shares(agg, bounds, dataset, rate, roles=roles),
                    f"{dataset}, missing rate {rate:g}: share of the test set each agent receives "
                    "under constrained decisions, against the workload bounds (dashed: upper, "
                    f"dotted: lower). {INTERVAL_CAPTION}")
        violations = rows.loc[rows["metric"] == "workload_violation", "mean"]
        if {"accuracy", "workload_violation"} <= set(rows["metric"]) and (violations > 0).any():
            figures[f"accuracy_vs_violation_{name}"] = MadeFigure(
                plot_accuracy_vs_violation(agg, dataset, roles),
                f"{dataset}: accuracy against workload violation per method and missing rate; "
                "filled markers: constrained decisions, hollow: argmax decisions.")
    return figures


def save_figures(figures: dict[str, Figure], out_dir: str | Path, dpi: int = 110) -> list[Path]:
    """Write each figure as ``<out_dir>/<name>.png`` and remove the PNGs of an earlier
    report that this one no longer has (the folder is the report's); returns the paths in
    order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, figure in tqdm(figures.items(), desc="figures", unit="fig", disable=None):
        path = out_dir / f"{name}.png"
        buffer = io.BytesIO()
        with warnings.catch_warnings():  # long legends: matplotlib then shrinks the axes itself
            warnings.filterwarnings("ignore", message="constrained_layout not applied")
            figure.savefig(buffer, dpi=dpi, format="png")
        atomic_write_bytes(path, buffer.getvalue())  # a kill never leaves a truncated PNG
        paths.append(path)
    for stale in set(out_dir.glob("*.png")) - set(paths):
        stale.unlink(missing_ok=True)
    return paths
