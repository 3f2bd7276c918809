"""Tests of the Prob-L2D E-steps (methods/estep.py) against independent transcriptions."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from methods.estep import (ESTEP_KINDS, REFERENCE_SMOOTHING, estep, exact_estep, meanfield_estep,
                           reference_estep)

NOISE = 1e-3


def random_inputs(batch, num_experts, num_classes, missing_rate=0.5, seed=0, scale=2.0):
    """Normalised log-probabilities, labels and annotations with ``-1`` for missing."""
    rng = np.random.default_rng(seed)
    num_agents = num_experts + 1
    log_p_z = np.asarray(jax.nn.log_softmax(scale * rng.standard_normal((batch, num_agents))))
    log_p_t = np.asarray(jax.nn.log_softmax(scale * rng.standard_normal((batch, num_agents, num_classes))))
    y = rng.integers(0, num_classes, batch)
    t = rng.integers(0, num_classes, (batch, num_experts))
    t = np.where(rng.random((batch, num_experts)) < missing_rate, -1, t)
    return log_p_z, log_p_t, y, t


def noise_lik(y, num_classes):
    """p(y | t = c) for every class c, float64."""
    return np.where(np.arange(num_classes) == y, 1 - NOISE + NOISE / num_classes, NOISE / num_classes)


def brute_force_posterior(log_p_z, log_p_t, y, t):
    """Exact marginals by enumerating z and every latent label (missing humans + classifier)."""
    batch, num_agents, num_classes = log_p_t.shape
    num_experts = num_agents - 1
    q_z = np.zeros((batch, num_agents))
    q_t = np.zeros((batch, num_agents, num_classes))
    p_z, p_t = np.exp(log_p_z.astype(np.float64)), np.exp(log_p_t.astype(np.float64))
    for i in range(batch):
        lik = noise_lik(y[i], num_classes)
        latent = [k for k in range(num_experts) if t[i, k] < 0] + [num_experts]
        total = 0.0
        joint_z = np.zeros(num_agents)
        joint_t = np.zeros((num_agents, num_classes))
        for labels in itertools.product(range(num_classes), repeat=len(latent)):
            full = {k: t[i, k] for k in range(num_experts) if t[i, k] >= 0}
            full.update(dict(zip(latent, labels)))
            prior_t = np.prod([p_t[i, k, c] for k, c in zip(latent, labels)])
            for z in range(num_agents):
                weight = p_z[i, z] * prior_t * lik[full[z]]
                total += weight
                joint_z[z] += weight
                for k in latent:
                    joint_t[k, full[k]] += weight
        q_z[i] = joint_z / total
        for k in range(num_agents):
            if k in latent:
                q_t[i, k] = joint_t[k] / total
            else:
                q_t[i, k, t[i, k]] = 1.0
    return q_z, q_t


def test_exact_matches_brute_force_enumeration():
    log_p_z, log_p_t, y, t = random_inputs(12, 2, 3, missing_rate=0.5, seed=1)
    t[0] = -1  # a row with every annotation missing
    t[1] = [0, 2]  # a row with none missing
    t[2] = [y[2], -1]
    q_z, q_t = exact_estep(log_p_z, log_p_t, y, t, NOISE)
    want_z, want_t = brute_force_posterior(log_p_z, log_p_t, y, t)
    np.testing.assert_allclose(q_z, want_z, atol=2e-6)
    np.testing.assert_allclose(q_t, want_t, atol=2e-6)


def meanfield_equations(log_p_z, log_p_t, y, t, q_t, collapse_classifier=True):
    """One pass of the design's mean-field updates, written with full sums over classes.

    Returns ``(q_z from q_t, q_t of latent humans from that q_z)``; the classifier's term
    is the collapsed log-evidence by default, as documented in ``meanfield_estep``.
    """
    batch, num_agents, num_classes = log_p_t.shape
    log_lik = np.log(np.stack([noise_lik(y[i], num_classes) for i in range(batch)]))  # (B, K)
    expected = np.einsum("bak,bk->ba", q_t, log_lik)
    if collapse_classifier:
        expected[:, -1] = np.log(np.sum(np.exp(log_p_t[:, -1] + log_lik), axis=-1))
    q_z = np.asarray(jax.nn.softmax(log_p_z + expected, axis=-1), np.float64)
    new_t = np.asarray(jax.nn.softmax(log_p_t + q_z[..., None] * log_lik[:, None, :], axis=-1))
    return q_z, new_t


@pytest.mark.parametrize("collapse_classifier", [True, False])
def test_meanfield_is_a_fixed_point(collapse_classifier):
    log_p_z, log_p_t, y, t = random_inputs(32, 2, 3, missing_rate=0.5, seed=2)
    run = lambda n: meanfield_estep(log_p_z, log_p_t, y, t, NOISE, num_iters=n,  # noqa: E731
                                    collapse_classifier=collapse_classifier)
    q_z, q_t = run(100)
    q_z_more, q_t_more = run(101)
    np.testing.assert_allclose(q_z_more, q_z, atol=1e-5)
    np.testing.assert_allclose(q_t_more, q_t, atol=1e-5)
    # The returned pair satisfies the update equations (independent transcription).
    want_z, want_t = meanfield_equations(log_p_z, log_p_t, y, t, np.asarray(q_t, np.float64),
                                         collapse_classifier)
    np.testing.assert_allclose(q_z, want_z, atol=1e-5)
    missing = t < 0
    np.testing.assert_allclose(np.asarray(q_t)[:, :-1][missing], want_t[:, :-1][missing], atol=1e-5)
    # Fixed rows: observed one-hots and the classifier's own softmax.
    np.testing.assert_allclose(np.asarray(q_t)[:, -1], np.exp(log_p_t[:, -1]), atol=1e-6)
    rows, cols = np.nonzero(~missing)
    np.testing.assert_array_equal(np.asarray(q_t)[rows, cols].argmax(-1), t[rows, cols])
    np.testing.assert_allclose(np.asarray(q_t)[rows, cols].max(-1), 1.0)


def test_meanfield_equals_exact_posterior_when_nothing_is_missing():
    log_p_z, log_p_t, y, t = random_inputs(40, 3, 5, missing_rate=0.4, seed=3)
    complete = np.all(t >= 0, axis=1)
    assert 3 <= complete.sum() < len(t)  # both kinds of rows are present
    q_mf, _ = meanfield_estep(log_p_z, log_p_t, y, t, NOISE)
    q_exact, _ = exact_estep(log_p_z, log_p_t, y, t, NOISE)
    np.testing.assert_allclose(np.asarray(q_mf)[complete], np.asarray(q_exact)[complete], atol=1e-6)
    # ... and it is a genuine approximation where labels are missing.
    assert np.abs(np.asarray(q_mf)[~complete] - np.asarray(q_exact)[~complete]).max() > 1e-3


def reference_transcription(log_p_z, log_p_t, y, t, num_iters=10):
    """The reference update with the explicit O(B E^2 K) loop over m != k (float64)."""
    batch, num_agents, num_classes = log_p_t.shape
    num_experts = num_agents - 1
    log_p_z = log_p_z.astype(np.float64)
    log_p_t = log_p_t.astype(np.float64)
    q_z = np.full((batch, num_agents), 1.0 / num_agents)
    q_t = np.zeros((batch, num_agents, num_classes))
    for i in range(batch):
        for k in range(num_experts):
            if t[i, k] >= 0:
                q_t[i, k] = REFERENCE_SMOOTHING / num_classes
                q_t[i, k, t[i, k]] += 1 - REFERENCE_SMOOTHING
            else:
                q_t[i, k] = NOISE / num_classes
        q_t[i, num_experts] = np.exp(log_p_t[i, num_experts])
    for _ in range(num_iters):
        previous = q_t.copy()
        for i in range(batch):
            log_lik = np.log(noise_lik(y[i], num_classes))
            logits = log_p_z[i] + previous[i] @ log_lik
            q_z[i] = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            for k in range(num_experts):
                if t[i, k] >= 0:
                    continue
                others = np.zeros(num_classes)
                for m in range(num_agents):
                    if m != k:
                        others += previous[i, m]
                row = log_p_t[i, k] + q_z[i, k] * log_lik * others
                q_t[i, k] = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    return q_z, q_t


@pytest.mark.parametrize("num_experts,num_classes", [(2, 3), (4, 6)])
def test_reference_variant_matches_direct_transcription(num_experts, num_classes):
    log_p_z, log_p_t, y, t = random_inputs(16, num_experts, num_classes, missing_rate=0.5, seed=4)
    t[0] = -1
    q_z, q_t = reference_estep(log_p_z, log_p_t, y, t, NOISE, num_iters=10)
    want_z, want_t = reference_transcription(log_p_z, log_p_t, y, t, num_iters=10)
    np.testing.assert_allclose(q_z, want_z, atol=1e-5)
    np.testing.assert_allclose(q_t, want_t, atol=1e-5)


@pytest.mark.parametrize("kind", ESTEP_KINDS)
@pytest.mark.parametrize("case", ["expert_column_missing", "all_missing", "none_missing", "large_logits"])
def test_no_nan_and_normalised(kind, case):
    log_p_z, log_p_t, y, t = random_inputs(64, 3, 10, missing_rate=0.3, seed=5)
    if case == "expert_column_missing":
        t[:, 1] = -1
    elif case == "all_missing":
        t[:] = -1
    elif case == "none_missing":
        t = np.where(t < 0, y[:, None], t)
    else:
        rng = np.random.default_rng(6)
        log_p_z = np.asarray(jax.nn.log_softmax(1e4 * rng.standard_normal(log_p_z.shape)))
        log_p_t = np.asarray(jax.nn.log_softmax(1e4 * rng.standard_normal(log_p_t.shape)))
    q_z, q_t = estep(kind, log_p_z, log_p_t, y, t, NOISE)
    assert np.all(np.isfinite(q_z)) and np.all(np.isfinite(q_t))
    assert np.all(np.asarray(q_z) >= 0) and np.all(np.asarray(q_t) >= -1e-7)
    np.testing.assert_allclose(np.sum(q_z, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.sum(q_t, axis=-1), 1.0, atol=1e-5)


def test_exact_fully_missing_column_matches_brute_force():
    log_p_z, log_p_t, y, t = random_inputs(6, 2, 3, seed=7)
    t[:, 0] = -1
    q_z, q_t = exact_estep(log_p_z, log_p_t, y, t, NOISE)
    want_z, want_t = brute_force_posterior(log_p_z, log_p_t, y, t)
    np.testing.assert_allclose(q_z, want_z, atol=2e-6)
    np.testing.assert_allclose(q_t, want_t, atol=2e-6)


@pytest.mark.parametrize("kind", ESTEP_KINDS)
def test_jit_and_vmap_compatible(kind):
    log_p_z, log_p_t, y, t = random_inputs(8, 2, 4, seed=8)
    eager = estep(kind, log_p_z, log_p_t, y, t, NOISE, num_iters=5)
    jitted = jax.jit(lambda *a: estep(kind, *a, label_noise=NOISE, num_iters=5))(log_p_z, log_p_t, y, t)
    stacked = [jnp.stack([x, x]) for x in (log_p_z, log_p_t, y, t)]
    vmapped = jax.vmap(lambda *a: estep(kind, *a, label_noise=NOISE, num_iters=5))(*stacked)
    for got in (jitted, (vmapped[0][1], vmapped[1][1])):
        np.testing.assert_allclose(got[0], eager[0], atol=1e-6)
        np.testing.assert_allclose(got[1], eager[1], atol=1e-6)


def test_observed_rows_are_one_hot_and_noise_is_a_traced_argument():
    log_p_z, log_p_t, y, t = random_inputs(10, 2, 4, seed=9)
    _, q_t = exact_estep(log_p_z, log_p_t, y, t, NOISE)
    rows, cols = np.nonzero(t >= 0)
    np.testing.assert_array_equal(np.asarray(q_t)[rows, cols], np.eye(4)[t[rows, cols]])
    # A larger noise makes agents that disagree with y less implausible: q(z) gets flatter.
    flat, _ = jax.jit(exact_estep)(log_p_z, log_p_t, y, t, 0.5)
    sharp, _ = jax.jit(exact_estep)(log_p_z, log_p_t, y, t, NOISE)
    entropy = lambda q: -np.sum(np.asarray(q) * np.log(np.asarray(q) + 1e-30), axis=-1).mean()  # noqa: E731
    assert entropy(flat) > entropy(sharp)


def test_unknown_kind_lists_valid_kinds():
    log_p_z, log_p_t, y, t = random_inputs(2, 2, 3)
    with pytest.raises(ValueError, match="exact, meanfield, reference"):
        estep("exat", log_p_z, log_p_t, y, t)
