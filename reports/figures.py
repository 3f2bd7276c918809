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
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tqdm.auto import tqdm

from datasets.manifest import atomic_write_bytes
from reports.frames import ci95_half_width

PANEL_SIZE = (4.2, 3.3)  # inches per panel
WORKLOAD_PREFIX = "workload/"


def _styled(plot: Callable[..., Figure]) -> Callable[..., Figure]:
    """Run a plot function under the report's seaborn style without touching global rcParams."""

    @functools.wraps(plot)
    def wrapper(*args, **kwargs) -> Figure:
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
            return plot(*args, **kwargs)

    return wrapper


def method_palette(methods: Iterable[str]) -> dict[str, tuple]:
    """A fixed colour per method (sorted names, tab10 up to ten methods, husl beyond)."""
    names = sorted(set(methods))
    colours = sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names))
    return dict(zip(names, colours))


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


def _panels(count: int, rows: int = 1, sharey: bool = True) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(PANEL_SIZE[0] * count + 1.8, PANEL_SIZE[1] * rows), layout="constrained")
    axes = figure.subplots(rows, count, squeeze=False, sharey=sharey)
    return figure, axes.ravel()


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
                                  metric: str = "accuracy", decision: str = "constrained") -> Figure:
    """Mean ``metric`` vs missing rate, one line per method, one panel per workload (bars = 95% CI)."""
    dataset = _pick(agg["dataset"], dataset, "dataset")
    rows = _select(agg, dataset=dataset, decision=decision, metric=metric)
    workloads = sorted(rows["workload"].unique())
    palette = method_palette(agg["method"])
    rates = sorted(rows["missing_rate"].unique())
    span = (max(rates) - min(rates)) if len(rates) > 1 else 1.0
    methods = sorted(rows["method"].unique())
    figure, axes = _panels(len(workloads))
    for ax, workload in zip(axes, workloads):
        for position, method in enumerate(methods):
            line = _select(rows, workload=workload, method=method).sort_values("missing_rate")
            dodge = (position - (len(methods) - 1) / 2) * 0.012 * span  # keep error bars apart
            ax.errorbar(line["missing_rate"] + dodge, line["mean"], yerr=line["ci95"].fillna(0),
                        marker="o", markersize=4, capsize=3, color=palette[method], label=method)
        ax.set(title=f"workload: {workload}", xlabel="missing annotation rate", xticks=rates)
    axes[0].set_ylabel(f"{decision} {metric}")
    _figure_legend(figure, *axes[0].get_legend_handles_labels())
    figure.suptitle(f"{dataset}: {decision} {metric} vs missing rate (mean ± 95% CI over seeds)")
    return figure


def average_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Accuracy-coverage curves averaged over seeds, with a 95% CI per coverage point.

    Returns dataset, method, missing_rate, workload, coverage, mean, ci95, n.
    """
    keys = ["dataset", "method", "missing_rate", "workload", "coverage"]
    points = curves.assign(coverage=curves["coverage"].round(6))
    out = points.groupby(keys)["accuracy"].agg(mean="mean", std="std", n="count").reset_index()
    out["ci95"] = ci95_half_width(out["std"], out["n"])
    return out[[*keys, "mean", "ci95", "n"]]


@_styled
def plot_accuracy_coverage_curves(curves: pd.DataFrame, dataset: str | None = None,
                                  workload: str | None = None) -> Figure:
    """Accuracy vs coverage per method (mean over seeds, band = 95% CI), one panel per missing rate."""
    dataset = _pick(curves["dataset"], dataset, "dataset")
    workload = _pick(_select(curves, dataset=dataset)["workload"], workload, "workload")
    averaged = average_curves(_select(curves, dataset=dataset, workload=workload))
    rates = sorted(averaged["missing_rate"].unique())
    palette = method_palette(curves["method"])
    figure, axes = _panels(len(rates))
    for ax, rate in zip(axes, rates):
        for method, line in _select(averaged, missing_rate=rate).groupby("method"):
            colour = palette[method]
            ax.plot(line["coverage"], line["mean"], color=colour, label=method, linewidth=1.5)
            band = line["ci95"].fillna(0)
            ax.fill_between(line["coverage"], line["mean"] - band, line["mean"] + band,
                            color=colour, alpha=0.15, linewidth=0)
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
    palette = method_palette(agg["method"])
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
            ax.bar(x, bars["mean"], width=width, yerr=bars["ci95"].fillna(0), capsize=2,
                   color=palette[method], label=method)
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
def plot_accuracy_vs_violation(agg: pd.DataFrame, dataset: str | None = None) -> Figure:
    """Accuracy vs workload violation, one point per (method, missing rate, decision), per workload.

    Colour = method; marker = decision rule (argmax vs constrained).
    """
    dataset = _pick(agg["dataset"], dataset, "dataset")
    rows = _select(agg, dataset=dataset)
    rows = rows[rows["metric"].isin(["accuracy", "workload_violation"])
                & rows["decision"].isin(["argmax", "constrained"])]
    points = rows.pivot_table(index=["method", "missing_rate", "workload", "decision"],
                              columns="metric", values="mean").reset_index()
    points = points.dropna(subset=["accuracy", "workload_violation"])
    workloads = sorted(points["workload"].unique())
    palette = method_palette(agg["method"])
    figure, axes = _panels(len(workloads))
    for ax, workload in zip(axes, workloads):
        sns.scatterplot(data=_select(points, workload=workload), x="workload_violation", y="accuracy",
                        hue="method", style="decision", palette=palette,
                        markers={"argmax": "o", "constrained": "X"}, s=50, ax=ax, legend=False)
        ax.set(title=f"workload: {workload}", xlabel="workload violation")
    method_handles = [Line2D([], [], marker="o", linestyle="", color=palette[m]) for m in palette]
    decision_handles = [Line2D([], [], marker=marker, linestyle="", color="grey")
                        for marker in ("o", "X")]
    _figure_legend(figure, method_handles + decision_handles,
                   [*palette, "argmax decisions", "constrained decisions"])
    figure.suptitle(f"{dataset}: accuracy vs workload violation (means over seeds)")
    return figure


# ---------------------------------------------------------------------------- all figures


def _slug(text: object) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(text)).strip("_")


def all_figures(agg: pd.DataFrame, curves: pd.DataFrame, bounds: pd.DataFrame) -> dict[str, Figure]:
    """Every report figure, keyed by a file-safe name; kinds without data are skipped.

    Per dataset: accuracy vs missing rate; accuracy-coverage curves per workload; workload
    shares per missing rate; accuracy vs workload violation.
    """
    figures: dict[str, Figure] = {}
    for dataset in sorted(agg["dataset"].unique()):
        rows = _select(agg, dataset=dataset)
        name = _slug(dataset)
        if (rows["metric"] == "accuracy").any():
            figures[f"accuracy_vs_missing_rate_{name}"] = plot_accuracy_vs_missing_rate(agg, dataset)
        dataset_curves = _select(curves, dataset=dataset)
        for workload in sorted(dataset_curves["workload"].unique()):
            figures[f"accuracy_coverage_{name}_{_slug(workload)}"] = plot_accuracy_coverage_curves(
                curves, dataset, workload)
        if rows["metric"].str.startswith(WORKLOAD_PREFIX).any():
            for rate in sorted(rows["missing_rate"].unique()):
                figures[f"workload_shares_{name}_missing_{rate:g}"] = plot_workload_shares(
                    agg, bounds, dataset, rate)
        if {"accuracy", "workload_violation"} <= set(rows["metric"]):
            figures[f"accuracy_vs_violation_{name}"] = plot_accuracy_vs_violation(agg, dataset)
    return figures


def save_figures(figures: dict[str, Figure], out_dir: str | Path, dpi: int = 110) -> list[Path]:
    """Write each figure as ``<out_dir>/<name>.png``; returns the paths in order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, figure in tqdm(figures.items(), desc="figures", unit="fig", disable=None):
        path = out_dir / f"{name}.png"
        buffer = io.BytesIO()
        figure.savefig(buffer, dpi=dpi, format="png")
        atomic_write_bytes(path, buffer.getvalue())  # a kill never leaves a truncated PNG
        paths.append(path)
    return paths
