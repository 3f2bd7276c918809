"""Scale: data-parallel training over local devices, grids through Hydra launchers, and
tracking to an MLflow server."""

from __future__ import annotations


import numpy as np

from benchmark.records import load_records
from tests.conftest import tiny_overrides
from tests.test_pipeline import run_cli


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


def test_submitit_local_launcher_runs_the_grid_like_the_basic_one(tiny_root, tmp_path):
    grid = ["experiment=smoke", "train.epochs=1", "method=classifier_only,multi_l2d_softmax",
            "workload=none"]
    basic = run_cli(*grid, *tiny_overrides(tiny_root, tmp_path / "basic"))
    assert basic.returncode == 0, basic.stderr[-2000:]
    launched = run_cli(*grid, *tiny_overrides(tiny_root, tmp_path / "submitit"),
                       "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20")
    assert launched.returncode == 0, launched.stderr[-3000:]

    def results(folder):
        records = load_records(folder / "runs/smoke")
        return {r["cell"]["method"]: r["metrics"]["constrained"]["accuracy"] for r in records}

    assert results(tmp_path / "submitit") == results(tmp_path / "basic")
    assert (tmp_path / "submitit/runs/smoke/report/leaderboard.csv").is_file()
    assert "Leaderboard" in launched.stdout


def test_tracking_to_an_mlflow_server(tiny_root, tmp_path):
    """A real `mlflow server` on 127.0.0.1: one run per cell, replaced (not added) on force."""
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
        grid = ["experiment=smoke", *overrides, "train.epochs=1", "method=classifier_only",
                "workload=none,paper", uri]
        for extra in ([], ["force=true"]):
            result = run_cli(*grid, *extra)
            assert result.returncode == 0, result.stderr[-2000:]
            assert "not tracked" not in result.stderr and "does not answer" not in result.stderr
        mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
        runs = mlflow.search_runs(experiment_names=["l2d-bench-smoke"], output_format="list")
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
