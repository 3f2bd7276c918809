"""One grid cell: identity -> parse -> data -> fit (or reuse) -> evaluate -> record -> track.

The record goes to ``benchmark.identity.record_path`` (one path per variant). A cell whose
record says "ok" for the same settings is skipped unless ``force``.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from benchmark.config import ConfigError, parse_run, resolve_path
from benchmark.identity import cell_identity, record_path, settings_fingerprint
from benchmark.provenance import REPO_ROOT, provenance
from benchmark.records import read_record, write_record
from benchmark.spec import RECORD_SCHEMA, SCORE_RANGE, ResultRecord, agent_names


def check_scores(name: str, scores: np.ndarray, logits: np.ndarray) -> None:
    """Raise unless test outputs are finite and scores follow the contract's scale."""
    if not np.isfinite(scores).all() or not np.isfinite(logits).all():
        raise FloatingPointError(f"{name} produced non-finite test outputs.")
    low, high = SCORE_RANGE
    if scores.min() < low - 1e-6 or scores.max() > high + 1e-6:
        raise ValueError(
            f"{name}: agent_scores must lie in [{low}, {high}] (benchmark.spec states the scale), "
            f"got values in [{scores.min():.4g}, {scores.max():.4g}]."
        )


def run_cell(cfg: Mapping[str, Any], choices: Mapping[str, str] | None = None,
             base: Path = REPO_ROOT) -> ResultRecord:
    """Run one grid cell and write its record; never raises for a failing cell.

    ``cfg`` is the composed config as a plain dict; ``choices`` Hydra's chosen presets.
    Returns the record (``status`` "ok", "failed" or "skipped" for an existing ok record).
    """
    from benchmark.data import load_data
    from benchmark.evaluator import evaluate
    from benchmark.predictions import cached_predictions
    from benchmark.tracking import Tracker

    cell, variant = cell_identity(cfg, choices)
    path = record_path(resolve_path(cfg["results_dir"], base), cell)
    fingerprint = settings_fingerprint(cfg)
    existing = read_record(path)
    force = bool(cfg.get("force", False))
    if existing and existing["status"] == "ok" and not force and existing.get("fingerprint") == fingerprint:
        return {**existing, "status": "skipped"}
    record: ResultRecord = {
        "schema": RECORD_SCHEMA, "status": "failed", "error": None, "cell": cell,
        "method_name": str(cfg["method"]["name"]), "variant": variant, "fingerprint": fingerprint,
    }
    try:
        if existing and existing.get("variant") not in (None, variant):
            raise ConfigError(
                f"{path} holds the result of other settings under the same labels "
                f"({existing['variant']}); give this variant its own method.label."
            )
        run = parse_run(cfg, base)
        record["role"] = run.method.role
        data = load_data(run.dataset, run.missing_rate)
        out = cached_predictions(run, data)
        scores = out["scores"]
        if run.method.sees_test_labels:  # the oracle reference row
            scores = run.method.scores_from_labels(out["logits"], scores, data.test.y, data.test.t)
        check_scores(run.method.name, np.asarray(scores), np.asarray(out["logits"]))
        metrics, curves = evaluate(out["logits"], scores, data.test.y, data.test.t, run.bounds,
                                   assignment_batch=run.assignment_batch)
        record.update(
            status="ok",
            agents=agent_names(run.spec.num_experts),
            workload_bounds={"lo": list(run.bounds.lo), "hi": list(run.bounds.hi)},
            metrics=metrics,
            run_metrics=out["run_metrics"],
            curves=curves,
            provenance=provenance(data.manifests),
        )
    except Exception as err:  # a failing cell is recorded, the sweep goes on
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc()
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_record(path, record)
    try:
        run_id = Tracker(cfg.get("tracking") or {}).log(record, cfg)
    except Exception as err:  # tracking never loses a result
        record["tracking_error"] = f"{type(err).__name__}: {err}"
        run_id = None
    if run_id or record.get("tracking_error"):
        record["mlflow_run_id"] = run_id
        write_record(path, record)
    return record
