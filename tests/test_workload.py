"""Tests of the workload modules: bound checks (benchmark.bounds), the constrained posterior
(methods.projection) and the hard assignment (benchmark.assignment)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from scipy.special import logsumexp

from benchmark.assignment import capacity_assignment, integer_capacities
from benchmark.bounds import InfeasibleBoundsError, check_bounds
from core.spec import agent_names
from methods.projection import constrain_posterior


def gating_posterior(batch, num_agents, seed=0, scale=3.0, classifier_bias=0.0):
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal((batch, num_agents))
    logits[:, -1] += classifier_bias
    return np.array(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def balanced_bounds(num_experts, classifier_hi=0.2, slack=0.25):
    share = (1.0 - classifier_hi) / num_experts
    lo = np.array([(1 - slack) * share] * num_experts + [0.0])
    hi = np.array([(1 + slack) * share] * num_experts + [classifier_hi])
    return lo, hi


# ----------------------------------------------------------------------------- check_bounds


def test_check_bounds_accepts_feasible_and_returns_arrays():
    lo, hi = check_bounds([0.0, 0.1, 0.0], [1.0, 0.5, 0.2])
    assert lo.dtype == np.float64 and hi.shape == (3,)
    check_bounds([0.1] * 10, [0.1] * 10)  # sums exactly 1 despite float rounding


@pytest.mark.parametrize(
    "lo,hi,fragments",
    [
        ([0.0, 0.5, 0.0], [1.0, 0.4, 1.0], ["expert_1", "lo=0.5", "hi=0.4"]),
        ([-0.1, 0.0, 0.0], [1.0, 1.0, 1.0], ["expert_0", "lo=-0.1"]),
        ([0.0, 0.0, 0.0], [1.0, 1.0, 1.2], ["classifier", "hi=1.2"]),
        ([0.6, 0.6, 0.0], [1.0, 1.0, 1.0], ["lower bounds sum to 1.2", "expert_0=0.6", "expert_1=0.6"]),
        ([0.0, 0.0, 0.0], [0.3, 0.3, 0.2], ["upper bounds sum to 0.8", "classifier=0.2"]),
    ],
)
def test_check_bounds_names_offending_agents(lo, hi, fragments):
    with pytest.raises(InfeasibleBoundsError) as err:
        check_bounds(lo, hi, agent_names(2))
    for fragment in fragments:
        assert fragment in str(err.value)
    assert isinstance(err.value, ValueError)


def test_check_bounds_rejects_mismatched_lengths():
    with pytest.raises(InfeasibleBoundsError, match="same length"):
        check_bounds([0.0, 0.0], [1.0, 1.0, 1.0])
    with pytest.raises(InfeasibleBoundsError, match="agent names"):
        check_bounds([0.0, 0.0], [1.0, 1.0], ["a", "b", "c"])


# ------------------------------------------------------------------------ constrain_posterior


def shares_of(q):
    return np.asarray(q, np.float64).mean(axis=0)


def assert_kkt(q, lo, hi, q_new, info, tol=1e-4):
    """Primal feasibility, dual feasibility, complementary slackness and stationarity."""
    shares = shares_of(q_new)
    upper, lower = np.asarray(info["upper_multiplier"]), np.asarray(info["lower_multiplier"])
    assert np.all(shares <= hi + tol) and np.all(shares >= lo - tol)
    assert float(info["violation"]) <= tol
    np.testing.assert_allclose(float(info["violation"]),
                               max(0.0, np.max(shares - hi), np.max(lo - shares)), atol=1e-6)
    assert np.all(upper >= 0) and np.all(lower >= 0)
    assert np.all(upper * lower == 0)
    active_upper, active_lower = upper > 1e-6, lower > 1e-6
    np.testing.assert_allclose(shares[active_upper], hi[active_upper], atol=tol)
    np.testing.assert_allclose(shares[active_lower], lo[active_lower], atol=tol)
    # q'_ik ∝ q_ik exp(l_k - u_k): the log-ratio minus (l - u) is constant along each row.
    residual = np.log(np.asarray(q_new, np.float64)) - np.log(q) - (lower - upper)
    np.testing.assert_allclose(residual - residual[:, :1], 0.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(q_new).sum(axis=1), 1.0, atol=1e-5)


def test_kkt_conditions_and_agreement_with_scipy_dual():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((12, 3)) + np.array([1.5, 0.5, -1.0])
    q = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)))
    q = q / q.sum(axis=1, keepdims=True)
    lo, hi = np.array([0.0, 0.0, 0.25]), np.array([0.4, 1.0, 1.0])
    q_new, info = constrain_posterior(q, lo, hi)
    assert_kkt(q, lo, hi, q_new, info)
    assert float(info["upper_multiplier"][0]) > 0 and float(info["lower_multiplier"][2]) > 0

    # Independent solution: L-BFGS-B on the (u, l) >= 0 dual in float64.
    log_q = np.log(q.astype(np.float64))

    def dual(x):
        u, l = x[:3], x[3:]
        z = log_q - u + l
        p = np.exp(z - logsumexp(z, axis=1, keepdims=True))
        s = p.mean(axis=0)
        value = logsumexp(z, axis=1).mean() + u @ hi - l @ lo
        return value, np.concatenate([hi - s, s - lo])

    best = scipy.optimize.minimize(dual, np.zeros(6), jac=True, method="L-BFGS-B",
                                   bounds=[(0, None)] * 6, options={"gtol": 1e-12, "ftol": 1e-15})
    u, l = best.x[:3], best.x[3:]
    z = log_q - u + l
    want = np.exp(z - logsumexp(z, axis=1, keepdims=True))
    np.testing.assert_allclose(np.asarray(q_new), want, atol=2e-4)
    # Primal objective: ours is no worse than scipy's primal-feasible optimum.
    kl = lambda p: np.mean(np.sum(p * (np.log(p) - log_q), axis=1))  # noqa: E731
    assert kl(np.asarray(q_new, np.float64)) <= kl(want) + 1e-4


@pytest.mark.parametrize("batch", [128, 1024, 4096])
@pytest.mark.parametrize("num_experts", [2, 8])
def test_reaches_target_violation_on_typical_inputs(batch, num_experts):
    q = gating_posterior(batch, num_experts + 1, seed=batch + num_experts, classifier_bias=2.0)
    lo, hi = balanced_bounds(num_experts)
    q_new, info = constrain_posterior(q, lo, hi)
    assert float(shares_of(q)[-1]) > hi[-1]  # the classifier cap is active
    assert_kkt(q, lo, hi, q_new, info)
    assert int(info["iterations"]) < 30


def test_inactive_bounds_return_q_unchanged():
    q = gating_posterior(64, 4, seed=1)
    q[:5, 0] = 0.0  # zeros are allowed
    q = q / q.sum(axis=1, keepdims=True)
    lo, hi = np.zeros(4), np.ones(4)
    q_new, info = constrain_posterior(q, lo, hi)
    np.testing.assert_array_equal(np.asarray(q_new), q.astype(np.float32))
    assert float(info["violation"]) == 0.0 and int(info["iterations"]) == 0
    shares = shares_of(q)
    q_new, _ = constrain_posterior(q, shares - 0.05, shares + 0.05)
    np.testing.assert_array_equal(np.asarray(q_new), q.astype(np.float32))


def test_zero_column_with_positive_lower_bound():
    q = gating_posterior(256, 3, seed=2)
    q[:, 0] = 0.0
    q = q / q.sum(axis=1, keepdims=True)
    lo, hi = np.array([0.2, 0.0, 0.0]), np.array([1.0, 1.0, 1.0])
    q_new, info = constrain_posterior(q, lo, hi)
    assert np.all(np.isfinite(np.asarray(q_new)))
    assert float(info["violation"]) <= 1e-4
    np.testing.assert_allclose(shares_of(q_new)[0], 0.2, atol=1e-4)


def test_equal_lower_and_upper_bounds():
    q = gating_posterior(512, 4, seed=3)
    bounds = np.full(4, 0.25)
    q_new, info = constrain_posterior(q, bounds, bounds)
    np.testing.assert_allclose(shares_of(q_new), 0.25, atol=1e-4)
    assert float(info["violation"]) <= 1e-4


def test_jittable_and_vmappable():
    q = jnp.asarray(gating_posterior(128, 3, seed=4, classifier_bias=1.0))
    lo, hi = (jnp.asarray(b, jnp.float32) for b in balanced_bounds(2))
    eager, _ = constrain_posterior(q, lo, hi)
    jitted, _ = jax.jit(lambda q, lo, hi: constrain_posterior(q, lo, hi))(q, lo, hi)
    np.testing.assert_allclose(jitted, eager, atol=1e-6)
    stacked, info = jax.vmap(constrain_posterior, in_axes=(0, None, None))(jnp.stack([q, q[::-1]]), lo, hi)
    np.testing.assert_allclose(stacked[0], eager, atol=1e-5)
    assert np.all(np.asarray(info["violation"]) <= 1e-4)


# ------------------------------------------------------------------------ capacity_assignment


def brute_force_assignment_score(scores, cap_lo, cap_hi):
    best = -np.inf
    num_samples, num_agents = scores.shape
    for assignment in itertools.product(range(num_agents), repeat=num_samples):
        counts = np.bincount(assignment, minlength=num_agents)
        if np.all(counts >= cap_lo) and np.all(counts <= cap_hi):
            best = max(best, scores[np.arange(num_samples), list(assignment)].sum())
    return best


@pytest.mark.parametrize("seed", range(4))
def test_assignment_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((7, 3))
    scores[:, 2] += 1.0  # everyone prefers the last agent: its cap binds
    lo, hi = np.array([0.2, 0.1, 0.0]), np.array([0.6, 0.6, 0.3])
    cap_lo, cap_hi = integer_capacities(7, lo, hi)
    np.testing.assert_array_equal(cap_lo, [2, 1, 0])
    np.testing.assert_array_equal(cap_hi, [4, 4, 2])
    assignment = capacity_assignment(scores, lo, hi)
    counts = np.bincount(assignment, minlength=3)
    assert np.all(counts >= cap_lo) and np.all(counts <= cap_hi)
    got = scores[np.arange(7), assignment].sum()
    assert got == pytest.approx(brute_force_assignment_score(scores, cap_lo, cap_hi), abs=1e-9)


def test_assignment_meets_capacities_at_scale_with_ties():
    rng = np.random.default_rng(5)
    num_samples, num_experts = 2000, 8
    scores = rng.integers(0, 3, (num_samples, num_experts + 1)).astype(float)  # many ties
    scores[:, -1] += 1.0
    lo, hi = balanced_bounds(num_experts, slack=0.1)
    assignment = capacity_assignment(scores, lo, hi)
    counts = np.bincount(assignment, minlength=num_experts + 1)
    cap_lo, cap_hi = integer_capacities(num_samples, lo, hi)
    assert np.all(counts >= cap_lo) and np.all(counts <= cap_hi)
    assert counts[-1] == cap_hi[-1]  # the preferred classifier is filled to its cap
    assert assignment.dtype.kind == "i" and assignment.shape == (num_samples,)


def test_unconstrained_argmax_is_kept_when_it_fits():
    scores = gating_posterior(50, 4, seed=6)
    np.testing.assert_array_equal(capacity_assignment(scores, np.zeros(4), np.ones(4)), scores.argmax(1))


def test_integer_infeasibility_names_the_agent():
    scores = np.zeros((4, 3))
    lo, hi = np.array([0.4, 0.0, 0.0]), np.array([0.45, 1.0, 1.0])  # 1.6 <= n_0 <= 1.8
    with pytest.raises(InfeasibleBoundsError, match="expert_0"):
        capacity_assignment(scores, lo, hi, agent_names(2))
    with pytest.raises(InfeasibleBoundsError, match="upper bounds sum"):
        capacity_assignment(scores, np.zeros(3), np.array([0.3, 0.3, 0.3]))
