"""Result records (``core.spec.ResultRecord``, loaded by ``core.records``) ->
pandas frames. Everything here is a pure function of the loaded records or of a frame.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, TypeGuard, TypeVar

import numpy as np
import pandas as pd

from core.records import NoRecordsError, load_records  # noqa: F401 (re-exported)
from core.spec import CELL_KEYS as SPEC_CELL_KEYS
from core.spec import (
    METRICS,
    RECORD_NAME,  # noqa: F401 (re-exported)
    target_count,
)
from reports.uncertainty import accuracy_intervals, seed_interval

CELL_KEYS = list(SPEC_CELL_KEYS)
RUN_DECISION = "run"  # the "decision" of metrics that belong to the run, not a decision rule
TIDY_COLUMNS = [*CELL_KEYS, "decision", "metric", "value"]
AGGREGATE_KEYS = ["dataset", "method", "missing_rate", "workload", "decision", "metric"]
AGGREGATE_COLUMNS = [*AGGREGATE_KEYS, "mean", "std", "lo", "hi", "n"]
# metrics of the trained model, the same under every decision rule: one column each, filed
# under the run's metrics (the record repeats them per decision rule)
DECISION_FREE = tuple(name for name, spec in METRICS.items() if spec.decision_free)


def is_decision_free(metric: str) -> bool:
    """Whether ``metric`` describes the trained model, not one set of decisions."""
    return any(metric == name or (name.endswith("/") and metric.startswith(name))
               for name in DECISION_FREE)


# ---------------------------------------------------------------------------- order


def natural_key(value: object) -> tuple:
    """Sort key that reads the numbers inside a label as numbers: ``none[coverage=0]`` <
    ``none[coverage=0.25]`` < ``none[coverage=1]``, ``seed=2`` < ``seed=10``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ((0, float(value), ""),)
    parts = re.split(r"(\d+(?:\.\d+)?)", str(value))
    return tuple((0, float(part), "") if index % 2 else (1, 0.0, part)
                 for index, part in enumerate(parts) if part)


def natural_sorted(values: Iterable) -> list:
    """The distinct ``values`` in natural order (see ``natural_key``)."""
    return sorted(set(values), key=natural_key)


def natural_order(column: pd.Series) -> pd.Series:
    """A ``sort_values(key=...)`` key: each value's position in natural order."""
    position = {value: index for index, value in enumerate(natural_sorted(column.dropna()))}
    return column.map(position)


# ---------------------------------------------------------------------------- records

Record = Mapping[str, Any]  # one result record as read (core.spec.ResultRecord)


def cell_of(record: Record) -> dict:
    """The grid cell of a record with normalised types (missing_rate float, seed int)."""
    cell = record["cell"]
    return {
        "dataset": str(cell["dataset"]),
        "method": str(cell["method"]),
        "missing_rate": float(cell["missing_rate"]),
        "workload": str(cell["workload"]),
        "seed": int(cell["seed"]),
    }


def ok_records(records: Iterable[Record]) -> list[Record]:
    """Successful records, one per cell (a repeated cell keeps its last record, with a warning)."""
    by_cell: dict[tuple, Record] = {}
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


_T = TypeVar("_T")


def _is_present(value: _T | None) -> TypeGuard[_T]:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


# ---------------------------------------------------------------------------- frames


def tidy(records: Iterable[Record]) -> pd.DataFrame:
    """Long frame of every metric value of the successful records.

    Columns: dataset, method, missing_rate, workload, seed, decision, metric, value.
    ``decision`` is the decision rule ("argmax", "constrained") or ``"run"`` for the run
    metrics (train_seconds, samples_per_second, imputation_accuracy) and for the metrics of
    the trained model that no decision rule changes (``DECISION_FREE``: one value each).
    ``workload_violation`` is the violation beyond the rounding of target shares to whole
    samples (``violation_beyond_rounding``). Failed cells and absent (null / NaN) values
    are left out.
    """
    rows = []
    for record in ok_records(records):
        cell = list(cell_of(record).values())
        per_decision = {decision: dict(metrics or {})
                        for decision, metrics in (record.get("metrics") or {}).items()}
        run = dict(record.get("run_metrics") or {})
        for decision, metrics in per_decision.items():
            for metric in [name for name in metrics if is_decision_free(name)]:
                value = metrics.pop(metric)
                run.setdefault(metric, value)
            if "workload_violation" in metrics:
                metrics["workload_violation"] = violation_beyond_rounding(record, decision)
        per_decision[RUN_DECISION] = run
        for decision, metrics in per_decision.items():
            for metric, value in metrics.items():
                if _is_present(value):
                    rows.append([*cell, decision, metric, float(value)])
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


def num_test_samples(record: Record) -> int | None:
    """Number of test samples of a record (from its per-sample outcomes), None if unknown."""
    for flags in (record.get("correct") or {}).values():
        if flags:
            return len(flags)
    return None


def violation_beyond_rounding(record: Record, decision: str) -> float | None:
    """``workload_violation`` of a record's ``decision`` without the rounding of a target.

    A target share c (an agent with lo = hi, e.g. a coverage target) is met by exactly
    ``round(c N)`` samples, which is c only up to 1/(2N); measured against that whole
    number, decisions that honour the target have violation 0. Range bounds (lo < hi) are
    measured as recorded (whole numbers inside them always exist). Returns the recorded value
    when the record has no target, or lacks the agents' shares, the bounds or the number of
    test samples.
    """
    metrics = (record.get("metrics") or {}).get(decision) or {}
    recorded = metrics.get("workload_violation")
    agents, bounds, size = record.get("agents"), record.get("workload_bounds"), num_test_samples(record)
    if not agents or not bounds or not size or not any(
            lo == hi for lo, hi in zip(bounds.get("lo") or [], bounds.get("hi") or [])):
        return recorded
    shares = [metrics.get(f"workload/{agent}") for agent in agents]
    present = [share for share in shares if _is_present(share)]
    if len(present) != len(shares) or len(bounds.get("lo") or []) != len(agents):
        return recorded
    worst = 0.0
    for share, lo, hi in zip(present, bounds["lo"], bounds["hi"]):
        if lo == hi:  # a target: compare whole numbers of samples
            allowed = target_count(lo, size)
            worst = max(worst, abs(round(share * size) - allowed) / size)
        else:
            worst = max(worst, share - hi, lo - share)
    return float(worst)


def failures(records: Iterable[Record]) -> pd.DataFrame:
    """One row per failed cell: dataset, method, missing_rate, workload, seed, error, path."""
    rows = [
        {**cell_of(record), "error": str(record.get("error") or "(no error message)"),
         "path": record.get("path", "")}
        for record in records
        if record.get("status") != "ok"
    ]
    return pd.DataFrame(rows, columns=[*CELL_KEYS, "error", "path"])


def curves_frame(records: Iterable[Record]) -> pd.DataFrame:
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


def correct_frame(records: Iterable[Record]) -> pd.DataFrame:
    """Per-sample outcomes of the successful records: dataset, method, missing_rate,
    workload, seed, decision, ``correct`` (an int8 array of 0/1 per test sample)."""
    rows = []
    for record in ok_records(records):
        cell = list(cell_of(record).values())
        for decision, flags in (record.get("correct") or {}).items():
            rows.append([*cell, decision, np.frombuffer(flags.encode(), np.uint8) - ord("0")])
    return pd.DataFrame(rows, columns=[*CELL_KEYS, "decision", "correct"])


def method_roles(records: Iterable[Record]) -> dict[str, str]:
    """Method label -> role ("method", or "reference" for the reference rows)."""
    return {str(record["cell"]["method"]): str(record["role"]) for record in records if record.get("role")}


def bounds_frame(records: Iterable[Record]) -> pd.DataFrame:
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


def record_test_set(record: Record) -> str | None:
    """A fingerprint of a record's test set: the hashes of its test ground-truth manifest
    and of its test images (``provenance``), None when the record has neither."""
    provenance = record.get("provenance") or {}
    manifest = (provenance.get("manifests") or {}).get("test/ground_truth")
    images = (provenance.get("images") or {}).get("test")
    if manifest is None and images is None:
        return None
    return f"manifest {manifest}, images {images}"


def dataset_test_sets(records: Iterable[Record]) -> dict[str, str]:
    """Dataset label -> fingerprint of its test set (``record_test_set``) for the labels whose
    records name one. Labels with one fingerprint share a test set: e.g. the missing-seed
    variants of a dataset, which differ in training annotations only."""
    found: dict[str, set[str]] = {}
    for record in ok_records(records):
        fingerprint = record_test_set(record)
        if fingerprint is not None:
            found.setdefault(cell_of(record)["dataset"], set()).add(fingerprint)
    return {label: " | ".join(sorted(prints)) for label, prints in found.items()}


def provenance_frame(records: Iterable[Record]) -> pd.DataFrame:
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


def seed_intervals(tidy_frame: pd.DataFrame) -> pd.DataFrame:
    """Bootstrap-over-seeds interval (``lo``, ``hi``) of every group's mean, clipped to the
    metric's range; NaN for a single seed (see ``reports.uncertainty``)."""
    rows = []
    for key, part in tidy_frame.groupby(AGGREGATE_KEYS, sort=True):
        rows.append([*key, *seed_interval(part["value"].to_numpy(), key[-1], *key)])
    return pd.DataFrame(rows, columns=[*AGGREGATE_KEYS, "lo", "hi"])


def aggregate(tidy_frame: pd.DataFrame, correct: pd.DataFrame | None = None) -> pd.DataFrame:
    """Mean, sample std, n and a 95% interval (``lo``, ``hi``) over seeds.

    Grouped by dataset, method, missing_rate, workload, decision, metric. Accuracy gets the
    two-level (seeds x test samples) bootstrap interval when ``correct`` (``correct_frame``)
    holds the per-sample outcomes; every other metric a bootstrap over seeds (NaN with one
    seed). Intervals are clipped to the metric's range.
    """
    if tidy_frame.empty:
        return pd.DataFrame(columns=AGGREGATE_COLUMNS)
    grouped = tidy_frame.groupby(AGGREGATE_KEYS, sort=True)["value"]
    out = grouped.agg(mean="mean", std="std", n="count").reset_index()
    out = out.merge(seed_intervals(tidy_frame), on=AGGREGATE_KEYS, how="left")
    if correct is not None and not correct.empty:
        sampled = accuracy_intervals(correct).assign(metric="accuracy")
        out = out.merge(sampled, on=AGGREGATE_KEYS, how="left", suffixes=("", "_sampled"))
        has = out["lo_sampled"].notna()
        out.loc[has, "lo"] = out.loc[has, "lo_sampled"]
        out.loc[has, "hi"] = out.loc[has, "hi_sampled"]
    return out[AGGREGATE_COLUMNS]
