"""One grid cell, one way: identity -> data -> method -> fit (or reuse) -> predict -> score ->
write the record -> track (the MLflow run id then added to the record).

``run_cell`` takes the typed ``CellConfig`` (``benchmark.config.to_cell``, once per cell) and
derives the cell's ``CellIdentity`` (labels, fingerprint, cache keys) and ``RunConfig`` once.
The record goes to ``benchmark.identity.record_path`` (one path per variant). A cell whose
record says "ok" for the same settings and source manifests is skipped unless ``force``; if
tracking is on and the store lacks its run (never tracked, or lost with a store moved aside),
it is tracked again. A lock file beside the record serialises processes that run or track
the same cell at the same time (the second one then finds the record, and its run, and
skips): one MLflow run per cell.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from benchmark.assignment import check_assignment_batch
from benchmark.config import CellConfig, ConfigError, RunConfig, dataset_of, resolve_path, with_method_option
from benchmark.data import load_data, source_image_digests, source_manifest_hashes
from benchmark.evaluator import committee_sets, decision_scores, evaluate
from benchmark.identity import CellIdentity, record_path
from benchmark.predictions import cached_predictions
from benchmark.provenance import REPO_ROOT, provenance
from benchmark.tracking import StoreNeedsRepair, Tracker
from benchmark.training import use_compilation_cache
from core.files import exclusive_lock
from core.records import read_record, write_record
from core.spec import NOT_APPLICABLE, RECORD_SCHEMA, SCORE_RANGE, SKIPPED, ResultRecord, agent_names, role_of
from methods import get_method_class


def check_scores(name: str, scores: np.ndarray, logits: np.ndarray) -> None:
    """Raise unless test outputs are finite and scores follow the contract's scale."""
    if not np.isfinite(scores).all() or not np.isfinite(logits).all():
        raise FloatingPointError(f"{name} produced non-finite test outputs.")
    low, high = SCORE_RANGE
    if scores.min() < low - 1e-6 or scores.max() > high + 1e-6:
        raise ValueError(
            f"{name}: agent_scores must lie in [{low}, {high}] (core.spec states the scale), "
            f"got values in [{scores.min():.4g}, {scores.max():.4g}]."
        )


def fingerprint_now(identity: CellIdentity, cell: CellConfig, base: Path) -> str:
    """The identity's fingerprint with the current content of the source manifests and
    images (an edited manifest or image reruns the cell)."""
    try:
        dataset = dataset_of(cell, base)
        hashes = {**source_manifest_hashes(dataset, cell.missing_rate),
                  **{f"images/{split}": digest
                     for split, digest in source_image_digests(dataset).items()}}
    except Exception:  # an invalid dataset fails the cell later, with its message
        hashes = None
    return identity.fingerprint(hashes)


def cell_lock(path: Path):
    """An exclusive lock on ``<record>.lock`` (released when the process dies)."""
    return exclusive_lock(path.with_name(path.name + ".lock"))


def compute(cell: CellConfig, identity: CellIdentity, record: ResultRecord, base: Path) -> None:
    """Fill ``record`` with the cell's result (raises on failure)."""
    run = RunConfig.build(cell, base, identity)
    use_compilation_cache(resolve_path(cell.jax_cache_dir, base) if cell.jax_cache_dir else None)
    record["role"] = role_of(run.method)

    def cell_data(run: RunConfig):
        return load_data(run.dataset, run.missing_rate, run.data_cache_dir,
                         (run.validation_fraction, run.validation_seed))

    def seed_cell(seed: int):  # this cell under another seed (seeds_per_program > 1)
        other = run.with_seed(seed, base)
        return other, cell_data(other)

    data = cell_data(run)
    check_assignment_batch(run.assignment_batch, len(data.test.y), run.bounds.lo, run.bounds.hi)
    record["fingerprint"] = fingerprint_now(identity, cell, base)  # the data exist now (built on first use)
    out = cached_predictions(run, data, seed_cell)

    # a committee method's expert sets are calibrated on the validation split
    calibration = (None if data.validation is None else
                   (np.asarray(out["validation"]["scores"]), data.validation.y, data.validation.t))
    run_metrics = dict(out["run_metrics"])

    def evaluate_split(outputs, split, name):
        scores = decision_scores(run.method, outputs["logits"], outputs["scores"], split.y, split.t)
        check_scores(run.method.name, np.asarray(scores), np.asarray(outputs["logits"]))
        sets = committee_sets(run.method, scores, calibration)
        if sets is not None and name == "test":
            run_metrics["expert_set_size"] = float(sets.sum(axis=1).mean())
        return evaluate(outputs["logits"], scores, split.y, split.t, run.bounds,
                        assignment_batch=run.assignment_batch, probs=outputs["probs"],
                        expert_sets=sets, expert_cost=run.spec.expert_cost)

    test = evaluate_split(out["test"], data.test, "test")
    record.update({
        "status": "ok",
        "agents": agent_names(run.spec.num_experts),
        "workload_bounds": {"lo": list(run.bounds.lo), "hi": list(run.bounds.hi)},
        "metrics": test.metrics,
        "correct": {rule: "".join("1" if c else "0" for c in right) for rule, right in test.correct.items()},
        "run_metrics": run_metrics,
        "history": out.get("history") or [],
        "curves": test.curves,
        "missing_seed": {"seed": run.dataset.missing_seed, "from": run.missing_seed_source},
        "missing_annotations": {"source": data.files.missing_source,  # none | published | drawn
                                "observed_rate": float(np.mean(data.train.t == -1))},
        "provenance": {**provenance(data.manifests), "images": data.image_digests},
    })
    if data.validation is not None:
        record["validation"] = evaluate_split(out["validation"], data.validation, "validation").metrics


def track(cell: CellConfig, record: ResultRecord, path: Path) -> ResultRecord:
    """Log the written record to MLflow and store the run id (or the tracking error) in it
    (call under the cell's lock: one run per cell, whatever runs at the same time)."""
    try:
        run_id = Tracker(cell.tracking).log(record, cell)
        if run_id:
            record.pop("tracking_error", None)  # an earlier attempt's error is history
    except Exception as err:  # tracking never loses a result
        record["tracking_error"] = f"{type(err).__name__}: {err}"
        run_id = None
    if run_id or record.get("tracking_error"):
        record["mlflow_run_id"] = run_id
        write_record(path, record)
    return record


def untracked(cell: CellConfig, record: ResultRecord) -> bool:
    """Whether tracking is on and the store lacks the finished ``record``'s run: never
    tracked (tracking was off, failed, or the process was killed first), or its run was lost
    with a store moved aside or replaced. False when the store cannot tell."""
    tracker = Tracker(cell.tracking)
    if not tracker.enabled or tracker.unavailable():
        return False
    run_id = record.get("mlflow_run_id")
    return not run_id or tracker.holds_run(run_id) is False


def run_cell(cell: CellConfig, choices: dict[str, str] | None = None,
             base: Path = REPO_ROOT) -> Mapping[str, Any]:
    """Run one grid cell, write its record and track it; never raises for a failing cell.

    ``cell`` is the typed config (``benchmark.config.to_cell``); ``choices`` Hydra's chosen
    presets. Returns the record, or an outcome whose ``status`` is one of
    ``core.spec.OUTCOMES``: "skipped" for an existing ok record, "not_applicable" when a
    swept top-level ``missing_policy`` is one the method does not support (nothing is run
    or written).
    """
    policy = cell.missing_policy
    if policy is not None:  # a sweep over policies: only the combinations a method supports
        supported = get_method_class(str(cell.method.name)).missing_policies
        if policy not in supported:
            return {"status": NOT_APPLICABLE, "cell": {"method": cell.method.name, "missing_policy": policy},
                    "error": (f"method {cell.method.name!r} does not support missing_policy={policy!r}"
                              f" (it supports {', '.join(supported) or 'none: it needs no policy'})")}
        cell = with_method_option(cell, "missing_policy", policy)
    key: Mapping[str, Any] = {"missing_rate": cell.missing_rate, "seed": cell.seed}  # until the labels are known
    try:
        identity = CellIdentity.of(cell, choices)
        key = identity.key()
        path = record_path(resolve_path(cell.results_dir, base), key)
        fingerprint = fingerprint_now(identity, cell, base)  # the settings and the sources' content now
        # no lock needed to read a whole record: a read-only folder of finished cells reports
        done = finished(cell, read_record(path), fingerprint)
        if done is not None and not untracked(cell, done):
            return done
        Tracker(cell.tracking).check_store()  # a damaged store that may hold runs: stop here
        with cell_lock(path):
            return _run_locked(cell, identity, path, fingerprint, base)
    except ConfigError as err:  # no identity: nothing can be recorded
        return {"status": "failed", "error": f"ConfigError: {err}", "cell": key}
    except StoreNeedsRepair as err:  # nothing run, nothing written: the store is left as it is
        return {"status": "failed", "error": f"StoreNeedsRepair: {err}", "cell": key}
    except OSError as err:  # the record (or its lock) cannot be written: say so, go on
        return {"status": "failed", "error": f"cannot write the result record: {err}", "cell": key}


def finished(cell: CellConfig, existing: ResultRecord | None,
             fingerprint: str) -> ResultRecord | None:
    """The cell's "skipped" outcome when its ``existing`` ok record has ``fingerprint`` (the
    same settings and source content) and ``force`` is off; None when the cell must run."""
    if (existing is None or existing["status"] != "ok" or cell.force
            or existing.get("fingerprint") != fingerprint):
        return None
    return {**existing, "status": SKIPPED}


def _run_locked(cell: CellConfig, identity: CellIdentity, path: Path, fingerprint: str,
                base: Path) -> Mapping[str, Any]:
    key, variant = identity.key(), identity.variant()
    existing = read_record(path)  # another process may have finished (and tracked) it meanwhile
    done = finished(cell, existing, fingerprint)
    if done is not None:
        if untracked(cell, done):  # killed before it was tracked, or its run lost: track it
            assert existing is not None  # finished() answers None for a missing record
            tracked = track(cell, existing, path)
            return {**tracked, "status": SKIPPED, "tracked_again": bool(tracked.get("mlflow_run_id"))}
        return done
    if cell.method.label and existing and existing.get("variant") not in (None, variant):
        return {"status": "failed", "cell": key, "error": (  # the existing record is kept
            f"ConfigError: method.label={cell.method.label!r}: {path} holds the result of other "
            f"settings under this label ({existing['variant']}); give each variant its own label.")}
    record: ResultRecord = {
        "schema": RECORD_SCHEMA, "status": "failed", "error": None, "cell": key,
        "method_name": str(cell.method.name), "variant": variant, "identity": identity.record(),
        "fingerprint": fingerprint,  # recomputed once the data exist (built on first use)
    }
    try:
        compute(cell, identity, record, base)
    except Exception as err:  # a failing cell is recorded, the sweep goes on
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc()
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_record(path, record)
    return track(cell, record, path)
