"""The original Prob-L2D E-step, ported: the honest yardstick of the E-step benchmarks.

A port (written for this project, no dependency on the original code or on jaxopt) of what
the reference implementation (github.com/cnguyen10/pl2d, ``probabilistic_l2d.py``) runs in
every training step, operation for operation:

1. ``unconstrained_posteriors``: 10 mean-field fixed-point iterations of its variant
   (design.md section 5, ``estep=reference``). Observed annotations are one-hots smoothed
   with 1e-3, missing ones the constant ``1e-3 / K``, the classifier's row its softmax;
   ``log p(y | t = c)`` is the log of the smoothed identity. Each iteration computes
   ``log q(z) = log p(z|x) + sum_c q(t_k=c) log p(y|c) - 1``, normalises it (logsumexp, then a
   softmax), gathers for every agent k the rows of the *other* agents into a
   (B, E+1, E, K) tensor (materialised, as the original does with an index table and a
   vmapped gather), forms ``log q(t_k) = log p(t_k|x) + sum_{m != k} q(z=k) q(t_m) log p(y|.)
   - 1``, normalises it the same way and keeps the new rows of missing annotations only;
2. ``constrained_posterior``: the workload dual over ``u, l >= 0``,
   ``D(u, l) = mean_i logsumexp_k(log q_ik - (u_k - l_k + 1)) + sum_k u_k hi_k - sum_k l_k lo_k``,
   minimised by jaxopt's ``ProjectedGradient`` with its defaults, i.e. ``ProximalGradient``
   with the projection onto the non-negative orthant as prox: FISTA acceleration, stepsize 0
   (backtracking line search: start from the previous stepsize, halve at most ``maxls=15``
   times until ``f(x+) <= f(x) + <g, x+ - x> + ||x+ - x||^2 / (2 step) + eps_float32``, then
   double it for the next iteration and reset it to 1 when it fell to 1e-6 or below), the first
   iteration always run and then at most ``maxiter - 1 = 499`` more while the error
   ``||P(x - grad f(x)) - x||_2`` (at the new iterate, an extra gradient evaluation) exceeds
   ``tol=1e-3``; the result is ``q'_ik ∝ q_ik exp(l_k - u_k)``.

Everything runs in one jitted program with ``lax`` loops (``while_loop`` where jaxopt uses
one). ``methods.estep.reference_estep`` computes the same E-step in O(B A K) memory (a test
checks they agree); ``methods.projection.constrain_posterior`` is the production projection.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SMOOTHING = 1e-3  # optax.smooth_labels(alpha=1e-3) in the original, for annotations and p(y|t)
MAXITER = 500
MAXLS = 15
TOL = 1e-3
DECREASE_FACTOR = 0.5


def _smooth(one_hot, alpha):
    """``optax.smooth_labels``: ``(1 - alpha) * labels + alpha / K``."""
    return (1.0 - alpha) * one_hot + alpha / one_hot.shape[-1]


def original_meanfield(log_p_z, log_p_t, y, t, label_noise=SMOOTHING, num_iters=10):
    """Port of ``unconstrained_posteriors``; returns ``(q_z, q_t)`` after ``num_iters`` rounds.

    ``log_p_z`` (B, A) and ``log_p_t`` (B, A, K) log-probabilities, ``y`` (B,), ``t`` (B, E)
    with -1 for missing. ``label_noise`` is the smoothing of ``p(y | t)`` (1e-3 there).
    """
    log_p_z = jnp.asarray(log_p_z, jnp.float32)
    log_p_t = jnp.asarray(log_p_t, jnp.float32)
    batch, num_agents, num_classes = log_p_t.shape
    num_experts = num_agents - 1
    missing = jnp.concatenate([(t == -1).astype(jnp.int32), jnp.zeros((batch, 1), jnp.int32)], axis=1)
    t_one_hot = _smooth(jax.nn.one_hot(t, num_classes), SMOOTHING)  # all-zero one-hot for -1
    classifier = jax.nn.softmax(log_p_t[:, -1, :], axis=-1)
    t_one_hot = jnp.concatenate([t_one_hot, classifier[:, None, :]], axis=1)  # (B, A, K)
    log_p_y_t = jnp.log(_smooth(jnp.eye(num_classes), label_noise)[y])  # (B, K): log p(y_i | c)

    # index table of the other agents, as jnp.nonzero(1 - eye) reshaped to (A, E)
    others_ids = np.nonzero(1 - np.eye(num_agents, dtype=np.int32))[1].reshape(num_agents, num_experts)
    others_ids = jnp.tile(jnp.asarray(others_ids), (batch, 1, 1))  # (B, A, E)
    gather_others = jax.vmap(lambda q_t, ids: q_t[ids], in_axes=(0, 0))
    keep = missing[..., None]

    def body(_, q):
        log_q_z = log_p_z + jnp.sum(q["t"] * log_p_y_t[:, None, :], axis=-1) - 1.0
        log_q_z -= jax.nn.logsumexp(log_q_z, axis=-1, keepdims=True)
        q_z = jax.nn.softmax(log_q_z, axis=-1)
        q_t_others = gather_others(q["t"], others_ids)  # (B, A, E, K), materialised
        log_q_t = log_p_t + jnp.sum(q_z[:, :, None, None] * q_t_others * log_p_y_t[:, None, None, :],
                                    axis=-2) - 1.0
        log_q_t -= jax.nn.logsumexp(log_q_t, axis=-1, keepdims=True)
        q_t = jax.nn.softmax(log_q_t, axis=-1)
        return {"z": q_z, "t": q_t * keep + (1 - keep) * t_one_hot}

    init = {"z": jnp.ones_like(log_p_z) / num_agents, "t": t_one_hot}
    out = jax.lax.fori_loop(0, num_iters, body, init)
    return out["z"], out["t"]


def _while(cond, body, init, maxiter):
    """jaxopt's ``loop.while_loop`` under jit: at most ``maxiter`` bodies while ``cond``."""
    def cond_with_count(state):
        count, value = state
        return cond(value) & (count <= maxiter - 1)

    def body_with_count(state):
        count, value = state
        return count + 1, body(value)

    return jax.lax.while_loop(cond_with_count, body_with_count, (0, init))[1]


def original_projection(q_z, lo, hi, maxiter=MAXITER, tol=TOL, maxls=MAXLS,
                        decrease_factor=DECREASE_FACTOR):
    """Port of ``constrained_posterior`` (jaxopt ``ProjectedGradient`` defaults).

    Returns ``(q_z_constrained, info)`` with ``violation`` (max over agents of
    ``max(0, share - hi, lo - share)``), ``shares`` and ``iterations`` (FISTA updates run).
    """
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    log_q = jnp.log(q_z)

    def unnormalised(params):  # get_unnorm_log_q_z_tilde
        return log_q - (params["upper"] - params["lower"] + 1.0)

    def dual(params):  # duality_Lagrangian
        value = jnp.mean(jax.nn.logsumexp(unnormalised(params), axis=-1), axis=0)
        return value + jnp.sum(params["upper"] * hi) - jnp.sum(params["lower"] * lo)

    value_and_grad = jax.value_and_grad(dual)
    grad_fn = jax.grad(dual)
    tree_map = jax.tree_util.tree_map
    tree_sub = lambda a, b: tree_map(jnp.subtract, a, b)  # noqa: E731
    tree_vdot = lambda a, b: sum(jnp.vdot(a[k], b[k]) for k in sorted(a))  # noqa: E731
    squared_norm = lambda a: tree_vdot(a, a)  # noqa: E731
    eps = jnp.finfo(jnp.float32).eps

    def prox_grad(x, x_grad, stepsize):  # projection_non_negative(x - stepsize * grad)
        return tree_map(lambda p, g: jnp.maximum(p - stepsize * g, 0.0), x, x_grad)

    def error(x, x_grad):
        return jnp.sqrt(squared_norm(tree_sub(prox_grad(x, x_grad, 1.0), x)))

    def line_search(x, x_value, x_grad, stepsize):
        def cond(pair):
            next_x, step = pair
            diff = tree_sub(next_x, x)
            decrease = step * (dual(next_x) - x_value)
            condition = step * tree_vdot(diff, x_grad) + 0.5 * squared_norm(diff)
            return decrease > condition + eps

        def body(pair):
            step = pair[1] * decrease_factor
            return prox_grad(x, x_grad, step), step

        return _while(cond, body, (prox_grad(x, x_grad, stepsize), stepsize), maxls)

    def update(state):  # ProximalGradient._update_accel
        x, y, momentum, stepsize, _, iteration = state
        y_value, y_grad = value_and_grad(y)
        next_x, next_stepsize = line_search(y, y_value, y_grad, stepsize)
        next_stepsize = jnp.where(next_stepsize <= 1e-6, 1.0, next_stepsize / decrease_factor)
        next_momentum = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * momentum ** 2))
        next_y = tree_map(lambda a, b: a + (momentum - 1.0) / next_momentum * (a - b), next_x, x)
        next_error = error(next_x, grad_fn(next_x))
        return next_x, next_y, next_momentum, next_stepsize, next_error, iteration + 1

    zeros = {"upper": jnp.zeros_like(hi), "lower": jnp.zeros_like(lo)}
    one = jnp.float32(1.0)
    state = update((zeros, zeros, one, one, jnp.float32(jnp.inf), jnp.int32(0)))  # first one unrolled
    state = _while(lambda s: s[4] > tol, update, state, maxiter - 1)
    params, iterations = state[0], state[5]
    log_q_new = unnormalised(params)
    q_new = jnp.exp(log_q_new - jax.nn.logsumexp(log_q_new, axis=-1, keepdims=True))
    shares = jnp.mean(q_new, axis=0)
    violation = jnp.max(jnp.maximum(0.0, jnp.maximum(shares - hi, lo - shares)))
    return q_new, {"violation": violation, "shares": shares, "iterations": iterations}


@functools.partial(jax.jit, static_argnames=("num_iters",))
def original_constrained_estep(log_p_z, log_p_t, y, t, lo, hi, label_noise=SMOOTHING, num_iters=10):
    """The original E-step end to end: mean-field variant, then the FISTA workload projection.

    Returns ``(q_z_constrained, q_t, info)``, like the other benchmark pipelines.
    """
    q_z, q_t = original_meanfield(log_p_z, log_p_t, jnp.asarray(y, jnp.int32),
                                  jnp.asarray(t, jnp.int32), label_noise, num_iters)
    q_z, info = original_projection(q_z, lo, hi)
    return q_z, q_t, info
