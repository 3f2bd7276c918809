"""The comparison protocol: validation split, seeds, reference rows, intervals, ties."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pandas as pd
import pytest

from benchmark.config import DatasetConfig
from benchmark.data import load_data
from benchmark.runner import run_cell
from datasets.generators import stratified_split
from tests.conftest import REPO_ROOT, tiny_overrides
from tests.test_pipeline import compose_cfg


def image_keys(split) -> set[str]:
    return {hashlib.sha256(image.tobytes()).hexdigest() for image in split.images}


def test_validation_is_held_out_stratified_and_disjoint(tiny_root, tmp_path):
    cfg, _ = compose_cfg(tiny_overrides(tiny_root, tmp_path))
    dataset = DatasetConfig.parse(cfg["dataset"], REPO_ROOT)
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
    from reports import build_report, leaderboard_from_records
    from benchmark.records import write_record

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
    assert "**best**" in markdown and "_close_" in markdown and "**oracle**" not in markdown
    assert "Reference rows (not ranked):" in markdown
    text = written["leaderboard.txt"].read_text()
    assert "*best" in text and "=close" in text and "*oracle" not in text
    assert " ref " in text
    page = written["report.html"].read_text()
    assert 'class="reference"' in page and 'class="scroll"' in page
    assert "Critical-difference diagram" in page  # 3 learned methods over 2 groups
    assert "figures/critical_difference.png" in written


# ----------------------------------------------------------------------------- tuning


def test_tune_searches_on_validation_and_writes_a_preset(tiny_root, tmp_path):
    import json

    import yaml

    from tests.test_pipeline import run_cli

    result = run_cli("experiment=tune", "method=impute_then_defer", "hydra.sweeper.n_trials=3",
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
    assert len(trials) == 3
    def validation(record):
        return record["validation"]["constrained"]["accuracy"]

    (chosen,) = [r for r in trials if r["variant"]["method"]["annotator_fraction"]
                 == pytest.approx(preset["method"]["params"]["annotator_fraction"], rel=1e-2)]
    assert validation(chosen) == max(validation(r) for r in trials)
    assert not (tmp_path / "runs/tune/report").exists()  # no test-set report of the trials


LEARNED_TRAINED = ["multi_l2d_softmax", "multi_l2d_ova", "realizable", "compare_confidence",
                   "l2d_em", "impute_then_defer", "prob_l2d", "classifier_only"]


@pytest.mark.parametrize("method", LEARNED_TRAINED)
def test_the_default_grid_uses_the_tuned_presets(method):
    """Every trained method has a validation-tuned preset on digits, and a default run of it
    uses those values while keeping the plain method name as its row label."""
    import yaml

    from benchmark.identity import cell_identity

    preset = yaml.safe_load((REPO_ROOT / "conf/tuned" / f"digits_{method}.yaml").read_text())
    cfg, choices = compose_cfg([f"method={method}"])
    assert choices["tuned"] == f"digits_{method}"
    assert cfg["train"]["learning_rate"] == pytest.approx(preset["train"]["learning_rate"])
    for option, value in (preset.get("method") or {}).get("params", {}).items():
        assert cfg["method"]["params"][option] == pytest.approx(value)
    cell, variant = cell_identity(cfg, choices)
    assert cell["method"] == method and variant["tuned_preset"] == f"digits_{method}"


# ----------------------------------------------------------------------------- coverage sweeps


def sweep_record(method: str, role: str, bound: float, seed: int, coverage: float, accuracy: float) -> dict:
    label = "none" if bound == 1.0 else f"none[classifier.hi={bound:g}]"
    metrics = {"accuracy": accuracy, "coverage": coverage, "workload_violation": 0.0}
    return {"schema": 2, "status": "ok", "error": None, "method_name": method, "role": role,
            "cell": {"dataset": "toy", "method": method, "missing_rate": 0.5, "workload": label,
                     "seed": seed},
            "variant": {"workload": {} if bound == 1.0 else {"classifier.hi": bound}},
            "workload_bounds": {"lo": [0.0, 0.0], "hi": [1.0, bound]},
            "metrics": {"argmax": metrics, "constrained": metrics}, "run_metrics": {}, "curves": {}}


def test_coverage_auc_is_the_trapezoid_over_realised_coverage():
    from reports.coverage import coverage_auc, coverage_points

    records = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        # realised coverage 0, 0.4, 0.6 (the classifier never takes more than 60%)
        for bound, coverage, accuracy in ((0.0, 0.0, 0.5), (0.5, 0.4, 0.7), (1.0, 0.6, 0.6)):
            records.append(sweep_record("a", "method", bound, seed, coverage, accuracy + shift))
            records.append(sweep_record("b", "method", bound, seed, coverage, accuracy - 0.3))
            records.append(sweep_record("oracle", "reference", bound, seed, coverage, 1.0))
    # a workload that changes more than the classifier's bound is not part of the sweep
    other = sweep_record("a", "method", 0.5, 0, 0.5, 0.9)
    records.append({**other, "variant": {"workload": {"classifier.hi": 0.5, "humans.hi": 0.5}},
                    "cell": {**other["cell"], "workload": "none[classifier.hi=0.5,humans.hi=0.5]"}})
    points = coverage_points(records)
    assert len(points) == 18
    auc = coverage_auc(points, {"oracle": "reference"}).set_index("method")
    by_hand = 0.4 * (0.5 + 0.7) / 2 + 0.2 * (0.7 + 0.6) / 2  # = 0.37 for seed 0
    assert auc.loc["a", "auc"] == pytest.approx(by_hand + 0.6 * 0.1 / 2)  # mean of seeds 0, 1
    assert auc.loc["a", "rank"] == 1 and auc.loc["b", "rank"] == 2
    assert pd.isna(auc.loc["oracle", "rank"]) and auc.loc["oracle", "role"] == "reference"
    assert bool(auc.loc["a", "tied_with_best"])
    assert 0.0 <= auc.loc["a", "auc_lo"] <= auc.loc["a", "auc"] <= auc.loc["a", "auc_hi"] <= 1.0


def test_coverage_smoke_writes_the_figure_and_the_auc_table(tiny_root, tmp_path):
    from tests.test_pipeline import run_cli

    result = run_cli("experiment=coverage_smoke", *tiny_overrides(tiny_root, tmp_path), "train.epochs=1",
                     "method=prob_l2d,classifier_only", "workload.classifier.hi=0.0,0.5,1.0")
    assert result.returncode == 0, result.stderr[-3000:]
    report = tmp_path / "runs/coverage_smoke/report"
    auc = pd.read_csv(report / "coverage_auc.csv")
    assert set(auc["method"].str.split("[").str[0]) == {"prob_l2d", "classifier_only"}
    assert auc["auc"].between(0, 1).all()
    assert list((report / "figures").glob("accuracy_coverage_*.png"))
    assert "Accuracy-coverage sweeps" in (report / "leaderboard.md").read_text()
    # prob_l2d trains once per bound, classifier_only once: its predictions are re-scored
    cached = list((tmp_path / "cache/predictions").glob("*.npz"))
    assert len([p for p in cached if p.name.startswith("prob_l2d")]) == 3
    assert len([p for p in cached if p.name.startswith("classifier_only")]) == 1
    records = load_records_under(tmp_path / "runs/coverage_smoke")
    assert all(r["run_metrics"]["estep_ms"] > 0 for r in records if r["method_name"] == "prob_l2d")


def load_records_under(path):
    from benchmark.records import load_records

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
    from tests.test_pipeline import run_cli

    result = run_cli("experiment=estep", *tiny_overrides(tiny_root, tmp_path), "train.epochs=1",
                     "missing_rate=0.5", "seed=0")
    assert result.returncode == 0, result.stderr[-3000:]
    records = load_records_under(tmp_path / "runs/estep")
    estep = sorted(r["variant"]["method"].get("estep", "exact") for r in records)
    assert estep == ["exact", "meanfield", "reference"]
    for record in records:
        assert 0.0 <= record["run_metrics"]["imputation_accuracy"] <= 1.0
        assert record["run_metrics"]["estep_ms"] > 0.0
    assert "estep_ms" in (tmp_path / "runs/estep/report/leaderboard.md").read_text()
