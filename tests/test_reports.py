"""Tests of ``reports`` on a small golden set of hand-made result records.

Golden set: dataset "digits", methods alpha and beta, missing rates 0.0 and 0.5, workloads
"none" and "paper", seeds 0-2, plus one failed cell (beta, 0.5, paper, seed 3) whose record
still carries (bogus) metrics that must never reach an aggregate.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reports import (
    aggregate,
    build_report,
    failures,
    format_console,
    leaderboard_table,
    load_leaderboard,
    load_records,
    rank_methods,
    tidy,
)
from reports.frames import correct_frame, curves_frame
from reports.leaderboard import all_columns, format_interval
from reports.metrics import direction
from reports.uncertainty import metric_range

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AGENTS = ["expert_0", "expert_1", "classifier"]
METHODS = ["alpha", "beta"]
MISSING_RATES = [0.0, 0.5]
WORKLOADS = ["none", "paper"]
SEEDS = [0, 1, 2]
TEST_SAMPLES = 20  # per-sample outcomes of the constrained decisions: round(accuracy * 20) right

# Hand-chosen constrained accuracy per (method, missing rate), by seed (same for both workloads).
# alpha wins at missing rate 0.0, beta at 0.5.
CONSTRAINED_ACCURACY = {
    ("alpha", 0.0): [0.8, 0.9, 1.0],
    ("alpha", 0.5): [0.7, 0.8, 0.9],
    ("beta", 0.0): [0.7, 0.7, 0.7],
    ("beta", 0.5): [0.85, 0.85, 0.85],
}
VIOLATION = {"alpha": 0.3, "beta": 0.1}  # constrained workload_violation (lower is better)
TRAIN_SECONDS = {"alpha": [10.0, 20.0, 30.0], "beta": [5.0, 5.0, 5.0]}


def decision_metrics(accuracy: float, violation: float) -> dict:
    return {
        "accuracy": accuracy, "coverage": 0.4,
        "workload/expert_0": 0.3, "workload/expert_1": 0.3, "workload/classifier": 0.4,
        "workload_violation": violation, "human_workload_cv": 0.0,
        "classifier_accuracy": 0.75, "expert_accuracy/0": 0.6, "expert_accuracy/1": 0.65,
        "classifier_ece": 0.05, "deferral_auc": 0.85,
    }


def outcomes(accuracy: float, seed: int) -> str:
    """A 0/1 string with round(accuracy * TEST_SAMPLES) ones (which samples: by seed)."""
    right = round(accuracy * TEST_SAMPLES)
    flags = np.zeros(TEST_SAMPLES, dtype=int)
    flags[np.random.default_rng(seed).permutation(TEST_SAMPLES)[:right]] = 1
    return "".join(map(str, flags))


def golden_record(method: str, missing_rate: float, workload: str, seed: int) -> dict:
    accuracy = CONSTRAINED_ACCURACY[(method, missing_rate)][seed]
    coverage = np.linspace(0.0, 1.0, 101)
    return {
        "schema": 2,
        "method_name": method,
        "role": "method",
        "status": "ok",
        "error": None,
        "cell": {"dataset": "digits", "method": method, "missing_rate": missing_rate,
                 "workload": workload, "seed": seed},
        "agents": AGENTS,
        "workload_bounds": {"lo": [0.0, 0.0, 0.0],
                            "hi": [1.0, 1.0, 0.2] if workload == "paper" else [1.0, 1.0, 1.0]},
        "metrics": {
            "argmax": decision_metrics(accuracy + 0.05, VIOLATION[method] + 0.2),
            "constrained": decision_metrics(accuracy, VIOLATION[method]),
        },
        "correct": {"constrained": outcomes(accuracy, seed)},
        "run_metrics": {
            "train_seconds": TRAIN_SECONDS[method][seed],
            "samples_per_second": 1000.0,
            "imputation_accuracy": None if method == "alpha" else 0.6,
        },
        "curves": {"coverage": coverage.tolist(),
                   "accuracy": (accuracy + 0.1 * (1 - coverage)).tolist()},
        "provenance": {"git_sha": "abc123", "versions": {"jax": "0.4.30"}, "backend": "cpu",
                       "devices": ["cpu:0"]},
        "mlflow_run_id": f"run-{method}-{missing_rate}-{workload}-{seed}",
    }


def failed_record() -> dict:
    record = golden_record("beta", 0.5, "paper", 0)
    record.update(status="failed", error="RuntimeError: NaN loss at step 12 <boom>")
    record["cell"]["seed"] = 3
    record["metrics"]["constrained"]["accuracy"] = 0.0  # must not leak into aggregates
    return record


def write_golden_run(run_dir: Path) -> Path:
    """Write the golden records in a nested layout, as a sweep would."""
    records = [golden_record(m, r, w, s)
               for m in METHODS for r in MISSING_RATES for w in WORKLOADS for s in SEEDS]
    records.append(failed_record())
    for record in records:
        cell = record["cell"]
        folder = (run_dir / cell["dataset"] / cell["method"] / f"mr={cell['missing_rate']}"
                  / cell["workload"] / f"seed={cell['seed']}")
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(record))
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_golden_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def records(run_dir) -> list[dict]:
    return load_records(run_dir)


@pytest.fixture(scope="module")
def agg(records) -> pd.DataFrame:
    return aggregate(tidy(records), correct_frame(records))


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory) -> dict[str, Path]:
    return build_report(run_dir, tmp_path_factory.mktemp("report"))


def one(agg: pd.DataFrame, method: str, missing_rate: float, workload: str, decision: str,
        metric: str) -> pd.Series:
    rows = agg[(agg["method"] == method) & (agg["missing_rate"] == missing_rate)
               & (agg["workload"] == workload) & (agg["decision"] == decision)
               & (agg["metric"] == metric)]
    assert len(rows) == 1
    return rows.iloc[0]


# ---------------------------------------------------------------------------- metrics


def test_metric_directions():
    assert direction("accuracy") == "higher"
    assert direction("expert_accuracy/3") == "higher"
    assert direction("workload/expert_0") is None
    assert direction("coverage") is None
    assert direction("train_seconds") == "lower"
    assert direction("classifier_ece") == "lower"
    with pytest.raises(KeyError, match="Did you mean 'accuracy'"):
        direction("acuracy")


# ---------------------------------------------------------------------------- frames


def test_load_records_finds_nested_files(records):
    assert len(records) == 2 * 2 * 2 * 3 + 1
    assert all(Path(record["path"]).name == "result.json" for record in records)


def test_tidy_excludes_failed_cells_and_null_values(records):
    frame = tidy(records)
    assert list(frame.columns) == ["dataset", "method", "missing_rate", "workload", "seed",
                                   "decision", "metric", "value"]
    assert set(frame["seed"]) == set(SEEDS)  # the failed seed 3 is absent
    assert set(frame["decision"]) == {"argmax", "constrained", "run"}
    imputation = frame[frame["metric"] == "imputation_accuracy"]
    assert set(imputation["method"]) == {"beta"}  # alpha's null values are left out


def test_aggregate_mean_interval_n_match_hand_computed(agg):
    alpha = one(agg, "alpha", 0.0, "none", "constrained", "accuracy")
    assert alpha["mean"] == pytest.approx(0.9) and alpha["n"] == 3
    assert alpha["lo"] < 0.9 < alpha["hi"] <= 1.0  # over seeds and samples, clipped to [0, 1]

    # over seeds only: the 3 seeds' values 10, 20, 30 give bootstrap means from 10 to 30,
    # each extreme with probability 1/27 > 2.5%, so the 95% interval is exactly [10, 30]
    seconds = one(agg, "alpha", 0.5, "paper", "run", "train_seconds")
    assert seconds["mean"] == pytest.approx(20.0)
    assert (seconds["lo"], seconds["hi"]) == (pytest.approx(10.0), pytest.approx(30.0))

    # the same accuracy on every seed still has test-sample uncertainty (20 samples)
    constant = one(agg, "beta", 0.0, "none", "constrained", "accuracy")
    assert constant["mean"] == pytest.approx(0.7)
    binomial = 1.96 * math.sqrt(0.7 * 0.3 / TEST_SAMPLES)
    assert constant["lo"] == pytest.approx(0.7 - binomial, abs=0.06)
    assert constant["hi"] == pytest.approx(0.7 + binomial, abs=0.06)
    # without per-sample outcomes (argmax here) a constant metric has a zero-width interval
    violation = one(agg, "beta", 0.0, "none", "constrained", "workload_violation")
    assert violation["lo"] == violation["hi"] == pytest.approx(0.1)


@pytest.mark.parametrize("seeds", [1, 2, 3])
def test_intervals_stay_in_the_metric_range(seeds):
    rng = np.random.default_rng(seeds)
    rows, outcomes_rows = [], []
    for seed in range(seeds):
        for metric, value in (("accuracy", 0.98 + 0.02 * rng.random()),
                              ("workload_violation", 0.01 * rng.random()),
                              ("classifier_ece", 0.99), ("train_seconds", 5.0 * rng.random())):
            rows.append(["d", "m", 0.0, "none", seed, "constrained", metric, value])
        outcomes_rows.append(["d", "m", 0.0, "none", seed, "constrained",
                              (rng.random(50) < 0.98).astype(np.uint8)])
    frame = pd.DataFrame(rows, columns=["dataset", "method", "missing_rate", "workload", "seed",
                                        "decision", "metric", "value"])
    correct = pd.DataFrame(outcomes_rows, columns=["dataset", "method", "missing_rate", "workload",
                                                   "seed", "decision", "correct"])
    for row in aggregate(frame, correct).itertuples(index=False):
        low, high = metric_range(row.metric)
        if row.metric == "accuracy" or seeds > 1:
            assert row.lo <= row.hi, row
            assert (low is None or row.lo >= low) and (high is None or row.hi <= high), row
        else:  # one seed and no per-sample outcomes: no interval
            assert math.isnan(row.lo) and math.isnan(row.hi)


def test_failed_cell_is_listed_and_excluded_from_aggregates(records, agg):
    failed = failures(records)
    assert len(failed) == 1
    row = failed.iloc[0]
    cell = (row["method"], row["missing_rate"], row["workload"], row["seed"])
    assert cell == ("beta", 0.5, "paper", 3)
    assert "NaN loss" in row["error"]
    beta = one(agg, "beta", 0.5, "paper", "constrained", "accuracy")
    assert beta["n"] == 3
    assert beta["mean"] == pytest.approx(0.85)  # the failed record's 0.0 is not averaged in


def test_single_seed_without_outcomes_has_no_interval():
    single = pd.DataFrame([["d", "m", 0.0, "none", 0, "constrained", "accuracy", 0.5]],
                          columns=["dataset", "method", "missing_rate", "workload", "seed",
                                   "decision", "metric", "value"])
    row = aggregate(single).iloc[0]
    assert row["n"] == 1 and row["mean"] == 0.5 and math.isnan(row["lo"]) and math.isnan(row["hi"])
    assert format_interval(row["mean"], row["lo"], row["hi"]) == "0.500"
    assert format_interval(0.5, 0.41, 0.59) == "0.500 [0.410, 0.590]"


def test_curves_frame_has_every_point_of_successful_cells(records):
    curves = curves_frame(records)
    assert len(curves) == 2 * 2 * 2 * 3 * 101
    assert curves["coverage"].min() == 0.0 and curves["coverage"].max() == 1.0


def test_repeated_cell_keeps_one_record_with_a_warning(records):
    repeated = [*records, {**records[0], "path": "elsewhere/result.json"}]
    with pytest.warns(UserWarning, match="more than one result record"):
        frame = tidy(repeated)
    assert len(frame) == len(tidy(records))


# ---------------------------------------------------------------------------- ranking


def ranks(ranked: pd.DataFrame, missing_rate: float, workload: str) -> dict[str, int]:
    rows = ranked[(ranked["missing_rate"] == missing_rate) & (ranked["workload"] == workload)]
    return dict(zip(rows["method"], rows["rank"]))


def test_ranking_higher_is_better(agg):
    ranked = rank_methods(agg)  # constrained accuracy
    assert ranks(ranked, 0.0, "none") == {"alpha": 1, "beta": 2}
    assert ranks(ranked, 0.5, "paper") == {"beta": 1, "alpha": 2}


def test_ranking_lower_is_better_ranks_ascending(agg):
    ranked = rank_methods(agg, "workload_violation", "constrained")
    for rate in MISSING_RATES:
        for workload in WORKLOADS:
            assert ranks(ranked, rate, workload) == {"beta": 1, "alpha": 2}
    seconds = rank_methods(agg, "train_seconds")  # a run metric: the decision resolves to "run"
    assert ranks(seconds, 0.0, "none") == {"beta": 1, "alpha": 2}


def test_ranking_on_metric_without_direction_is_an_error(agg):
    with pytest.raises(ValueError, match="no better side"):
        rank_methods(agg, "coverage")


def test_unknown_decision_is_an_error(agg):
    with pytest.raises(ValueError, match="unknown decision 'constrainted'"):
        rank_methods(agg, "accuracy", "constrainted")


def test_leaderboard_on_a_run_metric(agg):
    table = leaderboard_table(agg, "train_seconds")
    assert table.attrs["primary_column"] == "train_seconds"
    assert "constrained/workload_violation" in table.columns  # decision metrics stay constrained
    assert "train_seconds (lower is better)" in format_console(table)


def test_leaderboard_table_and_console(records, agg):
    table = leaderboard_table(agg)
    assert len(table) == 8
    expected = {"constrained/accuracy", "constrained/accuracy_lo", "constrained/accuracy_hi",
                "argmax/accuracy", "constrained/workload_violation", "train_seconds",
                "n", "role", "tied_with_best", "vs_best"}
    assert expected <= set(table.columns)
    # the compact table leaves out what says nothing (here a constant imputation accuracy);
    # the full one (the CSV) keeps it
    assert "imputation_accuracy" not in table.columns
    full = leaderboard_table(agg, columns=all_columns(agg))
    assert "imputation_accuracy" in full.columns
    best = table[table["rank"] == 1]
    assert (best["vs_best"] == 0).all() and (table.loc[table["role"] == "method", "vs_best"] <= 0).all()
    text = format_console(table, failures(records))
    assert max(len(line) for line in text.splitlines()[:4]) <= 100
    assert "*alpha" in text and "*beta" in text  # best per group is marked
    assert "constrained accuracy (higher is better)" in text
    assert "1 failed cell (beta: 1)" in text


# ---------------------------------------------------------------------------- files


def test_report_files_exist(report):
    for name in ["leaderboard.md", "leaderboard.csv", "leaderboard.txt", "report.html"]:
        assert report[name].is_file() and report[name].stat().st_size > 0
    figures = [path for name, path in report.items() if name.startswith("figures/")]
    kinds = {path.name.split("_digits")[0] for path in figures}
    assert kinds == {"accuracy_vs_missing_rate", "deferral_curve", "workload_shares",
                     "accuracy_vs_violation"}  # 2 methods: no critical-difference diagram


def test_csv_has_one_row_per_method_missing_rate_workload(report):
    csv = pd.read_csv(report["leaderboard.csv"])
    keys = ["dataset", "method", "missing_rate", "workload"]
    assert len(csv) == len(METHODS) * len(MISSING_RATES) * len(WORKLOADS)
    assert not csv.duplicated(keys).any()
    for column in ["constrained/accuracy", "argmax/accuracy", "constrained/workload_violation",
                   "constrained/workload/classifier", "train_seconds", "n", "role", "tied_with_best"]:
        assert column in csv.columns
        if column not in ("n", "role", "tied_with_best"):
            assert {f"{column}_lo", f"{column}_hi"} <= set(csv.columns)
    row = csv[(csv["method"] == "alpha") & (csv["missing_rate"] == 0.0) & (csv["workload"] == "none")]
    assert row["constrained/accuracy"].item() == pytest.approx(0.9)
    assert 0.0 <= row["constrained/accuracy_lo"].item() < 0.9 < row["constrained/accuracy_hi"].item() <= 1.0
    assert row["rank"].item() == 1 and row["n"].item() == 3 and row["role"].item() == "method"


def test_markdown_marks_best_method(report):
    text = report["leaderboard.md"].read_text()
    assert "## digits" in text and "| *alpha |" in text and "| *beta |" in text
    assert "0.900 [" in text and "### missing rate 0, workload none" in text


def test_pngs_are_valid(report):
    figures = [path for name, path in report.items() if name.startswith("figures/")]
    assert figures
    for path in figures:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_html_is_self_contained(report):
    page = report["report.html"].read_text()
    figures = [name for name in report if name.startswith("figures/")]
    assert page.count('src="data:image/png;base64,') == len(figures)
    assert "<script" not in page and "<link" not in page and "http" not in page
    assert "NaN loss at step 12 &lt;boom&gt;" in page  # failure listed, escaped
    assert "abc123" in page  # provenance summary


def test_load_leaderboard_matches_built_table(run_dir):
    table = load_leaderboard(run_dir, "workload_violation")
    assert table.attrs["primary_column"] == "constrained/workload_violation"
    assert set(table.loc[table["rank"] == 1, "method"]) == {"beta"}


# ---------------------------------------------------------------------------- command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "reports", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_on_empty_dir_fails_with_one_line_message(tmp_path):
    result = run_cli(str(tmp_path))
    assert result.returncode != 0
    assert "no result.json records found" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_on_missing_dir_fails_cleanly(tmp_path):
    result = run_cli(str(tmp_path / "absent"))
    assert result.returncode != 0 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help():
    result = run_cli("--help")
    assert result.returncode == 0 and "--primary-metric" in result.stdout


def test_cli_builds_report(run_dir, tmp_path):
    result = run_cli(str(run_dir), "--out", str(tmp_path / "out"), "--primary-metric", "accuracy")
    assert result.returncode == 0, result.stderr
    assert "*alpha" in result.stdout and "report:" in result.stdout
    assert (tmp_path / "out" / "report.html").is_file()


def test_cli_unknown_metric_fails_cleanly(run_dir, tmp_path):
    result = run_cli(str(run_dir), "--out", str(tmp_path / "out"), "--primary-metric", "acuracy")
    assert result.returncode != 0 and "Did you mean 'accuracy'" in result.stderr
    assert "Traceback" not in result.stderr
