"""End to end: the real pipeline on a tiny dataset (single cells, a smoke sweep, errors)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmark.config import CellConfig, register_configs, to_cell
from benchmark.runner import run_cell
from core.records import load_records
from tests.conftest import REPO_ROOT, tiny_overrides

register_configs()
TINY_METHOD = "classifier_only[train.batch_size=16,train.epochs=2]"  # tiny_overrides' training


def compose_cfg(overrides: list[str]) -> tuple[CellConfig, dict]:
    """A typed cell config and Hydra's chosen presets, as the entry point has them."""
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["experiment=single", *overrides],
                      return_hydra_config=True)
        choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
        return to_cell(cfg), choices


def cell_records(run_dir) -> dict[tuple, dict]:
    """Records below ``run_dir`` keyed by (method, missing_rate, workload, seed)."""
    return {(r["cell"]["method"], r["cell"]["missing_rate"], r["cell"]["workload"], r["cell"]["seed"]): r
            for r in load_records(run_dir)}


def run_cli(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m app args``; ``env`` adds to this process's environment (its XLA_FLAGS
    after this process's own, so the test session's compiler flags stay)."""
    env = dict(env or {})
    if "XLA_FLAGS" in env:
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {env['XLA_FLAGS']}".strip()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def flat(text: str) -> str:
    """Collapse the wrapping of printed paragraphs."""
    return " ".join(text.split())


def test_single_cell_writes_a_complete_record(tiny_root, tmp_path):
    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + ["missing_rate=0.5", "workload=paper"])
    record = run_cell(cfg, choices)
    assert record["status"] == "ok", record.get("error")
    (path,) = (tmp_path / "runs/single").rglob("result.json")
    assert path.parts[-5:] == (TINY_METHOD, "mr0.5", "paper", "seed0", "result.json")
    assert path.parts[-6].startswith("digits@")  # another root than the preset's: a variant
    saved = json.loads(path.read_text())
    assert saved["cell"]["method"] == TINY_METHOD and saved["method_name"] == "classifier_only"
    assert saved["role"] == "reference" and saved["variant"]["train"] == {
        "train.batch_size": 16, "train.epochs": 2}
    assert saved["agents"] == ["expert_0", "expert_1", "expert_2", "classifier"]
    assert saved["workload_bounds"]["hi"][-1] == pytest.approx(0.2)
    for rule in ("argmax", "constrained"):
        metrics = saved["metrics"][rule]
        assert {"accuracy", "coverage", "workload/classifier", "workload_violation",
                "deferral_auc", "classifier_ece"} <= set(metrics)
    # the constrained decisions honour the classifier cap; argmax sends everything to it
    assert saved["metrics"]["constrained"]["coverage"] <= 0.2 + 1e-9
    assert saved["metrics"]["argmax"]["coverage"] == 1.0
    assert len(saved["curves"]["coverage"]) == 101
    assert saved["provenance"]["backend"] == "cpu"
    assert set(saved["provenance"]["manifests"]) >= {"train/ground_truth", "test/expert_2",
                                                     "train/expert_0", "train/expert_0/source"}
    # missing manifests are derived into the harness's cache, never the dataset root
    assert len(list((tmp_path / "cache/data/missing").rglob("expert_0_train_expert_0.json"))) == 1
    assert not (tiny_root / "missing").exists() and not (tiny_root / ".cache").exists()


def test_rerun_skips_and_force_redoes(tiny_root, tmp_path):
    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path))
    assert run_cell(cfg, choices)["status"] == "ok"
    assert run_cell(cfg, choices)["status"] == "skipped"
    assert run_cell(dataclasses.replace(cfg, force=True), choices)["status"] == "ok"
    changed, _ = compose_cfg(tiny_overrides(tiny_root, tmp_path) + ["train.epochs=1"])
    assert run_cell(changed, choices)["status"] == "ok"  # a changed setting is not skipped ...
    # ... and keeps its own record beside the first
    assert len(list((tmp_path / "runs/single").rglob("result.json"))) == 2


def test_failed_cell_is_recorded_not_raised(tiny_root, tmp_path):
    overrides = tiny_overrides(tiny_root, tmp_path) + ["workload.classifier.hi=0.0",
                                                       "workload.humans.hi=0.1"]
    cfg, choices = compose_cfg(overrides)
    record = run_cell(cfg, choices)
    assert record["status"] == "failed"
    assert "workload preset 'none'" in record["error"]
    assert record["cell"]["workload"] == "none[classifier.hi=0,humans.hi=0.1]"
    (saved,) = load_records(tmp_path / "runs/single")
    assert saved["status"] == "failed" and saved["error"] == record["error"]
    # a failed cell is retried on the next run
    assert run_cell(cfg, choices)["status"] == "failed"
    fixed, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path))
    assert run_cell(fixed, choices)["status"] == "ok"


def test_cli_bad_root_exits_with_one_paragraph(tmp_path):
    result = run_cli("experiment=single", "tracking=none", f"output_dir={tmp_path}",
                     f"dataset.root={tmp_path / 'nonexistent'}")
    assert result.returncode == 1
    assert "dataset root does not exist" in flat(result.stderr)
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_label_out_of_range(tiny_root, tmp_path):
    records = json.loads((tiny_root / "test_ground_truth.json").read_text())
    records[5]["label"] = 12
    (tiny_root / "test_ground_truth.json").write_text(json.dumps(records))
    result = run_cli("experiment=single", *tiny_overrides(tiny_root, tmp_path))
    assert result.returncode == 1
    assert "test_ground_truth.json, record 5: label 12 is outside [0, 10)" in flat(result.stderr)
    assert "Traceback" not in result.stderr


def test_smoke_sweep_writes_report(tiny_root, tmp_path):
    result = run_cli("experiment=smoke", *tiny_overrides(tiny_root, tmp_path),
                     "method=classifier_only,multi_l2d_softmax")
    assert result.returncode == 0, result.stderr[-3000:]
    report = tmp_path / "runs/smoke/report"
    for name in ("leaderboard.md", "leaderboard.csv", "report.html"):
        assert (report / name).is_file()
    # the console fits 100 columns: a long variant label is shortened there, whole in the CSV
    assert "Leaderboard" in result.stdout and "multi_l2d_soft" in result.stdout
    import pandas as pd

    csv = pd.read_csv(report / "leaderboard.csv")
    assert {"role", "tied_with_best", "constrained/accuracy_lo", "constrained/accuracy_hi"} <= set(csv.columns)
    assert csv["constrained/accuracy_lo"].between(0, 1).all() and csv["constrained/accuracy_hi"].between(0, 1).all()
    reference = csv[csv["method"].str.startswith("classifier_only")]
    assert (reference["role"] == "reference").all() and reference["rank"].isna().all()
    assert (csv.loc[csv["role"] == "method", "rank"] == 1).all()  # the only learned method
    assert csv["method"].str.startswith("multi_l2d_softmax").any()
    records = list((tmp_path / "runs/smoke").rglob("result.json"))
    assert len(records) == 4  # 2 methods x 1 missing rate x 2 workloads x 1 seed
    again = run_cli("experiment=smoke", *tiny_overrides(tiny_root, tmp_path),
                    "method=classifier_only,multi_l2d_softmax")
    assert again.returncode == 0 and "(0 failed, 4 skipped so far)" in again.stderr
    assert "Report (unchanged: every cell was already done)" in again.stdout  # not rebuilt


def test_failing_cell_does_not_stop_the_sweep(tiny_root, tmp_path):
    result = run_cli("experiment=smoke", *tiny_overrides(tiny_root, tmp_path),
                     "method=classifier_only", "workload=none", "missing_rate=1.5,0.0")
    assert result.returncode == 1  # failures make the sweep exit non-zero ...
    assert "1 of 2 cells failed" in flat(result.stderr)
    assert "missing_rate must be in [0, 1], got 1.5" in flat(result.stderr)
    records = cell_records(tmp_path / "runs/smoke")
    # a value out of range fails when the config is converted, before the cell has an
    # identity: nothing is recorded for it ...
    assert [key for key in records if key[1] == 1.5] == []
    # ... but the cell after the failing one ran and the report was written
    assert records[(TINY_METHOD, 0.0, "none", 0)]["status"] == "ok"
    assert (tmp_path / "runs/smoke/report/leaderboard.csv").is_file()
    # the failed job, without an identity, is named by its overrides (never an empty name)
    assert "missing_rate=1.5" in result.stderr.split("cells failed:")[1]
    assert "failed: " not in result.stderr.replace("failed: job=", "")


# ----------------------------------------------------------------------------- identity


def leaderboard_rows(run_dir) -> list[dict]:
    import pandas as pd

    return pd.read_csv(run_dir / "report/leaderboard.csv").to_dict("records")


def test_every_setting_keeps_its_own_row(tiny_root, tmp_path):
    """Variants of one method never overwrite each other: one record and one row each. Here
    train.* and workload.* variants; the rows of method.params variants (prob_l2d's three
    E-steps, the same sweep of method.params.estep) are checked on experiment=estep's run
    (test_protocol's test_estep_experiment_compares_the_three_e_steps)."""
    common = [*tiny_overrides(tiny_root, tmp_path), "train.epochs=1", "missing_rate=0.5"]
    extra = "train.batch_size=16,train.epochs=1"
    grid = run_cli("-m", "experiment=single", "method=classifier_only", "workload=paper",
                   "train.learning_rate=0.011,0.012", "workload.classifier.hi=0.3,0.6",
                   *common, f"results_dir={tmp_path}/grid")
    assert grid.returncode == 0, grid.stderr[-3000:]
    rows = {(r["method"], r["workload"]) for r in leaderboard_rows(tmp_path / "grid")}
    assert rows == {(f"classifier_only[{extra},train.learning_rate={lr}]", f"paper[classifier.hi={hi}]")
                    for lr in ("0.011", "0.012") for hi in ("0.3", "0.6")}
    assert len(load_records(tmp_path / "grid")) == 4


def test_a_method_in_one_file_outside_the_repository_joins_the_sweep(tiny_root, tmp_path):
    """One Python file, no YAML: registered, configurable from Hydra, swept and reported."""
    plugin = tmp_path / "plugins" / "my_throwaway_method.py"
    plugin.parent.mkdir()
    source = (REPO_ROOT / "methods/template.py").read_text()
    source = source.replace('# @METHODS.register("my_method")', '@METHODS.register("throwaway")')
    source = source.replace("class MyMethod(", "class Throwaway(")
    plugin.write_text(source.replace("missing_policy: str = \"as_incorrect\"",
                                     "missing_policy: str = \"as_incorrect\"\n    width: int = 3"))
    env = {"L2D_METHODS": "my_throwaway_method",
           "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{plugin.parent}"}
    shown = run_cli("--cfg", "job", "method=throwaway", "method.params.width=5", env=env)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "name: throwaway" in shown.stdout and "width: 5" in shown.stdout
    result = run_cli("experiment=smoke", *tiny_overrides(tiny_root, tmp_path), "train.epochs=1",
                     "method=throwaway,classifier_only", "workload=none", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    methods = {r["method"].split("[")[0] for r in leaderboard_rows(tmp_path / "runs/smoke")}
    assert methods == {"throwaway", "classifier_only"}
    assert "throwaway[" in result.stdout  # on the printed leaderboard too


def test_force_replaces_the_cells_mlflow_run(tiny_root, tmp_path):
    import mlflow

    overrides = [o if o != "tracking=none" else "tracking=mlflow" for o in tiny_overrides(tiny_root, tmp_path)]
    cfg, choices = compose_cfg(overrides)
    first = run_cell(cfg, choices)
    forced = run_cell(dataclasses.replace(cfg, force=True), choices)
    other, _ = compose_cfg(overrides + ["seed=1"])
    another_cell = run_cell(other, choices)
    assert first["mlflow_run_id"] and forced["mlflow_run_id"] != first["mlflow_run_id"]
    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    # one active run per cell: the forced re-run replaced the first one
    assert sorted(r.info.run_id for r in runs) == sorted([forced["mlflow_run_id"],
                                                          another_cell["mlflow_run_id"]])


def test_a_user_label_names_the_row_and_refuses_other_settings(tiny_root, tmp_path):
    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + ["method.label=mine"])
    record = run_cell(cfg, choices)
    assert record["status"] == "ok" and record["cell"]["method"] == "mine"
    other, _ = compose_cfg(tiny_overrides(tiny_root, tmp_path) + ["method.label=mine",
                                                                   "train.learning_rate=0.01"])
    refused = run_cell(other, choices)
    assert refused["status"] == "failed"
    assert "method.label='mine'" in refused["error"] and "give each variant its own label" in refused["error"]
    (kept,) = load_records(tmp_path / "runs/single")
    assert kept["status"] == "ok" and kept["variant"] == record["variant"]  # not overwritten


def test_a_cell_is_converted_once_and_derived_once(tiny_root, tmp_path, monkeypatch):
    """One parse per cell: the typed config is converted once (at the entry point), the
    cell's run is derived from it once, and labels reuse Hydra's composition of the
    presets (composed once per process and choice)."""
    import benchmark.config
    import benchmark.identity

    calls = {"to_cell": 0, "build": 0}
    real_to_cell, real_build = benchmark.config.to_cell, benchmark.config.RunConfig.build.__func__

    def counting_to_cell(cfg):
        calls["to_cell"] += 1
        return real_to_cell(cfg)

    def counting_build(cls, cell, base, identity=None):
        calls["build"] += 1
        return real_build(cls, cell, base, identity)

    monkeypatch.setattr(benchmark.identity, "to_cell", counting_to_cell)
    monkeypatch.setattr(benchmark.config.RunConfig, "build", classmethod(counting_build))
    first, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + ["seed=0"])
    second, _ = compose_cfg(tiny_overrides(tiny_root, tmp_path) + ["seed=1"])
    benchmark.identity.baseline_cell.cache_clear()
    assert run_cell(first, choices)["status"] == "ok"
    assert calls == {"to_cell": 1, "build": 1}  # the presets' baseline, then the cell's run
    assert run_cell(second, choices)["status"] == "ok"
    assert calls == {"to_cell": 1, "build": 2}  # the baseline is reused


def test_a_single_run_of_an_unsupported_policy_says_so(tiny_root, tmp_path):
    result = run_cli("experiment=single", *tiny_overrides(tiny_root, tmp_path),
                     "method=multi_l2d_softmax", "missing_policy=mask")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert ("method 'multi_l2d_softmax' does not support missing_policy='mask' "
            "(it supports as_incorrect, drop)") in flat(result.stderr)


@pytest.mark.slow  # the same assertions on the same kind of sweep: test_failing_cell_does_not_stop_the_sweep
def test_a_failed_job_without_identity_is_named_by_its_overrides(tiny_root, tmp_path):
    result = run_cli("experiment=smoke", *tiny_overrides(tiny_root, tmp_path),
                     "method=classifier_only", "workload=none", "missing_rate=1.5")
    assert result.returncode == 1
    assert "missing_rate=1.5" in result.stderr.split("cells failed:")[1]
    assert "failed: " not in result.stderr.replace("failed: job=", "")  # never an empty name


def test_a_read_only_finished_run_reports_its_cells_as_done(tiny_root, tmp_path):
    """Finished cells are reported as done without writing anything (not even their lock
    file): here no lock can be created (a folder stands where each lock file would go,
    which stops root as well as a user of a read-only folder)."""
    args = ["experiment=smoke", *tiny_overrides(tiny_root, tmp_path), "method=best_expert",  # nothing to train
            "workload=none,paper"]
    assert run_cli(*args).returncode == 0
    for record in (tmp_path / "runs").rglob("result.json"):
        lock = record.with_name(record.name + ".lock")
        lock.unlink(missing_ok=True)
        lock.mkdir()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "(0 failed, 2 skipped so far)" in again.stderr
