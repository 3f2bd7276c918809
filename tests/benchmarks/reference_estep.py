"""The earlier E-step yardstick, and the shared benchmark inputs.

``yardstick_constrained_estep`` re-implements the reference approach in its own way (it is
not a port: ``original_estep.py`` is, and the E-step tables time both):

1. the mean-field fixed point of the reference variant (design.md section 5,
   ``estep=reference``) for 10 iterations, forming the sum over the *other* agents
   ``m != k`` explicitly: the (B, E+1, E+1, K) tensor ``q(t_m) * [m != k]`` is materialised and
   reduced, O(B E^2 K) (the original gathers a (B, E+1, E, K) tensor instead, which XLA runs
   several times slower on a CPU);
2. a generic projected-gradient solver of the workload dual over ``u, l >= 0``: FISTA with
   backtracking line search (Beck and Teboulle 2009), up to 500 iterations, stopping when the
   gradient mapping is below 1e-3 in the infinity norm (stricter than the original's
   jaxopt test, so it runs more iterations).

Everything is jitted with ``lax`` loops (no Python-level iteration). It is not used by the
library; ``methods.estep`` and ``methods.projection`` are the production versions. This
module also builds the shared benchmark inputs (``make_problem``, ``benchmark_bounds``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SMOOTHING = 1e-3


def _yardstick_meanfield(log_p_z, log_p_t, y, t, label_noise, num_iters):
    """The reference mean-field variant with the explicit O(B A^2 K) sum over m != k.

    Same input contract as ``methods.estep``: ``log_p_t`` normalised log-probabilities.
    """
    batch, num_agents, num_classes = log_p_t.shape
    num_experts = num_agents - 1
    log_lik = jnp.where(jax.nn.one_hot(y, num_classes) > 0,
                        jnp.log(1.0 - label_noise + label_noise / num_classes),
                        jnp.log(label_noise / num_classes))  # (B, K)
    observed = t >= 0
    smoothed = (1.0 - SMOOTHING) * jax.nn.one_hot(jnp.maximum(t, 0), num_classes) + SMOOTHING / num_classes
    human_rows = jnp.where(observed[..., None], smoothed, label_noise / num_classes)
    q_t = jnp.concatenate([human_rows, jnp.exp(log_p_t[:, num_experts:])], axis=1)
    update_row = jnp.concatenate([~observed, jnp.zeros((batch, 1), bool)], axis=1)
    not_self = 1.0 - jnp.eye(num_agents, dtype=q_t.dtype)  # [k, m]
    q_z = jnp.full((batch, num_agents), 1.0 / num_agents)

    def body(_, carry):
        _, q_t = carry
        q_z = jax.nn.softmax(log_p_z + jnp.sum(q_t * log_lik[:, None, :], axis=-1), axis=-1)
        pairs = not_self[None, :, :, None] * q_t[:, None, :, :]  # (B, A_k, A_m, K)
        others = jnp.sum(pairs, axis=2)
        logits = log_p_t + q_z[..., None] * log_lik[:, None, :] * others
        q_t = jnp.where(update_row[..., None], jax.nn.softmax(logits, axis=-1), q_t)
        return q_z, q_t

    return jax.lax.fori_loop(0, num_iters, body, (q_z, q_t))


def _dual(log_q, x, lo, hi):
    """Dual objective ``D(u, l)`` at ``x = (u, l) >= 0``."""
    num_agents = lo.shape[0]
    u, l = x[:num_agents], x[num_agents:]
    lse = jax.nn.logsumexp(log_q - u + l, axis=-1)
    return jnp.mean(lse) + jnp.sum(u * hi - l * lo)


def _fista_workload(q, lo, hi, max_iters, tol):
    """FISTA with backtracking on the (u, l) >= 0 dual; returns the constrained q and info."""
    num_agents = q.shape[1]
    log_q = jnp.log(jnp.maximum(q, 1e-12))
    value_and_grad = jax.value_and_grad(_dual, argnums=1)

    def prox_step(point, lipschitz):
        value, grad = value_and_grad(log_q, point, lo, hi)

        def not_enough(state):
            lip, candidate = state
            gap = candidate - point
            model = value + jnp.dot(grad, gap) + 0.5 * lip * jnp.dot(gap, gap)
            return _dual(log_q, candidate, lo, hi) > model + 1e-7

        def grow(state):
            lip, _ = state
            lip = 2.0 * lip
            return lip, jnp.maximum(point - grad / lip, 0.0)

        start = (lipschitz, jnp.maximum(point - grad / lipschitz, 0.0))
        lipschitz, candidate = jax.lax.while_loop(not_enough, grow, start)
        return candidate, lipschitz

    def cond(state):
        it, *_, mapping_norm = state
        return (it < max_iters) & (mapping_norm > tol)

    def body(state):
        it, x, point, momentum, lipschitz, _ = state
        x_new, lipschitz = prox_step(point, lipschitz)
        mapping_norm = lipschitz * jnp.max(jnp.abs(x_new - point))
        momentum_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * momentum ** 2))
        point = x_new + ((momentum - 1.0) / momentum_new) * (x_new - x)
        return it + 1, x_new, point, momentum_new, lipschitz, mapping_norm

    x0 = jnp.zeros((2 * num_agents,), q.dtype)
    init = (jnp.int32(0), x0, x0, jnp.float32(1.0), jnp.float32(1.0), jnp.float32(jnp.inf))
    iterations, x, *_ = jax.lax.while_loop(cond, body, init)
    u, l = x[:num_agents], x[num_agents:]
    q_new = jax.nn.softmax(log_q - u + l, axis=-1)
    shares = jnp.mean(q_new, axis=0)
    violation = jnp.max(jnp.maximum(0.0, jnp.maximum(shares - hi, lo - shares)))
    return q_new, {"violation": violation, "iterations": iterations, "shares": shares}


@functools.partial(jax.jit, static_argnames=("num_iters", "max_iters"))
def yardstick_constrained_estep(log_p_z, log_p_t, y, t, lo, hi, label_noise=1e-3, num_iters=10,
                                max_iters=500, tol=1e-3):
    """Reference approach end to end: O(B E^2 K) mean-field, then FISTA on the workload dual.

    Returns ``(q_z_constrained, q_t, info)`` with ``info['violation']`` and FISTA iterations.
    """
    q_z, q_t = _yardstick_meanfield(log_p_z, log_p_t, y, t, label_noise, num_iters)
    q_z, info = _fista_workload(q_z, jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32),
                                max_iters, tol)
    return q_z, q_t, info


def benchmark_bounds(num_experts: int):
    """Benchmark workload bounds: classifier share <= 0.2, humans balanced around 0.8/E +-25%."""
    share = 0.8 / num_experts
    lo = np.array([0.75 * share] * num_experts + [0.0], np.float32)
    hi = np.array([1.25 * share] * num_experts + [0.2], np.float32)
    return lo, hi


def make_problem(batch: int, num_experts: int, num_classes: int, seed: int = 0,
                 missing_rate: float = 0.3):
    """Random E-step inputs shaped like a mid-training batch, with active workload bounds.

    Gating logits ``3 N(0,1)``; annotator-model and classifier logits ``3 N(0,1)`` with a
    boost of 4 on the true class for the classifier (an accurate classifier, so the posterior
    wants to defer to it more than the 0.2 cap allows); experts of increasing accuracy
    (0.5 to 0.9, wrong labels uniform), so balanced human bounds are active; annotations
    missing completely at random. Returns ``(log_p_z, log_p_t, y, t)`` as jax arrays.
    """
    rng = np.random.default_rng(seed)
    num_agents = num_experts + 1
    y = rng.integers(0, num_classes, batch)
    gate = 3.0 * rng.standard_normal((batch, num_agents))
    log_p_z = jax.nn.log_softmax(jnp.asarray(gate, jnp.float32), axis=-1)
    logits = 3.0 * rng.standard_normal((batch, num_agents, num_classes))
    logits[np.arange(batch), -1, y] += 4.0
    log_p_t = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    accuracy = np.linspace(0.5, 0.9, num_experts)
    correct = rng.random((batch, num_experts)) < accuracy
    t = np.where(correct, y[:, None], rng.integers(0, num_classes, (batch, num_experts)))
    t = np.where(rng.random((batch, num_experts)) < missing_rate, -1, t)
    return log_p_z, log_p_t, jnp.asarray(y, jnp.int32), jnp.asarray(t, jnp.int32)
