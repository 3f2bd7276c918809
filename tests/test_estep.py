"""Tests of the Prob-L2D E-steps (methods/estep.py) against independent transcriptions, and of
the workload projection that follows them (methods/projection.py): its fixed-cost loop has no
data-dependent control flow, its early-exit loop one while_loop, and both certify the
tolerance on hard inputs against scipy."""

from __future__ import annotations

import contextlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from flax import nnx
from scipy.special import logsumexp

from benchmark import training
from benchmark.config import ConfigError, build_method
from core.spec import Batch, TaskSpec, WorkloadBounds
from methods.estep import ESTEP_KINDS, REFERENCE_SMOOTHING, estep, exact_estep, meanfield_estep, reference_estep
from methods.fused_estep import fused_exact_constrained
from methods.projection import NUM_ITERS, PROJECTION_LOOPS, check_loop, constrain_posterior, default_loop, solve_spd

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


# ------------------------------------------------------------ the workload projection's program


def primitives_of(closed_jaxpr):
    """Every equation of a jaxpr and of its sub-jaxprs (jit/pjit, scan, while, cond branches,
    custom_jvp/vjp calls, ...), found through any parameter that holds a jaxpr."""
    found = []

    def sub_jaxprs(value):
        if hasattr(value, "eqns"):  # Jaxpr
            yield value
        elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):  # ClosedJaxpr
            yield value.jaxpr
        elif isinstance(value, (tuple, list)):
            for item in value:
                yield from sub_jaxprs(item)

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            found.append(eqn)
            for value in eqn.params.values():
                for sub in sub_jaxprs(value):
                    walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


def exact_then_project(log_p_z, log_p_t, y, t, lo, hi, loop="fixed"):
    q_z, q_t = exact_estep(log_p_z, log_p_t, y, t, NOISE)
    q_z, info = constrain_posterior(q_z, lo, hi, loop=loop)
    return q_z, q_t, info


def test_walker_sees_nested_control_flow():
    """The walker finds a while and a cond nested in jit (so the next test is not vacuous)."""
    def looping(x):
        x = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 2.0), (0, x))[1]
        return jax.lax.cond(x.sum() > 0, lambda: x, lambda: -x)
    names = {eqn.primitive.name for eqn in primitives_of(jax.make_jaxpr(jax.jit(looping))(jnp.ones(3)))}
    assert {"while", "cond"} <= names


def test_estep_and_projection_have_no_data_dependent_control_flow():
    """jit(exact E-step + projection) and the projection alone with ``loop="fixed"``: no
    while, no cond, only fixed-length scans; for a number of agents (the small linear solves are unrolled over
    it), the same number of equations for any batch size, class count or bounds."""
    def program(fn, *args):
        eqns = primitives_of(jax.make_jaxpr(jax.jit(fn))(*args))
        names = [eqn.primitive.name for eqn in eqns]
        for eqn in eqns:
            if eqn.primitive.name == "scan":
                assert isinstance(eqn.params["length"], int)
        return names

    counts = {}
    for batch, experts, classes in [(128, 8, 10), (37, 8, 5), (64, 2, 5), (300, 2, 3)]:
        log_p_z, log_p_t, y, t = random_inputs(batch, experts, classes, seed=11)
        q = np.asarray(exact_estep(log_p_z, log_p_t, y, t, NOISE)[0])
        for name, (lo, hi) in {"caps": ([0.0] * experts + [0.0], [1.0] * experts + [0.2]),
                               "coverage": ([0.0] * experts + [0.3], [1.0] * experts + [0.3])}.items():
            lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
            fixed = lambda q, lo, hi: constrain_posterior(q, lo, hi, loop="fixed")  # noqa: E731
            for label, fn, args in [("pipeline", exact_then_project, (log_p_z, log_p_t, y, t, lo, hi)),
                                    ("projection", fixed, (q, lo, hi))]:
                names = program(fn, *args)
                assert "while" not in names and "cond" not in names, (label, sorted(set(names)))
                assert names.count("scan") == 1, label  # the fixed iterations, nothing else
                counts.setdefault((label, experts), set()).add(len(names))
    assert len(counts) == 4 and all(len(sizes) == 1 for sizes in counts.values()), counts


def test_early_exit_loop_is_one_while_and_the_default_only_on_cpu():
    """``loop="early_exit"``: one while_loop (no scan, no cond); ``"auto"`` resolves per
    backend (early exit on the CPU, the fixed loop on accelerators); unknown names are listed."""
    log_p_z, log_p_t, y, t = random_inputs(64, 2, 5, seed=11)
    lo, hi = jnp.asarray([0.0, 0.0, 0.3]), jnp.asarray([1.0, 1.0, 0.3])
    eqns = primitives_of(jax.make_jaxpr(
        lambda *a: exact_then_project(*a, loop="early_exit"))(log_p_z, log_p_t, y, t, lo, hi))
    names = [eqn.primitive.name for eqn in eqns]
    assert names.count("while") == 1 and "scan" not in names and "cond" not in names
    assert default_loop("cpu") == "early_exit"
    assert default_loop("gpu") == default_loop("tpu") == "fixed"
    assert check_loop("auto") == default_loop(jax.default_backend())
    assert set(PROJECTION_LOOPS) == {"fixed", "early_exit"}
    with pytest.raises(ValueError, match="auto, fixed, early_exit"):
        check_loop("adaptive")


# ------------------------------------------------------- the projection on hard inputs


def scipy_projection(q, lo, hi):
    """Independent solution: L-BFGS-B on the (u, l) >= 0 dual in float64."""
    num_agents = q.shape[1]
    log_q = np.log(np.maximum(q.astype(np.float64), 1e-12))

    def dual(x):
        u, l = x[:num_agents], x[num_agents:]
        z = log_q - u + l
        p = np.exp(z - logsumexp(z, axis=1, keepdims=True))
        s = p.mean(axis=0)
        return logsumexp(z, axis=1).mean() + u @ hi - l @ lo, np.concatenate([hi - s, s - lo])

    best = scipy.optimize.minimize(dual, np.zeros(2 * num_agents), jac=True, method="L-BFGS-B",
                                   bounds=[(0, None)] * (2 * num_agents),
                                   options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000})
    z = log_q - best.x[:num_agents] + best.x[num_agents:]
    return np.exp(z - logsumexp(z, axis=1, keepdims=True))


def hard_case(case):
    """``(q, lo, hi, comparable)``; ``comparable``: a finite optimum scipy finds reliably."""
    rng = np.random.default_rng(HARD_CASES.index(case))
    if case in ("estep_caps", "estep_coverage", "estep_exact_all"):
        log_p_z, log_p_t, y, t = random_inputs(256, 8, 10, seed=12)
        q = np.asarray(exact_estep(log_p_z, log_p_t, y, t, NOISE)[0])
        if case == "estep_caps":
            return q, np.array([0.075] * 8 + [0.0]), np.array([0.125] * 8 + [0.2]), True
        if case == "estep_coverage":  # exact coverage, as in training with workload.coverage
            return q, np.array([0.0] * 8 + [0.3]), np.array([1.0] * 8 + [0.3]), True
        target = rng.dirichlet(np.ones(9))
        return q, target, target, True
    if case in ("coverage_0", "coverage_1"):  # no finite optimum: shares reach 0 / 1 in the limit
        q = np.asarray(jax.nn.softmax(3 * rng.standard_normal((128, 4))))
        c = 0.0 if case == "coverage_0" else 1.0
        return q, np.array([0.0, 0.0, 0.0, c]), np.array([1.0, 1.0, 1.0, c]), False
    if case == "zero_columns":
        q = np.array(jax.nn.softmax(3 * rng.standard_normal((200, 5))))
        q[:, [1, 4]] = 0.0
        q /= q.sum(axis=1, keepdims=True)
        return q, np.array([0.1, 0.15, 0.1, 0.0, 0.15]), np.array([0.5, 0.3, 0.5, 1.0, 0.2]), False
    if case == "single_row":  # B = 1: the shares are the row itself
        q = np.array([[0.7, 0.2, 0.05, 0.05]])
        return q, np.array([0.1, 0.3, 0.2, 0.0]), np.array([0.4, 0.5, 0.3, 1.0]), True
    if case == "one_hot_rows":  # near one-hot posteriors (a confident gating network)
        q = np.asarray(jax.nn.softmax(1e4 * rng.standard_normal((512, 5))))
        return q, np.array([0.1, 0.2, 0.2, 0.2, 0.0]), np.array([0.2, 0.3, 0.3, 0.3, 0.1]), False
    if case == "tight_all":  # lo == hi for every agent, far from the unconstrained shares
        q = np.asarray(jax.nn.softmax(2 * rng.standard_normal((64, 6)) + np.arange(6)))
        target = np.array([0.3, 0.25, 0.2, 0.1, 0.1, 0.05])
        return q, target, target, True
    raise ValueError(case)


HARD_CASES = ["estep_caps", "estep_coverage", "estep_exact_all", "coverage_0", "coverage_1",
              "zero_columns", "single_row", "one_hot_rows", "tight_all"]


@pytest.mark.parametrize("loop", PROJECTION_LOOPS)
@pytest.mark.parametrize("case", HARD_CASES)
def test_projection_certifies_tolerance_on_hard_inputs(case, loop):
    q, lo, hi, comparable = hard_case(case)
    q_new, info = constrain_posterior(q, lo, hi, loop=loop)
    shares = np.asarray(q_new, np.float64).mean(axis=0)
    violation = max(0.0, np.max(shares - hi), np.max(lo - shares))
    assert violation <= 1e-4 and float(info["violation"]) <= 1e-4, (case, violation)
    assert int(info["iterations"]) <= NUM_ITERS
    np.testing.assert_allclose(np.asarray(q_new).sum(axis=1), 1.0, atol=1e-5)
    upper, lower = np.asarray(info["upper_multiplier"]), np.asarray(info["lower_multiplier"])
    assert np.all(upper * lower == 0) and np.all(upper >= 0) and np.all(lower >= 0)
    if comparable:  # the optimum: complementary slackness and agreement with a generic solver
        assert float(info["kkt_residual"]) <= 1e-4
        want = scipy_projection(q, lo, hi)
        np.testing.assert_allclose(np.asarray(q_new), want, atol=2e-3)
        kl = lambda p: np.mean(np.sum(p * (np.log(np.maximum(p, 1e-30))  # noqa: E731
                                           - np.log(np.maximum(q, 1e-12))), axis=1))
        assert kl(np.asarray(q_new, np.float64)) <= kl(want) + 1e-4


@pytest.mark.parametrize("loop", PROJECTION_LOOPS)
def test_projection_iterations_count_the_work_needed(loop):
    q = np.asarray(jax.nn.softmax(jnp.asarray(np.random.default_rng(3).standard_normal((300, 4)))))
    shares = q.mean(axis=0)
    unchanged, inactive = constrain_posterior(q, shares - 0.1, shares + 0.1, loop=loop)
    assert int(inactive["iterations"]) == 0
    np.testing.assert_array_equal(unchanged, q.astype(np.float32))
    lo, hi = np.array([0.0, 0.0, 0.0, 0.5]), np.array([1.0, 1.0, 1.0, 0.5])
    _, few = constrain_posterior(q, lo, hi, num_iters=2, loop=loop)
    _, full = constrain_posterior(q, lo, hi, loop=loop)
    assert 1 <= int(full["iterations"]) < NUM_ITERS
    assert int(few["iterations"]) == 2 and float(few["kkt_residual"]) >= float(full["kkt_residual"])
    if loop == "early_exit":  # stopped at the first iterate within tol
        assert float(full["kkt_residual"]) <= 1e-5


def test_both_loops_reach_the_same_projection():
    """The early exit stops where the fixed loop's iterates are within tol: same posteriors."""
    log_p_z, log_p_t, y, t = random_inputs(512, 8, 10, seed=13)
    q = np.asarray(exact_estep(log_p_z, log_p_t, y, t, NOISE)[0])
    lo, hi = np.array([0.1] * 8 + [0.0]), np.array([0.12] * 8 + [0.05])
    assert np.any(q.mean(axis=0) > hi) or np.any(q.mean(axis=0) < lo)  # active bounds
    fixed, fixed_info = constrain_posterior(q, lo, hi, loop="fixed")
    early, early_info = constrain_posterior(q, lo, hi, loop="early_exit")
    assert 1 <= int(early_info["iterations"]) <= int(fixed_info["iterations"])
    np.testing.assert_allclose(early, fixed, atol=1e-4)
    assert float(early_info["violation"]) <= 1e-5 and float(fixed_info["violation"]) <= 1e-5


@pytest.mark.parametrize("n", [1, 2, 4, 9, 12])
def test_unrolled_spd_solve_matches_numpy(n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, n))
    matrix, rhs = a @ a.T + n * np.eye(n), rng.normal(size=(n, 2))
    got = solve_spd(jnp.asarray(matrix, jnp.float32), jnp.asarray(rhs, jnp.float32))
    np.testing.assert_allclose(got, np.linalg.solve(matrix, rhs), rtol=1e-4, atol=1e-5)


# ------------------------------------------------ the fused kernel (Pallas, interpret mode here)


def fused_cases():
    """``(name, inputs, lo, hi, chunk_rows)``: one chunk and several (a partial last one);
    caps, an exact coverage, every agent's share fixed, inactive bounds and B = 1."""
    small = random_inputs(64, 3, 5, seed=21)
    wide = random_inputs(300, 8, 10, seed=22)
    single = random_inputs(1, 2, 3, seed=23)
    tight = np.array([0.3, 0.25, 0.25, 0.2])
    return [
        ("caps", small, [0.2, 0.2, 0.2, 0.0], [0.3, 0.3, 0.3, 0.15], 512),
        ("coverage", small, [0.0, 0.0, 0.0, 0.4], [1.0, 1.0, 1.0, 0.4], 512),
        ("tight_all", small, tight, tight, 512),
        ("inactive", small, [0.0] * 4, [1.0] * 4, 512),
        ("chunks", wide, [0.075] * 8 + [0.0], [0.125] * 8 + [0.2], 64),
        ("single_row", single, [0.1, 0.3, 0.0], [0.5, 0.6, 1.0], 512),
    ]


@pytest.mark.parametrize("loop", PROJECTION_LOOPS)
def test_fused_kernel_matches_the_xla_path(loop):
    """Interpret mode: same posteriors (1e-5), same violation and iterations as exact_estep +
    constrain_posterior with the same loop."""
    for name, (log_p_z, log_p_t, y, t), lo, hi, chunk_rows in fused_cases():
        lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
        q_z, q_t, info = fused_exact_constrained(log_p_z, log_p_t, y, t, lo, hi, label_noise=NOISE,
                                                 loop=loop, interpret=True, chunk_rows=chunk_rows)
        want_z, want_t, want = exact_then_project(log_p_z, log_p_t, y, t, lo, hi, loop=loop)
        np.testing.assert_allclose(q_z, want_z, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(q_t, want_t, atol=1e-6, err_msg=name)
        assert abs(float(info["violation"]) - float(want["violation"])) <= 1e-6, name
        assert int(info["iterations"]) == int(want["iterations"]), name
        for key in ("shares", "upper_multiplier", "lower_multiplier"):
            np.testing.assert_allclose(info[key], want[key], atol=1e-5, err_msg=f"{name} {key}")
        if name == "inactive":
            assert int(info["iterations"]) == 0
            np.testing.assert_array_equal(q_z, exact_estep(log_p_z, log_p_t, y, t, NOISE)[0])
        else:
            assert float(info["violation"]) <= 1e-4, name


def abstract_gpu():
    """A context in which Pallas's Triton lowering targets an H100 without one (newer JAX
    asks for the GPU's kind; older ones lower without)."""
    try:
        from jax._src.mesh import AbstractDevice, AbstractMesh
        device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
        return jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device))
    except (ImportError, TypeError, AttributeError):
        return contextlib.nullcontext()


def test_fused_kernel_lowers_to_one_triton_kernel():
    """Lowered for a CUDA GPU from this CPU: the whole computation is one Triton custom call
    (the Pallas Triton lowering accepts every operation), around it only constants and
    reshapes."""
    log_p_z, log_p_t, y, t = random_inputs(300, 8, 10, seed=24)
    lo, hi = jnp.asarray([0.075] * 8 + [0.0]), jnp.asarray([0.125] * 8 + [0.2])
    for loop in PROJECTION_LOOPS:
        fn = jax.jit(lambda *a: fused_exact_constrained(*a, loop=loop, interpret=False, chunk_rows=64))
        with abstract_gpu():
            text = fn.trace(log_p_z, log_p_t, y, t, lo, hi).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("stablehlo.custom_call") == 1 and "__gpu$xla.gpu.triton" in text, loop
        ops = {line.split("=")[1].split()[0] for line in text.splitlines()
               if "= stablehlo." in line and "custom_call" not in line}
        assert ops <= {"stablehlo.constant", "stablehlo.broadcast_in_dim", "stablehlo.concatenate",
                       "stablehlo.reshape"}, ops


def test_fused_kernel_rejects_bad_chunk_rows():
    log_p_z, log_p_t, y, t = random_inputs(8, 2, 3)
    with pytest.raises(ValueError, match="chunk_rows=48 must be a power of two >= 16"):
        fused_exact_constrained(log_p_z, log_p_t, y, t, jnp.zeros(3), jnp.ones(3), chunk_rows=48)


def test_prob_l2d_fused_projection_trains_like_the_xla_path():
    """``prob_l2d`` with ``projection=fused``: two seeds in one vmapped train step (the kernel
    once per seed, under the gradient's trace) give the losses, violations and parameters of
    ``projection=early_exit``; a fused projection needs the exact E-step."""
    spec = TaskSpec(num_classes=4, num_experts=2, input_shape=(8, 8, 1), backbone="small_cnn")
    optim = training.OptimConfig(learning_rate=0.05, total_steps=4)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, (2, 32))
    t = np.where(rng.random((2, 32, 2)) < 0.4, -1, rng.integers(0, 4, (2, 32, 2)))
    batch = Batch(jnp.asarray(rng.normal(size=(2, 32, 8, 8, 1)), jnp.float32), jnp.asarray(y, jnp.int32),
                  jnp.asarray(t, jnp.int32))
    results = {}
    for projection in ("fused", "early_exit"):
        method = build_method("prob_l2d", {"projection": projection}, spec)
        inputs = training.train_inputs(method, WorkloadBounds((0.0,) * 3, (1.0, 1.0, 0.2)), 0.5)
        models = [training.init_model(method, spec, seed) for seed in (0, 1)]
        graphdef, params, rest = nnx.split(models[0], nnx.Param, ...)
        states = [nnx.split(model, nnx.Param, ...)[1:] for model in models]
        params, rest = (jax.tree.map(lambda *leaves: jnp.stack(leaves), *parts) for parts in zip(*states))
        opt_state = jax.vmap(training.make_optimizer(optim).init)(params)
        state = training.TrainState(params, rest, opt_state)
        results[projection] = training.train_step_seeds(method, graphdef, optim, state, batch, inputs)
    (fused_state, fused), (xla_state, xla) = results["fused"], results["early_exit"]
    np.testing.assert_allclose(fused["loss"], xla["loss"], rtol=1e-5)
    np.testing.assert_allclose(fused["workload_violation"], xla["workload_violation"], atol=1e-6)
    for got, want in zip(jax.tree.leaves(fused_state.params), jax.tree.leaves(xla_state.params)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ConfigError, match="projection=fused fuses the exact E-step"):
        build_method("prob_l2d", {"projection": "fused", "estep": "meanfield"}, spec)
    with pytest.raises(ConfigError, match="projection='adaptive' is not one of auto, fixed"):
        build_method("prob_l2d", {"projection": "adaptive"}, spec)
