"""Conformal ensembles of experts (``conformal_l2d``): the non-conformity score, the
calibrated threshold, the sets, their vote in the evaluator and the run metric."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmark.config import ConfigError, build_method
from benchmark.evaluator import committee_sets, committee_vote, consulted_experts, evaluate
from core.spec import ExpertCommittee, TaskSpec, WorkloadBounds
from methods.conformal import conformal_sets, conformal_threshold, nonconformity
from tests.conftest import tiny_overrides
from tests.test_pipeline import compose_cfg

SPEC = TaskSpec(num_classes=4, num_experts=3, input_shape=(8, 8, 1))
SCORES = np.array([[0.5, 0.3, 0.2]])  # experts ranked 0, 1, 2; cumulative 0.5, 0.8, 1.0


# ----------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("answers,expected", [
    ([1, 0, 0], 0.5),  # only the top expert right: stop at rank 1
    ([0, 1, 0], 0.8),  # the second right: 0.5 + 0.3
    ([1, 0, 1], 1.0),  # the lowest-ranked right expert is the third
    ([0, 0, 0], 1.0),  # nobody right: every expert
])
def test_nonconformity_stops_at_the_lowest_ranked_right_expert(answers, expected):
    y = np.array([1])
    t = np.where(np.array([answers]) == 1, 1, 2)
    assert nonconformity(SCORES, y, t)[0] == pytest.approx(expected)


def test_nonconformity_ranks_experts_by_score_not_by_index():
    scores = np.array([[0.1, 0.6, 0.3]])  # ranked 1, 2, 0: cumulative 0.6, 0.9, 1.0
    y = np.array([0])
    assert nonconformity(scores, y, np.array([[3, 3, 0]]))[0] == pytest.approx(0.9)
    assert nonconformity(scores, y, np.array([[0, 3, 3]]))[0] == pytest.approx(1.0)


def test_threshold_is_the_conformal_quantile():
    scores = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])  # n = 9
    # alpha 0.1: rank ceil(10 * 0.9) = 9, the largest; alpha 0.2: rank 8; alpha 0.5: rank 5
    assert conformal_threshold(scores, 0.1) == pytest.approx(0.9)
    assert conformal_threshold(scores, 0.2) == pytest.approx(0.8)
    assert conformal_threshold(scores, 0.5) == pytest.approx(0.5)
    # n = 5, alpha 0.1: rank ceil(5.4) = 6 > n, so every expert; no calibration sample neither
    assert conformal_threshold(scores[:5], 0.1) == math.inf
    assert conformal_threshold(np.array([]), 0.1) == math.inf


@pytest.mark.parametrize("threshold,expected", [
    (0.4, [True, False, False]),  # 0 < 0.4: the top expert only (always at least one)
    (0.5, [True, False, False]),  # the top alone reaches 0.5
    (0.6, [True, True, False]),  # 0.5 < 0.6: the second joins; 0.8 >= 0.6 stops
    (0.95, [True, True, True]),
    (math.inf, [True, True, True]),
    (0.0, [True, False, False]),
])
def test_the_set_is_the_smallest_prefix_reaching_the_threshold(threshold, expected):
    assert conformal_sets(SCORES, threshold)[0].tolist() == expected


def test_a_set_contains_every_right_expert_with_the_promised_probability():
    """Split conformal on exchangeable draws: over many test samples, the share whose set
    holds every right expert is at least 1 - alpha (up to sampling error). Two of five
    experts are able (right w.p. 0.98, scored 0.98), three hopeless (0.02, scored 0.02):
    a hopeless expert is right on about 6% of the samples, within alpha = 0.1, so the
    threshold is the able pair's 1.96 and every set is that pair."""
    rng = np.random.default_rng(0)
    num_experts, alpha = 5, 0.1

    def draw(n):
        able = np.argsort(rng.random((n, num_experts)), axis=1) < 2
        skill = np.where(able, 0.98, 0.02)
        t = np.where(rng.random((n, num_experts)) < skill, 0, 1)
        return skill, np.zeros(n, int), t

    cal_scores, cal_y, cal_t = draw(1000)
    q = conformal_threshold(nonconformity(cal_scores, cal_y, cal_t), alpha)
    assert q == pytest.approx(1.96)
    scores, y, t = draw(20000)
    sets = conformal_sets(scores, q)
    right = t == y[:, None]
    covered = ~(right & ~sets).any(axis=1)
    assert covered.mean() >= 1 - alpha - 0.01, covered.mean()
    np.testing.assert_array_equal(sets, scores == 0.98)


# ----------------------------------------------------------------------------- the method


def test_sets_are_calibrated_on_the_deferred_validation_samples():
    """Validation: two samples the classifier takes (their only right expert ranks last:
    score 1.0) and two deferred ones whose top expert is right (score 0.5). alpha = 0.4:
    over the deferred pair the rank is ceil(3 * 0.6) = 2 of 2, q = 0.5, and a test set is
    its top expert alone. Were the classifier's samples counted (rank ceil(5 * 0.6) = 3 of
    [0.5, 0.5, 1, 1]), q would be 1.0 and the set every expert, as it is when the
    validation split defers nothing (then every sample calibrates)."""
    method = build_method("conformal_l2d", {"alpha": 0.4}, SPEC)
    assert isinstance(method, ExpertCommittee)
    experts = np.array([0.5, 0.3, 0.2])
    cal_scores = np.array([[*experts, 0.9], [*experts, 0.9], [*experts, 0.1], [*experts, 0.1]])
    cal_y = np.zeros(4, int)
    cal_t = np.array([[1, 1, 0], [1, 1, 0], [0, 1, 1], [0, 1, 1]])
    test = np.array([[0.2, 0.5, 0.3, 0.0]])
    assert method.expert_sets(test, (cal_scores, cal_y, cal_t)).tolist() == [[False, True, False]]
    nothing_deferred = cal_scores.copy()
    nothing_deferred[:, 3] = 0.9
    assert method.expert_sets(test, (nothing_deferred, cal_y, cal_t)).tolist() == [[True, True, True]]


def test_only_committee_methods_get_sets_and_they_need_a_validation_split():
    scores = np.array([[0.5, 0.3, 0.2, 0.1]])
    assert committee_sets(build_method("multi_l2d_ova", {}, SPEC), scores, None) is None
    with pytest.raises(ValueError, match="eval.validation_fraction > 0"):
        committee_sets(build_method("conformal_l2d", {}, SPEC), scores, None)


@pytest.mark.parametrize("params,message", [
    ({"surrogate": "softmax", "missing_policy": "mask"}, "'mask' is not supported by the 'softmax'"),
    ({"surrogate": "hinge"}, "surrogate must be one of ova, softmax"),
    ({"alpha": 1.0}, r"alpha must be in \(0, 1\)"),
])
def test_bad_options_are_refused_naming_them(params, message):
    with pytest.raises(ConfigError, match=message):
        build_method("conformal_l2d", params, SPEC)


# ----------------------------------------------------------------------------- the vote


def test_vote_is_the_plurality_with_ties_to_the_highest_scored_expert():
    t = np.array([[1, 2, 2], [1, 2, 3], [1, 2, 3], [1, 1, 3]])
    asked = np.array([[True, True, True], [True, True, True], [False, True, True], [False, False, False]])
    scores = np.array([[0.9, 0.5, 0.1, 0], [0.2, 0.9, 0.5, 0], [0.9, 0.2, 0.5, 0], [0.5, 0.5, 0.5, 0]])
    # row 0: two votes for 2; row 1: a three-way tie, expert 1 scores highest; row 2: expert 0
    # is not asked, tie between 2 and 3 goes to expert 2; row 3: nobody asked
    assert committee_vote(asked, t, scores).tolist() == [2, 2, 3, -1]


def test_the_decided_expert_and_its_set_answer_a_deferred_sample():
    """Three experts; sample 0 deferred to expert 0 (wrong) with set {1, 2} (both right):
    the vote of {0, 1, 2} is right and all three are paid. Sample 1 goes to the classifier:
    nobody is asked, whatever its set."""
    y = np.array([0, 1])
    t = np.array([[3, 0, 0], [1, 1, 1]])
    logits = np.array([[0.0, 0.0, 0.0, 5.0], [0.0, 5.0, 0.0, 0.0]])
    scores = np.array([[0.9, 0.1, 0.1, 0.0], [0.0, 0.0, 0.0, 1.0]])
    sets = np.array([[False, True, True], [True, True, True]])
    asked = consulted_experts(scores.argmax(axis=1), 3, sets)
    assert asked.tolist() == [[True, True, True], [False, False, False]]
    bounds = WorkloadBounds(lo=(0.0,) * 4, hi=(1.0,) * 4)
    result = evaluate(logits, scores, y, t, bounds, expert_sets=sets, expert_cost=(0.1, 0.1, 0.1))
    argmax = result.metrics["argmax"]
    assert argmax["accuracy"] == 1.0 and argmax["cost_aware_accuracy"] == pytest.approx(1.0 - 0.3 / 2)
    alone = evaluate(logits, scores, y, t, bounds).metrics["argmax"]  # the decided expert alone
    assert alone["accuracy"] == 0.5
    assert result.correct["argmax"].tolist() == [True, True]


# ----------------------------------------------------------------------------- end to end


def test_a_run_records_the_mean_set_size_and_votes(tiny_root, tmp_path):
    from benchmark.runner import run_cell

    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + [
        "method=conformal_l2d", "train.epochs=1", "eval.validation_fraction=0.25"])
    record = run_cell(cfg, choices)
    assert record["status"] == "ok", record.get("error")
    assert 1.0 <= record["run_metrics"]["expert_set_size"] <= 3.0
    assert "validation" in record

    cfg, choices = compose_cfg(tiny_overrides(tiny_root, tmp_path) + [
        "method=conformal_l2d", "train.epochs=1", "eval.validation_fraction=0"])
    record = run_cell(cfg, choices)
    assert record["status"] == "failed" and "eval.validation_fraction > 0" in record["error"]
