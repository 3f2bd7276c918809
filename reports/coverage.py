"""Accuracy-coverage sweeps (the Prob-L2D paper's comparison): accuracy against the realised
coverage as the classifier's workload bound moves, and the area under that curve.

A *sweep family* is every record of one (dataset, method, missing rate, seed) whose
workload is one preset with only ``classifier.hi`` changed (``none``,
``none[classifier.hi=0.3]``, ...); families with at least ``MIN_POINTS`` bounds are
analysed. The area is the trapezoid of constrained accuracy over realised constrained
coverage (share to the classifier), per seed, then averaged with a bootstrap-over-seeds
interval and a paired ``tied_with_best`` per (dataset, missing rate, preset).
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from benchmark.evaluator import area_under_curve
from reports.frames import cell_of, ok_records
from reports.uncertainty import seed_interval, ties_with_best

MIN_POINTS = 3
SWEPT = "classifier.hi"
POINT_COLUMNS = ["dataset", "method", "missing_rate", "workload", "seed", "bound", "coverage", "accuracy"]
AUC_COLUMNS = ["dataset", "method", "missing_rate", "workload", "role", "auc", "auc_lo", "auc_hi",
               "coverage_span", "n", "rank", "tied_with_best"]


def coverage_points(records: Iterable[dict], decision: str = "constrained") -> pd.DataFrame:
    """One row per record of a sweep family: its preset (``workload``), bound, realised
    coverage and accuracy under ``decision``."""
    rows = []
    for record in ok_records(records):
        changes = (record.get("variant") or {}).get("workload") or {}
        if set(changes) - {SWEPT} or not record.get("workload_bounds"):
            continue
        cell = cell_of(record)
        metrics = record["metrics"][decision]
        bound = float(record["workload_bounds"]["hi"][-1])
        rows.append([cell["dataset"], cell["method"], cell["missing_rate"],
                     cell["workload"].split("[")[0], cell["seed"], bound,
                     float(metrics["coverage"]), float(metrics["accuracy"])])
    points = pd.DataFrame(rows, columns=POINT_COLUMNS)
    family = ["dataset", "method", "missing_rate", "workload"]
    bounds = points.groupby(family)["bound"].transform("nunique")
    return points[bounds >= MIN_POINTS].reset_index(drop=True)


def area_per_seed(points: pd.DataFrame) -> pd.DataFrame:
    """Trapezoid area of accuracy over realised coverage (``value``) and the realised
    coverage range it spans (``span``: a curve ends where the method stops using the
    classifier, whatever the bound), per family and seed."""
    rows = []
    keys = ["dataset", "method", "missing_rate", "workload", "seed"]
    for key, part in points.groupby(keys, sort=True):
        part = part.sort_values(["coverage", "bound"])
        rows.append([*key, area_under_curve(part["coverage"].to_numpy(), part["accuracy"].to_numpy()),
                     part["coverage"].max() - part["coverage"].min()])
    return pd.DataFrame(rows, columns=[*keys, "value", "span"])


def coverage_auc(points: pd.DataFrame, roles: dict[str, str] | None = None) -> pd.DataFrame:
    """Mean area under each method's accuracy-coverage curve with its 95% interval, rank
    (learned methods only) and ``tied_with_best``, per (dataset, missing rate, preset)."""
    if points.empty:
        return pd.DataFrame(columns=AUC_COLUMNS)
    per_seed = area_per_seed(points)
    group = ["dataset", "missing_rate", "workload"]
    rows = []
    for key, part in per_seed.groupby([*group, "method"], sort=True):
        lo, hi = seed_interval(part["value"].to_numpy(), "accuracy", "auc", *key)
        rows.append([*key, (roles or {}).get(key[-1], "method"), part["value"].mean(), lo, hi,
                     part["span"].mean(), len(part)])
    table = pd.DataFrame(rows, columns=[*group, "method", "role", "auc", "auc_lo", "auc_hi",
                                        "coverage_span", "n"])
    learned = table["role"] == "method"
    table["rank"] = table["auc"].where(learned).groupby([table[k] for k in group]).rank(
        method="min", ascending=False).astype("Int64")
    best = table[table["rank"] == 1].drop_duplicates(group)
    ties = ties_with_best(per_seed[per_seed["method"].isin(table.loc[learned, "method"])], best,
                          higher_is_better=True)
    table = table.merge(ties, on=[*group, "method"], how="left")
    table = table.assign(_reference=~learned).sort_values([*group, "_reference", "rank", "method"])
    return table.drop(columns="_reference").reset_index(drop=True)[AUC_COLUMNS]


def average_points(points: pd.DataFrame) -> pd.DataFrame:
    """Per family and bound: mean realised coverage and accuracy over seeds, with the
    accuracy's 95% bootstrap-over-seeds interval (clipped to [0, 1])."""
    rows = []
    for key, part in points.groupby(["dataset", "method", "missing_rate", "workload", "bound"], sort=True):
        lo, hi = seed_interval(part["accuracy"].to_numpy(), "accuracy", "point", *key)
        rows.append([*key, part["coverage"].mean(), part["accuracy"].mean(), lo, hi])
    return pd.DataFrame(rows, columns=["dataset", "method", "missing_rate", "workload", "bound",
                                       "coverage", "accuracy", "lo", "hi"])


def format_auc_table(table: pd.DataFrame) -> pd.DataFrame:
    """Display strings of ``coverage_auc``: "auc [lo, hi]", rank ("ref" for reference rows)."""
    def interval(row):
        if pd.isna(row.auc_lo):
            return f"{row.auc:.3f}"
        return f"{row.auc:.3f} [{row.auc_lo:.3f}, {row.auc_hi:.3f}]"

    return pd.DataFrame({
        "dataset": table["dataset"],
        "missing": table["missing_rate"].map(lambda r: f"{r:g}"),
        "workload": table["workload"],
        "rank": ["ref" if role == "reference" else str(int(rank)) if not pd.isna(rank) else "–"
                 for role, rank in zip(table["role"], table["rank"])],
        "method": [("*" if rank == 1 else "=" if tied is True else " ") + method
                   for method, rank, tied in zip(table["method"], table["rank"].fillna(0),
                                                 table["tied_with_best"])],
        "AUC": [interval(row) for row in table.itertuples(index=False)],
        "coverage span": table["coverage_span"].map(lambda span: f"{span:.2f}"),
        "n": table["n"].astype(str),
    })
