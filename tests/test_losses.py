"""Tests for methods/surrogates.py and methods/missing_policy.py: hand-worked values, gradients, policies, numerics, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from methods import missing_policy, surrogates

M = -1  # MISSING

DEFERRAL_LOSSES = {
    "softmax": surrogates.softmax_deferral_loss,
    "ova": surrogates.ova_deferral_loss,
    "realizable": surrogates.realizable_deferral_loss,
}
ALL_POLICY_LOSSES = {**DEFERRAL_LOSSES, "correctness": surrogates.correctness_loss}


def arr(x, dtype=jnp.float32):
    return jnp.asarray(x, dtype=dtype)


def ints(x):
    return jnp.asarray(x, dtype=jnp.int32)


def logits_for(name, deferral_logits):
    """The correctness loss takes (B, E) expert logits: the last E columns."""
    return deferral_logits[:, 2:] if name == "correctness" else deferral_logits


# K = 2 classes, E = 2 experts; softmax of LOG_1234 is (0.1, 0.2, 0.3, 0.4).
LOG_1234 = [math.log(1.0), math.log(2.0), math.log(3.0), math.log(4.0)]


# --------------------------------------------------------------------------- values


def test_resolve_annotations_per_policy():
    t = ints([[0, M], [1, 2]])
    t_imp = ints([[5, 6], [7, 8]])
    filled, mask, weight = missing_policy.resolve_annotations(t, "as_incorrect")
    np.testing.assert_array_equal(filled, t)
    assert bool(jnp.all(mask)) and np.allclose(weight, [1, 1])
    filled, mask, weight = missing_policy.resolve_annotations(t, "mask")
    np.testing.assert_array_equal(mask, [[True, False], [True, True]])
    np.testing.assert_allclose(weight, [1, 1])
    filled, mask, weight = missing_policy.resolve_annotations(t, "drop")
    np.testing.assert_allclose(weight, [0, 1])
    filled, mask, weight = missing_policy.resolve_annotations(t, "impute", t_imp)
    np.testing.assert_array_equal(filled, [[0, 6], [1, 2]])
    assert bool(jnp.all(mask)) and np.allclose(weight, [1, 1])


def test_softmax_value_by_hand():
    logits = arr([LOG_1234, LOG_1234])
    y = ints([1, 0])
    t = ints([[1, 0], [M, 0]])
    # row 0: y=1 -> -log 0.2; expert 0 correct -> -log 0.3; expert 1 wrong.
    # row 1: y=0 -> -log 0.1; expert 0 missing (wrong); expert 1 correct -> -log 0.4.
    row0 = -math.log(0.2) - math.log(0.3)
    row1 = -math.log(0.1) - math.log(0.4)
    got = surrogates.softmax_deferral_loss(logits, y, t, "as_incorrect")
    np.testing.assert_allclose(got, (row0 + row1) / 2, rtol=1e-6)
    got = surrogates.softmax_deferral_loss(logits, y, t, "drop")
    np.testing.assert_allclose(got, row0, rtol=1e-6)
    # imputing expert 0 of row 1 with the true class adds -log 0.3 to that row.
    got = surrogates.softmax_deferral_loss(logits, y, t, "impute", ints([[9, 9], [0, 9]]))
    np.testing.assert_allclose(got, (row0 + row1 - math.log(0.3)) / 2, rtol=1e-6)


def test_ova_value_by_hand():
    # sigmoid(log 3) = 3/4, sigmoid(0) = 1/2, sigmoid(-log 3) = 1/4.
    logits = arr([[math.log(3.0), 0.0, math.log(3.0), -math.log(3.0)]])
    y = ints([0])
    t = ints([[0, M]])
    class_terms = -math.log(3 / 4) + math.log(2.0)  # BCE(log3, 1) + BCE(0, 0)
    expert0 = -math.log(3 / 4)  # correct: BCE(log3, 1)
    expert1_as_wrong = -math.log(1 - 1 / 4)  # missing -> target 0: BCE(-log3, 0)
    got = surrogates.ova_deferral_loss(logits, y, t, "as_incorrect")
    np.testing.assert_allclose(got, class_terms + expert0 + expert1_as_wrong, rtol=1e-6)
    got = surrogates.ova_deferral_loss(logits, y, t, "mask")
    np.testing.assert_allclose(got, class_terms + expert0, rtol=1e-6)
    # imputed as correct: BCE(-log3, 1) = -log(1/4).
    got = surrogates.ova_deferral_loss(logits, y, t, "impute", ints([[1, 0]]))
    np.testing.assert_allclose(got, class_terms + expert0 - math.log(1 / 4), rtol=1e-6)
    got = surrogates.ova_deferral_loss(logits, y, t, "drop")
    np.testing.assert_allclose(got, 0.0)


def test_realizable_value_by_hand():
    logits = arr([LOG_1234, LOG_1234, LOG_1234])
    y = ints([1, 1, 0])
    t = ints([[1, 0], [1, 1], [M, 1]])
    # exp g = (1, 2, 3, 4), total 10.
    row0 = -math.log((2 + 3) / 10)  # class 1 + expert 0
    row1 = -math.log((2 + 3 + 4) / 10)  # class 1 + both experts
    row2 = -math.log(1 / 10)  # class 0 only
    got = surrogates.realizable_deferral_loss(logits, y, t, "as_incorrect")
    np.testing.assert_allclose(got, (row0 + row1 + row2) / 3, rtol=1e-6)
    got = surrogates.realizable_deferral_loss(logits, y, t, "drop")
    np.testing.assert_allclose(got, (row0 + row1) / 2, rtol=1e-6)
    got = surrogates.realizable_deferral_loss(logits, y, t, "impute", ints([[0, 0], [0, 0], [0, 0]]))
    row2_imputed = -math.log((1 + 3) / 10)  # expert 0 imputed as class 0 = correct
    np.testing.assert_allclose(got, (row0 + row1 + row2_imputed) / 3, rtol=1e-6)


def test_correctness_value_by_hand():
    expert_logits = arr([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    y = ints([0, 1])
    t = ints([[0, 2], [M, 1]])
    row0 = -math.log(3 / 4) + math.log(2.0)  # correct: BCE(log3,1); wrong: BCE(0,0)
    row1_present = -math.log(3 / 4)  # expert 1 correct: BCE(log3, 1)
    missing_as_wrong = math.log(2.0)  # BCE(0, 0)
    got = surrogates.correctness_loss(expert_logits, y, t, "mask")
    np.testing.assert_allclose(got, (row0 + row1_present) / 2, rtol=1e-6)
    got = surrogates.correctness_loss(expert_logits, y, t, "as_incorrect")
    np.testing.assert_allclose(got, (row0 + row1_present + missing_as_wrong) / 2, rtol=1e-6)
    got = surrogates.correctness_loss(expert_logits, y, t, "drop")
    np.testing.assert_allclose(got, row0, rtol=1e-6)


def test_annotator_value_by_hand():
    # expert 0 predicts (0.25, 0.5, 0.25); expert 1 predicts (0.5, 0.25, 0.25).
    logits = arr([[[0.0, math.log(2.0), 0.0], [math.log(2.0), 0.0, 0.0]]])
    t = ints([[1, M]])
    np.testing.assert_allclose(surrogates.annotator_loss(logits, t), -math.log(0.5), rtol=1e-6)
    soft = arr([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])
    expected_observed = -(0.5 * math.log(0.25) + 0.5 * math.log(0.5))
    np.testing.assert_allclose(
        surrogates.annotator_loss(logits, t, soft_targets=soft), expected_observed, rtol=1e-6
    )
    np.testing.assert_allclose(
        surrogates.annotator_loss(logits, t, soft_targets=soft, mask_missing=False),
        expected_observed - math.log(0.5),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="soft_targets"):
        surrogates.annotator_loss(logits, t, mask_missing=False)


def test_cross_entropy_labels_and_probs():
    logits = arr([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    labels = ints([1, 1])
    expected = [-math.log(3 / 4), -math.log(1 / 4)]
    np.testing.assert_allclose(surrogates.cross_entropy(logits, labels), expected, rtol=1e-6)
    probs = jax.nn.one_hot(labels, 2)
    np.testing.assert_allclose(surrogates.cross_entropy(logits, probs), expected, rtol=1e-6)
    half = arr([[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(
        surrogates.cross_entropy(logits, half), [sum(expected) / 2] * 2, rtol=1e-6
    )


def test_deferral_scores_by_hand():
    logits = arr([LOG_1234])
    scores = surrogates.deferral_scores_softmax(logits, num_experts=2)
    np.testing.assert_allclose(scores, [[0.3, 0.4, 0.2]], rtol=1e-6)  # experts, then max(0.1, 0.2)
    np.testing.assert_allclose(surrogates.deferral_scores_realizable(logits, 2), scores)
    ova = surrogates.deferral_scores_ova(arr([[0.0, math.log(3.0), -math.log(3.0), 0.0]]), 2)
    np.testing.assert_allclose(ova, [[0.25, 0.5, 0.75]], rtol=1e-6)
    cc = surrogates.deferral_scores_correctness(
        arr([[0.0, math.log(3.0)]]), arr([[math.log(3.0), -math.log(3.0)]])
    )
    np.testing.assert_allclose(cc, [[0.75, 0.25, 0.75]], rtol=1e-6)


# ------------------------------------------------------------------------ gradients


def _descend(loss_fn, logits, step=0.1):
    grad = jax.grad(loss_fn)(logits)
    assert bool(jnp.all(jnp.isfinite(grad)))
    return logits - step * grad


@pytest.mark.parametrize("name", ["softmax", "realizable"])
def test_softmax_family_step_raises_correct_deferral(name):
    loss = DEFERRAL_LOSSES[name]
    logits = jax.random.normal(jax.random.PRNGKey(0), (1, 4))
    y, t = ints([0]), ints([[0, 1]])  # expert 0 correct, expert 1 wrong
    grad = jax.grad(lambda g: loss(g, y, t, "as_incorrect"))(logits)
    # descending lowers the logits of the wrong class and of the wrong expert ...
    assert grad[0, 1] > 0.0 and grad[0, 3] > 0.0
    new = _descend(lambda g: loss(g, y, t, "as_incorrect"), logits)
    old_p, new_p = jax.nn.softmax(logits), jax.nn.softmax(new)
    # ... and the probability of the correct deferral (to expert 0) and of a correct
    # outcome (class 0 or expert 0) grow.
    assert new_p[0, 2] > old_p[0, 2]
    assert new_p[0, 0] + new_p[0, 2] > old_p[0, 0] + old_p[0, 2]
    assert loss(new, y, t, "as_incorrect") < loss(logits, y, t, "as_incorrect")


def test_ova_step_direction():
    logits = jnp.zeros((1, 4))
    y, t = ints([0]), ints([[0, 1]])
    grad = jax.grad(lambda g: surrogates.ova_deferral_loss(g, y, t, "as_incorrect"))(logits)
    # descending: true class and correct expert up, other class and wrong expert down.
    np.testing.assert_array_less(grad[0, [0, 2]], 0.0)
    np.testing.assert_array_less(0.0, grad[0, [1, 3]])


def test_correctness_step_direction():
    h = jnp.zeros((1, 2))
    y, t = ints([1]), ints([[1, 0]])
    grad = jax.grad(lambda g: surrogates.correctness_loss(g, y, t, "mask"))(h)
    assert grad[0, 0] < 0.0 < grad[0, 1]


def test_annotator_step_direction():
    logits = jnp.zeros((1, 2, 3))
    t = ints([[2, M]])
    grad = jax.grad(lambda g: surrogates.annotator_loss(g, t))(logits)
    assert grad[0, 0, 2] < 0.0 < grad[0, 0, 0]
    np.testing.assert_array_equal(grad[0, 1], 0.0)  # missing label: no gradient


# ------------------------------------------------------------------------- policies


def test_ova_mask_zero_gradient_on_missing_expert_only():
    logits = jax.random.normal(jax.random.PRNGKey(1), (2, 4))
    y = ints([0, 1])
    t = ints([[M, 1], [1, 0]])
    grad_mask = jax.grad(lambda g: surrogates.ova_deferral_loss(g, y, t, "mask"))(logits)
    grad_wrong = jax.grad(lambda g: surrogates.ova_deferral_loss(g, y, t, "as_incorrect"))(logits)
    assert grad_mask[0, 2] == 0.0  # row 0, expert 0 is missing
    assert grad_wrong[0, 2] > 0.0  # as_incorrect pushes its logit down
    # everything else is identical between the two policies
    keep = np.ones((2, 4), bool)
    keep[0, 2] = False
    np.testing.assert_allclose(np.asarray(grad_mask)[keep], np.asarray(grad_wrong)[keep])


def test_correctness_mask_zero_gradient_on_missing_expert():
    h = jax.random.normal(jax.random.PRNGKey(2), (2, 2))
    y, t = ints([0, 1]), ints([[M, 0], [1, M]])
    grad = jax.grad(lambda g: surrogates.correctness_loss(g, y, t, "mask"))(h)
    assert grad[0, 0] == 0.0 and grad[1, 1] == 0.0
    assert grad[0, 1] != 0.0 and grad[1, 0] != 0.0


@pytest.mark.parametrize("name", sorted(ALL_POLICY_LOSSES))
def test_drop_ignores_incomplete_rows(name):
    loss = ALL_POLICY_LOSSES[name]
    logits = logits_for(name, jax.random.normal(jax.random.PRNGKey(3), (3, 4)))
    y = ints([0, 1, 1])
    t = ints([[0, 1], [M, 1], [1, 1]])
    grad = jax.grad(lambda g: loss(g, y, t, "drop"))(logits)
    np.testing.assert_array_equal(grad[1], 0.0)
    assert bool(jnp.any(grad[0] != 0.0)) and bool(jnp.any(grad[2] != 0.0))
    complete = np.array([0, 2])
    np.testing.assert_allclose(
        loss(logits, y, t, "drop"),
        loss(logits[complete], y[complete], t[complete], "as_incorrect"),
        rtol=1e-6,
    )


@pytest.mark.parametrize("name", sorted(ALL_POLICY_LOSSES))
def test_impute_uses_imputed_labels_only_where_missing(name):
    loss = ALL_POLICY_LOSSES[name]
    logits = logits_for(name, jax.random.normal(jax.random.PRNGKey(4), (2, 4)))
    y = ints([0, 1])
    t = ints([[M, 1], [1, M]])
    t_imputed = ints([[0, 0], [0, 1]])  # observed positions (values 0 here) must be ignored
    completed = ints([[0, 1], [1, 1]])
    np.testing.assert_allclose(
        loss(logits, y, t, "impute", t_imputed),
        loss(logits, y, completed, "as_incorrect"),
        rtol=1e-6,
    )


@pytest.mark.parametrize("name", sorted(ALL_POLICY_LOSSES))
def test_as_incorrect_equals_a_wrong_label(name):
    loss = ALL_POLICY_LOSSES[name]
    logits = logits_for(name, jax.random.normal(jax.random.PRNGKey(5), (2, 4)))
    y = ints([0, 1])
    t = ints([[M, 1], [1, M]])
    wrong = ints([[1, 1], [1, 0]])  # missing replaced by a label != y
    np.testing.assert_allclose(
        loss(logits, y, t, "as_incorrect"), loss(logits, y, wrong, "as_incorrect"), rtol=1e-6
    )


@pytest.mark.parametrize("name", sorted(ALL_POLICY_LOSSES))
def test_policies_agree_on_complete_annotations(name):
    loss = ALL_POLICY_LOSSES[name]
    logits = logits_for(name, jax.random.normal(jax.random.PRNGKey(6), (3, 4)))
    y, t = ints([0, 1, 1]), ints([[0, 1], [0, 0], [1, 1]])
    reference = loss(logits, y, t, "as_incorrect")
    for policy in missing_policy.SUPPORTED_POLICIES[name]:
        got = loss(logits, y, t, policy, jnp.zeros_like(t))
        np.testing.assert_allclose(got, reference, rtol=1e-6)


# ------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", sorted(ALL_POLICY_LOSSES))
def test_all_rows_dropped_is_zero_without_nan(name):
    loss = ALL_POLICY_LOSSES[name]
    logits = logits_for(name, jax.random.normal(jax.random.PRNGKey(7), (2, 4)))
    y, t = ints([0, 1]), ints([[M, 1], [M, M]])
    value, grad = jax.value_and_grad(lambda g: loss(g, y, t, "drop"))(logits)
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize(
    "name, policy",
    [
        (name, policy)
        for name in sorted(ALL_POLICY_LOSSES)
        for policy in missing_policy.SUPPORTED_POLICIES[name]
    ],
)
def test_large_logits_stay_finite(name, policy):
    loss = ALL_POLICY_LOSSES[name]
    logits = logits_for(name, arr([[1e4, -1e4, -1e4, 1e4], [-1e4, 1e4, 1e4, -1e4]]))
    y, t = ints([1, 0]), ints([[1, M], [0, 1]])
    value, grad = jax.value_and_grad(lambda g: loss(g, y, t, policy, jnp.zeros_like(t)))(logits)
    assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))


def test_large_logits_annotator_and_scores_finite():
    logits = arr([[[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]]])
    t = ints([[1, M]])
    value, grad = jax.value_and_grad(lambda g: surrogates.annotator_loss(g, t))(logits)
    assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))
    big = arr([[1e4, -1e4, -1e4, 1e4]])
    for scores in (
        surrogates.deferral_scores_softmax(big, 2),
        surrogates.deferral_scores_ova(big, 2),
        surrogates.deferral_scores_correctness(big[:, :2], big[:, 2:]),
    ):
        assert bool(jnp.all(jnp.isfinite(scores)))


def test_realizable_matches_naive_formula_on_moderate_logits():
    logits = jax.random.normal(jax.random.PRNGKey(8), (5, 6))  # K = 3, E = 3
    y = ints([0, 1, 2, 0, 1])
    t = ints([[0, 1, 0], [2, 1, 1], [M, 2, 0], [1, 1, 1], [1, M, 1]])
    expw = np.exp(np.asarray(logits, np.float64))
    rows = []
    for i in range(5):
        numerator = expw[i, int(y[i])] + sum(
            expw[i, 3 + j] for j in range(3) if int(t[i, j]) == int(y[i])
        )
        rows.append(-math.log(numerator / expw[i].sum()))
    got = surrogates.realizable_deferral_loss(logits, y, t, "as_incorrect")
    np.testing.assert_allclose(got, np.mean(rows), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL_POLICY_LOSSES))
def test_jittable_with_static_policy(name):
    loss = ALL_POLICY_LOSSES[name]
    logits = logits_for(name, jax.random.normal(jax.random.PRNGKey(9), (2, 4)))
    y, t = ints([0, 1]), ints([[M, 1], [1, 0]])
    jitted = jax.jit(loss, static_argnames="policy")
    np.testing.assert_allclose(
        jitted(logits, y, t, policy="drop"), loss(logits, y, t, "drop"), rtol=1e-6
    )


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["softmax", "realizable"])
def test_mask_refused_where_it_coincides_with_as_incorrect(name):
    logits, y, t = jnp.zeros((1, 4)), ints([0]), ints([[0, M]])
    with pytest.raises(ValueError) as info:
        DEFERRAL_LOSSES[name](logits, y, t, "mask")
    message = str(info.value)
    assert "valid choices: 'as_incorrect', 'drop', 'impute'" in message
    assert "coincide with 'as_incorrect'" in message


def test_policy_error_messages():
    with pytest.raises(ValueError, match="Did you mean 'as_incorrect'"):
        missing_policy.check_policy("ova", "as_incorect")
    with pytest.raises(ValueError, match="valid choices: 'as_incorrect', 'drop', 'mask', 'impute'"):
        missing_policy.check_policy("correctness", "zero")
    with pytest.raises(ValueError, match="unknown loss 'sofmax'; valid losses: 'softmax'"):
        missing_policy.check_policy("sofmax", "drop")
    with pytest.raises(ValueError, match="unknown missing-annotation policy"):
        missing_policy.resolve_annotations(ints([[0]]), "nope")
    for name, supported in missing_policy.SUPPORTED_POLICIES.items():
        for policy in supported:
            missing_policy.check_policy(name, policy)  # no error


def test_impute_needs_matching_t_imputed():
    logits, y, t = jnp.zeros((1, 4)), ints([0]), ints([[0, M]])
    with pytest.raises(ValueError, match="needs t_imputed"):
        surrogates.softmax_deferral_loss(logits, y, t, "impute")
    with pytest.raises(ValueError, match="t_imputed has shape"):
        surrogates.ova_deferral_loss(logits, y, t, "impute", ints([[0, 0, 0]]))


def test_shape_errors():
    with pytest.raises(ValueError, match="K \\+ E"):
        surrogates.softmax_deferral_loss(jnp.zeros((1, 2)), ints([0]), ints([[0, 1]]), "drop")
    with pytest.raises(ValueError, match="expert_logits have shape"):
        surrogates.correctness_loss(jnp.zeros((1, 3)), ints([0]), ints([[0, 1]]), "mask")
    with pytest.raises(ValueError, match="annot_logits have shape"):
        surrogates.annotator_loss(jnp.zeros((1, 3, 4)), ints([[0, 1]]))
