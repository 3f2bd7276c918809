"""The workload-constrained E-step: a jitted KL projection of agent posteriors onto bounds.

Used in training by the methods whose E-step honours the workload (``prob_l2d``,
``l2d_em``). Bounds follow ``core.spec`` (humans first, the classifier last) and must
be feasible (``benchmark.bounds.check_bounds``). The evaluator's hard version is
``benchmark.assignment.capacity_assignment``.

The solver runs the same projected-Newton iteration in one of two loops (``loop``):

* ``fixed``: a fixed-cost program, a ``lax.scan`` of ``num_iters`` identical iterations with
  no data-dependent control flow (no ``while_loop``, no ``cond``), so on an accelerator a call
  is a fixed sequence of kernels with no device-to-host round trip;
* ``early_exit``: a ``lax.while_loop`` that stops at the first iterate whose KKT residual is
  within ``tol`` (most problems: 2 to 7 iterations), at most ``num_iters``; on a CPU, where a
  loop's test costs nothing, it skips the iterations that are not needed.

``loop="auto"`` (the default) picks ``early_exit`` on the CPU backend and ``fixed`` elsewhere
(``default_loop``); ``tests/benchmarks/test_estep_benchmark.py`` checks that the pick is the
faster one on the backend it runs on. Both are certified by the same tolerance tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NUM_ITERS = 12  # iterations of the fixed loop, at most those of the early exit (docs/estep.md)
SNAP_EPS = 1e-3  # a multiplier this close to 0 whose gradient pulls it to 0 is set to 0
ZERO_EPS = 1e-6  # |v_k| below this after a shift is rounding: set to 0
MIN_TARGET = 1e-7  # targets of the logit step are clipped to [MIN_TARGET, 1 - MIN_TARGET]
GRADIENT_FRACTIONS = (1.0 / 16, 1.0 / 64, 1.0 / 256)  # short steps of the fallback direction
MAX_STEP = 32.0  # largest |step| of a multiplier in one iteration
MAX_BACKTRACKS = 3  # Newton trials at 2^0 .. 2^-MAX_BACKTRACKS of the step
MIN_PROB = 1e-12  # posterior entries are floored at this
_HIGHEST = jax.lax.Precision.HIGHEST  # float32 products (no TF32 on GPUs)
PROJECTION_LOOPS = ("fixed", "early_exit")  # constrain_posterior's loop, besides "auto"


def default_loop(backend: str | None = None) -> str:
    """The projection loop ``loop="auto"`` runs on ``backend`` (default: JAX's default
    backend): ``early_exit`` on the CPU, ``fixed`` (no data-dependent control flow) on
    accelerators."""
    return "early_exit" if (backend or jax.default_backend()) == "cpu" else "fixed"


def check_loop(loop: str) -> str:
    """``loop`` resolved to one of ``PROJECTION_LOOPS`` ("auto": ``default_loop()``); an
    unknown name raises ``ValueError`` listing the valid ones."""
    if loop == "auto":
        return default_loop()
    if loop not in PROJECTION_LOOPS:
        raise ValueError(f"Unknown projection loop {loop!r}; valid loops are: auto, "
                         f"{', '.join(PROJECTION_LOOPS)}.")
    return loop


def _linear_change(new, old, lo, hi):
    """``lin(new) - lin(old)`` for ``lin(v) = sum_k lo_k max(v_k, 0) + hi_k min(v_k, 0)``.

    Summed from per-agent differences, so a small step is not lost against large ``|v|``.
    Broadcasts over leading axes.
    """
    return jnp.sum(lo * (jnp.maximum(new, 0.0) - jnp.maximum(old, 0.0))
                   + hi * (jnp.minimum(new, 0.0) - jnp.minimum(old, 0.0)), axis=-1)


def _best_shift(v, movable, lo, hi, kink):
    """``v`` with the ``movable`` agents shifted by the best common ``t``, assuming the smooth
    part of the dual changes by exactly ``t`` (true when every agent moves: the gauge).

    The remaining term ``t - [lin(v + t 1_movable) - lin(v)]`` is convex and piecewise linear
    in ``t``, so its minimum is at a breakpoint ``t = -v_k`` of a movable agent with a kink
    (``lo_k < hi_k``) or at ``t = 0`` (listed first, so ties keep ``v``). Multipliers that
    the shift's rounding leaves within ``ZERO_EPS`` of 0 are set to 0.
    """
    shifts = jnp.concatenate([jnp.zeros((1,), v.dtype), jnp.where(movable & kink, -v, 0.0)])
    candidates = v[None, :] + jnp.where(movable[None, :], shifts[:, None], 0.0)
    value = shifts - _linear_change(candidates, v[None, :], lo, hi)
    shifted = candidates[jnp.argmin(value)]
    return jnp.where(jnp.abs(shifted) <= ZERO_EPS, 0.0, shifted)  # rounding of the shift


def solve_spd(matrix, rhs):
    """``matrix^{-1} rhs`` for a small symmetric positive definite (n, n) ``matrix`` and
    (n, r) ``rhs`` by Gauss-Jordan elimination unrolled over the static n (no pivoting: the
    diagonal of an SPD matrix stays positive). n rank-one updates of the (n, n + r) system,
    elementwise work that XLA fuses, with no call into a solver library: on a GPU each such
    call costs kernel launches of latency, far more than the arithmetic of an n <= ~20
    system."""
    n = matrix.shape[0]
    system = jnp.concatenate([matrix, rhs], axis=1)
    is_pivot_row = jnp.arange(n)[:, None]
    for k in range(n):
        pivot_row = system[k] / system[k, k]
        eliminated = system - system[:, k:k + 1] * pivot_row[None, :]
        system = jnp.where(is_pivot_row == k, pivot_row[None, :], eliminated)
    return system[:, n:]


def _kkt_residual(shares, v, lo, hi):
    """Max over agents of the KKT residual (in share units); zero exactly at the optimum."""
    at_zero = jnp.maximum(0.0, jnp.maximum(shares - hi, lo - shares))
    per_agent = jnp.where(v < 0, jnp.abs(shares - hi), jnp.where(v > 0, jnp.abs(shares - lo), at_zero))
    return jnp.max(per_agent)


@functools.partial(jax.jit, static_argnames=("num_iters", "max_backtracks", "loop"))
def constrain_posterior(q, lo, hi, num_iters=NUM_ITERS, tol=1e-5, min_prob=MIN_PROB, max_step=MAX_STEP,
                        max_backtracks=MAX_BACKTRACKS, loop="auto"):
    """KL-project agent posteriors onto the workload bounds (jittable; fixed cost with
    ``loop="fixed"``).

    Solves ``min (1/B) sum_i KL(q'_i || q_i)`` s.t. ``lo_k <= (1/B) sum_i q'_ik <= hi_k``.
    The solution is ``q'_ik ∝ q_ik exp(l_k - u_k)`` with ``u, l >= 0`` minimising
    ``D(u, l) = (1/B) sum_i logsumexp_k(log q_ik - u_k + l_k) + sum_k (u_k hi_k - l_k lo_k)``.
    Since ``lo <= hi``, at most one of ``u_k, l_k`` is positive at the optimum, so we minimise
    over ``v_k = l_k - u_k`` with the piecewise-linear term handled exactly (its kink at
    ``v_k = 0`` vanishes when ``lo_k = hi_k``, e.g. an exact coverage target).

    Solver: projected-Newton iterations (``current``: the exact step along the all-ones
    direction and the statistics of the posterior; ``step``: the sides of the agents, two
    Newton directions on the free ones and a gradient fallback, T trial points evaluated in
    one batched pass, the best decrease kept), every choice a ``jnp.where``/``argmin``
    selection (no ``cond``). ``loop`` (module docstring) runs exactly ``num_iters`` of them
    (``fixed``: a ``lax.scan``) or stops at the first iterate whose KKT residual is ``<= tol``
    (``early_exit``: a ``lax.while_loop``, at most ``num_iters``); "auto", the default:
    ``default_loop()``. The iteration step by step, its cost, and the stress suite behind
    ``NUM_ITERS`` (84% of 10,080 problems within 4 iterations, all but one within 12):
    docs/estep.md. Check ``info['violation']``: with too few iterations for a degenerate
    input it is above the tolerance (the posterior is still moved towards the bounds).

    Bounds must be feasible (see ``check_bounds``). ``q`` rows should sum to one; entries are
    floored at ``min_prob`` (zeros allowed). If no bound is active, ``q`` is returned unchanged.

    Returns ``(q_new, info)``; ``info`` holds ``violation`` (max over agents of
    ``max(0, share - hi, lo - share)``), ``kkt_residual``, ``shares``, ``upper_multiplier``
    ``u``, ``lower_multiplier`` ``l`` and ``iterations``: how many of the ``num_iters``
    iterations started with a KKT residual above ``tol`` (the work that was needed; with
    ``loop="fixed"`` all ``num_iters`` always run, with ``early_exit`` only these).
    """
    early_exit = check_loop(loop) == "early_exit"
    q = jnp.asarray(q, jnp.float32)
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    q_floor = jnp.maximum(q, min_prob)
    q_agents = q_floor.T  # (A, B): agent-major, reductions over agents are vectorised over B
    batch, num_agents = q.shape
    eye = jnp.eye(num_agents, dtype=jnp.float32)
    kink = hi > lo  # lo == hi: no kink at v = 0, the agent's term is the linear lo * v
    everyone = jnp.ones((num_agents,), jnp.bool_)
    newton_fractions = 2.0 ** -jnp.arange(max_backtracks + 1, dtype=jnp.float32)
    fallback_fractions = jnp.asarray(GRADIENT_FRACTIONS, jnp.float32)
    # trial layout: 2 Newton directions x (max_backtracks + 1) fractions, the fallback's
    # fractions, the shift of the free agents
    num_newton, num_fallback = 2 * (max_backtracks + 1), len(GRADIENT_FRACTIONS)
    is_fallback = jnp.asarray([False] * num_newton + [True] * num_fallback + [False])

    def newton_steps(held, off_diagonal, hess_diag, damping, rhs):
        """``-H_FF^{-1} rhs`` on the free agents (0 on held ones), for both right-hand sides."""
        both_free = ~held[:, None] & ~held[None, :]
        all_free = ~jnp.any(held)
        # Every agent free: the all-ones null direction of H is fixed by adding its projector
        # (the step is then the minimum-norm one; step 1 handles that direction exactly).
        gauge = jnp.where(all_free, jnp.max(hess_diag) / num_agents, 0.0)
        matrix = (eye * jnp.where(held, 1.0, hess_diag + damping)
                  - jnp.where(both_free, off_diagonal, 0.0) + gauge)
        steps = -solve_spd(matrix, jnp.where(held[:, None], 0.0, rhs))  # SPD: dominant diagonal + damping
        return jnp.where(all_free, steps - jnp.mean(steps, axis=0, keepdims=True), steps)

    def current(v):
        """``v`` shifted along the all-ones direction (step 1), its posteriors (A, B), shares
        and KKT residual: where an iteration starts and where the early exit looks."""
        v = _best_shift(v, everyone, lo, hi, kink)
        scaled_exp_v = jnp.exp(v - jnp.max(v))
        probs = (q_agents * scaled_exp_v[:, None]
                 / jnp.dot(scaled_exp_v, q_agents, precision=_HIGHEST)[None, :])  # (A, B)
        shares = jnp.mean(probs, axis=1)
        return v, probs, shares, _kkt_residual(shares, v, lo, hi)

    def step(v, probs, shares):
        """Steps 2-5 from the shifted ``v``: the next (unshifted) multipliers."""
        # 2. sides (+1 lower bound active, -1 upper bound active, 0 held at v = 0)
        at_zero = (v == 0) & kink
        side = jnp.where(at_zero, (at_zero & (shares < lo)).astype(jnp.float32)
                         - (at_zero & (shares > hi)), jnp.sign(v))
        target = jnp.where(side < 0, hi, lo)
        snap = kink & ~at_zero & (jnp.abs(v) <= SNAP_EPS) & ((shares - target) * side > 0)
        side = jnp.where(snap, 0.0, side)
        base = jnp.where(snap, 0.0, v)
        free = (side != 0) | ~kink
        grad = jnp.where(free, shares - target, 0.0)
        clipped_share = jnp.clip(shares, 1e-30, 1.0)
        clipped_target = jnp.clip(target, MIN_TARGET, 1.0 - MIN_TARGET)
        logit_gap = (jnp.log(clipped_share) - jnp.log(jnp.maximum(1.0 - shares, 1e-30))
                     - jnp.log(clipped_target) + jnp.log1p(-clipped_target))
        rhs = jnp.stack([grad, jnp.where(free, shares * (1.0 - shares) * logit_gap, 0.0)], axis=1)

        # 3. Newton steps. Hessian of the smooth part: diag(s) - P^T P / B; its rows sum to
        # zero, so the diagonal is rebuilt from the off-diagonal terms (no cancellation).
        off_diagonal = (jnp.dot(probs, probs.T, precision=_HIGHEST)
                        * ((1.0 - eye) / batch))
        hess_diag = jnp.sum(off_diagonal, axis=1)
        damping = 1e-6 * jnp.max(hess_diag) + 1e-12
        steps = newton_steps(~free, off_diagonal, hess_diag, damping, rhs)
        wrong_side = at_zero & (steps[:, 0] * side < 0)  # leaves v = 0 against its push
        steps = newton_steps(~free | wrong_side, off_diagonal, hess_diag, damping, rhs)
        steps = jnp.where(jnp.isfinite(steps), steps, 0.0)
        newton = steps[:, 0] * jnp.minimum(1.0, max_step / (jnp.max(jnp.abs(steps[:, 0])) + 1e-30))
        logit = jnp.clip(steps[:, 1], -max_step, max_step)
        fallback = jnp.clip(-grad / (hess_diag + damping), -max_step, max_step)

        # 4. trial points (T, A), projected onto the side of each agent's kink
        directions = jnp.stack([newton, logit])
        trials = jnp.concatenate([
            (base[None, None, :] + newton_fractions[None, :, None] * directions[:, None, :])
            .reshape(-1, num_agents),
            base[None, :] + fallback_fractions[:, None] * fallback[None, :]])
        trials = jnp.where(kink & (trials * side < 0), 0.0, trials)
        trials = jnp.concatenate([trials, _best_shift(v, free, lo, hi, kink)[None, :]])
        delta = trials - v[None, :]
        # D(v + delta) - D(v) = c + mean_i log1p(sum_k p_ik expm1(delta_k - c)) - lin change,
        # with c = min_k delta_k so that every expm1 argument is >= 0 (accurate, no overflow
        # for |delta| <= 2 max_step).
        low = jnp.min(delta, axis=1)
        ratio = jnp.dot(jnp.expm1(delta - low[:, None]), probs, precision=_HIGHEST)  # (T, B)
        change = low + jnp.mean(jnp.log1p(ratio), axis=1) - _linear_change(trials, v[None, :], lo, hi)

        # 5. the best decrease; the fallback only when nothing else decreases D
        newton_decreases = jnp.min(jnp.where(is_fallback, jnp.inf, change)) < 0
        change = jnp.where(is_fallback & newton_decreases, jnp.inf, change)
        best = jnp.argmin(change)  # staying: at the snapped point (a descent step itself)
        return jnp.where(change[best] < 0, trials[best], base)

    v0 = jnp.zeros((num_agents,), jnp.float32)
    if early_exit:  # a while_loop: stop at the first iterate within tol (host round trips on GPUs)
        def unconverged(state):
            return (state[3] > tol) & (state[4] < num_iters)

        def iterate(state):
            return (*current(step(*state[:3])), state[4] + 1)

        state = jax.lax.while_loop(unconverged, iterate, (*current(v0), jnp.int32(0)))
        (v, probs, shares, _), iterations = state[:4], state[4]
    else:  # a scan of num_iters iterations, each counted when it starts above tol
        def iteration(carry, _):
            v, needed = carry
            v, probs, shares, residual = current(v)
            return (step(v, probs, shares), needed + (residual > tol).astype(jnp.int32)), None

        (v, iterations), _ = jax.lax.scan(iteration, (v0, jnp.int32(0)), None, length=num_iters)
        v, probs, shares, _ = current(v)

    inactive = jnp.all(v == 0)
    q_new = jnp.where(inactive, q, probs.T)
    shares = jnp.where(inactive, jnp.mean(q, axis=0), shares)
    violation = jnp.max(jnp.maximum(0.0, jnp.maximum(shares - hi, lo - shares)))
    info = {
        "violation": violation,
        "kkt_residual": _kkt_residual(shares, v, lo, hi),
        "shares": shares,
        "upper_multiplier": jnp.maximum(-v, 0.0),
        "lower_multiplier": jnp.maximum(v, 0.0),
        "iterations": iterations,
    }
    return q_new, info
