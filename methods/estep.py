"""E-steps of Prob-L2D (design.md section 5): pure, jittable JAX functions.

Shapes and conventions (``core.spec``): ``A = E + 1`` agents, humans ``0..E-1`` and the
classifier last (index ``E``); ``K`` classes; a missing annotation is ``MISSING`` (-1).

Inputs shared by every E-step:

* ``log_p_z``   (B, A)    gating log-probabilities ``log p(z = k | x)`` (only used through a
  softmax over agents, so gating logits work as well);
* ``log_p_t``   (B, A, K) log-probabilities of the annotator models ``log p(t_j = c | x)`` for
  the humans and of the classifier ``log p(t_E = c | x)`` in row ``E``. They must be
  normalised over classes (``log_softmax`` output): they are not renormalised here, which
  saves two passes over the largest tensor;
* ``y``         (B,)      ground-truth class;
* ``t``         (B, E)    human annotations, ``MISSING`` where absent;
* ``label_noise`` the ``a`` of the noise model ``p(y | t_k = c) = (1 - a) 1[y = c] + a / K``.

Every E-step returns ``(q_z, q_t)``: ``q_z`` (B, A) the posterior over agents (rows sum to
one) and ``q_t`` (B, A, K) the per-agent label posteriors used as M-step cross-entropy
targets (the classifier row ``E`` is returned for completeness; the M-step trains the
classifier on ``y``).

Because ``p(y | c)`` takes only two values (``c = y`` or not), the class dimension is reduced
analytically: the exact and mean-field E-steps make a single exp pass over the (B, A, K)
input and otherwise work on the (B, A) scalars ``p(t_k = y | x)``. Numerical safety: every
likelihood is bounded below by ``a / K > 0``, gating weights are ``exp(log p_z - max)``
(at most 1, the largest exactly 1), so every normaliser is at least ``a / K``: no NaN or
overflow for a fully missing expert column, fully observed batches or extreme logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from core.spec import MISSING

ESTEP_KINDS = ("exact", "meanfield", "reference")
REFERENCE_SMOOTHING = 1e-3  # smoothing of observed one-hots in the reference variant


def _noise_probs(label_noise, num_classes):
    """``p(y | t = y)``, ``p(y | t = c != y)`` and ``1 - a`` of the noise model (scalars)."""
    label_noise = jnp.asarray(label_noise, jnp.float32)
    p_miss = label_noise / num_classes
    keep = 1.0 - label_noise
    return keep + p_miss, p_miss, keep


def _agent_masks(t):
    """(B, A) observation mask and annotations padded with a classifier column (0 there)."""
    t = jnp.asarray(t, jnp.int32)
    batch = t.shape[0]
    observed = jnp.concatenate([t != MISSING, jnp.zeros((batch, 1), jnp.bool_)], axis=1)
    t_full = jnp.concatenate([jnp.where(t == MISSING, 0, t), jnp.zeros((batch, 1), jnp.int32)], axis=1)
    return observed, t_full


def _prob_of_y(log_p_t, y):
    """``p(t_k = y | x)`` for every agent: (B, A). ``y`` must lie in ``[0, K)`` (labels are
    checked when a dataset is loaded): the gather skips the bounds test, which on a CPU made
    it 2-4x slower."""
    y_index = jnp.broadcast_to(y[:, None, None], (*log_p_t.shape[:2], 1))
    return jnp.exp(jnp.take_along_axis(log_p_t, y_index, axis=-1, mode="promise_in_bounds")[..., 0])


def _gating_weights(log_p_z):
    """``p(z = k | x)`` up to a per-row factor, largest entry exactly 1: (B, A)."""
    log_p_z = jnp.asarray(log_p_z, jnp.float32)
    return jnp.exp(log_p_z - jax.lax.stop_gradient(jnp.max(log_p_z, axis=-1, keepdims=True)))


def _reweight_at_y(p_t, y, scale_all, scale_y):
    """``q(t_k = c) = p(t_k = c | x) scale_all + 1[c = y] scale_y`` in one pass over K."""
    is_y = jax.nn.one_hot(y, p_t.shape[-1], dtype=jnp.bool_)[:, None, :]
    return p_t * scale_all[..., None] + jnp.where(is_y, scale_y[..., None], 0.0)


def _exact_terms(gate, p_y, observed, t_full, y, label_noise, num_classes):
    """Exact ``q(z)``, the likelihoods ``exp(L_k)`` and the scales of the latent rows' ``q(t)``.

    ``exp(L_k) = p(y | t_k)`` if observed, else ``sum_c p(t_k=c|x) p(y|c) = a/K + (1-a) p_y``
    (at least ``a/K``). For a latent row ``q(t=c) = p_t(c) [1 - q_z + q_z (a/K) / e^L]
    + 1[c=y] q_z (1-a) p_y / e^L``.
    """
    p_hit, p_miss, keep = _noise_probs(label_noise, num_classes)
    evidence = p_miss + keep * p_y
    likelihood = jnp.where(observed, jnp.where(t_full == y[:, None], p_hit, p_miss), evidence)
    weights = gate * likelihood
    q_z = weights / jnp.sum(weights, axis=-1, keepdims=True)
    ratio = q_z / evidence
    scale_all = (1.0 - q_z) + p_miss * ratio
    scale_y = keep * p_y * ratio
    return q_z, likelihood, scale_all, scale_y


@jax.jit
def exact_estep(log_p_z, log_p_t, y, t, label_noise=1e-3):
    """Exact closed-form E-step, O(B A K) with a single exp pass over ``log_p_t``.

    ``L_k = log p(y | t_k)`` for an observed human and
    ``L_k = logsumexp_c[log p(t_k = c | x) + log p(y | c)] = log(a/K + (1-a) p(t_k = y | x))``
    for a missing human and for the classifier; ``q(z = k) = softmax_k(log p(z=k|x) + L_k)``.

    ``q_t``: the exact marginal posteriors. Observed humans: the plain (unsmoothed) one-hot
    of the annotation (an observed label is data: its posterior is a point mass). Missing
    humans and the classifier (whose ``t_E`` is never observed, so it is treated exactly like
    a missing label): ``q(t_k = c) = q(z=k) r_k(c) + (1 - q(z=k)) p(t_k = c | x)`` with
    ``r_k = softmax_c(log p(t_k = c | x) + log p(y | c))``.
    """
    log_p_t = jnp.asarray(log_p_t, jnp.float32)
    num_classes = log_p_t.shape[-1]
    y = jnp.asarray(y, jnp.int32)
    observed, t_full = _agent_masks(t)
    q_z, _, scale_all, scale_y = _exact_terms(_gating_weights(log_p_z), _prob_of_y(log_p_t, y),
                                              observed, t_full, y, label_noise, num_classes)
    q_latent = _reweight_at_y(jnp.exp(log_p_t), y, scale_all, scale_y)
    one_hot = jax.nn.one_hot(t_full, num_classes, dtype=jnp.float32)
    return q_z, jnp.where(observed[..., None], one_hot, q_latent)


@functools.partial(jax.jit, static_argnames=("num_iters", "collapse_classifier"))
def meanfield_estep(log_p_z, log_p_t, y, t, label_noise=1e-3, num_iters=10,
                    collapse_classifier=True):
    """Factorised (mean-field) fixed point ``q(z) prod_j q(t_j)``, the paper's E-step.

    Block coordinate ascent on the ELBO for ``num_iters`` iterations, each first
    ``log q(z=k) = log p(z=k|x) + sum_c q(t_k=c) log p(y|c) + const``, then, for missing
    humans, ``log q(t_k=c) = log p(t_k=c|x) + q(z=k) log p(y|c) + const``; the returned
    ``q(z)`` is recomputed from the final ``q(t)``. Observed humans keep the plain one-hot (so
    their term is exactly ``log p(y | t_k)``).

    Since ``log p(y|c)`` takes two values, the iteration only tracks the scalar
    ``q(t_k = y)`` per (sample, agent): each iteration is O(B A) and the full (B, A, K)
    ``q_t`` is assembled once at the end.

    Initialisation: missing humans' ``q(t_k)`` start at the exact marginal posterior (the
    exact E-step). The fixed-point map is strongly coupled (``log(a/K)`` is about -8 to -12),
    so from the prior ``p(t_k|x)`` 10 iterations are often not converged and reach a worse
    fixed point; starting at the exact marginals converges faster and lands closer to the
    exact posterior. Mean-field fixed points are local: ``q(z)`` can differ from the exact
    one on rows with missing annotations (that is the approximation).

    Classifier: its ``q_t`` row stays its softmax ``p(t_E | x)`` (design.md). By default
    (``collapse_classifier=True``) its label ``t_E``, never observed nor a training target,
    is integrated out exactly in the ``q(z)`` update: the term is
    ``logsumexp_c[log p(t_E=c|x) + log p(y|c)]`` as in the exact E-step, so rows without a
    missing annotation get exactly the exact E-step's ``q(z)``. With
    ``collapse_classifier=False`` the term is the literal mean-field expectation
    ``sum_c p(t_E=c|x) log p(y|c)`` (a Jensen lower bound that under-weights the classifier).
    """
    log_p_t = jnp.asarray(log_p_t, jnp.float32)
    num_agents, num_classes = log_p_t.shape[1:]
    y = jnp.asarray(y, jnp.int32)
    observed, t_full = _agent_masks(t)
    p_hit, p_miss, _ = _noise_probs(label_noise, num_classes)
    gap = jnp.log(p_hit / p_miss)  # log p(y|y) - log p(y|c != y) > 0
    gate = _gating_weights(log_p_z)
    p_y = _prob_of_y(log_p_t, y)
    is_classifier = jnp.arange(num_agents) == num_agents - 1
    latent_human = ~observed & ~is_classifier[None, :]
    # Start point and fixed rows from the exact E-step: observed rows contribute p(y | t_k),
    # the classifier its marginal evidence (collapsed).
    _, likelihood, scale_all0, scale_y0 = _exact_terms(gate, p_y, observed, t_full, y,
                                                       label_noise, num_classes)
    q_y0 = p_y * scale_all0 + scale_y0  # exact q(t_k = y)
    if not collapse_classifier:  # exp(E_{p(t_E|x)}[log p(y | t_E)])
        likelihood = jnp.where(is_classifier[None, :], p_miss * jnp.exp(p_y * gap), likelihood)

    # The iteration runs on agent-major (A, B) arrays, so the sum over agents is a
    # reduction over the leading axis (vectorised along the batch).
    gate_am, p_y_am, latent_am, likelihood_am = (x.T for x in (gate, p_y, latent_human, likelihood))

    def update_z(q_y):
        # exp(E_q[log p(y | t_k)]) = (a/K) exp(q(t_k = y) gap) for a latent row
        weights = gate_am * jnp.where(latent_am, p_miss * jnp.exp(q_y * gap), likelihood_am)
        return weights / jnp.sum(weights, axis=0, keepdims=True)

    def update_y(q_z, p_y):
        # q(t=c) ∝ p_t(c) exp(q_z gap 1[c=y]); normaliser 1 - p_y + p_y w >= min(1, w) with
        # w = exp(q_z gap) in [1, K/a]: no overflow, no division by zero.
        boost = p_y * jnp.exp(q_z * gap)
        normaliser = (1.0 - p_y) + boost
        return boost / normaliser, normaliser

    def body(_, carry):
        _, q_y = carry
        q_z = update_z(q_y)
        return q_z, update_y(q_z, p_y_am)[0]

    if num_iters == 0:
        return update_z(q_y0.T).T, exact_estep(log_p_z, log_p_t, y, t, label_noise)[1]
    # q_z_used is the q(z) the last q(t) was computed from: rebuild the full q(t) from it.
    q_y0_am = q_y0.T
    q_z_used, q_y = jax.lax.fori_loop(0, num_iters, body, (update_z(q_y0_am), q_y0_am))
    q_z_final = update_z(q_y).T
    q_z_used, q_y = q_z_used.T, q_y.T
    _, normaliser = update_y(q_z_used, p_y)
    scale_all = 1.0 / normaliser
    scale_y = p_y * jnp.expm1(q_z_used * gap) * scale_all  # so that q(t=y) = q_y
    p_t = jnp.exp(log_p_t)
    q_latent = _reweight_at_y(p_t, y, scale_all, scale_y)
    one_hot = jax.nn.one_hot(t_full, num_classes, dtype=jnp.float32)
    fixed_rows = jnp.where(observed[..., None], one_hot, p_t)
    return q_z_final, jnp.where(latent_human[..., None], q_latent, fixed_rows)


@functools.partial(jax.jit, static_argnames=("num_iters",))
def reference_estep(log_p_z, log_p_t, y, t, label_noise=1e-3, num_iters=10):
    """The reference code's mean-field variant (``estep=reference``), O(B A K) memory.

    Reading of design.md section 5 implemented here:

    * initial ``q(z)`` uniform (overwritten by the first update, as in the reference);
      initial ``q(t)``: observed humans the smoothed one-hot ``(1-s) onehot + s/K`` with
      ``s = 1e-3``, missing humans the unnormalised constant ``a/K`` in every class, the
      classifier row its softmax ``p(t_E | x)`` (kept fixed throughout);
    * each of ``num_iters`` iterations first updates ``q(z)`` from the previous ``q(t)``:
      ``log q(z=k) = log p(z=k|x) + sum_c q(t_k=c) log p(y|c)`` for every agent (classifier
      included, through its softmax row: no collapsing here), normalised over k;
    * then updates every missing human's ``q(t)`` simultaneously (Jacobi: ``sum_{m != k}``
      uses the previous ``q(t)``, including other missing rows) from the new ``q(z)``:
      ``log q(t_k=c) = log p(t_k=c|x) + q(z=k) log p(y|c) * sum_{m != k} q(t_m=c)``,
      normalised over c, where m runs over all E+1 rows (observed smoothed one-hots, missing
      rows, classifier softmax). ``sum_{m != k}`` is computed as total minus self, never as an
      (A, A) tensor. Observed rows and the classifier row are never updated;
    * returns the ``q(z)`` and ``q(t)`` of the last iteration (that ``q(z)`` is the one the
      last ``q(t)`` was computed from).
    """
    log_p_z = jnp.asarray(log_p_z, jnp.float32)
    log_p_t = jnp.asarray(log_p_t, jnp.float32)
    batch, num_agents, num_classes = log_p_t.shape
    y = jnp.asarray(y, jnp.int32)
    observed, t_full = _agent_masks(t)
    p_hit, p_miss, _ = _noise_probs(label_noise, num_classes)
    log_lik = jnp.where(jax.nn.one_hot(y, num_classes, dtype=jnp.bool_),
                        jnp.log(p_hit), jnp.log(p_miss))  # (B, K)
    is_classifier = jnp.arange(num_agents) == num_agents - 1
    latent_human = ~observed & ~is_classifier[None, :]
    smoothed = ((1.0 - REFERENCE_SMOOTHING) * jax.nn.one_hot(t_full, num_classes, dtype=jnp.float32)
                + REFERENCE_SMOOTHING / num_classes)
    q_t0 = jnp.where(observed[..., None], smoothed, p_miss)
    q_t0 = jnp.where(is_classifier[None, :, None], jnp.exp(log_p_t), q_t0)
    q_z0 = jnp.full((batch, num_agents), 1.0 / num_agents, jnp.float32)

    def body(_, carry):
        _, q_t = carry
        q_z = jax.nn.softmax(log_p_z + jnp.einsum("bak,bk->ba", q_t, log_lik), axis=-1)
        others = jnp.sum(q_t, axis=1, keepdims=True) - q_t  # sum over m != k, (B, A, K)
        logits = log_p_t + q_z[..., None] * log_lik[:, None, :] * others
        q_t = jnp.where(latent_human[..., None], jax.nn.softmax(logits, axis=-1), q_t)
        return q_z, q_t

    return jax.lax.fori_loop(0, num_iters, body, (q_z0, q_t0))


def estep(kind: str, log_p_z, log_p_t, y, t, label_noise=1e-3, num_iters=10):
    """Dispatch to the E-step named ``kind`` (one of ``ESTEP_KINDS``); returns ``(q_z, q_t)``.

    ``num_iters`` is ignored by the exact E-step. ``kind`` is a Python string (static under
    ``jit``); an unknown kind raises ``ValueError`` listing the valid ones.
    """
    if kind == "exact":
        return exact_estep(log_p_z, log_p_t, y, t, label_noise)
    if kind == "meanfield":
        return meanfield_estep(log_p_z, log_p_t, y, t, label_noise, num_iters=num_iters)
    if kind == "reference":
        return reference_estep(log_p_z, log_p_t, y, t, label_noise, num_iters=num_iters)
    raise ValueError(f"Unknown E-step kind {kind!r}; valid kinds are: {', '.join(ESTEP_KINDS)}.")
