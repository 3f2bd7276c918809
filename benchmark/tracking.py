"""MLflow tracking: the only module that imports mlflow.

One MLflow run per grid cell (found by the ``cell_id`` tag, a hash of ``core.spec.CellKey``):

* params: the cell key, every method option (``method.params.<option>``, as overrides write
  it), ``train.*``, ``eval.*``, the dataset settings that define the data, the tuned preset
  applied (``variant.tuned_preset``) and the workload bounds of every agent
  (``bounds.lo/classifier``);
* metrics: the training metrics of every epoch (``train/loss`` at step = epoch), and what is
  measured once training is over at step = the last epoch: per decision rule on the test set
  (``constrained/accuracy``...) and on the validation split (``validation/constrained/...``),
  and the run metrics;
* artifacts: the result record, the cell's resolved configuration, the accuracy-coverage
  curve and the provenance.

A run is created whole or not at all: one cut short (a full disk, a lost server) is deleted,
and a cell's earlier runs are deleted only once its new run is complete. Experiments are
tagged as model training, so ``mlflow ui`` opens them on their runs. A sweep has one parent
run (found by the ``sweep_id`` tag), holding its report; a re-run adds what changed to it.

Stores: a local SQLite store is created under a temporary name and renamed into place once
complete. An existing one that MLflow cannot open is moved aside only when reading it with
sqlite shows it holds no run; otherwise (it holds runs, or its runs cannot be counted)
``StoreNeedsRepair`` says how to repair or move it, and it is left as it is. A tracking
server gets a health check (connect and read time-outs of ``CONNECT_TIMEOUT_S``) and MLflow
requests time out after ``REQUEST_TIMEOUT_S``; the first time-out turns tracking off for the
rest of the process (records never depend on tracking, and the next run tracks the cells).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import logging
import os
import shutil
import sqlite3
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

from benchmark.config import CellConfig, TrackingConfig, method_params
from benchmark.identity import dataset_identity, plain
from core.files import exclusive_lock
from core.labels import flatten, stable_hash
from core.spec import ResultRecord

CONNECT_TIMEOUT_S = 3.0  # a tracking server's health check: connect, then read its answer
REQUEST_TIMEOUT_S = 5  # each MLflow request to a server (connect and read), no retry
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI's training view
_UNAVAILABLE: dict[str | None, str] = {}  # tracking URI -> why it cannot be used (per process)
_EXPERIMENTS: dict[tuple[str | None, str], str] = {}  # (URI, experiment name) -> its id, once ready


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; the sweep goes on without tracking."""


class StoreNeedsRepair(RuntimeError):
    """A local store MLflow cannot open that holds runs, or whose runs cannot be counted: it
    is left as it is, and no cell runs until it is repaired or moved away."""


def server_problem(uri: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """For an http(s) URI, why its server cannot be used (None when it answers a request to
    ``/health`` within ``timeout`` seconds, whatever the answer)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
        return None
    except urllib.error.HTTPError:  # an answer (an error status, authentication...): it is up
        return None
    except urllib.error.URLError as err:  # no connection
        if isinstance(err.reason, ssl.SSLError):  # it answers; TLS settings are MLflow's to judge
            return None
        why = f"does not answer ({err.reason})"
    except (OSError, http.client.HTTPException) as err:  # connected, but no (HTTP) answer
        why = (f"accepts connections but does not answer within {timeout:g} s"
               if isinstance(err, TimeoutError) else f"does not answer ({type(err).__name__}: {err})")
    return f"tracking server {uri} {why}; tracking is off for this run"


def local_store(uri: str | None) -> Path | None:
    """The database file of a local (SQLite) store URI; None for a server or no URI."""
    return Path(uri.removeprefix("sqlite:///")) if uri and uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _store_lock(uri: str | None) -> Iterator[None]:
    """Serialise store creation, migration and sweep runs between processes (SQLite stores)."""
    db = local_store(uri)
    if db is None:
        yield
        return
    with exclusive_lock(db.with_name(db.name + ".lock")):
        yield


@contextlib.contextmanager
def _answered(uri: str | None, say: bool = True) -> Iterator[None]:
    """MLflow calls to a server: a request that gets no answer (a time-out, a refused or
    reset connection) turns tracking off for the rest of the process, said once on stderr
    (unless ``say`` is off: the caller says it), and raises ``TrackingUnavailable``."""
    try:
        yield
    except Exception as err:
        import requests  # what MLflow's client sends requests with

        no_answer = (isinstance(err, requests.exceptions.RequestException)  # not an error status
                     or "failed with exception" in str(err))
        if local_store(uri) is not None or not no_answer:
            raise  # an answer (an error status) or a local store: this call's error only
        limit = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", REQUEST_TIMEOUT_S)
        why = (f"did not answer within {limit} s" if "timed out" in str(err)
               else f"did not answer ({str(err)[:300]})")
        if uri not in _UNAVAILABLE:
            _UNAVAILABLE[uri] = f"tracking server {uri} {why}; tracking is off for the rest of this run"
            if say:
                print(f"[l2d-bench] {_UNAVAILABLE[uri]} (the records are complete; the next run "
                      "tracks these cells).", file=sys.stderr, flush=True)
        raise TrackingUnavailable(_UNAVAILABLE[uri]) from None


class Tracker:
    """Logs result records to MLflow (``enabled: false`` makes it a no-op)."""

    def __init__(self, settings: TrackingConfig | Mapping[str, Any]):
        """``settings``: the cell's ``tracking`` (typed), or the sweep's ``tracking`` node."""
        def get(key, default=None):
            if isinstance(settings, Mapping):
                return settings.get(key, default)
            return getattr(settings, key, default)

        self.enabled = bool(get("enabled", False))
        self.uri: str | None = get("uri")
        self.experiment: str = get("experiment") or "l2d-bench"
        self.artifact_location: str | None = get("artifact_location")

    def prepare(self) -> str | None:
        """Reach the store, create (and migrate) it and the experiment once, under a lock.

        Returns None when tracking is ready (or disabled), else why it is off. Called
        before a sweep's first job, so concurrent jobs never race on a new store.
        """
        if not self.enabled:
            return None
        try:
            self._experiment_id(say=False)  # the caller says why tracking is off
        except TrackingUnavailable as err:
            return str(err)
        return None

    def check_store(self) -> None:
        """Raise ``StoreNeedsRepair`` when the local store exists but MLflow cannot open it
        and it may hold runs (one that holds no run is moved aside and made again); nothing
        to do for a server, no store yet or tracking off."""
        db = local_store(self.uri) if self.enabled else None
        if db is not None and db.is_file() and db not in _CHECKED_STORES:
            import_mlflow()
            with _store_lock(self.uri):
                ensure_local_store(db)

    def unavailable(self) -> bool:
        """Whether this process already found the store unreachable (tracking is off)."""
        return self.uri in _UNAVAILABLE

    def _client(self):
        return import_mlflow().MlflowClient(tracking_uri=self.uri)

    def _experiment_id(self, say: bool = True) -> str:
        """The experiment's id, creating the store and the experiment if needed (once per
        process); raises ``TrackingUnavailable`` when the store cannot be reached."""
        known = _EXPERIMENTS.get((self.uri, self.experiment))
        store = local_store(self.uri)
        if known is not None and (store is None or store.is_file()):
            return known
        if self.uri in _UNAVAILABLE:
            raise TrackingUnavailable(_UNAVAILABLE[self.uri])
        problem = server_problem(self.uri or "")
        if problem:
            _UNAVAILABLE[self.uri] = problem
            raise TrackingUnavailable(problem)
        mlflow = import_mlflow()
        with _store_lock(self.uri), _answered(self.uri, say):
            db = local_store(self.uri)
            if db is not None:
                ensure_local_store(db)
            client = self._client()
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is None:
                location = None
                if self.artifact_location:  # else an SQLite store's artifacts go to ./mlruns
                    folder = Path(self.artifact_location)
                    folder.mkdir(parents=True, exist_ok=True)
                    location = folder.resolve().as_uri()
                try:
                    experiment_id = client.create_experiment(
                        self.experiment, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
                except mlflow.exceptions.MlflowException:  # another process made it meanwhile
                    experiment = client.get_experiment_by_name(self.experiment)
                    if experiment is None:
                        raise
            if experiment is not None:
                experiment_id = experiment.experiment_id
                if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
                    client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)  # an older one
        _EXPERIMENTS[(self.uri, self.experiment)] = experiment_id
        return experiment_id

    def holds_run(self, run_id: str) -> bool | None:
        """Whether the store holds ``run_id`` as an active run; None when that cannot be
        told (tracking off, a server that does not answer, a busy store). A local store that
        cannot be read raises ``StoreNeedsRepair``."""
        if not self.enabled:
            return None
        db = local_store(self.uri)
        if db is not None:
            return store_holds_run(db, run_id)
        mlflow = import_mlflow()
        try:
            self._experiment_id()
            with _answered(self.uri):
                run = self._client().get_run(run_id)
        except TrackingUnavailable:
            return None
        except mlflow.exceptions.MlflowException as err:
            return False if err.error_code == "RESOURCE_DOES_NOT_EXIST" else None
        return run.info.lifecycle_stage == "active"

    def log(self, record: ResultRecord, cell: CellConfig) -> str | None:
        """Log one cell's record as the cell's only run; returns its id (None when disabled).

        The new run is logged whole (or deleted if it cannot be: no FAILED or half-logged
        run is left); then the cell's earlier runs (a ``force=true`` re-run, an attempt cut
        short), found by the ``cell_id`` tag, are deleted.
        """
        if not self.enabled:
            return None
        experiment_id = self._experiment_id()
        key = record["cell"]
        cell_id = stable_hash(dict(key))
        with _answered(self.uri):
            client = self._client()
            run_id = client.create_run(experiment_id, run_name=run_name(key),
                                       tags={"cell_id": cell_id}).info.run_id
            try:
                _log_cell(client, run_id, record, cell)
                client.set_terminated(run_id)
            except BaseException:
                with contextlib.suppress(Exception):
                    client.delete_run(run_id)
                raise
            for old in client.search_runs([experiment_id], f"tags.cell_id = '{cell_id}'"):
                if old.info.run_id != run_id:
                    client.delete_run(old.info.run_id)
        return run_id

    def log_sweep(self, experiment_name: str, report_dir: Path, cell_runs: list[str]) -> str | None:
        """The sweep's parent run (one per experiment name and report folder: a re-run finds
        it again): the report's files as artifacts when they changed, the cells' runs as its
        children; returns its id (None when disabled)."""
        if not self.enabled:
            return None
        experiment_id = self._experiment_id()
        report_dir = Path(report_dir)
        sweep_id = stable_hash([experiment_name, str(report_dir.resolve())])
        report = folder_digest(report_dir)
        children = stable_hash(sorted(cell_runs))
        with _store_lock(self.uri), _answered(self.uri):
            client = self._client()
            found = client.search_runs([experiment_id], f"tags.sweep_id = '{sweep_id}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
            if found:
                run_id, tags = found[0].info.run_id, found[0].data.tags
            else:
                run_id = client.create_run(experiment_id, run_name=f"sweep {experiment_name}", tags={
                    "sweep": experiment_name, "sweep_id": sweep_id}).info.run_id
                tags = {}
            try:
                if report is not None and tags.get("report_digest") != report:
                    client.log_artifacts(run_id, str(report_dir), artifact_path="report")
                    client.set_tag(run_id, "report_digest", report)
                if tags.get("children") != children:
                    for child in cell_runs:
                        with contextlib.suppress(Exception):  # a run deleted since: nothing to link
                            client.set_tag(child, "mlflow.parentRunId", run_id)
                    client.set_tag(run_id, "cells", str(len(cell_runs)))
                    client.set_tag(run_id, "children", children)
                if not found:
                    client.set_terminated(run_id)
            except BaseException:
                if not found:
                    with contextlib.suppress(Exception):
                        client.delete_run(run_id)
                raise
        return run_id


def _log_cell(client, run_id: str, record: ResultRecord, cell: CellConfig) -> None:
    """Params, metrics, tags and artifacts of a cell's run (see the module's docstring)."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    history = record.get("history") or []
    after_training = max(len(history) - 1, 0)  # the step of what is measured after the last epoch
    values: list[tuple[str, Any, int]] = []
    for rule, metrics in (record.get("metrics") or {}).items():
        values += [(f"{rule}/{k}", v, after_training) for k, v in metrics.items()]
    for rule, metrics in (record.get("validation") or {}).items():
        values += [(f"validation/{rule}/{k}", v, after_training) for k, v in metrics.items()]
    values += [(k, v, after_training) for k, v in (record.get("run_metrics") or {}).items()]
    for epoch, metrics in enumerate(history):
        values += [(f"train/{k}", v, epoch) for k, v in metrics.items()]
    tags = {"status": record["status"], **{k: str(v) for k, v in record["cell"].items()}}
    error = record.get("error")
    if error:
        tags["error"] = error
    client.log_batch(
        run_id,
        metrics=[Metric(name, float(value), now, step) for name, value, step in values
                 if value is not None],
        params=[Param(k, str(v)[:500]) for k, v in cell_params(record, cell).items()],
        tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
    if record.get("curves"):
        client.log_dict(run_id, record["curves"], "curves.json")
    client.log_dict(run_id, record.get("provenance") or {}, "provenance.json")
    client.log_dict(run_id, {k: v for k, v in record.items() if k != "path"}, "result.json")
    client.log_dict(run_id, plain(cell), "config.json")


def run_name(cell: Mapping[str, Any]) -> str:
    """``method | workload | missing 0.3 | seed 0 | dataset`` (the parts that differ most
    first, so runs of different workloads never look alike when the name is cut)."""
    return (f"{cell['method']} | {cell['workload']} | missing {cell['missing_rate']:g} | "
            f"seed {cell['seed']} | {cell['dataset']}")[:250]


def cell_params(record: ResultRecord, cell: CellConfig) -> dict[str, Any]:
    """Every setting of a cell as flat MLflow params named as overrides write them: the cell
    key, ``method.params.*``, ``train.*``, ``eval.*``, the dataset's identity settings,
    ``variant.tuned_preset`` and each agent's bounds."""
    params: dict[str, Any] = {**record["cell"], "method_name": record["method_name"]}
    params.update({f"method.params.{k}": v for k, v in method_params(cell).items()})
    for section in ("train", "eval"):
        params.update({f"{section}.{k}": v for k, v in dataclasses.asdict(getattr(cell, section)).items()})
    params.update({f"dataset.{k}": v for k, v in flatten(dataset_identity(cell.dataset)).items()})
    params["variant.tuned_preset"] = (record.get("variant") or {}).get("tuned_preset")
    bounds = record.get("workload_bounds") or {}
    for agent, lo, hi in zip(record.get("agents") or [], bounds.get("lo", []), bounds.get("hi", [])):
        params[f"bounds.lo/{agent}"], params[f"bounds.hi/{agent}"] = lo, hi
    params["workload.coverage"] = cell.workload.coverage
    return params


def folder_digest(folder: Path) -> str | None:
    """A hash of every file's path and content below ``folder``; None when it is absent."""
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:20]


_MLFLOW: list[Any] = []
_CHECKED_STORES: set[Path] = set()  # local stores found whole in this process


def import_mlflow():
    """mlflow, imported once (call from the main thread before starting threads: two threads
    importing it at once can see a partially initialised module)."""
    if not _MLFLOW:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(REQUEST_TIMEOUT_S))
        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        _MLFLOW.append(mlflow)
    return _MLFLOW[0]


@contextlib.contextmanager
def _quiet_store_logs() -> Iterator[None]:
    """Silence MLflow's, Alembic's and SQLAlchemy's logs (a failed open logs a long
    SQLAlchemy traceback): the caller explains the outcome in one paragraph."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic", "sqlalchemy")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _read_only(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)


def read_run_count(db: Path) -> tuple[int | None, str | None]:
    """(how many runs the local store holds, None) read with sqlite itself: 0 when it has no
    ``runs`` table (a store never finished); (None, sqlite's error) when it cannot be read
    (a damaged file: it may hold runs)."""
    try:
        with contextlib.closing(_read_only(db)) as connection:
            tables = {name for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "runs" not in tables:
                return 0, None
            return int(connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0]), None
    except sqlite3.Error as err:
        return None, str(err)


def store_holds_run(db: Path, run_id: str) -> bool | None:
    """Whether the local store ``db`` holds ``run_id`` as an active run, read with sqlite
    (False when there is no store or no ``runs`` table; None when it is busy). A store that
    sqlite cannot read raises ``StoreNeedsRepair``."""
    if not db.is_file():
        return False
    try:
        with contextlib.closing(_read_only(db)) as connection:
            if connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'"
                                  ).fetchone() is None:
                return False
            row = connection.execute("SELECT lifecycle_stage FROM runs WHERE run_uuid = ?",
                                     (run_id,)).fetchone()
    except sqlite3.Error as err:
        if "locked" in str(err) or "busy" in str(err):  # a writer for longer than sqlite waits
            return None
        raise StoreNeedsRepair(repair_advice(db, None, str(err))) from None
    return row is not None and row[0] == "active"


def store_open_error(db: Path) -> str | None:
    """Why mlflow cannot open the local store ``db`` (migrating it if it must); None when it
    can. Tried on a copy: mlflow keeps an engine per store address, which must never point at
    a file that is then moved aside (hence a new address for every check and creation)."""
    mlflow = import_mlflow()
    trial = db.with_name(f".{db.name}.check-{uuid.uuid4().hex}")  # a new address every time
    try:
        shutil.copyfile(db, trial)
        with _quiet_store_logs():
            mlflow.MlflowClient(tracking_uri=f"sqlite:///{trial}").search_experiments()
        return None
    except Exception as err:  # noqa: BLE001 (a store mlflow cannot open, whatever the reason)
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    finally:
        trial.unlink(missing_ok=True)


def repair_advice(db: Path, runs: int | None, problem: str) -> str:
    """The one paragraph that stops a run on a store that cannot be opened and may hold runs."""
    if runs is None:
        what = (f"the MLflow store {db} is damaged (sqlite cannot read it: {problem}), so it may "
                "hold runs")
        fix = f"restore it from a backup, or move it away: mv {db} {db}.damaged"
    else:
        what = f"MLflow cannot open the store {db} ({problem}), which holds {runs} runs"
        fix = (f"if an older MLflow made it, upgrade it: .venv/bin/mlflow db upgrade sqlite:///{db}; "
               f"else move it away: mv {db} {db}.old")
    return (f"{what}. It is left as it is and no cell runs until it is repaired or moved. To go "
            f"on, {fix}; then re-run the same command (finished cells are kept, and every cell "
            "whose run is not in the store is tracked again).")


def ensure_local_store(db: Path) -> None:
    """Make sure MLflow can use the local store ``db`` (call under the store lock).

    A new store is created completely or not at all: mlflow builds and migrates it under a
    temporary name, renamed into place when done (a kill leaves only the temporary file). A
    store that exists but cannot be opened is moved aside, with a message, only when reading
    it with sqlite shows it holds no run (a store never finished); one that holds runs, or
    whose runs cannot be counted, raises ``StoreNeedsRepair`` and is left as it is.
    """
    mlflow = import_mlflow()
    if db in _CHECKED_STORES and db.is_file():
        return
    if db.is_file():
        runs, unreadable = read_run_count(db)
        problem = unreadable or store_open_error(db)
        if problem is None:
            _CHECKED_STORES.add(db)
            return
        if runs != 0:
            raise StoreNeedsRepair(repair_advice(db, runs, problem))
        aside = db.with_name(f"{db.name}.half-made-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(db, aside)
        print(f"[l2d-bench] the MLflow store {db} was left half-made (a run killed while creating "
              f"it; sqlite finds no run in it): moved to {aside}, creating a new one.", flush=True)
    db.parent.mkdir(parents=True, exist_ok=True)
    building = db.with_name(f".{db.name}.creating-{uuid.uuid4().hex}")  # a new address: no cache
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{building}")
    client.search_experiments()  # creates the tables and runs every migration
    del client
    os.replace(building, db)
    _CHECKED_STORES.add(db)
