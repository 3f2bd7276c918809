"""The comparison protocol: validation split, seeds, reference rows, intervals, ties."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from benchmark.config import dataset_of
from benchmark.data import load_data
from benchmark.runner import run_cell
from datasets.generators import stratified_split
from tests.conftest import REPO_ROOT, tiny_overrides
from tests.test_pipeline import compose_cfg


def image_keys(split) -> set[str]:
    return {hashlib.sha256(image.tobytes()).hexdigest() for image in split.images}


def test_validation_is_held_out_stratified_and_disjoint(tiny_root, tmp_path):
    cfg, _ = compose_cfg(tiny_overrides(tiny_root, tmp_path))
    dataset = dataset_of(cfg, REPO_ROOT)
    dataset = dataclasses.replace(dataset, missing_seed=0)
    whole = load_data(dataset, 0.0, tmp_path / "cache")
    data = load_data(dataset, 0.0, tmp_path / "cache", validation=(0.25, 0))
    assert whole.validation is None
    assert len(data.train) + len(data.validation) == len(whole.train)
    assert len(data.validation) == round(0.25 * len(whole.train))
    train, validation, test = image_keys(data.train), image_keys(data.validation), image_keys(data.test)
    assert not validation & train and not validation & test
    assert validation | train == image_keys(whole.train)
    # stratified: every class keeps its share (within one sample)
    for c in np.unique(whole.train.y):
        share = (whole.train.y == c).sum() * 0.25
        assert abs((data.validation.y == c).sum() - share) <= 1


def test_stratified_split_is_seeded_and_exact():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    kept, held = stratified_split(labels, 0.1, seed=3)
    assert len(held) == 10 and not set(kept) & set(held) and len(kept) + len(held) == 100
    assert [int((labels[held] == c).sum()) for c in range(4)] == [1, 2, 3, 4]
    np.testing.assert_array_equal(held, stratified_split(labels, 0.1, seed=3)[1])
    assert not np.array_equal(held, stratified_split(labels, 0.1, seed=4)[1])


def test_records_hold_validation_metrics_and_the_missing_seed(tiny_root, tmp_path):
    records = []
    for seed in (0, 1):
        cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + [f"seed={seed}", "missing_rate=0.5"])
        records.append(run_cell(cfg, choices))
    for seed, record in enumerate(records):
        assert record["status"] == "ok", record.get("error")
        assert set(record["validation"]) == {"argmax", "constrained"}
        assert 0.0 <= record["validation"]["constrained"]["accuracy"] <= 1.0
        assert record["missing_seed"] == {"seed": seed, "from": "run seed"}
        assert len(record["correct"]["constrained"]) == 24  # one flag per test sample
    # each run seed draws its own missing annotations
    sources = [r["provenance"]["manifests"]["train/expert_0"] for r in records]
    assert sources[0] != sources[1]
    pinned, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + ["seed=1", "missing_rate=0.5",
                                                                         "dataset.missing_seed=0"])
    record = run_cell(pinned, choices)
    assert record["missing_seed"] == {"seed": 0, "from": "dataset.missing_seed"}
    assert record["provenance"]["manifests"]["train/expert_0"] == sources[0]


# ----------------------------------------------------------------------------- reports


def record(method: str, role: str, workload: str, seed: int, right: np.ndarray) -> dict:
    """A minimal ok record whose constrained decisions are right where ``right`` is 1."""
    accuracy = float(right.mean())
    metrics = {"accuracy": accuracy, "coverage": 0.5, "workload_violation": 0.0}
    return {"schema": 2, "status": "ok", "error": None, "method_name": method, "role": role,
            "cell": {"dataset": "toy", "method": method, "missing_rate": 0.0,
                     "workload": workload, "seed": seed},
            "metrics": {"argmax": metrics, "constrained": metrics},
            "correct": {"constrained": "".join(map(str, right.astype(int)))},
            "run_metrics": {}, "curves": {}}


def outcomes(accuracy: float, seed: int, size: int = 400) -> np.ndarray:
    right = np.zeros(size, dtype=int)
    right[np.random.default_rng(seed).permutation(size)[: round(accuracy * size)]] = 1
    return right


@pytest.fixture(scope="module")
def toy_records() -> list[dict]:
    records = []
    for workload in ("none", "paper"):
        for seed in (0, 1):
            best = outcomes(0.90, seed)
            close = best.copy()
            close[np.flatnonzero(best)[:2]] = 0  # 2 of 400 samples worse: not significant
            records += [record("best", "method", workload, seed, best),
                        record("close", "method", workload, seed, close),
                        record("weak", "method", workload, seed, outcomes(0.6, seed + 7)),
                        record("oracle", "reference", workload, seed, np.ones(400, int))]
    return records


def test_reference_rows_are_unranked_apart_and_never_best(toy_records, tmp_path):
    from core.records import write_record
    from reports import build_report, leaderboard_from_records

    table = leaderboard_from_records(toy_records)
    oracle = table[table["method"] == "oracle"]
    assert set(oracle["role"]) == {"reference"} and oracle["rank"].isna().all()
    assert oracle["tied_with_best"].isna().all()
    learned = table[table["role"] == "method"]
    assert set(learned.loc[learned["rank"] == 1, "method"]) == {"best"}  # not the oracle
    for group, rows in table.groupby(["missing_rate", "workload"]):
        assert list(rows["role"]) == ["method"] * 3 + ["reference"]  # references listed last
    ties = dict(zip(learned["method"], learned["tied_with_best"]))
    assert ties == {"best": True, "close": True, "weak": False}

    for i, rec in enumerate(toy_records):
        write_record(tmp_path / "runs" / f"{i}" / "result.json", rec)
    written = build_report(tmp_path / "runs", tmp_path / "report")
    markdown = written["leaderboard.md"].read_text()
    assert "| *best |" in markdown and "| =close |" in markdown and "*oracle" not in markdown
    assert "Reference rows (not ranked):" in markdown
    text = written["leaderboard.txt"].read_text()
    assert "*best" in text and "=close" in text and "*oracle" not in text
    assert " ref " in text
    page = written["report.html"].read_text()
    assert 'class="reference"' in page and 'class="scroll"' in page
    # 3 learned methods over 2 groups of one dataset: not independent units, no diagram
    assert "figures/critical_difference.png" not in written
    assert "at least 2 independent units (datasets)" in page


# ----------------------------------------------------------------------------- tuning


def test_tune_searches_on_validation_and_writes_a_preset(tiny_root, tmp_path):
    import json

    import yaml

    from tests.test_pipeline import run_cli

    result = run_cli("experiment=tune", "method=impute_then_defer", "hydra.sweeper.n_trials=2",
                     *tiny_overrides(tiny_root, tmp_path), "train.epochs=1",
                     f"tuned_dir={tmp_path / 'tuned'}")
    assert result.returncode == 0, result.stderr[-3000:]
    preset_path = tmp_path / "tuned" / "digits_impute_then_defer.yaml"
    text = preset_path.read_text()
    assert text.startswith("# @package _global_") and "never the test split" in text
    preset = yaml.safe_load(text)
    assert 0.05 <= preset["method"]["params"]["annotator_fraction"] <= 0.75
    assert 0.005 <= preset["train"]["learning_rate"] <= 0.2
    # the chosen trial is the one with the best validation accuracy (test is not read)
    trials = [json.loads(p.read_text()) for p in (tmp_path / "runs/tune").rglob("result.json")]
    assert len(trials) == 2
    def validation(record):
        return record["validation"]["constrained"]["accuracy"]

    (chosen,) = [r for r in trials if r["variant"]["method"]["annotator_fraction"]
                 == pytest.approx(preset["method"]["params"]["annotator_fraction"], rel=1e-2)]
    assert validation(chosen) == max(validation(r) for r in trials)
    assert not (tmp_path / "runs/tune/report").exists()  # no test-set report of the trials


LEARNED_TRAINED = ["multi_l2d_softmax", "multi_l2d_ova", "realizable", "compare_confidence",
                   "l2d_em", "impute_then_defer", "prob_l2d", "classifier_only", "two_stage",
                   "team_allocation", "post_hoc"]


@pytest.mark.parametrize("method", LEARNED_TRAINED)
def test_the_default_grid_uses_the_tuned_presets(method):
    """Every trained method has a validation-tuned preset on digits, and a default run of it
    uses those values while keeping the plain method name as its row label."""
    import yaml

    from benchmark.identity import cell_identity

    preset = yaml.safe_load((REPO_ROOT / "conf/tuned" / f"digits_{method}.yaml").read_text())
    cfg, choices = compose_cfg([f"method={method}"])
    assert choices["tuned"] == f"digits_{method}"
    assert cfg.train.learning_rate == pytest.approx(preset["train"]["learning_rate"])
    for option, value in (preset.get("method") or {}).get("params", {}).items():
        assert getattr(cfg.method.params, option) == pytest.approx(value)
    cell, variant = cell_identity(cfg, choices)
    assert cell["method"] == method and variant["tuned_preset"] == f"digits_{method}"


def load_records_under(path):
    from core.records import load_records

    return load_records(path)


# ----------------------------------------------------------------------------- study experiments


def test_policies_experiment_gives_one_row_per_supported_policy(tiny_root, tmp_path):
    from tests.test_pipeline import run_cli

    result = run_cli("experiment=policies", *tiny_overrides(tiny_root, tmp_path), "train.epochs=1",
                     "method=multi_l2d_softmax,prob_l2d", "missing_rate=0.3", "seed=0")
    assert result.returncode == 0, result.stderr[-3000:]
    records = load_records_under(tmp_path / "runs/policies")
    labels = sorted(r["cell"]["method"].replace(",train.batch_size=16,train.epochs=1", "")
                    .replace("[train.batch_size=16,train.epochs=1]", "") for r in records)
    # softmax supports as_incorrect (its default: the plain name) and drop; prob_l2d none
    assert labels == ["multi_l2d_softmax", "multi_l2d_softmax[missing_policy=drop]"]


def test_estep_experiment_compares_the_three_e_steps(tiny_root, tmp_path):
    """The three E-steps of prob_l2d, each its own record and leaderboard row, labelled by
    the option that differs from the default (method.params variants never overwrite each
    other; test_pipeline's test_every_setting_keeps_its_own_row checks train.* and workload.*)."""
    import pandas as pd

    from tests.test_pipeline import run_cli

    result = run_cli("experiment=estep", *tiny_overrides(tiny_root, tmp_path), "train.epochs=1",
                     "missing_rate=0.5", "seed=0")
    assert result.returncode == 0, result.stderr[-3000:]
    records = load_records_under(tmp_path / "runs/estep")
    estep = sorted(r["variant"]["method"].get("estep", "exact") for r in records)
    assert estep == ["exact", "meanfield", "reference"]
    labels = set(pd.read_csv(tmp_path / "runs/estep/report/leaderboard.csv")["method"])
    extra = "train.batch_size=16,train.epochs=1"
    assert labels == {f"prob_l2d[{extra}]", f"prob_l2d[estep=meanfield,{extra}]",
                      f"prob_l2d[estep=reference,{extra}]"}
    for record in records:
        assert 0.0 <= record["run_metrics"]["imputation_accuracy"] <= 1.0
        assert record["run_metrics"]["estep_ms"] > 0.0
    assert "estep_ms" in (tmp_path / "runs/estep/report/leaderboard.md").read_text()
