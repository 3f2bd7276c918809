"""Scale: data-parallel training over local devices, grids through Hydra launchers, and
tracking to an MLflow server."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from core.records import load_records
from tests.conftest import tiny_overrides, write_tiny_dataset
from tests.test_pipeline import run_cli

GRID = ["experiment=smoke", "train.epochs=1", "method=classifier_only,multi_l2d_softmax",
        "workload=none"]  # two cells


def cached_outputs(cache_dir):
    (path,) = list(cache_dir.glob("*.npz"))
    with np.load(path) as saved:
        return saved["test/logits"], saved["test/scores"]


def test_two_local_devices_train_data_parallel_with_the_same_results(tiny_root, tmp_path):
    common = [*tiny_overrides(tiny_root, tmp_path), "experiment=single", "method=multi_l2d_softmax"]
    runs = {}
    for devices in (1, 2):
        env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        result = run_cli(*common, f"output_dir={tmp_path / str(devices)}", env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        (record,) = load_records(tmp_path / str(devices) / "runs/single")
        assert record["run_metrics"]["num_devices"] == devices
        runs[devices] = cached_outputs(tmp_path / str(devices) / "cache/predictions")
    np.testing.assert_allclose(runs[2][0], runs[1][0], rtol=1e-3, atol=1e-3)  # logits
    np.testing.assert_allclose(runs[2][1], runs[1][1], rtol=1e-3, atol=1e-3)  # agent scores


@pytest.fixture(scope="module")
def basic_grid(tmp_path_factory) -> tuple[Path, Path]:
    """GRID on a tiny dataset through the basic (in-process) launcher, the reference of the
    other launchers' runs (which use the same dataset root): (root, output folder)."""
    folder = tmp_path_factory.mktemp("basic_grid")
    root = write_tiny_dataset(folder / "tiny")
    result = run_cli(*GRID, *tiny_overrides(root, folder / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    return root, folder / "out"


def assert_same_grid(launched: Path, basic: Path) -> None:
    """The same cells, all ok, the same metrics (float tolerance) and the same report table."""
    def by_cell(folder):
        return {tuple(sorted(r["cell"].items())): r for r in load_records(folder / "runs/smoke")}

    ours, reference = by_cell(launched), by_cell(basic)
    assert ours.keys() == reference.keys() and len(ours) == 2
    for cell, record in ours.items():
        assert record["status"] == reference[cell]["status"] == "ok", record.get("error")
        assert record["metrics"].keys() == reference[cell]["metrics"].keys()
        for rule, metrics in record["metrics"].items():
            assert metrics == pytest.approx(reference[cell]["metrics"][rule], rel=1e-5, abs=1e-6)
    table = "runs/smoke/report/leaderboard.txt"
    assert (launched / table).read_text() == (basic / table).read_text()


def test_submitit_local_launcher_runs_the_grid_like_the_basic_one(basic_grid, tmp_path):
    root, basic = basic_grid
    launched = run_cli(*GRID, *tiny_overrides(root, tmp_path), "hydra/launcher=submitit_local",
                       "hydra.launcher.timeout_min=20")
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert_same_grid(tmp_path, basic)
    assert "Leaderboard" in launched.stdout


def stop_processes_with(token: str, wait_s: float = 30.0) -> list[str]:
    """Give the processes whose environment holds RAY_AUTH_TOKEN=``token`` (one run's Ray
    instance) ``wait_s`` to exit, kill those left and return their names."""
    marker = f"RAY_AUTH_TOKEN={token}".encode()

    def alive():  # raw /proc: Ray's process titles overwrite the start of their environment
        found = []
        for proc in psutil.process_iter():
            try:
                if marker in Path(f"/proc/{proc.pid}/environ").read_bytes():
                    found.append(proc)
            except (OSError, psutil.Error):  # gone meanwhile, or not readable
                pass
        return found

    deadline = time.monotonic() + wait_s
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(0.5)
    names = []
    for proc in left:
        try:
            names.append(proc.name())
            proc.kill()
        except psutil.Error:
            pass
    return names


def test_ray_launcher_runs_the_grid_like_the_basic_one(basic_grid, tmp_path, monkeypatch):
    """hydra/launcher=ray without RAY_ADDRESS: the run starts its own Ray instance on
    127.0.0.1, runs the cells as Ray tasks and stops the instance when it exits."""
    root, basic = basic_grid
    for name in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):  # a cluster to join;
        monkeypatch.delenv(name, raising=False)  # Ray's switch the run sets for 127.0.0.1
    token = secrets.token_hex(32)  # Ray's token auth, given: none is written to ~/.ray
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-"))  # short: Ray's socket paths are capped
    try:
        launched = run_cli(*GRID, *tiny_overrides(root, tmp_path), "hydra/launcher=ray",
                           "+hydra.launcher.ray.init.num_cpus=1",  # one worker runs both cells
                           env={"RAY_AUTH_TOKEN": token, "RAY_TMPDIR": str(ray_tmp)})
        assert launched.returncode == 0, launched.stderr[-3000:]
        assert "Started a local Ray instance" in launched.stderr
        gcs_log = ray_tmp / "ray/session_latest/logs/gcs_server.out"
        assert "node_address=127.0.0.1" in gcs_log.read_text()
    finally:
        left = stop_processes_with(token)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"the run left Ray processes running: {left}"
    assert_same_grid(tmp_path, basic)
    assert "Leaderboard" in launched.stdout


@pytest.mark.slow
def test_tracking_to_an_mlflow_server(tiny_root, tmp_path):
    """A real `mlflow server` on 127.0.0.1: one run per cell, replaced (not added) on force.
    Slow (~25 s: the server's start and two sweeps). Tracker's logging, one run per cell,
    force and the sweep's parent are the same calls for a local store, checked fast
    (test_pipeline's test_force_replaces_the_cells_mlflow_run, test_integrity's
    test_a_cell_run_has_epochs_bounds_record_and_config_and_the_sweep_has_the_report); the
    server's own branches (the /health check, no store lock, requests that get no answer)
    run fast against fake servers (test_tracking: answering /health then hanging;
    test_integrity: unreachable). Only a real server's successful answers are left here."""
    import socket
    import subprocess
    import sys
    import time

    import mlflow

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        overrides = [o for o in tiny_overrides(tiny_root, tmp_path) if o != "tracking=none"]
        uri = f"tracking.uri=http://127.0.0.1:{port}"
        grid = ["experiment=smoke", *overrides, "method=best_expert",  # nothing to train
                "workload=none,paper", uri]
        for extra in ([], ["force=true"]):
            result = run_cli(*grid, *extra)
            assert result.returncode == 0, result.stderr[-2000:]
            assert "not tracked" not in result.stderr and "does not answer" not in result.stderr
        mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
        found = mlflow.search_runs(experiment_names=["l2d-bench-smoke"], output_format="list")
        runs = [run for run in found if "cell_id" in run.data.tags]  # the sweeps' parents aside
        assert len(found) - len(runs) == 1  # one parent run for the sweep, found again on force
        assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs)
        ids = {r["mlflow_run_id"] for r in load_records(tmp_path / "runs/smoke")}
        assert ids == {run.info.run_id for run in runs}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_identical_training_problems_train_once(tiny_root, tmp_path):
    result = run_cli("experiment=smoke", *tiny_overrides(tiny_root, tmp_path), "workload=none",
                     "method=classifier_only,oracle,random")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "cache/predictions").glob("trained-cross_entropy_classifier-*.npz"))) == 1
    records = load_records(tmp_path / "runs/smoke")
    accuracy = {r["method_name"]: r["metrics"]["argmax"]["classifier_accuracy"] for r in records}
    assert len(accuracy) == 3 and len(set(accuracy.values())) == 1  # one classifier
    train_seconds = {r["run_metrics"]["train_seconds"] for r in records}
    assert len(train_seconds) == 1  # the timing of the one training, reported by all three
