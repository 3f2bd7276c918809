"""Evaluator metrics on hand-built arrays, and the optimiser's weight-decay mask."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from benchmark.evaluator import (
    accuracy_coverage_curve,
    area_under_curve,
    coefficient_of_variation,
    decision_metrics,
    evaluate,
    expected_calibration_error,
    imputation_accuracy,
    workload_violation,
)
from core.spec import WorkloadBounds

# 4 samples, 2 experts, 3 classes. Expert 0 is right on samples 0 and 1, expert 1 on 2.
Y = np.array([0, 1, 2, 0])
T = np.array([[0, 2], [1, 2], [1, 2], [2, 1]])
LOGITS = np.log(np.array([[0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]))
FREE = WorkloadBounds(lo=(0.0, 0.0, 0.0), hi=(1.0, 1.0, 1.0))


def test_decision_metrics_by_hand():
    agent = np.array([0, 2, 1, 2])  # expert 0 (right), classifier (1: right), expert 1 (right), classifier (0: right)
    bounds = WorkloadBounds(lo=(0.0, 0.3, 0.0), hi=(1.0, 1.0, 0.4))
    metrics = decision_metrics(agent, LOGITS, Y, T, bounds)
    assert metrics["accuracy"] == 1.0
    assert metrics["coverage"] == 0.5
    assert metrics["workload/expert_0"] == 0.25 and metrics["workload/expert_1"] == 0.25
    assert metrics["workload/classifier"] == 0.5
    # classifier share 0.5 exceeds hi 0.4 by 0.1; expert 1's 0.25 is below lo 0.3 by 0.05
    assert metrics["workload_violation"] == pytest.approx(0.1)
    assert metrics["human_workload_cv"] == 0.0
    floor = WorkloadBounds(lo=(0.0, 0.0, 0.25), hi=(1.0, 1.0, 1.0))
    wrong = decision_metrics(np.array([1, 1, 0, 0]), LOGITS, Y, T, floor)
    assert wrong["accuracy"] == 0.0  # every chosen expert answers a wrong label
    assert wrong["workload_violation"] == pytest.approx(0.25)  # classifier 0 < lo 0.25
    assert wrong["human_workload_cv"] == 0.0


def test_workload_violation_and_cv():
    bounds = WorkloadBounds(lo=(0.2, 0.0), hi=(0.5, 0.6))
    assert workload_violation(np.array([0.1, 0.9]), bounds) == pytest.approx(0.3)
    assert workload_violation(np.array([0.4, 0.6]), bounds) == 0.0
    assert coefficient_of_variation(np.array([0.2, 0.6])) == pytest.approx(0.2 / 0.4)
    assert coefficient_of_variation(np.zeros(3)) == 0.0


def test_deferral_curve_and_known_area():
    # classifier right on samples 0, 1; the human right on 2, 3; margins rank 0, 1 first.
    # Classifier takes round(4c) samples: accuracy 0.5, 0.75, 1, 0.75, 0.5 for 0..4 of
    # them, each held over a coverage interval of 0.125, 0.25, 0.25, 0.25, 0.125: area 0.75.
    y = np.array([0, 0, 0, 0])
    class_pred = np.array([0, 0, 1, 1])
    t = np.array([[1], [1], [0], [0]])
    scores = np.array([[0.0, 0.9], [0.0, 0.8], [0.0, 0.2], [0.0, 0.1]])
    coverage, curve = accuracy_coverage_curve(scores, class_pred, y, t, points=101)
    assert curve[0] == 0.5 and curve[50] == 1.0 and curve[-1] == 0.5
    assert area_under_curve(coverage, curve) == pytest.approx(0.75, abs=5e-3)
    assert area_under_curve(np.array([0.0, 1.0]), np.array([0.0, 1.0])) == pytest.approx(0.5)


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])
    # bin of 0.9: acc 0.5, conf 0.9 -> 0.4 * 0.5; bin of 0.6: acc 1, conf 0.6 -> 0.4 * 0.5
    assert expected_calibration_error(probs, y) == pytest.approx(0.4)


def test_constrained_decisions_meet_capacities():
    rng = np.random.default_rng(0)
    n, e = 200, 3
    y = rng.integers(0, 3, n)
    t = rng.integers(0, 3, (n, e))
    logits = rng.normal(size=(n, 3))
    scores = rng.normal(size=(n, e + 1))
    scores[:, -1] += 3.0  # argmax would send almost everything to the classifier
    bounds = WorkloadBounds(lo=(0.2, 0.2, 0.2, 0.0), hi=(1.0, 1.0, 1.0, 0.3))
    metrics, curves, correct = evaluate(logits, scores, y, t, bounds)
    assert metrics["argmax"]["workload_violation"] > 0.5
    constrained = metrics["constrained"]
    assert constrained["workload_violation"] <= 1e-12
    assert constrained["coverage"] <= 0.3
    for j in range(e):
        assert constrained[f"workload/expert_{j}"] >= 0.2
    assert len(curves["coverage"]) == 101
    for rule in ("argmax", "constrained"):  # per-sample correctness agrees with the accuracy
        assert correct[rule].shape == (n,) and correct[rule].mean() == metrics[rule]["accuracy"]


def test_calibration_uses_the_methods_own_probabilities():
    """OvA-style sigmoids: confidence is their max, not a softmax of the logits."""
    y = np.array([0, 1])
    logits = np.array([[2.0, 0.0], [0.0, 2.0]])
    sigmoids = np.array([[0.6, 0.1], [0.2, 0.6]])  # both right, confidence 0.6
    bounds = WorkloadBounds(lo=(0.0,), hi=(1.0,))
    t = np.zeros((2, 0), np.int64)
    scores = np.ones((2, 1))
    own = evaluate(logits, scores, y, t, bounds, probs=sigmoids).metrics["argmax"]["classifier_ece"]
    assert own == pytest.approx(1.0 - 0.6)
    softmax_confidence = 1.0 / (1.0 + np.exp(-2.0))
    default = evaluate(logits, scores, y, t, bounds).metrics["argmax"]["classifier_ece"]
    assert default == pytest.approx(1.0 - softmax_confidence)


def test_imputation_accuracy_only_on_withheld_labels():
    q_t = np.eye(3)[np.array([[0, 1], [2, 2]])]  # argmax: [[0, 1], [2, 2]]
    observed = np.array([[-1, 1], [-1, -1]])
    complete = np.array([[0, 1], [1, 2]])
    assert imputation_accuracy(q_t, observed, complete) == pytest.approx(2 / 3)
    assert imputation_accuracy(q_t, complete, complete) is None


def test_weight_decay_applies_to_kernels_only():
    from benchmark.training import _decay_mask
    from methods.nets import Network

    _, params, _ = nnx.split(Network("small_cnn", 1, 3, rngs=nnx.Rngs(0)), nnx.Param, ...)
    for path, decayed in jax.tree_util.tree_leaves_with_path(_decay_mask(params)):
        assert decayed == ("kernel" in jax.tree_util.keystr(path)), path
