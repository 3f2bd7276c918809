"""Bad input and faults end in one clear message, with nothing written where it must not be
and nothing lost: unknown keys, names and paths that would escape their folders, settings
that would be silently wrong, unwritable or full output folders, and Ctrl-C at any moment
(during the imports, with Grain's worker processes, with joblib's)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from hydra import compose, initialize_config_dir

from app import preflight
from benchmark.assignment import capacity_assignment, check_assignment_batch, chunk_is_faithful, integer_capacities
from benchmark.bounds import InfeasibleBoundsError
from benchmark.config import ConfigError, RunConfig, dataset_of, to_cell
from benchmark.data import dataset_files, load_data
from core.records import load_records
from datasets.__main__ import main as datasets_cli
from datasets.manifest import ManifestError, read_manifest
from tests.conftest import REPO_ROOT, tiny_overrides
from tests.test_pipeline import compose_cfg, flat, run_cli


def compose_raw(overrides: list[str]):
    """The composed config before conversion (what ``to_cell`` receives)."""
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=["experiment=single", *overrides])


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("override, key", [("+train.foo=1", "train.foo"), ("+foo=1", "foo"),
                                           ("+method.params.foo=1", "method.params.foo")])
def test_a_key_added_with_plus_must_exist(override, key):
    with pytest.raises(ConfigError, match=rf"unknown option\(s\) {key}: no such setting"):
        to_cell(compose_raw([override]))


def test_free_form_mappings_still_take_new_keys():
    cell = to_cell(compose_raw(["+dataset.builder_args.extra=1"]))
    assert cell.dataset.builder_args["extra"] == 1


def test_unknown_keys_and_escaping_names_stop_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    for args, message in ((["+train.foo=1"], "unknown option(s) train.foo"),
                          (["experiment_name=../../escape"], "experiment_name='../../escape'")):
        result = run_cli("experiment=single", "tracking=none", f"output_dir={out}", *args)
        assert result.returncode == 1, result.stderr[-2000:]
        assert message in flat(result.stderr) and "Traceback" not in result.stderr
        assert not out.exists() and not (tmp_path / "escape").exists()


def test_std_must_be_positive():
    with pytest.raises(ConfigError, match=r"dataset.std must be finite and > 0"):
        to_cell(compose_raw(["dataset.std=[0]"]))


def test_a_dataset_without_experts_is_named():
    with pytest.raises(ConfigError, match=r"dataset.train.experts must be at least one expert"):
        to_cell(compose_raw(["dataset.train.experts=[]", "dataset.test.experts=[]"]))


@pytest.mark.parametrize("option", ["data_cache_dir", "cache_dir"])
def test_caches_are_never_written_into_a_dataset_root(tiny_root, tmp_path, option):
    cell, _ = compose_cfg(tiny_overrides(tiny_root, tmp_path) + [f"{option}={tiny_root}/cache"])
    with pytest.raises(ConfigError, match=rf"{option} must be outside the dataset root"):
        RunConfig.build(cell, REPO_ROOT)


@pytest.mark.parametrize("pattern", ["../outside/{stem}_{rate}.json", "ABSOLUTE/{stem}_{rate}.json"])
def test_published_missing_manifests_must_lie_in_the_root(tiny_root, tmp_path, pattern):
    outside = tmp_path / "outside"
    outside.mkdir()
    for j in range(3):  # readable files outside the root: they must still be refused
        (outside / f"train_expert_{j}_0.5.json").write_text((tiny_root / f"train_expert_{j}.json").read_text())
    pattern = pattern.replace("ABSOLUTE", str(outside))
    cell, _ = compose_cfg(tiny_overrides(tiny_root, tmp_path) + [f"dataset.published_missing='{pattern}'"])
    with pytest.raises(ManifestError, match=r"dataset.published_missing\) resolves to .*outside the dataset root"):
        dataset_files(dataset_of(cell, REPO_ROOT), 0.5, tmp_path / "cache")


def test_one_image_under_two_spellings_is_one_image(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"file": "train/0/0000.png", "label": 0},
                                {"file": "./train/0/0000.png", "label": 0},
                                {"file": "train//1/0001.png", "label": 1}]))
    manifest = read_manifest(path, 10)
    assert manifest.files == ("train/0/0000.png", "train/1/0001.png")
    path.write_text(json.dumps([{"file": "train/0/0000.png", "label": 0},
                                {"file": "./train/0/0000.png", "label": 1}]))
    with pytest.raises(ManifestError, match=r"record 1: duplicate file './train/0/0000.png' \(the image "
                                            r"'train/0/0000.png'\) with conflicting labels 0 and 1"):
        read_manifest(path, 10)


def test_a_class_absent_from_training_is_named(tiny_root, tmp_path, capsys):
    for name in ("train_ground_truth.json", *(f"train_expert_{j}.json" for j in range(3))):
        records = json.loads((tiny_root / name).read_text())
        kept = [r for r in records if not r["file"].startswith("train/7/")]
        (tiny_root / name).write_text(json.dumps(kept))
    cell, _ = compose_cfg(tiny_overrides(tiny_root, tmp_path))
    load_data(dataset_of(cell, REPO_ROOT), 0.0, tmp_path / "cache")
    assert "class(es) 7 never occur in the training split" in flat(capsys.readouterr().err)
    validate = ["validate", "--root", str(tiny_root), "--ground-truth", "train_ground_truth.json",
                "--num-classes", "10"]
    assert datasets_cli(validate) == 0
    assert "warning: class(es) 7 never occur in train_ground_truth.json" in flat(capsys.readouterr().err)


def test_validate_refuses_one_image_under_two_spellings_with_two_labels(tiny_root, capsys):
    records = json.loads((tiny_root / "train_ground_truth.json").read_text())
    first = records[0]
    records.append({"file": "./" + first["file"], "label": (first["label"] + 1) % 10})
    (tiny_root / "train_ground_truth.json").write_text(json.dumps(records))
    assert datasets_cli(["validate", "--root", str(tiny_root), "--ground-truth",
                         "train_ground_truth.json", "--num-classes", "10"]) != 0
    assert f"duplicate file './{first['file']}' (the image '{first['file']}')" in capsys.readouterr().err


# ----------------------------------------------------------------------------- chunked assignment


def chunked_totals(num_samples, chunk, lo, hi):
    """Per agent, the capacities summed over the chunks, from ``integer_capacities`` itself
    (None when a chunk has no integer assignment)."""
    totals_lo, totals_hi = np.zeros(len(lo)), np.zeros(len(lo))
    for offset in range(0, num_samples, chunk):
        size = min(chunk, num_samples - offset)
        try:
            cap_lo, cap_hi = integer_capacities(size, lo, hi, offset=offset)
        except InfeasibleBoundsError:
            return None
        totals_lo, totals_hi = totals_lo + cap_lo, totals_hi + cap_hi
    return totals_lo, totals_hi


def test_a_faithful_chunk_matches_the_capacities_summed_chunk_by_chunk():
    rng = np.random.default_rng(0)
    for _ in range(300):
        num_samples, agents = int(rng.integers(5, 80)), int(rng.integers(2, 5))
        chunk = int(rng.integers(1, num_samples + 1))
        lo = rng.uniform(0, 0.6 / agents, agents) * rng.integers(0, 2, agents)
        hi = np.minimum(1.0, lo + rng.uniform(0.2, 1.0, agents))
        if rng.random() < 0.3:
            hi[-1] = lo[-1]  # a target share
        try:
            whole = integer_capacities(num_samples, lo, hi)
        except InfeasibleBoundsError:
            continue
        totals = chunked_totals(num_samples, chunk, lo, hi)
        expected = totals is not None and bool(np.all(totals[0] <= whole[0] + 1)
                                               and np.all(totals[1] >= whole[1] - 1))
        assert chunk_is_faithful(num_samples, chunk, lo, hi) == expected, (num_samples, chunk, lo, hi)


def test_an_unfaithful_assignment_batch_is_refused_with_the_smallest_that_can():
    lo, hi = [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.2]  # the paper workload: classifier <= 20%
    scores = np.tile([0.1, 0.1, 0.1, 1.0], (540, 1))  # the classifier is everyone's best
    per_sample = np.concatenate([capacity_assignment(scores[i:i + 1], lo, hi, offset=i) for i in range(540)])
    assert (per_sample == 3).sum() == 0  # what chunks of 1 did: the classifier never answers
    with pytest.raises(InfeasibleBoundsError, match=r"eval.assignment_batch=1: .* the smallest chunk that can is 5"):
        check_assignment_batch(1, 540, lo, hi)
    by_five = np.concatenate([capacity_assignment(scores[i:i + 5], lo, hi, offset=i) for i in range(0, 540, 5)])
    assert (by_five == 3).sum() == (capacity_assignment(scores, lo, hi) == 3).sum() == 108
    check_assignment_batch(5, 540, lo, hi)  # accepted
    check_assignment_batch(None, 540, lo, hi)


# ----------------------------------------------------------------------------- output folders


def test_an_output_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert "is a file, not a folder" in preflight.folder_problem(blocker / "out", "output_dir")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(preflight.tempfile, "TemporaryFile", refuse)
    problem = preflight.folder_problem(tmp_path / "out", "output_dir")
    assert problem.startswith(f"output_dir={tmp_path / 'out'}: {tmp_path} cannot be written (Permission denied)")


def test_a_nearly_full_disk_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: type("U", (), {"free": 4 * 2**20})())
    problem = preflight.folder_problem(tmp_path / "out", "output_dir")
    assert "has 4.0 MB free; a run needs at least 64 MB" in problem


@pytest.fixture
def small_disk(tmp_path):
    """A 80 MB tmpfs (skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs privileges this machine does not give")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_read_only_output_folder_is_named_before_hydra_writes(small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = run_cli("experiment=single", "tracking=none", f"output_dir={small_disk}/out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"output_dir={small_disk}/out: {small_disk} cannot be written (Read-only file system)" in flat(result.stderr)


@pytest.mark.slow
def test_a_disk_filling_up_mid_sweep_ends_with_one_message(tiny_root, small_disk):
    out = small_disk / "out"
    args = [sys.executable, "-m", "app", "experiment=smoke", *tiny_overrides(tiny_root, out),
            "method=classifier_only,best_expert", "workload=none,paper", "seed=0,1"]
    sweep = subprocess.Popen(args, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(list(out.rglob("result.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(small_disk / "filler", "wb") as filler:  # fill the disk to the last byte
        with pytest.raises(OSError):
            while True:
                filler.write(b"\0" * 2**20)
                filler.flush()
    _, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr and "the sweep stopped after" in stderr, stderr[-2000:]
    # found full between two jobs, or by Hydra writing the next job's folder
    assert (f"the disk holding {out} has 0.0 MB free" in flat(stderr)
            or re.search(rf"{out}\S* cannot be written \(No space left on device\)", flat(stderr)))
    assert "re-run the same command to resume" in flat(stderr)
    records = load_records(out / "runs/smoke")
    assert len([r for r in records if r["status"] == "ok"]) >= 2  # the finished ones intact


# ----------------------------------------------------------------------------- Ctrl-C


def start_in_own_group(args: list[str]) -> subprocess.Popen:
    """``python -m app args`` in a process group of its own, as a terminal runs it."""
    start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "sys.argv[0] = 'app'; runpy.run_module('app', run_name='__main__', alter_sys=True)")
    return subprocess.Popen([sys.executable, "-c", start, *args], cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def ctrl_c(process: subprocess.Popen) -> tuple[str, list[int]]:
    """Send SIGINT to the process group (a terminal's Ctrl-C); its stderr and the pids of the
    processes it had started."""
    children = [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    return stderr, children


def alive(pids: list[int]) -> list[int]:
    time.sleep(1.0)  # resource trackers exit once their workers are gone
    return [pid for pid in pids if psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("delay", [0.2, 0.6, 1.2])
def test_ctrl_c_during_the_imports_prints_one_line(tmp_path, delay):
    process = start_in_own_group(["experiment=single", "tracking=none", f"output_dir={tmp_path}"])
    time.sleep(delay)
    stderr, _ = ctrl_c(process)
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip() == "interrupted; re-run the same command to resume (finished cells are kept)."


def wait_for(condition, seconds: float = 300.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_ctrl_c_with_grain_workers_stops_them_quietly(tiny_root, tmp_path):
    process = start_in_own_group(["experiment=single", *tiny_overrides(tiny_root, tmp_path),
                                  "train.epochs=200", "dataset.cache=false", "dataset.workers=1"])

    def a_worker_runs():
        children = psutil.Process(process.pid).children(recursive=True)
        return any("spawn_main" in " ".join(child.cmdline()) for child in children)

    wait_for(a_worker_runs)
    time.sleep(1.0)  # a worker part-way through its start, or serving batches
    stderr, children = ctrl_c(process)
    assert process.returncode == 130
    assert stderr.strip() == "interrupted; re-run the same command to resume (finished cells are kept).", stderr
    assert not alive(children)


@pytest.mark.slow
def test_ctrl_c_with_joblib_counts_the_cells_its_workers_finished(tiny_root, tmp_path):
    seeds = 12
    process = start_in_own_group(["experiment=smoke", *tiny_overrides(tiny_root, tmp_path),
                                  "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                  "method=best_expert", "workload=none", f"seed=range({seeds})"])
    records = tmp_path / "runs/smoke"
    wait_for(lambda: len(list(records.rglob("result.json"))) >= 2)
    stderr, children = ctrl_c(process)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    counted = re.search(rf"interrupted after (\d+) of {seeds} cells", stderr)
    assert counted and 2 <= int(counted.group(1)) <= len(load_records(records)), stderr[-2000:]
    assert not alive(children)
