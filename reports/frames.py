"""Result records (``benchmark.spec.ResultRecord``, loaded by ``benchmark.records``) ->
pandas frames. Everything here is a pure function of the loaded records or of a frame.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy import stats

from benchmark.records import NoRecordsError, load_records  # noqa: F401 (re-exported)
from benchmark.spec import CELL_KEYS as SPEC_CELL_KEYS
from benchmark.spec import RECORD_NAME  # noqa: F401 (re-exported)

CELL_KEYS = list(SPEC_CELL_KEYS)
RUN_DECISION = "run"  # the "decision" of metrics that belong to the run, not a decision rule
TIDY_COLUMNS = [*CELL_KEYS, "decision", "metric", "value"]
GROUP_KEYS = ["dataset", "method", "missing_rate", "workload", "decision", "metric"]
AGGREGATE_COLUMNS = [*GROUP_KEYS, "mean", "std", "ci95", "n"]


# ---------------------------------------------------------------------------- records


def cell_of(record: dict) -> dict:
    """The grid cell of a record with normalised types (missing_rate float, seed int)."""
    cell = record["cell"]
    return {
        "dataset": str(cell["dataset"]),
        "method": str(cell["method"]),
        "missing_rate": float(cell["missing_rate"]),
        "workload": str(cell["workload"]),
        "seed": int(cell["seed"]),
    }


def ok_records(records: Iterable[dict]) -> list[dict]:
    """Successful records, one per cell (a repeated cell keeps its last record, with a warning)."""
    by_cell: dict[tuple, dict] = {}
    for record in records:
        if record.get("status") != "ok":
            continue
        key = tuple(cell_of(record).values())
        if key in by_cell:
            warnings.warn(
                f"cell {dict(zip(CELL_KEYS, key))} has more than one result record; "
                f"using {record.get('path', 'the last one')}",
                stacklevel=2,
            )
        by_cell[key] = record
    return list(by_cell.values())


def _is_present(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


# ---------------------------------------------------------------------------- frames


def tidy(records: Iterable[dict]) -> pd.DataFrame:
    """Long frame of every metric value of the successful records.

    Columns: dataset, method, missing_rate, workload, seed, decision, metric, value.
    ``decision`` is the decision rule ("argmax", "constrained") or ``"run"`` for the run
    metrics (train_seconds, samples_per_second, imputation_accuracy). Failed cells and
    absent (null / NaN) values are left out.
    """
    rows = []
    for record in ok_records(records):
        cell = list(cell_of(record).values())
        per_decision = dict(record.get("metrics") or {})
        per_decision[RUN_DECISION] = record.get("run_metrics") or {}
        for decision, metrics in per_decision.items():
            for metric, value in metrics.items():
                if _is_present(value):
                    rows.append([*cell, decision, metric, float(value)])
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


def failures(records: Iterable[dict]) -> pd.DataFrame:
    """One row per failed cell: dataset, method, missing_rate, workload, seed, error, path."""
    rows = [
        {**cell_of(record), "error": str(record.get("error") or "(no error message)"),
         "path": record.get("path", "")}
        for record in records
        if record.get("status") != "ok"
    ]
    return pd.DataFrame(rows, columns=[*CELL_KEYS, "error", "path"])


def curves_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Long frame of accuracy-coverage curve points of the successful records.

    Columns: dataset, method, missing_rate, workload, seed, point, coverage, accuracy.
    """
    rows = []
    for record in ok_records(records):
        curves = record.get("curves") or {}
        coverage, accuracy = curves.get("coverage") or [], curves.get("accuracy") or []
        if len(coverage) != len(accuracy):
            raise ValueError(
                f"{record.get('path', 'record')}: curve coverage and accuracy differ in length"
            )
        cell = list(cell_of(record).values())
        for point, (cov, acc) in enumerate(zip(coverage, accuracy)):
            if _is_present(cov) and _is_present(acc):
                rows.append([*cell, point, float(cov), float(acc)])
    return pd.DataFrame(rows, columns=[*CELL_KEYS, "point", "coverage", "accuracy"])


def bounds_frame(records: Iterable[dict]) -> pd.DataFrame:
    """Workload bounds per (dataset, workload, agent): columns dataset, workload, agent, lo, hi."""
    rows = []
    for record in records:
        bounds, agents = record.get("workload_bounds"), record.get("agents")
        if not bounds or not agents:
            continue
        cell = cell_of(record)
        for agent, lo, hi in zip(agents, bounds["lo"], bounds["hi"]):
            rows.append([cell["dataset"], cell["workload"], agent, float(lo), float(hi)])
    frame = pd.DataFrame(rows, columns=["dataset", "workload", "agent", "lo", "hi"])
    return frame.drop_duplicates(["dataset", "workload", "agent"]).reset_index(drop=True)


def provenance_frame(records: Iterable[dict]) -> pd.DataFrame:
    """One row per record: the cell, status, git_sha, backend, devices, versions, mlflow_run_id."""
    rows = []
    for record in records:
        provenance = record.get("provenance") or {}
        versions = provenance.get("versions") or {}
        rows.append({
            **cell_of(record),
            "status": record.get("status"),
            "git_sha": str(provenance.get("git_sha") or "unknown"),
            "backend": str(provenance.get("backend") or "unknown"),
            "devices": ", ".join(map(str, provenance.get("devices") or [])) or "unknown",
            "versions": ", ".join(f"{name} {version}" for name, version in sorted(versions.items()))
            or "unknown",
            "mlflow_run_id": record.get("mlflow_run_id") or "",
        })
    columns = [*CELL_KEYS, "status", "git_sha", "backend", "devices", "versions", "mlflow_run_id"]
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------- aggregation


def ci95_half_width(std: np.ndarray | pd.Series, n: np.ndarray | pd.Series) -> np.ndarray:
    """Half-width of the Student-t 95% confidence interval of a mean; NaN where n < 2."""
    n = np.asarray(n, dtype=float)
    std = np.asarray(std, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t_quantile = stats.t.ppf(0.975, n - 1)
        half_width = t_quantile * std / np.sqrt(n)
    return np.where(n >= 2, half_width, np.nan)


def aggregate(tidy_frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std, 95% CI half-width and n over seeds.

    Grouped by dataset, method, missing_rate, workload, decision, metric. The CI is
    ``t(0.975, n-1) * std / sqrt(n)`` and NaN when there is a single seed.
    """
    if tidy_frame.empty:
        return pd.DataFrame(columns=AGGREGATE_COLUMNS)
    grouped = tidy_frame.groupby(GROUP_KEYS, sort=True)["value"]
    out = grouped.agg(mean="mean", std="std", n="count").reset_index()
    out["ci95"] = ci95_half_width(out["std"], out["n"])
    return out[AGGREGATE_COLUMNS]
