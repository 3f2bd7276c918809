"""MLflow tracking: the only module that imports mlflow.

One MLflow run per grid cell (found by the cell key, ``core.spec.CellKey``): params
(cell, method, training), metrics per decision rule (``argmax/accuracy``, ``constrained/accuracy``...), the accuracy-coverage curve and the
provenance as JSON artifacts, and the result record itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Mapping

from benchmark.config import CellConfig, TrackingConfig, method_params
from core.labels import stable_hash
from core.spec import ResultRecord
from core.files import exclusive_lock


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
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        if self.uri:
            mlflow.set_tracking_uri(self.uri)
        with _store_lock(self.uri):
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
        import mlflow

        if not self._ready:
            self._setup()
        settings, cell = cell, record["cell"]
        cell_id = stable_hash(dict(cell))
        for old in mlflow.search_runs(filter_string=f"tags.cell_id = '{cell_id}'", output_format="list"):
            mlflow.delete_run(old.info.run_id)
        name = "-".join(str(cell[k]) for k in ("method", "dataset", "missing_rate", "workload", "seed"))
        params = {**cell, "method_name": record["method_name"],
                  **{f"method.{k}": v for k, v in method_params(settings).items()},
                  **{f"train.{k}": v for k, v in dataclasses.asdict(settings.train).items()}}
        with mlflow.start_run(run_name=name[:250]) as run:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            metrics = {}
            for rule, values in (record.get("metrics") or {}).items():
                metrics.update({f"{rule}/{k}": v for k, v in values.items() if v is not None})
            metrics.update({k: v for k, v in (record.get("run_metrics") or {}).items() if v is not None})
            if metrics:
                mlflow.log_metrics(metrics)
            mlflow.set_tags({"status": record["status"], "cell_id": cell_id,
                             **{k: str(v)[:5000] for k, v in cell.items()}})
            if record.get("error"):
                mlflow.set_tag("error", record["error"][:5000])
            if record.get("curves"):
                mlflow.log_dict(record["curves"], "curves.json")
            mlflow.log_dict(record.get("provenance") or {}, "provenance.json")
            return run.info.run_id
