"""Accuracy at equal coverage: coverage targets as whole numbers of samples, the methods that
take part (random at the same coverage, Prob-L2D trained once and assigned post hoc), the
per-target table and the equal-coverage AUC, the critical-difference diagram's rule, and
``experiment=coverage_smoke`` end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmark.assignment import capacity_assignment, integer_capacities
from benchmark.bounds import InfeasibleBoundsError
from benchmark.config import AgentShare, ConfigError, WorkloadConfig
from core.spec import target_count
from tests.conftest import REPO_ROOT, tiny_overrides

GRID = [0.0, 0.25, 0.5, 0.75, 1.0]


# ----------------------------------------------------------------------------- whole numbers


@pytest.mark.parametrize("num_samples", [1, 2, 7, 24, 100, 539])
@pytest.mark.parametrize("target", [0.0, 0.1, 0.25, 0.3, 1 / 3, 0.5, 0.7, 0.95, 1.0])
def test_a_target_is_exactly_round_c_n_samples_and_never_infeasible(num_samples, target):
    lo, hi = [0.0, 0.0, target], [1.0, 1.0, target]
    cap_lo, cap_hi = integer_capacities(num_samples, lo, hi)
    expected = int(np.floor(target * num_samples + 0.5))  # round half up, by hand
    assert cap_lo[-1] == cap_hi[-1] == expected
    scores = np.random.default_rng(num_samples).random((num_samples, 3))
    counts = np.bincount(capacity_assignment(scores, lo, hi), minlength=3)
    assert counts[-1] == expected
    assert abs(counts[-1] / num_samples - target) <= 0.5 / num_samples + 1e-12


def test_digits_target_0_3_of_539_is_162_samples():
    """0.3 x 539 = 161.7: the old ceil/floor rule found no whole number in [161.7, 161.7]."""
    assert target_count(0.3, 539) == 162
    scores = np.random.default_rng(0).random((539, 4))
    agent = capacity_assignment(scores, [0, 0, 0, 0.3], [1, 1, 1, 0.3])
    assert np.sum(agent == 3) == 162


def test_chunks_of_a_split_add_up_to_the_split_target():
    scores = np.random.default_rng(1).random((539, 3))
    lo, hi = [0.0, 0.0, 0.3], [1.0, 1.0, 0.3]
    per_chunk = [np.sum(capacity_assignment(scores[i:i + 100], lo, hi, offset=i) == 2)
                 for i in range(0, 539, 100)]
    assert sum(per_chunk) == 162 and per_chunk == [30, 30, 30, 30, 30, 12]


def test_a_range_that_holds_no_whole_number_still_names_the_agent():
    with pytest.raises(InfeasibleBoundsError, match=r"expert_0 \(lo=0.4, hi=0.45\)"):
        integer_capacities(4, [0.4, 0.0, 0.0], [0.45, 1.0, 1.0], ["expert_0", "expert_1", "classifier"])


def test_workload_coverage_sets_the_classifier_share_and_is_checked():
    free = WorkloadConfig(name="none", coverage=0.3).bounds(num_experts=2)
    assert free.lo == (0.0, 0.0, 0.3) and free.hi == (1.0, 1.0, 0.3)
    balanced = WorkloadConfig(name="balanced", coverage=0.4, balanced_slack=0.05,
                              classifier=AgentShare(0.0, 0.4)).bounds(num_experts=3)
    assert balanced.lo[-1] == balanced.hi[-1] == 0.4
    assert balanced.lo[0] == pytest.approx(0.15) and balanced.hi[0] == pytest.approx(0.25)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="workload.coverage"):
            WorkloadConfig(name="none", coverage=bad)


# ----------------------------------------------------------------------------- the methods


def test_random_is_random_at_every_target():
    """Random deferral's scores stay a random order under any capacity: at a target below its
    own coverage it keeps a random subset of its chosen samples, above it adds random ones."""
    from benchmark import training
    from tests.test_methods import SPEC, E, build, make_batch

    method = build("random", coverage=0.5)
    model = training.init_model(method, SPEC, 0)
    x = make_batch(size=400, seed=2).x
    scores = method.reference_scores(None, np.asarray(method.agent_scores(model, x)), None, None)
    own = set(np.flatnonzero(scores.argmax(axis=1) == E))
    assert len(own) == 200
    lo, hi = np.zeros(E + 1), np.ones(E + 1)
    chosen = {}
    for target in (0.2, 0.8):
        lo[E] = hi[E] = target
        chosen[target] = set(np.flatnonzero(capacity_assignment(scores, lo, hi) == E))
        assert len(chosen[target]) == target_count(target, 400)
    assert chosen[0.2] < own < chosen[0.8]
    # not the solver's tie-break (e.g. the first indices): spread over the whole split
    assert 100 < np.mean(sorted(chosen[0.2])) < 300 and max(chosen[0.2]) > 300


def test_prob_l2d_posthoc_trains_once_without_the_bounds():
    import jax.numpy as jnp

    from benchmark import training
    from core.spec import TrainInputs, UndeclaredBoundsError
    from tests.test_methods import SPEC, build, make_batch, run

    constrained, posthoc = build("prob_l2d"), build("prob_l2d", train_with_workload=False)
    assert constrained.workload_in_training and not posthoc.workload_in_training
    free = TrainInputs(progress=jnp.float32(0.5))  # what the trainer passes undeclared methods
    history, *_ = run(posthoc, steps=2, inputs=free)
    assert all(np.isfinite(h["loss"]) for h in history)
    assert all(h["workload_violation"] == 0.0 for h in history)
    with pytest.raises(UndeclaredBoundsError):
        run(constrained, steps=1, inputs=free)
    q_t = posthoc.impute(training.init_model(posthoc, SPEC, 0), make_batch(), free)
    np.testing.assert_allclose(np.asarray(q_t).sum(axis=-1), 1.0, atol=1e-5)


def test_prob_l2d_posthoc_config_is_prob_l2d_with_its_tuned_preset():
    from benchmark.identity import cell_identity
    from tests.test_pipeline import compose_cfg

    cfg, choices = compose_cfg(["method=prob_l2d_posthoc", "workload.coverage=0.3"])
    reference, _ = compose_cfg(["method=prob_l2d"])
    assert cfg.method.name == "prob_l2d"
    assert cfg.method.params.train_with_workload is False
    assert cfg.train.learning_rate == reference.train.learning_rate  # inherited
    cell, variant = cell_identity(cfg, choices)
    assert cell["method"] == "prob_l2d[train_with_workload=false]"  # no train.* difference
    assert cell["workload"] == "none[coverage=0.3]" and variant["workload"] == {"coverage": 0.3}


# ----------------------------------------------------------------------------- the report


def point_record(method: str, seed: int, target: float, correct: np.ndarray, role="method",
                 dataset="toy", workload="none", coverage=None) -> dict:
    accuracy = float(np.mean(correct))
    coverage = target if coverage is None else coverage
    metrics = {"accuracy": accuracy, "coverage": coverage, "workload_violation": 0.0}
    return {"schema": 2, "status": "ok", "error": None, "method_name": method, "role": role,
            "cell": {"dataset": dataset, "method": method, "missing_rate": 0.5,
                     "workload": f"{workload}[coverage={target:g}]", "seed": seed},
            "variant": {"workload": {"coverage": target}},
            "workload_bounds": {"lo": [0.0, target], "hi": [1.0, target]},
            "metrics": {"argmax": metrics, "constrained": metrics},
            "correct": {"constrained": "".join("1" if c else "0" for c in correct),
                        "argmax": "".join("1" if c else "0" for c in correct)},
            "run_metrics": {}, "curves": {}}


def outcomes(rate: float, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros(size, dtype=int)
    out[rng.permutation(size)[: int(round(rate * size))]] = 1
    return out


@pytest.fixture
def equal_coverage_records():
    """Three seeds x five targets. ``steady`` is more accurate than ``stops_early`` at every
    target; ``stops_early`` is the old artefact's winner (it would have kept full coverage);
    ``partial`` lacks a target; ``oracle`` is a reference row."""
    records = []
    for seed in range(3):
        for i, target in enumerate(GRID):
            steady = outcomes(0.9 - 0.1 * target, 400, 10 * seed + i)
            worse = steady.copy()
            worse[np.flatnonzero(steady)[:40]] = 0  # 10% fewer right answers at every target
            records += [point_record("steady", seed, target, steady),
                        point_record("stops_early", seed, target, worse),
                        point_record("oracle", seed, target, np.ones(400, int), role="reference")]
            if target != 0.5:
                records.append(point_record("partial", seed, target, steady))
    records.append({**point_record("steady", 0, 0.3, np.ones(400, int)),  # another family
                    "variant": {"workload": {"coverage": 0.3, "humans.hi": 0.5}},
                    "cell": {"dataset": "toy", "method": "steady", "missing_rate": 0.5,
                             "workload": "none[coverage=0.3,humans.hi=0.5]", "seed": 0}})
    return records


def test_a_method_more_accurate_at_every_target_has_the_larger_area(equal_coverage_records):
    from reports.coverage import area_table, coverage_points, target_table, trapezoid_weights

    points = coverage_points(equal_coverage_records)
    assert set(points["workload"]) == {"none", "none[humans.hi=0.5]"}
    roles = {"oracle": "reference"}
    area = area_table(points, roles)
    area = area[area["workload"] == "none"].set_index("method")
    targets = target_table(points, roles)
    targets = targets[targets["workload"] == "none"]
    assert area.loc["steady", "auc"] > area.loc["stops_early", "auc"]
    assert area.loc["steady", "rank"] == 1 and area.loc["stops_early", "rank"] == 2
    assert area.loc["steady", "tied_with_best"] and not area.loc["stops_early", "tied_with_best"]
    # the area is the trapezoid over the common grid of the per-target table's means
    for method in ("steady", "stops_early", "oracle"):
        means = targets[targets["method"] == method].sort_values("target")
        assert list(means["target"]) == GRID
        by_hand = sum((b - a) * (fa + fb) / 2 for a, b, fa, fb in zip(
            GRID[:-1], GRID[1:], means["accuracy"].iloc[:-1], means["accuracy"].iloc[1:]))
        assert area.loc[method, "auc"] == pytest.approx(by_hand)
        assert area.loc[method, "grid"] == "0,0.25,0.5,0.75,1"
        # float32 bootstrap sums: the interval holds the mean to 1e-6
        assert area.loc[method, "auc_lo"] - 1e-6 <= area.loc[method, "auc"] <= area.loc[method, "auc_hi"] + 1e-6
    np.testing.assert_allclose(trapezoid_weights(GRID), [0.125, 0.25, 0.25, 0.25, 0.125])
    assert area.loc["oracle", "auc"] == pytest.approx(1.0) and pd.isna(area.loc["oracle", "rank"])
    assert pd.isna(area.loc["partial", "auc"]) and pd.isna(area.loc["partial", "rank"])
    assert area.loc["partial", "targets"] == 4 and area.loc["partial", "grid_targets"] == 5
    # per target: steady best everywhere, the reference unranked
    learned = targets[targets["role"] == "method"]
    best = learned[learned["rank"] == 1]
    assert set(best["method"]) == {"steady", "partial"} and set(best["target"]) == set(GRID)
    assert targets.loc[targets["method"] == "oracle", "rank"].isna().all()
    assert (targets["coverage_error"] == 0).all()


def test_report_shows_the_equal_coverage_tables_and_names_both_areas(equal_coverage_records, tmp_path):
    from reports import write_report

    paths = write_report(equal_coverage_records, tmp_path / "report")
    assert {"coverage_auc.csv", "coverage_targets.csv"} <= set(paths)
    figures = [name for name in paths if name.startswith("figures/")]
    assert figures[0].startswith("figures/accuracy_at_coverage_toy_none")  # headline first
    markdown = paths["leaderboard.md"].read_text()
    assert "## Accuracy at equal coverage" in markdown
    assert "equal-coverage AUC: area under constrained accuracy" in markdown
    assert "deferral_auc: area under one trained model's own" in markdown
    assert "incomplete (4 of 5 targets)" in markdown
    # the headline first; the per-target leaderboards that repeat its numbers folded away
    assert markdown.index("## Accuracy at equal coverage") < markdown.index("## Leaderboard")
    assert "<details><summary>missing rate 0.5, workload none[coverage=0]</summary>" in markdown
    assert "nAC-AUC" in markdown and "Ties (=) come from a paired test" in markdown
    text = paths["leaderboard.txt"].read_text()
    assert text.startswith("== Accuracy at equal coverage ==") and "*0." in text
    assert max(len(line) for line in text.splitlines()) <= 100
    html = paths["report.html"].read_text()
    headline = html.index("<h2>Accuracy at equal coverage</h2>")
    assert headline < html.index('alt="accuracy_at_coverage_toy_none"') < html.index("<h2>Leaderboard</h2>")
    assert html.index("<h2>Leaderboard</h2>") < html.index("<details>")


# ----------------------------------------------------------------------------- statistics


def unit_records(num_datasets: int, consistent: bool) -> list[dict]:
    """Records of three learned methods on ``num_datasets`` datasets: with ``consistent``
    the same order everywhere, else orders that cancel out."""
    records = []
    for d in range(num_datasets):
        order = [0, 1, 2] if consistent else [[0, 1, 2], [2, 1, 0], [1, 0, 2], [2, 0, 1]][d % 4]
        for method, place in zip(("a", "b", "c"), order):
            record = point_record(method, 0, 1.0, outcomes(0.9 - 0.1 * place, 200, d),
                                  dataset=f"set{d}")
            records.append({**record, "variant": {"workload": {}},
                            "cell": {**record["cell"], "workload": "none"}})
    return records


def test_cd_diagram_is_absent_with_the_reason_when_friedman_does_not_reject(tmp_path):
    from reports import write_report

    paths = write_report(unit_records(4, consistent=False), tmp_path / "report")
    assert "figures/critical_difference.png" not in paths
    markdown = paths["leaderboard.md"].read_text()
    assert "not significant (Friedman p = " in markdown
    assert "not significant (Friedman p = " in paths["leaderboard.txt"].read_text()


def test_cd_diagram_needs_independent_units(equal_coverage_records, tmp_path):
    from reports import write_report

    paths = write_report(equal_coverage_records, tmp_path / "report")  # one dataset
    assert "figures/critical_difference.png" not in paths
    assert ("at least 2 independent units (datasets) whose test sets differ"
            in paths["leaderboard.md"].read_text())


def test_cd_diagram_is_drawn_with_its_length_when_friedman_rejects(tmp_path):
    from reports import write_report
    from reports.figures import nemenyi_critical_difference

    paths = write_report(unit_records(6, consistent=True), tmp_path / "report")
    assert "figures/critical_difference.png" in paths
    page = paths["report.html"].read_text()
    cd = nemenyi_critical_difference(3, 6)
    assert cd == pytest.approx(2.3437 * np.sqrt(3 * 4 / 36), rel=1e-3)  # q_0.05 for k=3 (Demšar)
    assert f"CD = {cd:.2f}" in page and "over 6 independent test sets" in page
    assert "Drawn: figures/critical_difference.png" in paths["leaderboard.txt"].read_text()


# ----------------------------------------------------------------------------- end to end


def test_coverage_smoke_puts_every_method_at_every_target(tiny_root, tmp_path):
    from core.records import load_records
    from reports.coverage import trapezoid_weights
    from tests.test_pipeline import run_cli

    result = run_cli("experiment=coverage_smoke", *tiny_overrides(tiny_root, tmp_path),
                     "train.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    records = load_records(tmp_path / "runs/coverage_smoke")
    methods = {r["method_name"] for r in records} | {"prob_l2d_posthoc"}
    configured = {p.stem for p in (REPO_ROOT / "conf/method").glob("*.yaml")}
    from methods import METHODS, load_all

    load_all()
    assert methods == set(METHODS.names()) | configured  # every method, learned and reference
    report = tmp_path / "runs/coverage_smoke/report"
    targets = pd.read_csv(report / "coverage_targets.csv")
    area = pd.read_csv(report / "coverage_auc.csv")
    num_test = 24
    labels = {r["cell"]["method"] for r in records}
    assert len(labels) == len(METHODS.names()) + 1  # prob_l2d twice: at each target, post hoc
    for label in labels:
        rows = targets[targets["method"] == label].sort_values("target")
        assert list(rows["target"]) == GRID, label
        assert (rows["coverage_error"] <= 1 / num_test + 1e-12).all(), rows
        recomputed = float(trapezoid_weights(GRID) @ rows["accuracy"].to_numpy())
        assert area.set_index("method").loc[label, "auc"] == pytest.approx(recomputed, abs=1e-6)
    assert area.loc[area["role"] == "reference", "rank"].isna().all()
    # prob_l2d trains at each target; post hoc and workload-free methods train once
    cached = [p.name for p in (tmp_path / "cache/predictions").glob("*.npz")]
    assert len([n for n in cached if n.startswith("prob_l2d-")]) == len(GRID) + 1
    assert len([n for n in cached if n.startswith("multi_l2d_ova-")]) == 1


def test_the_newest_baselines_beat_random_deferral_at_equal_coverage_on_digits(digits_coverage_smoke):
    """A digits smoke (the embedded dataset, coverage_smoke's 8 epochs and the tuned presets,
    one seed, two coverage targets below 1; the run conftest's ``digits_coverage_smoke``
    shares with test_population): each of two_stage, team_allocation and post_hoc is more
    accurate than random deferral at the same coverage. (At coverage 1 there is no
    deferral: every method is its classifier.)"""
    targets = pd.read_csv(digits_coverage_smoke / "runs/coverage_smoke/report/coverage_targets.csv")
    accuracy = targets.pivot_table(index="target", columns="method", values="accuracy")
    for method in ("two_stage", "team_allocation", "post_hoc"):
        assert (accuracy[method] > accuracy["random"]).all(), accuracy
