"""The report from ragged record sets: every figure and table handles missing cells, a
report that cannot be written says so once, and nothing over-claims (test-set units for the
critical-difference diagram, intervals shared between tables, violation beyond rounding,
the normalised area, stable colours, natural order)."""

from __future__ import annotations

import io
import json
import zlib
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.spec import Outcome, Status
from reports import ReportError, build_report, write_report
from reports.figures import PALETTE, method_styles, registered_methods

AGENTS = ["expert_0", "expert_1", "classifier"]
SIZE = 200  # test samples per record
REFERENCES = {"oracle", "random", "best_expert", "classifier_only"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def flags(share_right: float, seed: int, size: int = SIZE) -> str:
    """A 0/1 string with round(share_right * size) ones, which ones drawn by ``seed``."""
    out = np.zeros(size, dtype=int)
    out[np.random.default_rng(seed).permutation(size)[: round(share_right * size)]] = 1
    return "".join(map(str, out))


def record(method: str, seed: int = 0, workload: str = "none", dataset: str = "digits",
           missing_rate: float = 0.5, accuracy: float = 0.8, target: float | None = None,
           test_set: str = "digits-test", status: str = "ok", curves: bool = True,
           correct: bool = True, size: int = SIZE, classifier_count: int | None = None) -> dict:
    """A result record as the runner writes it (schema 2). ``target`` makes it a coverage
    sweep cell (workload ``<workload>[coverage=c]``, the classifier's share fixed at c)."""
    share = target if target is not None else 0.4
    count = classifier_count if classifier_count is not None else round(share * size)
    shares = {"expert_0": (size - count) / 2 / size, "expert_1": (size - count) / 2 / size,
              "classifier": count / size}
    metrics = {"accuracy": accuracy, "coverage": shares["classifier"],
               **{f"workload/{agent}": value for agent, value in shares.items()},
               "workload_violation": 0.0, "human_workload_cv": 0.0,
               "classifier_accuracy": 0.7, "classifier_ece": 0.05, "deferral_auc": 0.8,
               "expert_accuracy/0": 0.6, "expert_accuracy/1": 0.65}
    if target is not None:  # the evaluator's distance from c itself, rounding included
        metrics["workload_violation"] = abs(shares["classifier"] - target)
    label = workload if target is None else f"{workload}[coverage={target:g}]"
    lo, hi = ([0.0, 0.0, target], [1.0, 1.0, target]) if target is not None else ([0.0] * 3, [1.0] * 3)
    outcomes = flags(accuracy, 1000 * seed + zlib.crc32(method.encode()) % 997, size)
    return {
        "schema": 2, "status": status, "method_name": method.split("[")[0],
        "error": None if status == "ok" else "RuntimeError: boom",
        "role": "reference" if method.split("[")[0] in REFERENCES else "method",
        "cell": {"dataset": dataset, "method": method, "missing_rate": missing_rate,
                 "workload": label, "seed": seed},
        "variant": {"workload": {} if target is None else {"coverage": target}},
        "agents": AGENTS, "workload_bounds": {"lo": lo, "hi": hi},
        "metrics": {"argmax": dict(metrics), "constrained": dict(metrics)},
        "correct": {"constrained": outcomes, "argmax": outcomes} if correct else {},
        "run_metrics": {"train_seconds": 1.0 + seed, "imputation_accuracy": None},
        "curves": ({"coverage": [0.0, 0.5, 1.0], "accuracy": [0.7, accuracy, 0.75]}
                   if curves else {}),
        "provenance": {"git_sha": "abc", "backend": "cpu", "devices": ["cpu:0"],
                       "manifests": {"test/ground_truth": f"{test_set}-manifest"},
                       "images": {"test": f"{test_set}-images"}},
    }


def sweep(methods: dict[str, float], targets, seeds=(0,), **options) -> list[dict]:
    """A coverage sweep: every method (name -> accuracy at coverage 0) at every target."""
    return [record(method, seed, target=target, accuracy=min(1.0, base + 0.05 * target), **options)
            for method, base in methods.items() for target in targets for seed in seeds]


RAGGED = {
    # the README's one cell (workload balanced) beside its E-step sweep (workload none):
    # prob_l2d alone in one group, three variants in the other, one seed
    "one cell beside an E-step sweep": [
        record("prob_l2d", workload="balanced", accuracy=0.85),
        record("prob_l2d", accuracy=0.86), record("prob_l2d[estep=meanfield]", accuracy=0.84),
        record("prob_l2d[estep=reference]", accuracy=0.87)],
    "methods missing from some groups, references alone in one": [
        record("two_stage", missing_rate=0.0), record("post_hoc", missing_rate=0.0, accuracy=0.7),
        record("post_hoc", missing_rate=0.5, workload="paper"),
        record("oracle", missing_rate=0.5, workload="balanced", accuracy=1.0),
        record("random", missing_rate=0.5, workload="balanced", accuracy=0.5)],
    "a coverage sweep beside plain cells, a failed cell, records without curves or outcomes": [
        *sweep({"prob_l2d": 0.8, "two_stage": 0.7, "random": 0.5, "oracle": 0.95},
               [0.0, 0.25, 0.5, 0.75, 1.0], seeds=(0, 1)),
        record("prob_l2d", workload="paper"), record("two_stage", workload="paper", curves=False),
        record("l2d_em", workload="paper", correct=False),
        record("l2d_em", workload="paper", seed=1, status="failed")],
    "a sweep of one target and one seed": sweep({"prob_l2d": 0.8, "two_stage": 0.7}, [0.5]),
    "a partial sweep (a method lacks a target, another a seed)": [
        *sweep({"prob_l2d": 0.8, "random": 0.5, "oracle": 0.95}, [0.0, 0.5, 1.0], seeds=(0, 1)),
        *sweep({"two_stage": 0.7}, [0.0, 1.0], seeds=(0, 1)),
        *sweep({"post_hoc": 0.75}, [0.0, 0.5, 1.0], seeds=(0,)),
        record("post_hoc", seed=1, target=0.5)],
    "every cell failed": [record("prob_l2d", status="failed"), record("two_stage", status="failed")],
}


def check_report(paths: dict[str, Path]) -> None:
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.txt", "report.html", "columns.md"):
        assert paths[name].is_file() and paths[name].stat().st_size > 0, name
    for name, path in paths.items():
        if name.startswith("figures/"):
            assert path.read_bytes()[:8] == PNG_SIGNATURE
            with Image.open(path) as image:
                assert image.width > 100 and image.height > 100
    text = paths["leaderboard.txt"].read_text()
    assert max(len(line) for line in text.splitlines()) <= 100, text


@pytest.mark.parametrize("name", list(RAGGED))
def test_ragged_record_sets_give_a_whole_report(name, tmp_path):
    records = RAGGED[name]
    for i, rec in enumerate(records):
        folder = tmp_path / "runs" / str(i)
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(rec))
    paths = build_report(tmp_path / "runs", tmp_path / "report")
    check_report(paths)
    ok = [rec for rec in records if rec["status"] == "ok"]
    csv = pd.read_csv(paths["leaderboard.csv"]) if ok else None
    if ok:  # one row per cell label that succeeded
        labels = {(r["cell"]["method"], r["cell"]["missing_rate"], r["cell"]["workload"]) for r in ok}
        assert len(csv) == len(labels)


def test_a_method_absent_from_a_workload_panel_is_drawn_where_it_has_results(tmp_path):
    paths = write_report(RAGGED["one cell beside an E-step sweep"], tmp_path)
    assert "figures/workload_shares_digits_missing_0.5.png" in paths
    text = paths["leaderboard.txt"].read_text()
    assert "[digits · missing rate 0.5 · workload balanced]" in text
    assert "*prob_l2d[estep=reference]" in text  # the best of the E-step group


def test_a_sweep_of_one_target_has_no_area_and_says_so(tmp_path):
    paths = write_report(RAGGED["a sweep of one target and one seed"], tmp_path)
    area = pd.read_csv(paths["coverage_auc.csv"])
    assert area["auc"].isna().all() and area["rank"].isna().all()
    assert "– (one target: no area)" in paths["leaderboard.txt"].read_text()


def test_a_partial_sweep_keeps_complete_methods_and_marks_the_others(tmp_path):
    paths = write_report(RAGGED["a partial sweep (a method lacks a target, another a seed)"], tmp_path)
    area = pd.read_csv(paths["coverage_auc.csv"]).set_index("method")
    assert pd.isna(area.loc["two_stage", "auc"]) and area.loc["two_stage", "targets"] == 2
    assert area.loc["post_hoc", "n"] == 1  # only seed 0 has every target
    assert area.loc["prob_l2d", "n"] == 2 and area.loc["prob_l2d", "rank"] == 1
    assert "incomplete (2 of 3 targets)" in paths["leaderboard.md"].read_text()


# ----------------------------------------------------------------------------- failing loudly


def test_a_report_that_cannot_be_written_raises_one_typed_error(tmp_path, monkeypatch):
    import reports

    def broken(*args, **kwargs):
        raise TypeError("operation 'add' not supported for dtype 'str'")

    monkeypatch.setattr(reports, "all_figures", broken)
    with pytest.raises(ReportError, match=r"could not be written \(TypeError: operation 'add'"):
        write_report(RAGGED["one cell beside an E-step sweep"], tmp_path / "report")


def test_the_sweep_callback_turns_a_report_error_into_one_message(tmp_path, monkeypatch):
    import app.callbacks as callbacks

    def broken(*args, **kwargs):
        raise ReportError("the report in X could not be written (TypeError: boom)")

    monkeypatch.setattr(callbacks, "build_report", broken)
    callback = callbacks.SweepCallback()
    stderr = io.StringIO()
    with redirect_stderr(stderr):  # False: the sweep exits with status 1
        assert callback._show_report(tmp_path, tmp_path / "report", [Outcome(Status.OK, {})]) is False
    message = stderr.getvalue().strip()
    assert message.startswith("The report could not be written: ReportError:")
    assert len(message.splitlines()) == 1


# ----------------------------------------------------------------------------- no over-claiming


def units_records(test_sets: list[str], labels: list[str]) -> list[dict]:
    """Three methods in the same order on each dataset label (Friedman rejects with 6 units)."""
    records = []
    for label, test_set in zip(labels, test_sets):
        for method, accuracy in (("prob_l2d", 0.9), ("two_stage", 0.8), ("post_hoc", 0.7)):
            records.append(record(method, dataset=label, test_set=test_set, accuracy=accuracy))
    return records


def test_missing_seed_variants_of_one_dataset_are_one_unit(tmp_path):
    labels = ["digits", "digits@5a1e", "digits@6b2f"]  # dataset.missing_seed=5, =6
    paths = write_report(units_records(["digits-test"] * 3, labels), tmp_path)
    assert "figures/critical_difference.png" not in paths
    text = paths["leaderboard.txt"].read_text()
    assert "these results have 1 test set(s)" in text
    assert "count once: digits, digits@5a1e, digits@6b2f" in text


def test_datasets_with_different_test_sets_are_units(tmp_path):
    sets = [f"set{i}" for i in range(6)]
    paths = write_report(units_records(sets, sets), tmp_path)
    assert "figures/critical_difference.png" in paths
    assert "over 6 independent test sets" in paths["leaderboard.txt"].read_text()


def test_per_target_intervals_and_ties_equal_the_leaderboards(tmp_path):
    records = sweep({"prob_l2d": 0.8, "two_stage": 0.78, "post_hoc": 0.6, "oracle": 0.95},
                    [0.0, 0.5, 1.0], seeds=(0, 1, 2))
    paths = write_report(records, tmp_path)
    targets = pd.read_csv(paths["coverage_targets.csv"])
    board = pd.read_csv(paths["leaderboard.csv"])
    board["target"] = board["workload"].str.extract(r"coverage=([0-9.]+)")[0].astype(float)
    both = targets.merge(board, on=["method", "target"], suffixes=("", "_board"))
    assert len(both) == len(targets) == 12
    for column in ("accuracy", "accuracy_lo", "accuracy_hi"):
        np.testing.assert_array_equal(both[column], both[f"constrained/{column}"])
    def marks(column):
        return [None if pd.isna(tied) else bool(tied) for tied in both[column]]

    assert marks("tied_with_best") == marks("tied_with_best_board")
    assert marks("tied_with_best")[:3] == [True, True, False]  # the test can tell them apart
    assert (both["rank"].fillna(0) == both["rank_board"].fillna(0)).all()


def test_workload_violation_leaves_out_the_rounding_of_a_target(tmp_path):
    """539 test samples at coverage 0.5: the target is round(269.5) = 270 samples, a share
    of 0.50093; the recorded 0.00093 is rounding (0), while 272 samples violate by 2/539."""
    honoured = record("prob_l2d", target=0.5, size=539, classifier_count=270)
    missed = record("two_stage", target=0.5, size=539, classifier_count=272)
    assert honoured["metrics"]["constrained"]["workload_violation"] == pytest.approx(0.5 / 539)
    board = pd.read_csv(write_report([honoured, missed], tmp_path)["leaderboard.csv"])
    violation = dict(zip(board["method"], board["constrained/workload_violation"]))
    assert violation == {"prob_l2d": 0.0, "two_stage": pytest.approx(2 / 539)}


def test_decision_free_metrics_are_one_column_each(tmp_path):
    board = pd.read_csv(write_report(RAGGED["one cell beside an E-step sweep"],
                                     tmp_path)["leaderboard.csv"])
    for metric in ("deferral_auc", "classifier_ece", "classifier_accuracy", "expert_accuracy/0"):
        assert metric in board.columns
        assert not [c for c in board.columns if c.endswith(f"/{metric}")], metric
    assert "constrained/accuracy" in board.columns and "argmax/accuracy" in board.columns


def test_normalised_area_spans_random_to_oracle_with_the_areas_own_draws(tmp_path):
    """Random always wrong, the oracle always right: every resampled area of random is 0 and
    of the oracle 1, so nAC-AUC and its interval equal the area and its interval exactly."""
    records = []
    for seed in (0, 1):
        for target in (0.0, 0.5, 1.0):
            records += [record("random", seed, target=target, accuracy=0.0),
                        record("oracle", seed, target=target, accuracy=1.0),
                        record("prob_l2d", seed, target=target, accuracy=0.6 + 0.2 * target),
                        record("two_stage", seed, target=target, accuracy=0.65)]
    area = pd.read_csv(write_report(records, tmp_path)["coverage_auc.csv"]).set_index("method")
    assert area.loc["random", "nac_auc"] == 0.0 and area.loc["oracle", "nac_auc"] == 1.0
    for method in ("prob_l2d", "two_stage"):
        row = area.loc[method]
        assert row["nac_auc"] == pytest.approx(row["auc"])
        assert row["nac_auc_lo"] == pytest.approx(row["auc_lo"], abs=1e-6)
        assert row["nac_auc_hi"] == pytest.approx(row["auc_hi"], abs=1e-6)
    # by hand: prob_l2d's trapezoid over 0, 0.5, 1 of 0.6, 0.7, 0.8 is 0.7
    assert area.loc["prob_l2d", "auc"] == pytest.approx(0.7)
    assert area.loc["prob_l2d", "vs_best"] == 0.0
    assert area.loc["two_stage", "vs_best"] == pytest.approx(-0.05)


def test_normalised_area_by_hand_and_empty_without_its_references(tmp_path):
    records = sweep({"prob_l2d": 0.8, "random": 0.5, "oracle": 0.9}, [0.0, 1.0])
    area = pd.read_csv(write_report(records, tmp_path / "a")["coverage_auc.csv"]).set_index("method")
    auc = area["auc"]
    assert area.loc["prob_l2d", "nac_auc"] == pytest.approx(
        (auc["prob_l2d"] - auc["random"]) / (auc["oracle"] - auc["random"]))
    assert area.loc["prob_l2d", "nac_auc_lo"] <= area.loc["prob_l2d", "nac_auc"] <= area.loc["prob_l2d", "nac_auc_hi"]
    alone = pd.read_csv(write_report(sweep({"prob_l2d": 0.8}, [0.0, 1.0]), tmp_path / "b")
                        ["coverage_auc.csv"])
    assert alone["nac_auc"].isna().all()


# ----------------------------------------------------------------------------- reading


def test_targets_and_workloads_print_in_numeric_order(tmp_path):
    records = [*sweep({"prob_l2d": 0.8, "two_stage": 0.7}, [1.0, 0.25, 0.0, 0.75, 0.5]),
               record("prob_l2d", workload="w10"), record("prob_l2d", workload="w2")]
    paths = write_report(records, tmp_path)
    text = paths["leaderboard.txt"].read_text()
    header = next(line for line in text.splitlines() if "c=0 " in line)
    assert [word for word in header.split() if word.startswith("c=")] == [
        "c=0", "c=0.25", "c=0.5", "c=0.75", "c=1"]
    assert text.index("workload w2]") < text.index("workload w10]")
    board = pd.read_csv(paths["leaderboard.csv"])
    order = list(dict.fromkeys(board["workload"]))
    assert order == ["none[coverage=0]", "none[coverage=0.25]", "none[coverage=0.5]",
                     "none[coverage=0.75]", "none[coverage=1]", "w2", "w10"]


def test_colours_are_fixed_by_the_registry_not_by_the_methods_present():
    learned, references = registered_methods()
    assert {"prob_l2d", "two_stage"} <= set(learned) and {"oracle", "random"} <= set(references)
    alone = method_styles(["prob_l2d"])["prob_l2d"]
    crowd = method_styles([*learned, *references, "prob_l2d[estep=meanfield]"])
    assert crowd["prob_l2d"] == alone
    assert alone.colour == pytest.approx(PALETTE_RGB[learned.index("prob_l2d")])
    colours = [crowd[name].colour for name in learned]
    assert len(set(colours)) == len(learned)  # every registered method its own colour
    for name in references:  # references: dashed greys
        red, green, blue = crowd[name].colour
        assert red == green == blue and crowd[name].linestyle == "--"
    variant = crowd["prob_l2d[estep=meanfield]"]
    assert variant.colour != alone.colour and variant.marker != alone.marker


PALETTE_RGB = [tuple(int(code[i:i + 2], 16) / 255 for i in (1, 3, 5)) for code in PALETTE]
