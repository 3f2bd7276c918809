"""MLflow tracking: the only module that imports mlflow.

One MLflow run per grid cell (found by the cell key, ``core.spec.CellKey``):

* params: the cell key, every method option, ``train.*``, ``eval.*``, the dataset settings
  that define the data, and the workload bounds of every agent (``bounds.lo/classifier``);
* metrics: per decision rule (``constrained/accuracy``...), the run metrics, and the
  training metrics of every epoch (``train/loss`` at step = epoch);
* artifacts: the result record, the cell's resolved configuration, the accuracy-coverage
  curve and the provenance.

A sweep gets a parent run that holds its report; its cells' runs are its children. A
local SQLite store is created under a temporary name and renamed into place once complete,
so a kill during creation never leaves a half-made store; one left by an older version is
moved aside (when it holds no run) or explained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import sqlite3
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping


from benchmark.config import CellConfig, TrackingConfig, method_params
from benchmark.identity import dataset_identity, plain
from core.files import exclusive_lock
from core.labels import flatten, stable_hash
from core.spec import ResultRecord


CONNECT_TIMEOUT_S = 3.0
_UNAVAILABLE: dict[str, str] = {}  # tracking URI -> why it cannot be used (per process)


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; the sweep goes on without tracking."""


def server_problem(uri: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """For an http(s) URI, why its server cannot be reached (None when it answers a connect)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as err:
        return f"tracking server {uri} does not answer ({err}); tracking is off for this run"
    return None


def local_store(uri: str | None) -> Path | None:
    """The database file of a local (SQLite) store URI; None for a server or no URI."""
    return Path(uri.removeprefix("sqlite:///")) if uri and uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _store_lock(uri: str | None) -> Iterator[None]:
    """Serialise store creation and migration between processes (SQLite stores)."""
    db = local_store(uri)
    if db is None:
        yield
        return
    with exclusive_lock(db.with_name(db.name + ".lock")):
        yield


class Tracker:
    """Logs result records to MLflow (``enabled: false`` makes it a no-op)."""

    def __init__(self, settings: TrackingConfig | Mapping[str, Any]):
        """``settings``: the cell's ``tracking`` (typed), or the sweep's ``tracking`` node."""
        def get(key, default=None):
            if isinstance(settings, Mapping):
                return settings.get(key, default)
            return getattr(settings, key, default)

        self.enabled = bool(get("enabled", False))
        self.uri = get("uri")
        self.experiment = get("experiment") or "l2d-bench"
        self.artifact_location = get("artifact_location")
        self._ready = False

    def prepare(self) -> str | None:
        """Reach the store, create (and migrate) it and the experiment once, under a lock.

        Returns None when tracking is ready (or disabled), else why it is off. Called
        before a sweep's first job, so concurrent jobs never race on a new store.
        """
        if not self.enabled:
            return None
        try:
            self._setup()
        except TrackingUnavailable as err:
            return str(err)
        return None

    def _setup(self) -> None:
        if self.uri in _UNAVAILABLE:
            raise TrackingUnavailable(_UNAVAILABLE[self.uri])
        problem = server_problem(self.uri or "")
        if problem:
            _UNAVAILABLE[self.uri] = problem
            raise TrackingUnavailable(problem)
        mlflow = import_mlflow()
        with _store_lock(self.uri):
            db = local_store(self.uri)
            if db is not None:
                ensure_local_store(db)
            if self.uri:
                mlflow.set_tracking_uri(self.uri)
            if mlflow.get_experiment_by_name(self.experiment) is None and self.artifact_location:
                # an SQLite store would otherwise put artifacts in ./mlruns of the current dir
                location = Path(self.artifact_location)
                location.mkdir(parents=True, exist_ok=True)
                mlflow.create_experiment(self.experiment, artifact_location=location.resolve().as_uri())
            mlflow.set_experiment(self.experiment)
        self._ready = True

    def log(self, record: ResultRecord, cell: CellConfig) -> str | None:
        """Log one cell's record as the cell's only run; returns its id (None when disabled).

        Runs are found by the ``cell_id`` tag (a hash of the cell key): an earlier run of
        the same cell (a ``force=true`` re-run, a failed attempt) is deleted and replaced.
        """
        if not self.enabled:
            return None
        mlflow = import_mlflow()
        if not self._ready:
            self._setup()
        settings, cell = cell, record["cell"]
        cell_id = stable_hash(dict(cell))
        for old in mlflow.search_runs(filter_string=f"tags.cell_id = '{cell_id}'", output_format="list"):
            mlflow.delete_run(old.info.run_id)
        with mlflow.start_run(run_name=run_name(cell)) as run:
            mlflow.log_params({k: str(v)[:500] for k, v in cell_params(record, settings).items()})
            metrics = {}
            for rule, values in (record.get("metrics") or {}).items():
                metrics.update({f"{rule}/{k}": v for k, v in values.items() if v is not None})
            for rule, values in (record.get("validation") or {}).items():
                metrics.update({f"validation/{rule}/{k}": v for k, v in values.items() if v is not None})
            metrics.update({k: v for k, v in (record.get("run_metrics") or {}).items() if v is not None})
            if metrics:
                mlflow.log_metrics(metrics)
            for epoch, values in enumerate(record.get("history") or []):
                mlflow.log_metrics({f"train/{k}": v for k, v in values.items()}, step=epoch)
            mlflow.set_tags({"status": record["status"], "cell_id": cell_id,
                             **{k: str(v)[:5000] for k, v in cell.items()}})
            if record.get("error"):
                mlflow.set_tag("error", record["error"][:5000])
            if record.get("curves"):
                mlflow.log_dict(record["curves"], "curves.json")
            mlflow.log_dict(record.get("provenance") or {}, "provenance.json")
            mlflow.log_dict({k: v for k, v in record.items() if k != "path"}, "result.json")
            mlflow.log_dict(plain(settings), "config.json")
            return run.info.run_id

    def log_sweep(self, experiment_name: str, report_dir: Path, cell_runs: list[str]) -> str | None:
        """A parent run for a finished sweep: the report's files as artifacts, the cells'
        runs as its children; returns its id (None when disabled)."""
        if not self.enabled:
            return None
        mlflow = import_mlflow()
        if not self._ready:
            self._setup()
        with mlflow.start_run(run_name=f"sweep {experiment_name} {time.strftime('%Y-%m-%d %H:%M')}"
                              ) as run:
            mlflow.set_tags({"sweep": experiment_name, "cells": str(len(cell_runs))})
            if report_dir.is_dir():
                mlflow.log_artifacts(str(report_dir), artifact_path="report")
        client = mlflow.MlflowClient()
        for run_id in cell_runs:
            with contextlib.suppress(Exception):  # a run deleted since: nothing to link
                client.set_tag(run_id, "mlflow.parentRunId", run.info.run_id)
        return run.info.run_id


def run_name(cell: Mapping[str, Any]) -> str:
    """``method | workload | missing 0.3 | seed 0 | dataset`` (the parts that differ most
    first, so runs of different workloads never look alike when the name is cut)."""
    return (f"{cell['method']} | {cell['workload']} | missing {cell['missing_rate']:g} | "
            f"seed {cell['seed']} | {cell['dataset']}")[:250]


def cell_params(record: ResultRecord, cell: CellConfig) -> dict[str, Any]:
    """Every setting of a cell as flat MLflow params: the cell key, method options,
    ``train.*``, ``eval.*``, the dataset's identity settings and each agent's bounds."""
    params: dict[str, Any] = {**record["cell"], "method_name": record["method_name"]}
    params.update({f"method.{k}": v for k, v in method_params(cell).items()})
    for section in ("train", "eval"):
        params.update({f"{section}.{k}": v for k, v in dataclasses.asdict(getattr(cell, section)).items()})
    params.update({f"dataset.{k}": v for k, v in flatten(dataset_identity(cell.dataset)).items()})
    bounds = record.get("workload_bounds") or {}
    for agent, lo, hi in zip(record.get("agents") or [], bounds.get("lo", []), bounds.get("hi", [])):
        params[f"bounds.lo/{agent}"], params[f"bounds.hi/{agent}"] = lo, hi
    params["workload.coverage"] = cell.workload.coverage
    return params


_MLFLOW: list[Any] = []
_CHECKED_STORES: set[Path] = set()  # local stores found whole in this process


def import_mlflow():
    """mlflow, imported once (call from the main thread before starting threads: two threads
    importing it at once can see a partially initialised module)."""
    if not _MLFLOW:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        _MLFLOW.append(mlflow)
    return _MLFLOW[0]


class HalfMadeStore(TrackingUnavailable):
    """A local store left half-made by a killed process that still holds runs."""


def store_runs(db: Path) -> int | None:
    """How many runs a local store holds; None when it cannot be read as a store."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
            return int(connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
    except sqlite3.Error:
        return None


def store_opens(db: Path) -> bool:
    """Whether mlflow opens the local store ``db`` (migrating it if it must). Tried on a copy:
    mlflow keeps an engine per store address, which must never point at a file that is
    then moved aside (hence a new address for every check and every creation)."""
    mlflow = import_mlflow()
    trial = db.with_name(f".{db.name}.check-{uuid.uuid4().hex}")  # a new address every time
    try:
        shutil.copyfile(db, trial)
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{trial}").search_experiments()
        return True
    except Exception:  # noqa: BLE001 (a store mlflow cannot open, whatever the reason)
        return False
    finally:
        trial.unlink(missing_ok=True)


def ensure_local_store(db: Path) -> None:
    """Create a new local store completely or not at all: mlflow builds and migrates it under
    a temporary name, renamed into place when done (a kill leaves only the temporary file).
    A store that exists but was never finished (an older version killed mid-creation) is
    moved aside when it holds no run, with a message; one that holds runs is explained."""
    mlflow = import_mlflow()
    if db in _CHECKED_STORES and db.is_file():
        return
    if db.is_file():
        if store_opens(db):
            _CHECKED_STORES.add(db)
            return
        runs = store_runs(db)
        if runs:
            raise HalfMadeStore(
                f"the MLflow store {db} cannot be opened but holds {runs} runs; try "
                f"`.venv/bin/mlflow db upgrade sqlite:///{db}`, or move it away (mv {db} {db}.old) "
                "and re-run (the records are complete; cells are tracked again)")
        aside = db.with_name(f"{db.name}.half-made-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(db, aside)
        print(f"[l2d-bench] the MLflow store {db} was left half-made (a run killed while creating "
              f"it; it held no run): moved to {aside}, creating a new one.", flush=True)
    db.parent.mkdir(parents=True, exist_ok=True)
    building = db.with_name(f".{db.name}.creating-{uuid.uuid4().hex}")  # a new address: no cache
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{building}")
    client.search_experiments()  # creates the tables and runs every migration
    del client
    os.replace(building, db)
    _CHECKED_STORES.add(db)
