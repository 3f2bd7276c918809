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
from typing import NamedTuple
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tqdm.auto import tqdm

from core.files import atomic_write_bytes
from reports.metrics import direction
from reports.uncertainty import group_rng, percentile_interval, seed_resamples

PANEL_SIZE = (4.2, 3.3)  # inches per panel
WORKLOAD_PREFIX = "workload/"


def _styled(plot: Callable[..., Figure]) -> Callable[..., Figure]:
    """Run a plot function under the report's seaborn style without touching global rcParams."""

    @functools.wraps(plot)
    def wrapper(*args, **kwargs) -> Figure:
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
            return plot(*args, **kwargs)

    return wrapper


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<")


class Style(NamedTuple):
    """How one method is drawn: colour, marker and line style (dashed: a reference row)."""

    colour: tuple
    marker: str
    linestyle: str


REFERENCE_GREYS = ((0.15, 0.15, 0.15), (0.45, 0.45, 0.45), (0.62, 0.62, 0.62), (0.3, 0.3, 0.3))


def method_styles(methods: Iterable[str], roles: dict[str, str] | None = None) -> dict[str, Style]:
    """A fixed, distinguishable style per method: the i-th learned method (sorted names) gets
    the i-th of 18 colours (tab20's dark, then light shades, greys left out; no colour reused
    within 18 methods) and a marker; reference rows are dashed greys with their own markers,
    so they never share a learned method's colour."""
    names = sorted(set(methods))
    reference = [name for name in names if (roles or {}).get(name) == "reference"]
    learned = [name for name in names if name not in reference]
    tab20 = sns.color_palette("tab20", 20)  # dark and light shades of ten hues; greys left out
    colours = [tab20[k] for k in range(0, 20, 2) if k != 14] + [tab20[k] for k in range(1, 20, 2) if k != 15]
    styles = {name: Style(colours[i % len(colours)], MARKERS[(i + i // len(colours)) % len(MARKERS)], "-")
              for i, name in enumerate(learned)}
    styles.update({name: Style(REFERENCE_GREYS[i % len(REFERENCE_GREYS)],
                               MARKERS[(i + 4) % len(MARKERS)], "--")
                   for i, name in enumerate(reference)})
    return styles


def _yerr(rows: pd.DataFrame) -> np.ndarray:
    """(2, n) error-bar lengths of the intervals ``lo``/``hi`` around ``mean`` (0 where absent)."""
    below = (rows["mean"] - rows["lo"]).fillna(0).clip(lower=0)
    above = (rows["hi"] - rows["mean"]).fillna(0).clip(lower=0)
    return np.vstack([below.to_numpy(float), above.to_numpy(float)])


def _pick(values: Iterable, wanted, what: str):
    """``wanted`` if given (checked), else the first of the sorted ``values``."""
    available = sorted(set(values))
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
    figure.legend(list(unique.values()), list(unique), loc="outside right upper", frameon=False)


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
    workloads = sorted(rows["workload"].unique())
    styles = method_styles(agg["method"], roles)
    rates = sorted(rows["missing_rate"].unique())
    span = (max(rates) - min(rates)) if len(rates) > 1 else 1.0
    methods = sorted(rows["method"].unique())
    figure, axes = _panels(len(workloads))
    for ax, workload in zip(axes, workloads):
        for position, method in enumerate(methods):
            line = _select(rows, workload=workload, method=method).sort_values("missing_rate")
            dodge = (position - (len(methods) - 1) / 2) * 0.012 * span  # keep error bars apart
            style = styles[method]
            ax.errorbar(line["missing_rate"] + dodge, line["mean"], yerr=_yerr(line),
                        marker=style.marker, markersize=4, capsize=3, color=style.colour,
                        linestyle=style.linestyle, label=method)
        ax.set(title=f"workload: {workload}", xlabel="missing annotation rate", xticks=rates)
    axes[0].set_ylabel(f"{decision} {metric}")
    _figure_legend(figure, *axes[0].get_legend_handles_labels())
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
            ax.plot(line["coverage"], line["mean"], color=style.colour, label=method,
                    linewidth=1.5, linestyle=style.linestyle, marker=style.marker, markevery=10,
                    markersize=4)
            ax.fill_between(line["coverage"], line["lo"].fillna(line["mean"]),
                            line["hi"].fillna(line["mean"]),
                            color=style.colour, alpha=0.15, linewidth=0)
        ax.set(title=f"missing rate {rate:g}", xlabel="coverage (share to classifier)", xlim=(0, 1))
    axes[0].set_ylabel("accuracy")
    _figure_legend(figure, *axes[0].get_legend_handles_labels())
    figure.suptitle(f"{dataset}, workload {workload}: accuracy-coverage curves (mean over seeds)")
    return figure


def _agent_order(shares: pd.DataFrame, bounds: pd.DataFrame) -> list[str]:
    """Agents in record order (humans, then the classifier); unknown ones sorted at the end."""
    known = list(dict.fromkeys(bounds["agent"]))
    extra = sorted(set(shares["agent"]) - set(known))
    return [agent for agent in known if agent in set(shares["agent"])] + extra


@_styled
def plot_workload_shares(agg: pd.DataFrame, bounds: pd.DataFrame, dataset: str | None = None,
                         missing_rate: float | None = None, decision: str = "constrained") -> Figure:
    """Mean workload share per agent and method (bars, 95% CI) against the bounds, per workload.

    Upper bounds below 1 are drawn as dashed lines, lower bounds above 0 as dotted lines.
    """
    dataset = _pick(agg["dataset"], dataset, "dataset")
    missing_rate = _pick(_select(agg, dataset=dataset)["missing_rate"], missing_rate, "missing rate")
    rows = _select(agg, dataset=dataset, missing_rate=missing_rate, decision=decision)
    shares = rows[rows["metric"].str.startswith(WORKLOAD_PREFIX)]
    shares = shares.assign(agent=shares["metric"].str.slice(len(WORKLOAD_PREFIX)))
    workloads = sorted(shares["workload"].unique())
    methods = sorted(shares["method"].unique())
    styles = method_styles(agg["method"])
    width = 0.8 / max(len(methods), 1)
    figure, axes = _panels(len(workloads))
    for ax, workload in zip(axes, workloads):
        panel = _select(shares, workload=workload)
        panel_bounds = _select(bounds, dataset=dataset, workload=workload)
        agents = _agent_order(panel, panel_bounds)
        positions = {agent: index for index, agent in enumerate(agents)}
        for offset, method in enumerate(methods):
            bars = _select(panel, method=method)
            x = bars["agent"].map(positions) + (offset - (len(methods) - 1) / 2) * width
            ax.bar(x, bars["mean"], width=width, yerr=_yerr(bars), capsize=2,
                   color=styles[method].colour, label=method)
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
    legend = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        legend.update(zip(labels, handles))
    labels = [*methods, *(label for label in ("upper bound", "lower bound") if label in legend)]
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
    workloads = sorted(points["workload"].unique())
    styles = method_styles(agg["method"], roles)
    figure, axes = _panels(len(workloads))
    for ax, workload in zip(axes, workloads):
        for (method, decision), part in _select(points, workload=workload).groupby(["method", "decision"]):
            style = styles[method]
            filled = decision == "constrained"
            ax.scatter(part["workload_violation"], part["accuracy"], s=40, marker=style.marker,
                       color=style.colour if filled else "none", edgecolors=style.colour)
        ax.set(title=f"workload: {workload}", xlabel="workload violation")
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


@_styled
def critical_difference(agg: pd.DataFrame, roles: dict[str, str] | None = None,
                        metric: str = "accuracy", decision: str = "constrained"
                        ) -> tuple[Figure, str] | str:
    """Critical-difference diagram of the learned methods over independent units.

    A unit is a dataset (test sets and trained models are shared across the missing rates
    and workloads of a dataset, so those groups are not independent); a method's score on a
    unit is its mean ``metric`` over the dataset's (missing rate, workload) groups, and only
    methods present in every group of every unit take part. Friedman test first; only when
    it rejects at 5% is the diagram drawn (mean ranks, Nemenyi post-hoc cliques, the CD
    length), as autorank does. Returns (figure, caption), or the reason it is not drawn.
    """
    import scikit_posthocs as sp
    from scipy.stats import friedmanchisquare

    rows = agg[(agg["decision"] == decision) & (agg["metric"] == metric)]
    rows = rows[rows["method"].map(lambda m: (roles or {}).get(m, "method")) == "method"]
    complete = rows.pivot_table(index=["dataset", "missing_rate", "workload"], columns="method",
                                values="mean").dropna(axis=1)
    units = complete.groupby(level="dataset").mean()
    what = f"{decision} {metric}"
    if units.shape[1] < 3 or units.shape[0] < 2:
        return (f"Critical-difference diagram not drawn: it needs at least 2 independent units "
                f"(datasets) and 3 learned methods present in all of them; these results have "
                f"{units.shape[0]} dataset(s) and {units.shape[1]} such method(s). The groups "
                "of one dataset share test sets and trained models, so they are not independent "
                "units.")
    higher = direction(metric) != "lower"
    statistic, p_value = friedmanchisquare(*(units[column] for column in units.columns))
    if not p_value < CD_ALPHA:
        return (f"Critical-difference diagram not drawn: not significant (Friedman p = "
                f"{p_value:.3g} over {units.shape[0]} datasets, {units.shape[1]} methods, on "
                f"{what}); no post-hoc test is run when Friedman does not reject at 5%.")
    ranks = units.rank(axis=1, ascending=not higher).mean(axis=0)
    significance = sp.posthoc_nemenyi_friedman(units.to_numpy())
    significance.index = significance.columns = units.columns
    cd = nemenyi_critical_difference(units.shape[1], units.shape[0])
    figure = Figure(figsize=(8.0, 0.35 * len(ranks) + 1.8), layout="constrained")
    ax = figure.subplots()
    sp.critical_difference_diagram(ranks, significance, ax=ax, cd=cd)
    ax.set_title(f"mean rank on {what} over {units.shape[0]} datasets (1 = best)")
    caption = (f"Critical-difference diagram: mean rank of each learned method on {what} over "
               f"{units.shape[0]} datasets (independent units; a method's score on a dataset is "
               f"its mean over that dataset's groups); methods joined by a bar are not "
               f"significantly different (Nemenyi post-hoc, 5%; CD = {cd:.2f}). Friedman test: "
               f"chi2 = {statistic:.2f}, p = {p_value:.3g}.")
    return figure, caption


@_styled
def plot_accuracy_at_coverage(targets: pd.DataFrame, dataset: str, workload: str,
                              roles: dict[str, str] | None = None) -> Figure:
    """Constrained accuracy at each coverage target (``reports.coverage.target_table``), one
    line per method (band = 95% interval), one panel per missing rate; references dashed."""
    rows = _select(targets, dataset=dataset, workload=workload)
    rates = sorted(rows["missing_rate"].unique())
    styles = method_styles(targets["method"], roles)
    figure, axes = _panels(len(rates))
    for ax, rate in zip(axes, rates):
        for method, line in _select(rows, missing_rate=rate).groupby("method"):
            line = line.sort_values("target")
            style = styles[method]
            ax.plot(line["target"], line["accuracy"], color=style.colour, marker=style.marker,
                    markersize=4, linestyle=style.linestyle, linewidth=1.5, label=method)
            ax.fill_between(line["target"], line["accuracy_lo"].fillna(line["accuracy"]),
                            line["accuracy_hi"].fillna(line["accuracy"]), color=style.colour,
                            alpha=0.12, linewidth=0)
        ax.set(title=f"missing rate {rate:g}", xlabel="coverage target (share to classifier)",
               xlim=(-0.02, 1.02))
    axes[0].set_ylabel("constrained accuracy")
    _figure_legend(figure, *axes[0].get_legend_handles_labels())
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
    leaves the sweep's cells out of the other frames); then per dataset: accuracy vs missing rate; post-hoc accuracy-coverage curves per workload;
    workload shares per missing rate; accuracy vs workload violation. The
    critical-difference diagram is separate (``critical_difference``).
    """
    figures: dict[str, MadeFigure] = {}
    if coverage_targets is not None and not coverage_targets.empty:
        for (dataset, workload), _ in coverage_targets.groupby(["dataset", "workload"]):
            figures[f"accuracy_at_coverage_{_slug(dataset)}_{_slug(workload)}"] = MadeFigure(
                plot_accuracy_at_coverage(coverage_targets, dataset, workload, roles),
                f"{dataset}, workload {workload}: constrained accuracy at each coverage target c "
                "(exactly round(c N) test samples to the classifier; methods that use the "
                "workload in training trained at c), one panel per missing rate, mean over "
                "seeds; band: 95% bootstrap interval over seeds and test samples; reference "
                "rows dashed. The equal-coverage AUC of each line is in coverage_auc.csv.")
    for dataset in sorted(agg["dataset"].unique()):
        rows = _select(agg, dataset=dataset)
        name = _slug(dataset)
        if (rows["metric"] == "accuracy").any() and rows["missing_rate"].nunique() > 1:
            figures[f"accuracy_vs_missing_rate_{name}"] = MadeFigure(
                plot_accuracy_vs_missing_rate(agg, dataset, roles=roles),
                f"{dataset}: constrained accuracy of every method against the missing-annotation "
                f"rate, one panel per workload; reference rows dashed. {INTERVAL_CAPTION}")
        dataset_curves = _select(curves, dataset=dataset)
        for workload in sorted(dataset_curves["workload"].unique()):
            figures[f"deferral_curve_{name}_{_slug(workload)}"] = MadeFigure(
                plot_accuracy_coverage_curves(curves, dataset, workload, roles),
                f"{dataset}, workload {workload}: post-hoc accuracy-coverage curve of each "
                "trained model (the top-c share by classifier-vs-best-human score goes to the "
                "classifier; its area is deferral_auc), mean over seeds; reference rows "
                "dashed; bands: 95% bootstrap intervals over seeds.")
        if rows["metric"].str.startswith(WORKLOAD_PREFIX).any():
            for rate in sorted(rows["missing_rate"].unique()):
                figures[f"workload_shares_{name}_missing_{rate:g}"] = MadeFigure(
                    plot_workload_shares(agg, bounds, dataset, rate),
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
