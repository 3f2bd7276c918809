"""The exact E-step and the workload projection as one Pallas kernel (GPU, Triton backend).

``fused_exact_constrained`` computes what ``exact_estep`` followed by ``constrain_posterior``
computes (the XLA path, the reference it is tested against), in one kernel launch (besides
it XLA only zeroes a 4-byte counter):

1. every program of a 1-D grid runs the exact E-step (``methods/estep.py``) on a tile of
   ``rows`` samples: one pass over its (rows, E+1, K) block of ``log_p_t``, writing ``q_t``
   and the unconstrained ``q_z`` rows;
2. each program then increments a counter in global memory (an atomic with acquire-release
   semantics after a block barrier); the program that arrives last (the others have written
   every ``q_z`` row by then) runs the projection's projected-Newton iterations on the whole
   (B, E+1) posterior: held in registers when ``B <= chunk_rows``, else streamed in chunks of
   ``chunk_rows`` rows from the L2-resident ``q_z`` output (two passes per iteration); it
   writes the projected ``q_z``, the multipliers and the statistics.

The iteration is ``constrain_posterior``'s, step for step (same shift, sides, Newton and
logit-Newton directions, Gauss-Jordan solves, trial points and selection), written for
Triton: every array is padded to powers of two (agents to at least 16, the smallest
dimension of a Triton dot product; classes to ``next_power_of_2(K)``; the trials to 16)
with masked loads and stores, and
elements are picked by masked reductions instead of indexing. ``loop`` is the projection's:
``early_exit`` (the default here: inside a kernel a data-dependent loop is a branch, with
no host round trip) or ``fixed`` (``num_iters`` iterations).

On a CPU (tests) the kernel runs with ``interpret=True`` (the default off GPUs), which
executes the same kernel body program by program with XLA; the block barrier is a GPU-only
instruction and is left out there. Speed on a GPU has not been measured yet
(``tests/benchmarks/device_check.sh`` measures it against the XLA path and the original
port); ``prob_l2d`` uses the kernel only when asked (``method.params.projection=fused``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from core.spec import MISSING
from methods.projection import (
    GRADIENT_FRACTIONS,
    MAX_BACKTRACKS,
    MAX_STEP,
    MIN_PROB,
    MIN_TARGET,
    NUM_ITERS,
    SNAP_EPS,
    ZERO_EPS,
    check_loop,
)

TILE_ELEMENTS = 4096  # E-step tile: rows * padded agents * padded classes per program
CHUNK_ROWS = 512  # projection: rows held (or streamed) per pass
NUM_WARPS = 8  # 256 threads: a (512, 16) chunk is 32 registers per thread and array
_HIGHEST = jax.lax.Precision.HIGHEST  # float32 products (IEEE, no TF32)


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _any(mask):
    """``jnp.any`` as a max (Triton lowers no boolean reductions)."""
    return jnp.max(mask.astype(jnp.float32)) > 0


def _pick(values, index, ids, axis=0):
    """``values[index]`` along ``axis`` by a masked sum (Triton cannot index a register
    array); ``ids`` is the iota of that axis, broadcastable against ``values``."""
    return jnp.sum(jnp.where(ids == index, values, 0.0), axis=axis)


class _Agents:
    """Padded agent-vector helpers: ``num`` real agents out of ``padded`` lanes."""

    def __init__(self, num: int, padded: int):
        self.num, self.padded = num, padded
        self.ids = jax.lax.broadcasted_iota(jnp.int32, (padded,), 0)
        self.real = self.ids < num
        self.rows = jax.lax.broadcasted_iota(jnp.int32, (padded, padded), 0)
        self.cols = jax.lax.broadcasted_iota(jnp.int32, (padded, padded), 1)
        self.eye = (self.rows == self.cols).astype(jnp.float32)
        self.real_pair = (self.rows < num) & (self.cols < num)

    def max(self, v):
        return jnp.max(jnp.where(self.real, v, -jnp.inf))

    def mean(self, v):
        return jnp.sum(jnp.where(self.real, v, 0.0)) / self.num


def _linear_change(new, old, lo, hi):
    """As ``projection._linear_change`` (padded agents have ``new == old == 0``)."""
    return jnp.sum(lo * (jnp.maximum(new, 0.0) - jnp.maximum(old, 0.0))
                   + hi * (jnp.minimum(new, 0.0) - jnp.minimum(old, 0.0)), axis=-1)


def _best_shift(agents, v, movable, lo, hi, kink):
    """``projection._best_shift`` on padded vectors: the candidate shifts are the rows of an
    (agents, agents) matrix; shift 0 wins ties (it is kept unless another decreases)."""
    shifts = jnp.where(movable & kink, -v, 0.0)  # candidate s shifts by shifts[s]
    candidates = v[None, :] + jnp.where(movable[None, :], shifts[:, None], 0.0)
    value = shifts - _linear_change(candidates, v[None, :], lo[None, :], hi[None, :])
    best = jnp.argmin(value).astype(jnp.int32)
    shift = jnp.where(jnp.min(value) < 0.0, _pick(shifts, best, agents.ids), 0.0)
    shifted = v + jnp.where(movable, shift, 0.0)
    return jnp.where(jnp.abs(shifted) <= ZERO_EPS, 0.0, shifted)


def _kkt_residual(agents, shares, v, lo, hi):
    at_zero = jnp.maximum(0.0, jnp.maximum(shares - hi, lo - shares))
    per_agent = jnp.where(v < 0, jnp.abs(shares - hi), jnp.where(v > 0, jnp.abs(shares - lo), at_zero))
    return jnp.max(jnp.where(agents.real, per_agent, 0.0))


def _solve(agents, matrix, rhs_a, rhs_b):
    """``projection.solve_spd`` for two right-hand sides: Gauss-Jordan unrolled over the
    real agents (the padded rows are identity rows, left as they are)."""
    for k in range(agents.num):
        row = _pick(matrix, k, agents.rows, axis=0)
        column = _pick(matrix, k, agents.cols, axis=1)
        pivot = _pick(row, k, agents.ids)
        row = row / pivot
        pivot_a, pivot_b = _pick(rhs_a, k, agents.ids) / pivot, _pick(rhs_b, k, agents.ids) / pivot
        matrix = jnp.where(agents.rows == k, row[None, :], matrix - column[:, None] * row[None, :])
        rhs_a = jnp.where(agents.ids == k, pivot_a, rhs_a - column * pivot_a)
        rhs_b = jnp.where(agents.ids == k, pivot_b, rhs_b - column * pivot_b)
    return rhs_a, rhs_b


def _newton_steps(agents, held, off_diagonal, hess_diag, damping, rhs_a, rhs_b):
    """``-H_FF^{-1} rhs`` on the free agents for both right-hand sides (as in
    ``constrain_posterior``; padded agents are held)."""
    both_free = ~held[:, None] & ~held[None, :]
    all_free = ~_any(held & agents.real)
    gauge = jnp.where(all_free, agents.max(hess_diag) / agents.num, 0.0)
    matrix = (agents.eye * jnp.where(held, 1.0, hess_diag + damping)[None, :]
              - jnp.where(both_free, off_diagonal, 0.0) + jnp.where(agents.real_pair, gauge, 0.0))
    step_a, step_b = _solve(agents, matrix, jnp.where(held, 0.0, rhs_a), jnp.where(held, 0.0, rhs_b))
    step_a, step_b = -step_a, -step_b
    center_a = jnp.where(all_free & agents.real, agents.mean(step_a), 0.0)
    center_b = jnp.where(all_free & agents.real, agents.mean(step_b), 0.0)
    return step_a - center_a, step_b - center_b


def _trial_layout(num_trials_padded: int):
    """Per-trial (trials,) coefficients, as ``constrain_posterior`` lays the trials out: the
    Newton direction at ``2^0 .. 2^-MAX_BACKTRACKS``, the logit-Newton direction at the same
    fractions, the fallback at ``GRADIENT_FRACTIONS``, the shift of the free agents; padding
    trials after them are never chosen."""
    ids = jax.lax.broadcasted_iota(jnp.int32, (num_trials_padded,), 0)
    per_direction = MAX_BACKTRACKS + 1
    num_newton = 2 * per_direction
    newton_fraction = jnp.exp2(-(ids % per_direction).astype(jnp.float32))
    fallback_fraction = jnp.zeros_like(newton_fraction)
    for j, fraction in enumerate(GRADIENT_FRACTIONS):
        fallback_fraction = jnp.where(ids == num_newton + j, fraction, fallback_fraction)
    shift_id = num_newton + len(GRADIENT_FRACTIONS)
    return {
        "ids": ids, "is_newton": ids < per_direction, "is_logit": (ids >= per_direction) & (ids < num_newton),
        "is_fallback": (ids >= num_newton) & (ids < shift_id), "is_shift": ids == shift_id,
        "valid": ids <= shift_id,
        "fraction": jnp.where(ids < num_newton, newton_fraction, fallback_fraction),
    }


def _estep_tile(params_ref, lpz_ref, lpt_ref, y_ref, t_ref, qz_ref, qt_ref, *, shape, rows, padded):
    """The exact E-step on rows ``[program * rows, program * rows + rows)``."""
    batch, num_agents, num_classes = shape
    agents_p, classes_p = padded
    start = pl.program_id(0) * rows
    row_ids = start + jax.lax.broadcasted_iota(jnp.int32, (rows,), 0)
    valid = row_ids < batch
    agent_ids = jax.lax.broadcasted_iota(jnp.int32, (agents_p,), 0)
    real, human = agent_ids < num_agents, agent_ids < num_agents - 1
    class_ids = jax.lax.broadcasted_iota(jnp.int32, (1, 1, classes_p), 2)
    mask2 = valid[:, None] & real[None, :]
    mask3 = mask2[:, :, None] & (class_ids < num_classes)

    label_noise = params_ref[0]
    p_miss = label_noise / num_classes
    keep = 1.0 - label_noise
    p_hit = keep + p_miss
    log_p_z = plgpu.load(lpz_ref.at[pl.ds(start, rows), pl.ds(0, agents_p)], mask=mask2, other=0.0)
    log_p_z = jnp.where(real[None, :], log_p_z, -jnp.inf)
    y = plgpu.load(y_ref.at[pl.ds(start, rows)], mask=valid, other=0)
    t = plgpu.load(t_ref.at[pl.ds(start, rows), pl.ds(0, agents_p)],
                   mask=valid[:, None] & human[None, :], other=MISSING)
    log_p_t = plgpu.load(lpt_ref.at[pl.ds(start, rows), pl.ds(0, agents_p), pl.ds(0, classes_p)],
                         mask=mask3, other=-jnp.inf)

    is_y = class_ids == y[:, None, None]
    p_y = jnp.exp(jnp.sum(jnp.where(is_y, log_p_t, 0.0), axis=2))  # p(t_k = y | x)
    gate = jnp.exp(log_p_z - jnp.max(log_p_z, axis=1, keepdims=True))
    observed = human[None, :] & (t != MISSING)
    evidence = p_miss + keep * p_y
    likelihood = jnp.where(observed, jnp.where(t == y[:, None], p_hit, p_miss), evidence)
    weights = gate * likelihood
    q_z = weights / jnp.sum(weights, axis=1, keepdims=True)
    ratio = q_z / evidence
    scale_all = (1.0 - q_z) + p_miss * ratio
    scale_y = keep * p_y * ratio
    q_latent = jnp.exp(log_p_t) * scale_all[:, :, None] + jnp.where(is_y, scale_y[:, :, None], 0.0)
    one_hot = (class_ids == t[:, :, None]).astype(jnp.float32)
    q_t = jnp.where(observed[:, :, None], one_hot, q_latent)
    plgpu.store(qt_ref.at[pl.ds(start, rows), pl.ds(0, agents_p), pl.ds(0, classes_p)], q_t, mask=mask3)
    plgpu.store(qz_ref.at[pl.ds(start, rows), pl.ds(0, agents_p)], q_z, mask=mask2)


def _project(params_ref, lo_ref, hi_ref, qz_ref, info_refs, *, batch,
             agents, chunk_rows, num_iters, early_exit):
    """The projection (``constrain_posterior``) of the (batch, agents) posterior in ``qz_ref``,
    in place; run by one program after every ``q_z`` row is written."""
    num_chunks = -(-batch // chunk_rows)
    tol = params_ref[1]
    lo = plgpu.load(lo_ref.at[pl.ds(0, agents.padded)], mask=agents.real, other=0.0)
    hi = plgpu.load(hi_ref.at[pl.ds(0, agents.padded)], mask=agents.real, other=1.0)
    kink = hi > lo  # padded agents: lo 0 < hi 1, at v = 0 with share 0, so always held
    trial = _trial_layout(16)

    def load_chunk(c):
        """Rows ``[c * chunk_rows, ...)``: the floored posterior, the raw one and the row mask."""
        row_ids = c * chunk_rows + jax.lax.broadcasted_iota(jnp.int32, (chunk_rows,), 0)
        mask = (row_ids < batch)[:, None] & agents.real[None, :]
        raw = plgpu.load(qz_ref.at[pl.ds(c * chunk_rows, chunk_rows), pl.ds(0, agents.padded)],
                         mask=mask, other=0.0, volatile=True)  # written by other programs
        return jnp.where(mask, jnp.maximum(raw, MIN_PROB), 0.0), raw, mask

    resident = load_chunk(0) if num_chunks == 1 else None  # the whole posterior in registers

    def over_chunks(body, init):
        """``body(chunk_floored, chunk_raw, row_mask, c, acc)`` accumulated over the chunks."""
        if resident is not None:
            return body(*resident, 0, init)
        return jax.lax.fori_loop(0, num_chunks, lambda c, acc: body(*load_chunk(c), c, acc), init)

    def probs_of(q, scaled_exp_v):
        denominator = jnp.sum(q * scaled_exp_v[None, :], axis=1, keepdims=True)
        return q * scaled_exp_v[None, :] / jnp.where(denominator > 0, denominator, 1.0)

    def current(v):
        """Step 1 and the statistics of the shifted ``v``: shares, ``P^T P`` and the residual."""
        v = _best_shift(agents, v, agents.real, lo, hi, kink)
        scaled_exp_v = jnp.where(agents.real, jnp.exp(v - agents.max(v)), 0.0)

        def body(q, raw, mask, c, acc):
            probs = probs_of(q, scaled_exp_v)
            return (acc[0] + jnp.sum(probs, axis=0),
                    acc[1] + jnp.dot(probs.T, probs, precision=_HIGHEST))

        zeros = jnp.zeros((agents.padded,), jnp.float32)
        sums, gram = over_chunks(body, (zeros, jnp.zeros((agents.padded, agents.padded), jnp.float32)))
        shares = sums / batch
        return v, scaled_exp_v, shares, gram, _kkt_residual(agents, shares, v, lo, hi)

    def step(v, scaled_exp_v, shares, gram):
        """Steps 2-5 of ``constrain_posterior`` from the shifted ``v``."""
        at_zero = (v == 0) & kink
        side = jnp.where(at_zero, (at_zero & (shares < lo)).astype(jnp.float32)
                         - (at_zero & (shares > hi)).astype(jnp.float32), jnp.sign(v))
        target = jnp.where(side < 0, hi, lo)
        snap = kink & ~at_zero & (jnp.abs(v) <= SNAP_EPS) & ((shares - target) * side > 0)
        side = jnp.where(snap, 0.0, side)
        base = jnp.where(snap, 0.0, v)
        free = ((side != 0) | ~kink) & agents.real
        grad = jnp.where(free, shares - target, 0.0)
        clipped_share = jnp.clip(shares, 1e-30, 1.0)
        clipped_target = jnp.clip(target, MIN_TARGET, 1.0 - MIN_TARGET)
        logit_gap = (jnp.log(clipped_share) - jnp.log(jnp.maximum(1.0 - shares, 1e-30))
                     - jnp.log(clipped_target) + jnp.log1p(-clipped_target))
        rhs_logit = jnp.where(free, shares * (1.0 - shares) * logit_gap, 0.0)

        off_diagonal = gram * ((1.0 - agents.eye) / batch)
        hess_diag = jnp.sum(off_diagonal, axis=1)
        damping = 1e-6 * agents.max(hess_diag) + 1e-12
        newton, logit = _newton_steps(agents, ~free, off_diagonal, hess_diag, damping, grad, rhs_logit)
        wrong_side = at_zero & (newton * side < 0)
        newton, logit = _newton_steps(agents, ~free | wrong_side, off_diagonal, hess_diag, damping,
                                      grad, rhs_logit)
        newton = jnp.where(jnp.isfinite(newton), newton, 0.0)
        logit = jnp.where(jnp.isfinite(logit), logit, 0.0)
        newton = newton * jnp.minimum(1.0, MAX_STEP / (jnp.max(jnp.abs(newton)) + 1e-30))
        logit = jnp.clip(logit, -MAX_STEP, MAX_STEP)
        fallback = jnp.clip(-grad / (hess_diag + damping), -MAX_STEP, MAX_STEP)

        direction = jnp.where(trial["is_newton"][:, None], newton[None, :],
                              jnp.where(trial["is_logit"][:, None], logit[None, :], fallback[None, :]))
        trials = base[None, :] + trial["fraction"][:, None] * direction
        trials = jnp.where(kink[None, :] & (trials * side[None, :] < 0), 0.0, trials)
        shifted = _best_shift(agents, v, free, lo, hi, kink)
        trials = jnp.where(trial["is_shift"][:, None], shifted[None, :], trials)
        trials = jnp.where(agents.real[None, :], trials, 0.0)
        delta = trials - v[None, :]
        low = jnp.min(jnp.where(agents.real[None, :], delta, jnp.inf), axis=1)
        growth = jnp.where(agents.real[None, :], jnp.expm1(delta - low[:, None]), 0.0)  # (trials, agents)

        def body(q, raw, mask, c, acc):
            ratio = jnp.dot(probs_of(q, scaled_exp_v), growth.T, precision=_HIGHEST)  # (rows, trials)
            row_valid = jnp.max(mask.astype(jnp.float32), axis=1, keepdims=True) > 0
            return acc + jnp.sum(jnp.where(row_valid, jnp.log1p(ratio), 0.0), axis=0)

        log_sums = over_chunks(body, jnp.zeros(trial["ids"].shape, jnp.float32))
        change = (low + log_sums / batch
                  - _linear_change(trials, v[None, :], lo[None, :], hi[None, :]))
        change = jnp.where(trial["valid"], change, jnp.inf)
        is_fallback = trial["is_fallback"]
        newton_decreases = jnp.min(jnp.where(is_fallback, jnp.inf, change)) < 0
        change = jnp.where(is_fallback & newton_decreases, jnp.inf, change)
        best = jnp.argmin(change).astype(jnp.int32)
        chosen = _pick(trials, best, trial["ids"][:, None], axis=0)
        return jnp.where(jnp.min(change) < 0, chosen, base)

    v0 = jnp.zeros((agents.padded,), jnp.float32)
    if early_exit:
        def unconverged(state):
            return (state[4] > tol) & (state[5] < num_iters)

        def iterate(state):
            return (*current(step(*state[:4])), state[5] + 1)

        state = jax.lax.while_loop(unconverged, iterate, (*current(v0), jnp.int32(0)))
        v, scaled_exp_v, shares, iterations = state[0], state[1], state[2], state[5]
    else:
        def iteration(_, carry):
            v, needed = carry
            v, scaled_exp_v, shares, gram, residual = current(v)
            return step(v, scaled_exp_v, shares, gram), needed + (residual > tol).astype(jnp.int32)

        v, iterations = jax.lax.fori_loop(0, num_iters, iteration, (v0, jnp.int32(0)))
        v, scaled_exp_v, shares, _, _ = current(v)

    inactive = ~_any(v != 0)

    def write(q, raw, mask, c, acc):
        new = jnp.where(inactive, raw, probs_of(q, scaled_exp_v))
        plgpu.store(qz_ref.at[pl.ds(c * chunk_rows, chunk_rows), pl.ds(0, agents.padded)], new, mask=mask)
        return acc + jnp.sum(new, axis=0)

    shares = jnp.where(inactive, over_chunks(write, jnp.zeros_like(shares)) / batch, shares)
    violation = jnp.max(jnp.where(agents.real, jnp.maximum(0.0, jnp.maximum(shares - hi, lo - shares)), 0.0))
    vectors = {"upper_multiplier": jnp.maximum(-v, 0.0), "lower_multiplier": jnp.maximum(v, 0.0),
               "shares": shares}
    scalars = {"violation": violation, "kkt_residual": _kkt_residual(agents, shares, v, lo, hi),
               "iterations": iterations}
    for name, value in vectors.items():
        plgpu.store(info_refs[name].at[pl.ds(0, agents.padded)], value, mask=agents.real)
    for name, value in scalars.items():
        info_refs[name][...] = jnp.full((1,), value, info_refs[name].dtype)


INFO_OUTPUTS = ("upper_multiplier", "lower_multiplier", "shares", "violation", "kkt_residual",
                "iterations")  # the kernel's outputs after q_z and q_t, before the counter


def _kernel(params_ref, lpz_ref, lpt_ref, y_ref, t_ref, lo_ref, hi_ref, _counter_in,
            qz_ref, qt_ref, *info_and_counter, shape, rows, padded, chunk_rows, num_iters,
            early_exit, interpret):
    *info_refs, counter_ref = info_and_counter
    _estep_tile(params_ref, lpz_ref, lpt_ref, y_ref, t_ref, qz_ref, qt_ref, shape=shape, rows=rows,
                padded=padded)
    if not interpret:
        plgpu.debug_barrier()  # every thread's q_z stores before the release below
    arrived = plgpu.atomic_add(counter_ref, (jnp.int32(0),), jnp.int32(1))  # acquire-release

    @pl.when(arrived == pl.num_programs(0) - 1)
    def _():
        _project(params_ref, lo_ref, hi_ref, qz_ref, dict(zip(INFO_OUTPUTS, info_refs)), batch=shape[0],
                 agents=_Agents(shape[1], padded[0]), chunk_rows=chunk_rows, num_iters=num_iters,
                 early_exit=early_exit)


def _one_problem_per_launch(launch):
    """``launch`` under ``vmap`` (several seeds in one program): one launch per problem in a
    ``lax.map`` (the kernel's grid and arrival counter describe one problem)."""
    launch = jax.custom_batching.custom_vmap(launch)

    @launch.def_vmap
    def _rule(axis_size, in_batched, *args):
        batched = [arg for arg, is_batched in zip(args, in_batched) if is_batched]

        def one(values):
            values = iter(values)
            return launch(*(next(values) if is_batched else arg for arg, is_batched in zip(args, in_batched)))

        out = jax.lax.map(one, batched)
        return out, jax.tree.map(lambda _: True, out)

    return launch


def _launch(params, log_p_z, log_p_t, y, t, lo, hi, *, num_iters, early_exit, interpret, chunk_rows,
            num_warps):
    """The kernel's ``pallas_call`` for one problem: ``(q_z, q_t, *INFO_OUTPUTS values)``."""
    batch, num_agents, num_classes = log_p_t.shape
    padded = (max(16, _next_power_of_2(num_agents)), _next_power_of_2(num_classes))
    rows = max(1, min(_next_power_of_2(batch), TILE_ELEMENTS // (padded[0] * padded[1])))
    chunk = min(chunk_rows, max(16, _next_power_of_2(batch)))
    kernel = functools.partial(_kernel, shape=(batch, num_agents, num_classes), rows=rows,
                               padded=padded, chunk_rows=chunk, num_iters=num_iters,
                               early_exit=early_exit, interpret=interpret)
    vector, scalar = jax.ShapeDtypeStruct((num_agents,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)
    out_shape = (
        jax.ShapeDtypeStruct((batch, num_agents), jnp.float32),  # q_z
        jax.ShapeDtypeStruct((batch, num_agents, num_classes), jnp.float32),  # q_t
        vector, vector, vector, scalar, scalar,  # INFO_OUTPUTS
        jax.ShapeDtypeStruct((1,), jnp.int32),  # iterations
        jax.ShapeDtypeStruct((1,), jnp.int32),  # arrival counter
    )
    *outputs, _ = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(pl.cdiv(batch, rows),),
        input_output_aliases={7: len(out_shape) - 1}, interpret=interpret,
        name="fused_exact_constrained",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
    )(params, log_p_z, log_p_t, y, t, lo, hi, jnp.zeros((1,), jnp.int32))
    return tuple(outputs)


@functools.partial(jax.jit, static_argnames=("num_iters", "loop", "interpret", "chunk_rows",
                                             "num_warps"))
def fused_exact_constrained(log_p_z, log_p_t, y, t, lo, hi, label_noise=1e-3, tol=1e-5,
                            num_iters=NUM_ITERS, loop="early_exit", interpret=None,
                            chunk_rows=CHUNK_ROWS, num_warps=NUM_WARPS):
    """``exact_estep`` then ``constrain_posterior`` in one Pallas kernel launch.

    Arguments as ``exact_estep`` (``log_p_z`` (B, A), ``log_p_t`` (B, A, K), ``y`` (B,),
    ``t`` (B, E)) and ``constrain_posterior`` (``lo``, ``hi`` (A,), ``tol``, ``num_iters``,
    ``loop``: "fixed", "early_exit" or "auto", which here means "early_exit"). ``interpret``:
    run the kernel body with XLA (default: everywhere but on a GPU). ``chunk_rows`` (a power
    of two >= 16) rows of the posterior per projection pass; ``num_warps`` per program.

    Returns ``(q_z, q_t, info)`` like ``exact_estep`` + ``constrain_posterior`` (``info``:
    violation, kkt_residual, shares, upper/lower multipliers, iterations).
    """
    if chunk_rows < 16 or chunk_rows & (chunk_rows - 1):
        raise ValueError(f"fused_exact_constrained: chunk_rows={chunk_rows} must be a power of "
                         "two >= 16 (the Gram products are Triton dot products).")
    early_exit = loop == "auto" or check_loop(loop) == "early_exit"
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    # the kernel reads these as params_ref[0] and params_ref[1]
    params = jnp.stack([jnp.asarray(label_noise, jnp.float32), jnp.asarray(tol, jnp.float32)])
    launch = _one_problem_per_launch(functools.partial(
        _launch, num_iters=num_iters, early_exit=early_exit, interpret=interpret,
        chunk_rows=chunk_rows, num_warps=num_warps))
    q_z, q_t, *info = launch(params, jnp.asarray(log_p_z, jnp.float32), jnp.asarray(log_p_t, jnp.float32),
                             jnp.asarray(y, jnp.int32), jnp.asarray(t, jnp.int32),
                             jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32))
    info = {name: value.reshape(()) if value.shape == (1,) else value
            for name, value in zip(INFO_OUTPUTS, info)}
    return q_z, q_t, info
