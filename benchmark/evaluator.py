"""Turns any method's outputs into decisions and metrics, the same way for every method.

Inputs are plain arrays over the test set: class ``logits`` (N, K), ``agent_scores``
(N, E+1), ground truth ``y`` (N,) and the experts' test annotations ``t`` (N, E).
Decisions are agent indices (classifier = E). Metric names, directions and ranges are
fixed in ``core.spec.METRICS``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from benchmark.assignment import capacity_assignment
from core.spec import ExpertCommittee, Method, ReferenceRow, WorkloadBounds, agent_names

CURVE_POINTS = 101
ECE_BINS = 15


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def decision_scores(method, logits, scores, y, t) -> np.ndarray:
    """The (N, E+1) scores decisions are made on: the method's own, or for a reference row
    (``core.spec.ReferenceRow``) its stated rule applied to the whole split (the oracle's
    rule alone reads the labels)."""
    scores = np.asarray(scores)
    if not isinstance(method, ReferenceRow):
        return scores
    sees = method.sees_test_labels
    return np.asarray(method.reference_scores(np.asarray(logits), scores, y if sees else None,
                                              t if sees else None))


def committee_sets(method: Method, scores: np.ndarray,
                   calibration: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> np.ndarray | None:
    """(N, E) bool expert sets of an ``ExpertCommittee`` method for a split with ``scores``,
    calibrated on ``calibration`` = (scores, y, t) of the validation split; None for any
    other method."""
    if not isinstance(method, ExpertCommittee):
        return None
    if calibration is None:
        raise ValueError(f"{method.name} calibrates its expert sets on the validation split, "
                         "which is empty: set eval.validation_fraction > 0.")
    return np.asarray(method.expert_sets(np.asarray(scores), calibration), dtype=bool)


def consulted_experts(agent: np.ndarray, num_experts: int,
                      expert_sets: np.ndarray | None = None) -> np.ndarray:
    """(N, E) bool: the experts asked per sample: the decided expert and, when a deferred
    sample has an expert set, every member of it (nobody when the classifier answers)."""
    asked = agent[:, None] == np.arange(num_experts)[None, :]
    if expert_sets is not None:
        asked |= np.asarray(expert_sets, dtype=bool) & (agent < num_experts)[:, None]
    return asked


def committee_vote(asked: np.ndarray, t: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(N,) the plurality answer of the experts ``asked`` per sample; a tie goes to the
    answer of the highest-scored expert among those giving a tied answer (-1: nobody asked)."""
    num_experts = t.shape[1]
    labels = np.arange(max(int(t.max(initial=0)) + 1, 1))
    votes = ((t[:, :, None] == labels) & asked[:, :, None]).sum(axis=1)  # (N, K)
    tied = votes == votes.max(axis=1, keepdims=True)
    gives_tied = asked & np.take_along_axis(tied, np.clip(t, 0, None), axis=1) & (t >= 0)
    chosen = np.where(gives_tied, scores[:, :num_experts], -np.inf).argmax(axis=1)
    return np.where(asked.any(axis=1), t[np.arange(len(t)), chosen], -1)


def consultation_cost(asked: np.ndarray, expert_cost) -> float:
    """Mean over samples of the summed cost of the experts ``asked`` (no cost: 0)."""
    if expert_cost is None or len(expert_cost) == 0 or len(asked) == 0:
        return 0.0
    return float((asked * np.asarray(expert_cost, dtype=float)).sum(axis=1).mean())


def final_predictions(agent: np.ndarray, class_pred: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The label the system outputs: the classifier's or the chosen expert's annotation."""
    num_experts = t.shape[1]
    if num_experts == 0:
        return class_pred
    human = np.take_along_axis(t, np.minimum(agent, num_experts - 1)[:, None], axis=1)[:, 0]
    return np.where(agent == num_experts, class_pred, human)


def workload_shares(agent: np.ndarray, num_agents: int) -> np.ndarray:
    """Share of samples routed to each agent."""
    return np.bincount(agent, minlength=num_agents) / max(len(agent), 1)


def workload_violation(shares: np.ndarray, bounds: WorkloadBounds) -> float:
    """max_k max(0, share_k - hi_k, lo_k - share_k)."""
    lo, hi = np.asarray(bounds.lo), np.asarray(bounds.hi)
    return float(np.max(np.maximum(0.0, np.maximum(shares - hi, lo - shares))))


def coefficient_of_variation(values: np.ndarray) -> float:
    """std / mean (population std); 0 when every value is 0."""
    mean = float(np.mean(values)) if len(values) else 0.0
    return 0.0 if mean == 0.0 else float(np.std(values) / mean)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins: sum_b |acc_b - conf_b| * n_b / N."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += abs(correct[in_bin].mean() - confidence[in_bin].mean()) * in_bin.mean()
    return float(ece)


def accuracy_coverage_curve(
    scores: np.ndarray, class_pred: np.ndarray, y: np.ndarray, t: np.ndarray,
    points: int = CURVE_POINTS,
) -> tuple[np.ndarray, np.ndarray]:
    """System accuracy when the top-c fraction (by classifier-vs-best-human score) goes to
    the classifier and the rest to the best-scored human, for c on a grid of ``points``."""
    num_experts = t.shape[1]
    coverage = np.linspace(0.0, 1.0, points)
    classifier_correct = class_pred == y
    if num_experts == 0:
        return coverage, np.full(points, classifier_correct.mean())
    best_human = scores[:, :num_experts].argmax(axis=1)
    human_correct = t[np.arange(len(y)), best_human] == y
    margin = scores[:, num_experts] - scores[:, :num_experts].max(axis=1)
    order = np.argsort(-margin, kind="stable")
    # prefix[c] = correct answers when the first c samples (by margin) go to the classifier
    gain = (classifier_correct[order].astype(float) - human_correct[order].astype(float))
    prefix = np.concatenate([[0.0], np.cumsum(gain)]) + human_correct.sum()
    counts = np.round(coverage * len(y)).astype(int)
    return coverage, prefix[counts] / len(y)


def area_under_curve(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoidal area under y(x)."""
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def correct_answers(agent: np.ndarray, logits: np.ndarray, y: np.ndarray, t: np.ndarray,
                    expert_sets: np.ndarray | None = None, scores: np.ndarray | None = None) -> np.ndarray:
    """(N,) bool: whether the system's answer under decisions ``agent`` is right (with
    ``expert_sets``: a deferred sample gets the vote of the experts consulted)."""
    answer = final_predictions(agent, logits.argmax(axis=1), t)
    if expert_sets is not None:
        if scores is None:
            raise ValueError("correct_answers: expert_sets need the agent scores (scores=...) to break "
                             "ties in the committee's vote.")
        voted = committee_vote(consulted_experts(agent, t.shape[1], expert_sets), t, scores)
        answer = np.where(agent == t.shape[1], answer, voted)
    return answer == y


def decision_metrics(
    agent: np.ndarray, logits: np.ndarray, y: np.ndarray, t: np.ndarray, bounds: WorkloadBounds,
    expert_sets: np.ndarray | None = None, scores: np.ndarray | None = None, expert_cost=None,
) -> dict[str, float]:
    """Metrics of one set of decisions (``agent`` per sample)."""
    num_experts = t.shape[1]
    shares = workload_shares(agent, num_experts + 1)
    accuracy = float(correct_answers(agent, logits, y, t, expert_sets, scores).mean())
    asked = consulted_experts(agent, num_experts, expert_sets)
    metrics = {
        "accuracy": accuracy,
        "cost_aware_accuracy": accuracy - consultation_cost(asked, expert_cost),
        "coverage": float(shares[num_experts]),
    }
    for name, share in zip(agent_names(num_experts), shares):
        metrics[f"workload/{name}"] = float(share)
    metrics["workload_violation"] = workload_violation(shares, bounds)
    metrics["human_workload_cv"] = coefficient_of_variation(shares[:num_experts])
    return metrics


class Evaluation(NamedTuple):
    """What ``evaluate`` returns."""

    metrics: dict[str, dict[str, float]]  # {"argmax": {...}, "constrained": {...}}
    curves: dict[str, list[float]]  # {"coverage": [...], "accuracy": [...]}
    correct: dict[str, np.ndarray]  # per decision rule, (N,) bool: answer right per sample


def evaluate(
    logits: np.ndarray, scores: np.ndarray, y: np.ndarray, t: np.ndarray, bounds: WorkloadBounds,
    assignment_batch: int | None = None, probs: np.ndarray | None = None,
    expert_sets: np.ndarray | None = None, expert_cost=None,
) -> Evaluation:
    """All metrics for argmax and capacity-constrained decisions, the curve, and which
    samples each rule answers correctly.

    ``assignment_batch`` solves the constrained assignment per chunk of that many test
    samples (as a deployed system would per batch); None solves it over the whole set.
    ``probs`` are the classifier's class probabilities for calibration (default: the
    softmax of ``logits``; a method may supply its own, e.g. OvA's sigmoids).
    ``expert_sets`` (N, E) (``committee_sets``): a deferred sample is answered by the vote of
    its set and the decided expert. ``expert_cost`` (E,) prices each expert consulted
    (``cost_aware_accuracy``).
    """

    num_experts = t.shape[1]
    class_pred = logits.argmax(axis=1)
    shared = {
        "classifier_accuracy": float((class_pred == y).mean()),
        "classifier_ece": expected_calibration_error(softmax(logits) if probs is None else probs, y),
    }
    for j in range(num_experts):
        shared[f"expert_accuracy/{j}"] = float((t[:, j] == y).mean())
    coverage, curve = accuracy_coverage_curve(scores, class_pred, y, t)
    shared["deferral_auc"] = area_under_curve(coverage, curve)

    argmax_agent = scores.argmax(axis=1)
    chunk = assignment_batch or len(y)
    constrained_agent = np.concatenate([
        capacity_assignment(scores[i : i + chunk], np.asarray(bounds.lo), np.asarray(bounds.hi),
                            agent_names(num_experts), offset=i)
        for i in range(0, len(y), chunk)
    ])
    agents = {"argmax": argmax_agent, "constrained": constrained_agent}
    return Evaluation(
        metrics={rule: {**decision_metrics(agent, logits, y, t, bounds, expert_sets, scores,
                                           expert_cost), **shared}
                 for rule, agent in agents.items()},
        curves={"coverage": coverage.tolist(), "accuracy": curve.tolist()},
        correct={rule: correct_answers(agent, logits, y, t, expert_sets, scores)
                 for rule, agent in agents.items()},
    )


def imputation_accuracy(q_t: np.ndarray, t_observed: np.ndarray, t_complete: np.ndarray) -> float | None:
    """Accuracy of argmax q(t_j) on annotations that were withheld (observed -1, complete known)."""
    withheld = (t_observed < 0) & (t_complete >= 0)
    if not withheld.any():
        return None
    return float((q_t.argmax(axis=-1)[withheld] == t_complete[withheld]).mean())
