"""MLflow tracking: one run per cell whatever runs at the same time, no half-logged run,
stores that cannot be opened explained in one paragraph, servers that never answer."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest

import benchmark.tracking as tracking
from benchmark.runner import run_cell
from benchmark.tracking import StoreNeedsRepair, Tracker
from tests.conftest import tiny_overrides
from tests.test_pipeline import compose_cfg, flat, run_cli


def tracked_overrides(tiny_root, tmp_path, *extra: str) -> list[str]:
    """The tiny dataset's overrides with tracking to ``<tmp_path>/mlflow.db``."""
    return [o if o != "tracking=none" else "tracking=mlflow"
            for o in tiny_overrides(tiny_root, tmp_path)] + list(extra)


def runs_in_store(db: Path) -> list[dict]:
    """Every run of a local store, deleted ones too, read with sqlite: id, status,
    lifecycle stage and ``cell_id`` tag."""
    with contextlib.closing(sqlite3.connect(db)) as connection:
        rows = connection.execute(
            "SELECT runs.run_uuid, runs.status, runs.lifecycle_stage, tags.value FROM runs "
            "LEFT JOIN tags ON tags.run_uuid = runs.run_uuid AND tags.key = 'cell_id'").fetchall()
    return [dict(zip(("id", "status", "stage", "cell_id"), row)) for row in rows]


@pytest.fixture(autouse=True)
def fresh_tracking(monkeypatch):
    """Each test as a new process sees it: no store checked, no experiment or server known."""
    monkeypatch.setattr(tracking, "_CHECKED_STORES", set())
    monkeypatch.setattr(tracking, "_EXPERIMENTS", {})
    monkeypatch.setattr(tracking, "_UNAVAILABLE", {})


def record_of(tmp_path: Path) -> tuple[Path, dict]:
    (path,) = (tmp_path / "runs/single").rglob("result.json")
    return path, json.loads(path.read_text())


# ------------------------------------------------------------------ one run per cell


def test_two_processes_tracking_one_finished_cell_make_one_run(tiny_root, tmp_path, monkeypatch):
    """Two runs of the same command reach a finished cell that is not tracked yet at the same
    moment: the tracking happens under the cell's lock, so exactly one MLflow run is ever
    created for it (the slow log below leaves time for a second one otherwise)."""
    untracked, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path))
    assert run_cell(untracked, choices)["status"] == "ok"  # a record without a run id
    cfg, _ = compose_cfg(tracked_overrides(tiny_root, tmp_path))
    Tracker(cfg.tracking).prepare()
    original = Tracker.log

    def slow_log(self, record, cell):
        time.sleep(1.0)
        return original(self, record, cell)

    monkeypatch.setattr(Tracker, "log", slow_log)
    start = threading.Barrier(2)
    outcomes = []

    def sweep():
        start.wait()
        outcomes.append(run_cell(cfg, choices))

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o["status"] for o in outcomes) == ["skipped", "skipped"]
    assert sorted(bool(o.get("tracked_again")) for o in outcomes) == [False, True]
    runs = runs_in_store(tmp_path / "mlflow.db")
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED" and runs[0]["stage"] == "active"
    _, record = record_of(tmp_path)
    assert record["mlflow_run_id"] == runs[0]["id"] and record["status"] == "ok"


# ------------------------------------------------------------------ a full disk


def test_a_run_cut_short_by_a_full_disk_is_deleted_and_the_cell_tracked_next_time(
        tiny_root, tmp_path, monkeypatch):
    """Writing the run's artifacts fails (no space left): the half-logged run is deleted (no
    FAILED run), the record is whole and says why it is not tracked; when even the deletion
    fails, the run left behind is replaced the next time. Then the cell is tracked once."""
    import mlflow

    cfg, choices = compose_cfg(tracked_overrides(tiny_root, tmp_path))
    db = tmp_path / "mlflow.db"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    log_dict, delete_run = mlflow.MlflowClient.log_dict, mlflow.MlflowClient.delete_run
    monkeypatch.setattr(mlflow.MlflowClient, "log_dict", full_disk)
    first = run_cell(cfg, choices)
    assert first["status"] == "ok" and first["mlflow_run_id"] is None
    assert "No space left on device" in first["tracking_error"]
    runs = runs_in_store(db)
    assert len(runs) == 1 and runs[0]["stage"] == "deleted"  # no FAILED or half-logged run left
    path, record = record_of(tmp_path)
    assert record["metrics"] == first["metrics"] and "No space left" in record["tracking_error"]

    monkeypatch.setattr(mlflow.MlflowClient, "delete_run", full_disk)  # the deletion fails too
    again = run_cell(cfg, choices)
    assert again["status"] == "skipped" and not again.get("tracked_again")
    stranded = [r for r in runs_in_store(db) if r["stage"] == "active"]
    assert len(stranded) == 1 and stranded[0]["status"] == "RUNNING"

    monkeypatch.setattr(mlflow.MlflowClient, "log_dict", log_dict)  # space again
    monkeypatch.setattr(mlflow.MlflowClient, "delete_run", delete_run)
    resumed = run_cell(cfg, choices)
    assert resumed["status"] == "skipped" and resumed["tracked_again"]
    active = [r for r in runs_in_store(db) if r["stage"] == "active"]
    assert len(active) == 1 and active[0]["status"] == "FINISHED"
    _, record = record_of(tmp_path)
    assert record["mlflow_run_id"] == active[0]["id"] and "tracking_error" not in record
    assert record["metrics"] == first["metrics"]


def test_truncated_compilation_cache_entries_are_removed_before_use(tmp_path, capfd):
    """JAX writes an entry in place and never rewrites it: one cut short (a full disk) would
    warn on every later run. Settled entries JAX cannot decompress are removed, with one
    line; whole entries and entries still being written (recent) are kept."""
    import jax
    from jax._src.compilation_cache import compress_executable

    from benchmark.training import remove_truncated_entries, use_compilation_cache

    whole = compress_executable(bytes(range(256)) * 64)
    entries = {"jit_a-1-cache": whole, "jit_b-2-cache": whole[: len(whole) // 2],
               "jit_c-3-cache": whole[: len(whole) // 3]}
    for name, data in entries.items():
        (tmp_path / name).write_bytes(data)
    old = time.time() - 600
    for name in ("jit_a-1-cache", "jit_b-2-cache"):
        os.utime(tmp_path / name, (old, old))
    assert remove_truncated_entries(tmp_path) == [tmp_path / "jit_b-2-cache"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jit_a-1-cache", "jit_c-3-cache"]

    os.utime(tmp_path / "jit_c-3-cache", (old, old))  # settled now: a truncated entry
    previous = jax.config.jax_compilation_cache_dir
    try:
        use_compilation_cache(tmp_path)
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
    assert ("[l2d-bench] removed 1 truncated entries of the JAX compilation cache "
            f"{tmp_path}") in capfd.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["jit_a-1-cache"]


@pytest.mark.slow
def test_a_resumed_run_after_truncated_cache_entries_does_not_warn(tiny_root, tmp_path):
    """End to end: every entry of a run's JAX cache cut in half (as a full disk leaves them);
    the next run removes them (one line) and JAX never warns about reading one."""
    cache = tmp_path / "jax"
    args = ["experiment=smoke", *tiny_overrides(tiny_root, tmp_path), "train.epochs=1",
            "method=classifier_only", "workload=none", f"jax_cache_dir={cache}"]
    assert run_cli(*args).returncode == 0
    entries = list(cache.glob("*-cache"))
    assert entries
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
        os.utime(entry, (time.time() - 600, time.time() - 600))
    resumed = run_cli(*args, "force=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"removed {len(entries)} truncated entries of the JAX compilation cache" in flat(resumed.stderr)
    assert "Error reading persistent compilation cache" not in resumed.stderr


# ------------------------------------------------------------------ stores that cannot be opened


def made_store(tmp_path: Path, runs: int) -> Path:
    """A complete local store holding ``runs`` runs, made by MLflow."""
    import mlflow

    tracker = Tracker({"enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "x",
                       "artifact_location": str(tmp_path / "mlartifacts")})
    assert tracker.prepare() is None
    client = mlflow.MlflowClient(tracking_uri=tracker.uri)
    for _ in range(runs):
        client.set_terminated(client.create_run(tracking._EXPERIMENTS[(tracker.uri, "x")]).info.run_id)
    return tmp_path / "mlflow.db"


def drop_experiments(db: Path) -> None:
    with contextlib.closing(sqlite3.connect(db)) as connection:
        connection.executescript("PRAGMA foreign_keys = OFF; DROP TABLE experiments;")


def check(db: Path) -> None:
    """What a new process does with the store before its first cell."""
    tracking._CHECKED_STORES.clear()
    tracking._EXPERIMENTS.clear()
    Tracker({"enabled": True, "uri": f"sqlite:///{db}"}).check_store()


def test_a_store_without_experiments_table_and_no_run_is_moved_aside_in_one_line(tmp_path, capfd):
    db = made_store(tmp_path, runs=0)
    drop_experiments(db)
    capfd.readouterr()
    check(db)
    out = capfd.readouterr()
    said = (out.out + out.err).strip()
    assert said.count("\n") == 0 and "Traceback" not in said and "SQLAlchemy" not in said, said
    assert f"the MLflow store {db} was left half-made" in said and "sqlite finds no run in it" in said
    (aside,) = tmp_path.glob("mlflow.db.half-made-*")
    assert f"moved to {aside}" in said
    assert db.is_file() and tracking.read_run_count(db) == (0, None)  # a new, complete store


def test_a_store_without_experiments_table_that_holds_runs_is_explained_and_kept(tmp_path, capfd):
    db = made_store(tmp_path, runs=2)
    drop_experiments(db)
    before = db.read_bytes()
    capfd.readouterr()
    with pytest.raises(StoreNeedsRepair) as err:
        check(db)
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""  # no SQLAlchemy log: the exception is the paragraph
    message = str(err.value)
    assert "\n" not in message and f"MLflow cannot open the store {db}" in message
    assert "which holds 2 runs" in message
    assert f".venv/bin/mlflow db upgrade sqlite:///{db}" in message and f"mv {db} {db}.old" in message
    assert db.read_bytes() == before and not list(tmp_path.glob("mlflow.db.half-made-*"))


def test_a_store_sqlite_cannot_read_is_treated_as_holding_runs(tmp_path):
    """Truncated anywhere, sqlite cannot read even its schema (tried from 4 KB to 95% of a
    2 MB store): its run count is unknown, so it is never moved aside or replaced."""
    db = made_store(tmp_path, runs=3)
    size = db.stat().st_size
    for cut in (4096, size // 3, size * 9 // 10):
        with open(db, "r+b") as handle:
            handle.truncate(cut)
        count, problem = tracking.read_run_count(db)
        assert count is None and "malformed" in problem
        with pytest.raises(StoreNeedsRepair) as err:
            check(db)
        assert f"the MLflow store {db} is damaged (sqlite cannot read it" in str(err.value)
        assert f"mv {db} {db}.damaged" in str(err.value)
        assert db.stat().st_size == cut and not list(tmp_path.glob("mlflow.db.half-made-*"))
    with pytest.raises(StoreNeedsRepair):  # asking for a run reads it too
        tracking.store_holds_run(db, "0" * 32)


# ------------------------------------------------------------------ servers that never answer


def test_a_server_that_accepts_connections_but_never_answers_is_given_up_in_seconds():
    """The kernel completes the connection (a listening socket that never accepts), no answer
    ever comes: the health check gives up after 3 s, once; later checks cost nothing."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        tracker = Tracker({"enabled": True, "uri": uri, "experiment": "x"})
        started = time.monotonic()
        problem = tracker.prepare()
        first = time.monotonic() - started
        assert problem == (f"tracking server {uri} accepts connections but does not answer within "
                           "3 s; tracking is off for this run")
        assert first < 10
        started = time.monotonic()
        assert tracker.prepare() == problem and tracker.unavailable()
        assert time.monotonic() - started < 0.5


class _HealthOnly(http.server.BaseHTTPRequestHandler):
    """Answers ``/health``; every MLflow request hangs (an overloaded or stuck server)."""

    def do_GET(self):
        if self.path.startswith("/health"):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")
            return
        time.sleep(120)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_server_that_stops_answering_costs_one_time_out_said_once_and_summarised(tiny_root, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthOnly)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}"
    try:
        started = time.monotonic()
        result = run_cli("experiment=smoke", *tracked_overrides(tiny_root, tmp_path),
                         "method=best_expert", "workload=none,paper", f"tracking.uri={uri}")  # nothing to train
        elapsed = time.monotonic() - started
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr[-2000:]
    problem = (f"tracking server {uri} did not answer within 5 s; tracking is off for the rest of "
               "this run")
    err = flat(result.stderr)
    assert err.count(f"[l2d-bench] {problem}") == 1  # said once, when it happens
    assert f"MLflow: {problem}; the records are complete." in err  # and in the summary
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs/smoke").rglob("result.json")]
    assert len(records) == 2 and all(r["status"] == "ok" and not r["mlflow_run_id"] for r in records)
    assert elapsed < 90  # each request waited ~100 s before (30 s time-out, 2 retries)
