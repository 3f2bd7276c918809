"""Deferral with a cost per expert consulted: ``dataset.expert_cost``, the evaluator's
``cost_aware_accuracy`` and the cost-sensitive two-stage surrogate (``two_stage_cost``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmark.config import ConfigError, build_method
from benchmark.evaluator import consultation_cost, decision_metrics, evaluate
from core.spec import MISSING, TaskSpec, WorkloadBounds
from methods.two_stage import two_stage_surrogate
from tests.conftest import tiny_overrides
from tests.test_pipeline import compose_cfg

NO_BOUNDS = WorkloadBounds(lo=(0.0, 0.0, 0.0), hi=(1.0, 1.0, 1.0))


# ----------------------------------------------------------------------------- the surrogate


def test_cost_enters_each_expert_cost_and_so_the_others_weights():
    """y = 0; expert 0 right, expert 1 wrong, the classifier (argmax 2) wrong. Costs with
    beta = (0.5, 0.25): (0 + 0.5, 1 + 0.25, 1) = (0.5, 1.25, 1); weights tau_k = sum of the
    others' = (2.25, 1.5, 1.75), total 5.5; a uniform rejector pays log 3 per unit of weight.
    Under "mask" a missing expert 1 leaves: costs (0.5, -, 1), weights (1, -, 0.5), log 2."""
    y = jnp.array([0])
    classifier = jnp.array([[0.0, 0.0, 5.0]])
    rejector = jnp.zeros((1, 3))
    both, one_missing = jnp.array([[0, 1]]), jnp.array([[0, MISSING]])
    beta = (0.5, 0.25)
    assert float(two_stage_surrogate(rejector, classifier, y, both, "mask", beta)) == pytest.approx(5.5 * np.log(3))
    assert float(two_stage_surrogate(rejector, classifier, y, one_missing, "mask", beta)) == pytest.approx(1.5 * np.log(2))
    # as_incorrect: the missing answer costs 1 + beta_1, as a wrong one
    assert float(two_stage_surrogate(rejector, classifier, y, one_missing, "as_incorrect", beta)) == pytest.approx(5.5 * np.log(3))
    # no cost, or zero costs: the plain two-stage surrogate
    plain = float(two_stage_surrogate(rejector, classifier, y, both, "mask"))
    assert float(two_stage_surrogate(rejector, classifier, y, both, "mask", (0.0, 0.0))) == pytest.approx(plain)
    assert plain == pytest.approx(4 * np.log(3))


def rejector_choice(beta, expert_right, classifier_right, steps=300):
    """The agent a free rejector (one logit per agent, shared by every sample) prefers after
    minimising the cost-sensitive surrogate over a population of samples with one expert."""
    n = len(expert_right)
    y = jnp.zeros(n, jnp.int32)
    t = jnp.where(jnp.asarray(expert_right), 0, 1)[:, None].astype(jnp.int32)
    classifier = jnp.where(jnp.asarray(classifier_right)[:, None], jnp.array([5.0, 0.0]), jnp.array([0.0, 5.0]))
    loss = lambda r: two_stage_surrogate(jnp.broadcast_to(r, (n, 2)), classifier, y, t, "mask", beta)
    logits, opt = jnp.zeros(2), optax.sgd(0.5)
    state = opt.init(logits)
    for _ in range(steps):
        updates, state = opt.update(jax.grad(loss)(logits), state)
        logits = optax.apply_updates(logits, updates)
    return int(jnp.argmax(logits))


@pytest.mark.parametrize("beta,expected", [(0.0, 0), (0.2, 0), (0.4, 1), (0.9, 1)])
def test_the_rejector_defers_only_while_the_expert_is_worth_its_price(beta, expected):
    """Expert right on 90% of the samples, the classifier on 60%: the expected costs are
    0.1 + beta (expert) and 0.4 (classifier), so the surrogate's minimiser (softmax weights
    proportional to the mean tau_k = total - c_k) prefers the expert while beta < 0.3."""
    expert_right = np.arange(100) < 90
    classifier_right = (np.arange(100) % 10) < 6
    assert rejector_choice((beta,), expert_right, classifier_right) == expected


def test_two_stage_cost_is_filled_from_the_task_not_a_setting():
    spec = TaskSpec(num_classes=4, num_experts=2, input_shape=(8, 8, 1), expert_cost=(0.1, 0.2))
    method = build_method("two_stage_cost", {}, spec)
    assert method.expert_cost == (0.1, 0.2)
    with pytest.raises(ConfigError, match="has no option.*expert_cost"):
        build_method("two_stage_cost", {"expert_cost": (0.3, 0.3)}, spec)
    # a method that declares no cost gets none
    assert not hasattr(build_method("two_stage", {}, spec), "expert_cost")


# ----------------------------------------------------------------------------- the metric


def test_cost_aware_accuracy_on_hand_worked_decisions():
    """Four samples, two experts (costs 0.1, 0.3), the classifier predicts class 0 always.
    Decisions: expert 0, expert 1, classifier, expert 1. Answers: expert 0 right on sample 0,
    expert 1 right on sample 1 and wrong on sample 3, classifier right on sample 2: accuracy
    3/4; cost (0.1 + 0.3 + 0 + 0.3) / 4 = 0.175."""
    y = np.array([1, 2, 0, 3])
    t = np.array([[1, 0], [0, 2], [0, 0], [0, 1]])
    logits = np.tile([5.0, 0.0, 0.0, 0.0], (4, 1))
    agent = np.array([0, 1, 2, 1])
    metrics = decision_metrics(agent, logits, y, t, NO_BOUNDS, expert_cost=(0.1, 0.3))
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["cost_aware_accuracy"] == pytest.approx(0.75 - 0.175)
    # no cost: the same as accuracy
    assert decision_metrics(agent, logits, y, t, NO_BOUNDS)["cost_aware_accuracy"] == pytest.approx(0.75)


def test_cost_charges_every_consulted_expert():
    asked = np.array([[True, True], [False, False], [False, True]])
    assert consultation_cost(asked, (0.2, 0.5)) == pytest.approx((0.7 + 0.0 + 0.5) / 3)
    assert consultation_cost(asked, ()) == 0.0 and consultation_cost(asked, None) == 0.0


def test_evaluate_reports_the_cost_under_both_decision_rules():
    """Under a classifier cap of 1/2 the constrained rule defers one more sample, so it pays
    one more consultation than the argmax rule."""
    y = np.array([0, 0, 0, 0])
    t = np.array([[0], [0], [1], [1]])
    logits = np.tile([5.0, 0.0], (4, 1))
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.1, 0.7]])
    bounds = WorkloadBounds(lo=(0.0, 0.0), hi=(1.0, 0.5))
    result = evaluate(logits, scores, y, t, bounds, expert_cost=(0.4,))
    argmax, constrained = result.metrics["argmax"], result.metrics["constrained"]
    assert argmax["accuracy"] == 1.0 and argmax["cost_aware_accuracy"] == pytest.approx(1.0 - 0.4 / 4)
    assert constrained["coverage"] == 0.5
    assert constrained["cost_aware_accuracy"] == pytest.approx(constrained["accuracy"] - 0.4 * 2 / 4)


# ----------------------------------------------------------------------------- the setting


@pytest.mark.parametrize("value,message", [
    ("[0.1,0.2]", "3 finite values >= 0, one per expert"),
    ("[0.1,-0.2,0.0]", "3 finite values >= 0"),
])
def test_a_bad_expert_cost_is_refused_naming_the_option(tiny_root, tmp_path, value, message):
    with pytest.raises(ConfigError, match=r"dataset\.expert_cost must be .*" + message):
        compose_cfg(tiny_overrides(tiny_root, tmp_path) + [f"dataset.expert_cost={value}"])


def test_cost_reaches_the_record_leaderboard_and_columns(tiny_root, tmp_path):
    """One run with a cost per expert: the record's cost-aware accuracy is its accuracy less
    the cost of the deferred samples' experts, and the report's leaderboard and columns.md
    carry the metric."""
    from benchmark.runner import run_cell
    from core.records import load_records
    from reports import write_report

    cost = (0.05, 0.1, 0.2)
    overrides = tiny_overrides(tiny_root, tmp_path) + [
        "method=two_stage_cost", "dataset.expert_cost=[0.05,0.1,0.2]", "train.epochs=1"]
    cfg, choices = compose_cfg(overrides)
    record = run_cell(cfg, choices)
    assert record["status"] == "ok", record.get("error")
    for metrics in record["metrics"].values():
        paid = sum(c * metrics[f"workload/expert_{j}"] for j, c in enumerate(cost))
        assert metrics["cost_aware_accuracy"] == pytest.approx(metrics["accuracy"] - paid)
    paths = write_report(load_records(tmp_path / "runs/single"), tmp_path / "report")
    board = paths["leaderboard.csv"].read_text().splitlines()[0]
    assert "constrained/cost_aware_accuracy" in board.split(",")
    columns = paths["columns.md"].read_text()
    assert "| `constrained/cost_aware_accuracy` | mean over seeds of cost_aware_accuracy: accuracy minus" in columns
