"""Integrity: nothing stale, nothing lost, nothing written where it does not belong."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.config import ConfigError
from benchmark.runner import run_cell
from core.records import load_records
from tests.conftest import REPO_ROOT, tiny_overrides
from tests.test_pipeline import compose_cfg, flat, run_cli


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` with the sha256 of its bytes (the set of paths included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_dataset_root_is_only_read(tiny_root, tmp_path):
    """Derived manifests and decoded images go to the harness's cache; the root stays as it was."""
    before = tree_snapshot(tiny_root)
    os.chmod(tiny_root, 0o555)  # read-only for a normal user (root ignores it: the snapshot decides)
    try:
        cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + ["missing_rate=0.5"])
        record = run_cell(cfg, choices)
    finally:
        os.chmod(tiny_root, 0o755)
    assert record["status"] == "ok", record.get("error")
    assert tree_snapshot(tiny_root) == before
    assert list((tmp_path / "cache/data/images").glob("images-*.npz"))


def test_an_edited_expert_manifest_derives_again_and_reruns(tiny_root, tmp_path):
    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + ["missing_rate=0.5"])
    first = run_cell(cfg, choices)
    assert run_cell(cfg, choices)["status"] == "skipped"
    manifest = tiny_root / "train_expert_0.json"
    records = json.loads(manifest.read_text())
    records[0]["label"] = (records[0]["label"] + 1) % 10
    manifest.write_text(json.dumps(records))
    second = run_cell(cfg, choices)  # no force: the source changed, so the cell reruns
    assert second["status"] == "ok"
    source = second["provenance"]["manifests"]["train/expert_0/source"]
    assert source == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert source != first["provenance"]["manifests"]["train/expert_0/source"]
    derived = sorted((tmp_path / "cache/data/missing").glob("*/expert_0_train_expert_0.json"))
    assert len(derived) == 2  # one derivation per source content


def blank_images(root: Path, split: str) -> None:
    """Overwrite every image of ``split`` with a black one (same names, same manifests)."""
    from PIL import Image

    time.sleep(0.01)  # a new modification time even on coarse clocks
    for path in sorted((root / split).rglob("*.png")):
        Image.new("L", (8, 8)).save(path)


def test_an_edited_image_reruns_its_cells_and_no_cell_reuses_old_outputs(tiny_root, tmp_path):
    """The skip decision and every cache key (predictions, trained model, decoded images)
    include the images' content: after the test images change, an existing cell reruns and
    a new cell (another workload) is computed from the new pixels, not served from the cache."""
    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path))
    first = run_cell(cfg, choices)
    assert first["status"] == "ok" and run_cell(cfg, choices)["status"] == "skipped"
    blank_images(tiny_root, "test")
    again = run_cell(cfg, choices)  # no force
    assert again["status"] == "ok"
    assert again["provenance"]["images"]["test"] != first["provenance"]["images"]["test"]
    assert again["provenance"]["images"]["train"] == first["provenance"]["images"]["train"]
    # a black image carries no class: the classifier answers one class for every test image
    before = first["metrics"]["argmax"]["classifier_accuracy"]
    assert again["metrics"]["argmax"]["classifier_accuracy"] <= 0.2 < before
    other, _ = compose_cfg(tiny_overrides(tiny_root, tmp_path) + ["workload=paper"])
    new_cell = run_cell(other, choices)
    assert new_cell["status"] == "ok"
    assert (new_cell["metrics"]["argmax"]["classifier_accuracy"]
            == again["metrics"]["argmax"]["classifier_accuracy"])  # the new pixels, not the old
    predictions = sorted((tmp_path / "cache/predictions").glob("classifier_only-*.npz"))
    assert len(predictions) == 2  # one per image content
    assert len(list((tmp_path / "cache/data/images").glob("images-*.npz"))) == 3  # train, 2 tests


@pytest.mark.parametrize("pattern,what", [("predictions/classifier_only-*.npz", "predictions"),
                                          ("predictions/trained-*.npz", "trained model"),
                                          ("data/images/images-*.npz", "decoded images")])
def test_a_corrupt_cache_file_is_named_and_recomputed(tiny_root, tmp_path, capfd, pattern, what):
    import benchmark.data

    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path))
    first = run_cell(cfg, choices)
    files = sorted((tmp_path / "cache").glob(pattern))
    assert first["status"] == "ok" and files
    for path in files:
        path.write_bytes(b"PK\x03\x04 truncated")
    benchmark.data._decode.cache_clear()  # a new process: nothing memoised
    capfd.readouterr()
    for path in (tmp_path / "runs").rglob("result.json"):
        path.unlink()  # the cell runs again (no force: caches are read)
    if what != "predictions":  # the cell's predictions gone, so the model and images are read
        for path in (tmp_path / "cache").glob("predictions/classifier_only-*.npz"):
            path.unlink()
    again = run_cell(cfg, choices)
    err = capfd.readouterr().err
    assert again["status"] == "ok", again.get("error")
    assert f"corrupt {what} cache file {files[0]}" in err and "recomputing it" in err
    assert again["metrics"]["argmax"]["classifier_accuracy"] == first["metrics"]["argmax"]["classifier_accuracy"]
    for path in sorted((tmp_path / "cache").glob(pattern)):  # rewritten whole
        with np.load(path) as saved:
            assert saved.files


def test_every_cache_file_carries_its_key_and_a_renamed_one_is_refused(tmp_path, capfd):
    """``write_cache`` stores the key a file is written under (its name); ``read_cache``
    serves only that key's entry: a file renamed or copied under another key, or one
    without a key, is named, deleted and reported absent (the caller recomputes it)."""
    from core.files import read_cache, write_cache

    written = tmp_path / "trained-problem-aaaa.npz"
    write_cache(written, leaf_0=np.arange(3))
    assert read_cache(written, lambda saved: saved["leaf_0"].tolist(), "trained model") == [0, 1, 2]
    renamed = tmp_path / "trained-problem-bbbb.npz"
    renamed.write_bytes(written.read_bytes())
    keyless = tmp_path / "trained-problem-cccc.npz"
    np.savez(keyless, leaf_0=np.arange(3))
    capfd.readouterr()
    assert read_cache(renamed, lambda saved: saved["leaf_0"], "trained model") is None
    assert read_cache(keyless, lambda saved: saved["leaf_0"], "trained model") is None
    err = flat(capfd.readouterr().err)
    assert (f"corrupt trained model cache file {renamed} (it holds the entry of key "
            "'trained-problem-aaaa', not 'trained-problem-bbbb'") in err
    assert f"corrupt trained model cache file {keyless} (it carries no cache key" in err
    assert not renamed.exists() and not keyless.exists() and written.exists()


def test_another_cells_predictions_copied_in_place_are_not_served(tiny_root, tmp_path, capfd):
    """A predictions file of another method copied over a cell's: its key (stored in the
    file) is not the cell's, so it is named, deleted and the cell's own outputs recomputed."""
    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path))
    first = run_cell(cfg, choices)
    other, _ = compose_cfg(tiny_overrides(tiny_root, tmp_path) + ["method=best_expert"])
    assert first["status"] == "ok" and run_cell(other, choices)["status"] == "ok"
    (own,) = (tmp_path / "cache/predictions").glob("classifier_only-*.npz")
    (foreign,) = (tmp_path / "cache/predictions").glob("best_expert-*.npz")
    own.write_bytes(foreign.read_bytes())
    for path in (tmp_path / "runs").rglob("result.json"):
        path.unlink()
    capfd.readouterr()
    again = run_cell(cfg, choices)
    err = flat(capfd.readouterr().err)
    assert again["status"] == "ok", again.get("error")
    assert (f"corrupt predictions cache file {own} (it holds the entry of key '{foreign.stem}', "
            f"not '{own.stem}'") in err and "recomputing it" in err
    assert again["metrics"] == first["metrics"]
    with np.load(own) as saved:
        assert str(saved["cache_key"]) == own.stem


def test_swapped_train_and_test_image_caches_are_named_and_decoded_again(tiny_root, tmp_path, capfd):
    import benchmark.data

    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path))
    first = run_cell(cfg, choices)
    first_file, second_file = sorted((tmp_path / "cache/data/images").glob("images-*.npz"))
    a, b = first_file.read_bytes(), second_file.read_bytes()
    first_file.write_bytes(b)
    second_file.write_bytes(a)
    benchmark.data._decode.cache_clear()  # a new process: nothing memoised
    for path in [*(tmp_path / "runs").rglob("result.json"), *(tmp_path / "cache/predictions").glob("*")]:
        path.unlink()
    capfd.readouterr()
    again = run_cell(cfg, choices)
    err = flat(capfd.readouterr().err)
    assert again["status"] == "ok", again.get("error")  # was: IndexError, no file named
    for path in (first_file, second_file):
        assert f"corrupt decoded images cache file {path} (it holds the entry of key" in err
    assert again["metrics"] == first["metrics"]
    assert first_file.read_bytes() == a and second_file.read_bytes() == b  # rewritten as before


def test_a_corrupted_image_after_a_cached_run_is_reported(tiny_root, tmp_path):
    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path))
    assert run_cell(cfg, choices)["status"] == "ok"
    image = tiny_root / "test/3/003.png"
    time.sleep(0.01)  # a new modification time even on coarse clocks
    image.write_bytes(b"not a png")
    record = run_cell(dataclasses.replace(cfg, force=True), choices)
    assert record["status"] == "failed"
    assert "test/3/003.png: image file cannot be decoded" in record["error"]


def test_an_expert_naming_an_unknown_sample_is_clear_at_any_missing_rate(tiny_root, tmp_path):
    manifest = tiny_root / "train_expert_1.json"
    records = json.loads(manifest.read_text()) + [{"file": "train/0/999.png", "label": 0}]
    manifest.write_text(json.dumps(records))
    for rate in ("0.0", "0.5"):
        cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + [f"missing_rate={rate}"])
        record = run_cell(cfg, choices)
        assert record["status"] == "failed"
        assert "train_expert_1.json, record 48: file 'train/0/999.png' is not in the ground-truth" \
            in record["error"], (rate, record["error"])


def test_a_symbolic_link_out_of_the_root_is_refused(tiny_root, tmp_path):
    outside = tmp_path / "elsewhere.png"
    Image.new("L", (8, 8)).save(outside)
    image = tiny_root / "train/0/000.png"
    image.unlink()
    image.symlink_to(outside)
    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path))
    record = run_cell(cfg, choices)
    assert record["status"] == "failed"
    assert "image file 'train/0/000.png' resolves through a symbolic link" in record["error"]


@pytest.mark.parametrize("override,message", [
    ("train.epochs=0", "train.epochs must be >= 1, got 0."),
    ("train.epochs=-3", "train.epochs must be >= 1, got -3."),
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0."),
    ("train.learning_rate=nan", "train.learning_rate must be a finite number >= 0, got nan."),
    ("seed=-1", "seed must be >= 0, got -1."),
    ("missing_rate=1.5", "missing_rate must be in [0, 1], got 1.5."),
    ("eval.validation_fraction=1", "eval.validation_fraction must be in [0, 1), got 1.0."),
    ("workload.coverage=2", "workload.coverage must be null or in [0, 1]"),
    ("dataset.num_classes=1", "dataset.num_classes must be >= 2, got 1."),
])
def test_values_out_of_range_fail_when_the_config_is_converted(tiny_root, tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        compose_cfg(tiny_overrides(tiny_root, tmp_path) + [override])
    assert message in str(err.value)


@pytest.mark.parametrize("override", ["train.learning_rate=abc", "train.epochs=1.5", "seed=zero",
                                      "train.no_such_option=1", "workload.coverage=half"])
def test_values_of_the_wrong_type_fail_at_composition(tiny_root, tmp_path, override):
    with pytest.raises(Exception) as err:
        compose_cfg(tiny_overrides(tiny_root, tmp_path) + [override])
    assert override.split("=")[0] in str(err.value)


@pytest.mark.parametrize("override,message", [
    ("dataset.name=../../x", "dataset.name='../../x' names folders under the results directory"),
    ("method.label=a/b", "method.label='a/b' names folders"),
])
def test_unsafe_names_are_refused(tiny_root, tmp_path, override, message):
    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + [override])
    record = run_cell(cfg, choices)
    assert record["status"] == "failed" and message in record["error"], record["error"]
    assert not (tmp_path.parent / "x").exists()


def test_an_unwritable_record_fails_with_one_message(tiny_root, tmp_path):
    """A cell whose record cannot be written fails with the reason; a sweep whose results
    folder cannot be made is refused before any cell runs."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the results folder should be")
    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + [f"results_dir={blocker}/runs"])
    record = run_cell(cfg, choices)
    assert record["status"] == "failed" and "cannot write the result record" in record["error"]
    result = run_cli("experiment=smoke", *tiny_overrides(tiny_root, tmp_path), "train.epochs=1",
                     "method=classifier_only", "workload=none", f"results_dir={blocker}/runs")
    assert result.returncode == 1
    assert f"{blocker} is a file, not a folder" in flat(result.stderr)
    assert "Traceback" not in result.stderr and blocker.read_text().startswith("a file")


def test_unreachable_tracking_server_is_detected_once(tiny_root, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_root, tmp_path) if o != "tracking=none"]
    result = run_cli("experiment=smoke", *overrides, "method=best_expert",  # nothing to train
                     "workload=none,paper", "tracking.uri=http://127.0.0.1:9")
    assert result.returncode == 0, result.stderr[-2000:]
    # checked once before the first job (no per-cell connection timeouts), said once
    assert flat(result.stderr).count("[l2d-bench] tracking server http://127.0.0.1:9 does not answer") == 1
    records = load_records(tmp_path / "runs/smoke")
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)


def test_concurrent_sweeps_on_a_new_store_keep_one_run_per_cell(tiny_root, tmp_path):
    import mlflow

    overrides = [o for o in tiny_overrides(tiny_root, tmp_path) if o != "tracking=none"]
    args = [sys.executable, "-m", "app", "experiment=smoke", *overrides, "train.epochs=1",
            "method=classifier_only,best_expert", "workload=none"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    sweeps = [subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [sweep.communicate(timeout=600) for sweep in sweeps]
    assert all(s.returncode == 0 for s in sweeps), [o[1][-2000:] for o in outputs]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["l2d-bench-smoke"], output_format="list")
    cells = [run.data.tags["cell_id"] for run in runs if "cell_id" in run.data.tags]
    assert len(cells) == 2 and len(set(cells)) == 2  # exactly one active run per cell
    assert sum("sweep" in run.data.tags for run in runs) == 1  # and one parent run for both
    assert all(run.info.status == "FINISHED" for run in runs)


def interrupt_a_sweep(tiny_root, out: Path, delay: float = 0.0) -> tuple[int, str]:
    """Start a smoke sweep in its own process group, wait for its first record (plus
    ``delay`` seconds), send SIGINT to the group as a terminal's Ctrl-C does; (rc, stderr)."""
    # SIGINT handled as in an interactive shell even if this test process ignores it
    start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "sys.argv[0] = 'app'; runpy.run_module('app', run_name='__main__', alter_sys=True)")
    args = [sys.executable, "-c", start, "experiment=smoke", *tiny_overrides(tiny_root, out),
            "train.epochs=100", "method=classifier_only", "workload=none", "seed=range(10)"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    sweep = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((out / "runs/smoke").rglob("result.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    os.killpg(sweep.pid, signal.SIGINT)
    _, stderr = sweep.communicate(timeout=120)
    return sweep.returncode, stderr


def test_ctrl_c_stops_the_sweep_with_one_line(tiny_root, tmp_path):
    returncode, stderr = interrupt_a_sweep(tiny_root, tmp_path)
    assert returncode == 130, stderr[-2000:]
    assert "re-run the same command to resume" in stderr
    assert "Traceback" not in stderr
    assert "interrupted after" in stderr and "of 10 cells" in stderr
    records = load_records(tmp_path / "runs/smoke")  # every record whole and readable
    assert 1 <= len(records) < 10 and all(r["status"] == "ok" for r in records)


@pytest.mark.slow
def test_ctrl_c_ends_the_same_way_twenty_times(tiny_root, tmp_path):
    """Twenty Ctrl-Cs at different moments of a cell (training, evaluation, writing): every
    one ends with the message and status 130, never a crash or a swallowed interrupt."""
    outcomes = []
    for attempt in range(20):
        out = tmp_path / f"try{attempt}"
        returncode, stderr = interrupt_a_sweep(tiny_root, out, delay=0.1 * attempt)
        outcomes.append((attempt, returncode, "re-run the same command to resume" in stderr,
                         "Traceback" in stderr or "Exception ignored" in stderr))
    bad = [o for o in outcomes if o[1] != 130 or not o[2] or o[3]]
    assert not bad, bad


def test_a_figure_that_fails_to_render_leaves_the_old_file(tmp_path):
    import matplotlib.pyplot as plt

    from reports.figures import save_figures

    figure = plt.figure()
    (old,) = save_figures({"plot": figure}, tmp_path)
    before = old.read_bytes()

    class Broken:
        def savefig(self, target, **kwargs):
            target.write(b"\x89PNG partial")
            raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        save_figures({"plot": Broken()}, tmp_path)
    assert old.read_bytes() == before and list(tmp_path.iterdir()) == [old]


def test_a_drawn_missing_rate_on_incomplete_experts_is_refused(incomplete_root, tmp_path):
    cfg, choices = compose_cfg(tiny_overrides(incomplete_root, tmp_path) + ["missing_rate=0.5"])
    record = run_cell(cfg, choices)
    assert record["status"] == "failed"
    assert ("missing_rate=0.5 would drop annotations a second time: train_expert_2.json already "
            "annotates only 32 of 48 training samples") in record["error"]
    cfg, choices = compose_cfg(tiny_overrides(incomplete_root, tmp_path))  # as they are: fine
    record = run_cell(cfg, choices)
    assert record["status"] == "ok"
    assert record["missing_annotations"]["source"] == "none"
    assert 0.0 < record["missing_annotations"]["observed_rate"] < 1.0


# ----------------------------------------------------------------------------- MLflow


def tracked_overrides(tiny_root, tmp_path) -> list[str]:
    return [o for o in tiny_overrides(tiny_root, tmp_path) if o != "tracking=none"]


def test_a_half_made_store_is_moved_aside_and_made_again(tiny_root, tmp_path):
    """A store left mid-migration by a killed process (here: one table of the first
    migration and nothing else) is repaired on the next run, and the run says so."""
    import sqlite3

    import mlflow

    store = tmp_path / "mlflow.db"
    with sqlite3.connect(store) as connection:
        connection.execute("CREATE TABLE model_version_tags (key VARCHAR(250))")
    result = run_cli("experiment=smoke", *tracked_overrides(tiny_root, tmp_path), "train.epochs=1",
                     "method=classifier_only", "workload=none")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"the MLflow store {store} was left half-made" in flat(result.stdout + result.stderr)
    assert "Traceback" not in result.stderr and "SQLAlchemy" not in result.stderr  # one paragraph
    assert list(tmp_path.glob("mlflow.db.half-made-*"))
    (record,) = load_records(tmp_path / "runs/smoke")
    assert record["mlflow_run_id"] and "tracking_error" not in record
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    assert mlflow.get_run(record["mlflow_run_id"]).info.status == "FINISHED"


def test_a_cell_run_has_epochs_bounds_record_and_config_and_the_sweep_has_the_report(tiny_root, tmp_path):
    """What a run shows in MLflow: the training view, params named as overrides, metrics per
    epoch with validation after the last one; a re-run of the finished sweep adds nothing."""
    import mlflow

    command = ("experiment=smoke", *tracked_overrides(tiny_root, tmp_path), "train.epochs=2",
               "method=prob_l2d", "workload=paper")
    result = run_cli(*command)
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = load_records(tmp_path / "runs/smoke")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    run = client.get_run(record["mlflow_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not GenAI
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [0, 1]  # one value per epoch
    assert [m.value for m in losses] == pytest.approx([h["loss"] for h in record["history"]])
    (validation,) = client.get_metric_history(run.info.run_id, "validation/constrained/accuracy")
    assert validation.step == 1  # measured after the last epoch
    assert validation.value == pytest.approx(record["validation"]["constrained"]["accuracy"])
    assert run.data.params["bounds.hi/classifier"] == "0.2"
    assert run.data.params["bounds.lo/expert_0"] == "0.0"
    assert run.data.params["method.params.estep"] == "exact"  # as the override is written
    assert not [name for name in run.data.params if name.startswith("method.") and "params." not in name]
    assert run.data.params["variant.tuned_preset"] == record["variant"]["tuned_preset"] == "digits_prob_l2d"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"result.json", "config.json", "curves.json", "provenance.json"} <= artifacts
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["sweep"] == "smoke"
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.html" in report and "report/leaderboard.md" in report

    before = {r.info.run_id: r.data.tags for r in client.search_runs([run.info.experiment_id])}
    again = run_cli(*command)  # the finished sweep again: no new parent run, nothing moved
    assert again.returncode == 0, again.stderr[-2000:]
    after = {r.info.run_id: r.data.tags for r in client.search_runs([run.info.experiment_id])}
    assert after == before


def test_a_truncated_store_with_31_runs_is_never_replaced_and_a_moved_one_is_tracked_again(
        tiny_root, tmp_path):
    """A store holding 31 runs, truncated (sqlite can no longer read it): the sweep stops
    before any cell with one paragraph naming the file and the command, and the store,
    the records and the folder are left as they were. After the store is moved aside as
    advised, the same sweep tracks every finished cell again into a new store."""
    import mlflow

    store = tmp_path / "mlflow.db"
    sweep = ["experiment=smoke", *tracked_overrides(tiny_root, tmp_path), "train.epochs=2",
             "method=classifier_only,random", "workload=none,paper"]
    first = run_cli(*sweep[:-2], "method=classifier_only", "workload=none,paper")
    assert first.returncode == 0, first.stderr[-2000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("l2d-bench-smoke").experiment_id
    for _ in range(28):  # earlier sweeps' runs, beside the 2 cells' and their sweep's
        client.set_terminated(client.create_run(experiment).info.run_id)
    assert len(client.search_runs([experiment], max_results=100)) == 31
    with open(store, "r+b") as handle:
        handle.truncate(store.stat().st_size * 2 // 3)
    records = tmp_path / "runs/smoke"
    folder, results = tree_snapshot(tmp_path), tree_snapshot(records)

    stopped = run_cli(*sweep)
    assert stopped.returncode == 1
    err = flat(stopped.stderr)
    assert (f"[l2d-bench] the MLflow store {store} is damaged (sqlite cannot read it: database "
            "disk image is malformed), so it may hold runs. It is left as it is") in err
    assert f"move it away: mv {store} {store}.damaged; then re-run the same command" in err
    assert "Traceback" not in stopped.stderr and "[grid]" not in stopped.stderr  # no cell ran
    assert tree_snapshot(records) == results  # nothing run, nothing rewritten
    left = {k: v for k, v in tree_snapshot(tmp_path).items() if not k.startswith("hydra/")}
    assert left == {k: v for k, v in folder.items() if not k.startswith("hydra/")}  # nor replaced

    os.replace(store, f"{store}.damaged")  # as the message says
    resumed = run_cli(*sweep)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "MLflow: 2 finished cells were tracked again (their runs were not in the store)." \
        in flat(resumed.stderr)
    assert hashlib.sha256((tmp_path / "mlflow.db.damaged").read_bytes()).hexdigest() \
        == folder["mlflow.db"]
    tracked = load_records(records)
    assert len(tracked) == 4 and all(r["status"] == "ok" for r in tracked)
    with sqlite3.connect(store) as connection:  # the new store (this process's engine is on the old)
        runs = dict(connection.execute("SELECT run_uuid, status FROM runs WHERE lifecycle_stage = 'active'"))
        cells = connection.execute("SELECT COUNT(DISTINCT value), COUNT(*) FROM tags WHERE key = 'cell_id'"
                                   ).fetchone()
    assert all(runs.get(r["mlflow_run_id"]) == "FINISHED" for r in tracked)  # every cell tracked
    assert cells == (4, 4) and len(runs) == 5  # one run per cell, and the sweep's parent


def test_written_files_follow_the_umask(tmp_path):
    """Records, caches and reports are as readable as any file the user creates (0644 under
    the usual umask 022), so colleagues on a shared file system can read them."""
    from core.files import atomic_write_text

    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600


def test_num_classes_larger_than_the_data_is_refused(tiny_root, tmp_path):
    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + ["dataset.num_classes=1000"])
    record = run_cell(cfg, choices)
    assert record["status"] == "failed"
    assert "dataset.num_classes=1000, but the ground truth" in record["error"]
    assert "set dataset.num_classes=10" in record["error"]
