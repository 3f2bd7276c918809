"""The workload-constrained E-step: a jitted KL projection of agent posteriors onto bounds.

Used in training by the methods whose E-step honours the workload (``prob_l2d``,
``l2d_em``). Bounds follow ``core.spec`` (humans first, the classifier last) and must
be feasible (``benchmark.bounds.check_bounds``). The evaluator's hard version is
``benchmark.assignment.capacity_assignment``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax.scipy.linalg


def _dual_terms(q, v, lo, hi):
    """Dual objective in the free variable ``v = l - u`` and the per-row normalisers.

    ``D(v) = mean_i log sum_k q_ik exp(v_k) - sum_k (lo_k max(v_k,0) + hi_k min(v_k,0))``,
    i.e. the (u, l) dual minimised over ``u, l >= 0`` with ``l - u = v``. The row sums are a
    matrix-vector product with ``exp(v - max v)`` (no exp over the (B, A) array).
    Returns ``(D, scaled_exp_v, row_sums)`` with ``q'_i = q_i * scaled_exp_v / row_sums_i``.
    """
    top = jnp.max(v)
    scaled_exp_v = jnp.exp(v - top)
    row_sums = q @ scaled_exp_v
    linear = jnp.sum(lo * jnp.maximum(v, 0.0) + hi * jnp.minimum(v, 0.0))
    return jnp.mean(jnp.log(row_sums)) + top - linear, scaled_exp_v, row_sums


def _kkt_residual(shares, v, lo, hi):
    """Max over agents of the KKT residual (in share units); zero exactly at the optimum."""
    at_zero = jnp.maximum(0.0, jnp.maximum(shares - hi, lo - shares))
    per_agent = jnp.where(v < 0, jnp.abs(shares - hi), jnp.where(v > 0, jnp.abs(shares - lo), at_zero))
    return jnp.max(per_agent)


@functools.partial(jax.jit, static_argnames=("num_iters", "max_backtracks"))
def constrain_posterior(q, lo, hi, num_iters=30, tol=1e-5, min_prob=1e-12, max_step=8.0,
                        max_backtracks=12):
    """KL-project agent posteriors onto the workload bounds (jittable).

    Solves ``min (1/B) sum_i KL(q'_i || q_i)`` s.t. ``lo_k <= (1/B) sum_i q'_ik <= hi_k``.
    The solution is ``q'_ik ∝ q_ik exp(l_k - u_k)`` with ``u, l >= 0`` minimising
    ``D(u, l) = (1/B) sum_i logsumexp_k(log q_ik - u_k + l_k) + sum_k (u_k hi_k - l_k lo_k)``.
    Since ``lo <= hi``, at most one of ``u_k, l_k`` is positive at the optimum, so we optimise
    the single free variable ``v_k = l_k - u_k`` with the piecewise-linear term handled exactly.

    Solver: projected Newton (equivalent to projected Newton on the 2(E+1) bound-constrained
    multipliers). Each iteration: agents with ``v_k = 0`` and share inside its bounds are
    held at 0; on the other agents a Newton step on the (E+1)x(E+1) Hessian
    ``diag(s) - P^T P / B`` (Levenberg damped, step capped at ``max_step``; an agent that
    would leave ``v_k = 0`` on the wrong side of the kink is held), a ``v_k`` that crosses 0
    is clipped to 0 (the bound ``u_k >= 0`` or ``l_k >= 0``), then an Armijo test of the full
    step with backtracking only when it fails. A ``lax.while_loop`` runs at most
    ``num_iters`` iterations (typically 2 to 7) and stops once the KKT residual (primal
    violation and complementary slackness, in share units) is ``<= tol``. Structure: the
    row normalisers are ``q @ exp(v)``, so an iteration costs two (B, A) x (A,) products,
    one (A, B) x (B, A) product and B logs; no exp over the batch.

    Bounds must be feasible (see ``check_bounds``). ``q`` rows should sum to one; entries are
    floored at ``min_prob`` (zeros allowed). If no bound is active, ``q`` is returned unchanged.

    Returns ``(q_new, info)``; ``info`` holds ``violation`` (max over agents of
    ``max(0, share - hi, lo - share)``), ``kkt_residual``, ``shares``, ``upper_multiplier``
    ``u``, ``lower_multiplier`` ``l`` and ``iterations``.
    """
    q = jnp.asarray(q, jnp.float32)
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    q_floor = jnp.maximum(q, min_prob)
    batch, num_agents = q.shape
    eye = jnp.eye(num_agents, dtype=jnp.float32)

    def posterior(scaled_exp_v, row_sums):
        return q_floor * scaled_exp_v / row_sums[:, None]

    def newton_direction(v, probs, shares):
        at_zero = v == 0
        pushing_up = at_zero & (shares < lo)  # a lower bound becomes active: v goes up
        pushing_down = at_zero & (shares > hi)  # an upper bound becomes active: v goes down
        # side of the kink each agent sits on: +1 (l > 0), -1 (u > 0), 0 (held at v = 0)
        side = jnp.where(at_zero, pushing_up.astype(jnp.float32) - pushing_down, jnp.sign(v))
        free = side != 0
        grad = jnp.where(free, shares - jnp.where(side < 0, hi, lo), 0.0)
        # Hessian of the smooth part: diag(s) - P^T P / B. Its rows sum to zero, so the
        # diagonal is rebuilt from the off-diagonal terms (no cancellation when s_k -> 1).
        off_diagonal = (probs.T @ probs) * ((1.0 - eye) / batch)
        hess_diag = jnp.sum(off_diagonal, axis=1)
        damping = 1e-6 * jnp.max(hess_diag) + 1e-12
        def solve(held):
            # Newton system on the free agents; held agents get the identity row (step 0).
            both_free = ~held[:, None] & ~held[None, :]
            reduced = (eye * jnp.where(held, 1.0, hess_diag + damping)
                       - jnp.where(both_free, off_diagonal, 0.0))
            factor = jax.scipy.linalg.cho_factor(reduced)  # SPD: diagonally dominant + damping
            return -jax.scipy.linalg.cho_solve(factor, jnp.where(held, 0.0, grad))

        direction = solve(~free)
        # An agent leaving v = 0 on the wrong side of its kink is held at 0 and we re-solve.
        wrong_side = at_zero & (direction * side < 0)
        direction = jax.lax.cond(jnp.any(wrong_side), lambda: solve(~free | wrong_side),
                                 lambda: direction)
        # Safeguard: float32 rounding near the all-ones null direction of the Hessian can
        # spoil the Newton step; fall back to a diagonally scaled gradient step then.
        is_descent = jnp.dot(grad, direction) < 0
        direction = jnp.where(is_descent, direction, -grad / (hess_diag + damping))
        scale = jnp.minimum(1.0, max_step / (jnp.max(jnp.abs(direction)) + 1e-30))
        return direction * scale, grad, side

    def step_to(v, direction, alpha, side):
        trial = v + alpha * direction
        return jnp.where(trial * side < 0, 0.0, trial)  # project onto u >= 0, l >= 0

    def armijo(value, trial_value, grad, v, trial):
        slack = 1e-6 * jnp.abs(value) + 1e-7  # float32 resolution of D
        return trial_value <= value + 1e-4 * jnp.dot(grad, trial - v) + slack

    def backtrack(v, value, direction, grad, side, terms):
        def cond(state):
            tries, _, _, _, accepted = state
            return (tries < max_backtracks) & ~accepted

        def body(state):
            tries, alpha, _, _, _ = state
            alpha = 0.5 * alpha
            trial = step_to(v, direction, alpha, side)
            trial_value, *trial_terms = _dual_terms(q_floor, trial, lo, hi)
            return (tries + 1, alpha, trial_value, tuple(trial_terms),
                    armijo(value, trial_value, grad, v, trial))

        _, alpha, trial_value, trial_terms, accepted = jax.lax.while_loop(
            cond, body, (jnp.int32(0), jnp.float32(1.0), value, terms, jnp.bool_(False)))
        new_v = jnp.where(accepted, step_to(v, direction, alpha, side), v)
        new_terms = jax.tree_util.tree_map(lambda new, old: jnp.where(accepted, new, old),
                                           trial_terms, terms)
        return new_v, jnp.where(accepted, trial_value, value), new_terms, accepted

    def cond(state):
        it, _, _, _, _, residual, stalled = state
        return (it < num_iters) & (residual > tol) & ~stalled

    def body(state):
        it, v, value, terms, probs, _, _ = state
        shares = jnp.mean(probs, axis=0)
        direction, grad, side = newton_direction(v, probs, shares)
        trial = step_to(v, direction, 1.0, side)
        trial_value, *trial_terms = _dual_terms(q_floor, trial, lo, hi)
        full_step_ok = armijo(value, trial_value, grad, v, trial)
        v, value, terms, accepted = jax.lax.cond(
            full_step_ok,
            lambda: (trial, trial_value, tuple(trial_terms), jnp.bool_(True)),
            lambda: backtrack(v, value, direction, grad, side, terms))
        probs = posterior(*terms)
        residual = _kkt_residual(jnp.mean(probs, axis=0), v, lo, hi)
        return it + 1, v, value, terms, probs, residual, ~accepted

    v0 = jnp.zeros((num_agents,), jnp.float32)
    value0, *terms0 = _dual_terms(q_floor, v0, lo, hi)
    probs0 = posterior(*terms0)
    init = (jnp.int32(0), v0, value0, tuple(terms0), probs0,
            _kkt_residual(jnp.mean(probs0, axis=0), v0, lo, hi), jnp.bool_(False))
    iterations, v, _, _, probs, residual, _ = jax.lax.while_loop(cond, body, init)

    inactive = jnp.all(v == 0)
    q_new = jnp.where(inactive, q, probs)
    shares = jnp.mean(q_new, axis=0)
    violation = jnp.max(jnp.maximum(0.0, jnp.maximum(shares - hi, lo - shares)))
    info = {
        "violation": violation,
        "kkt_residual": residual,
        "shares": shares,
        "upper_multiplier": jnp.maximum(-v, 0.0),
        "lower_multiplier": jnp.maximum(v, 0.0),
        "iterations": iterations,
    }
    return q_new, info
