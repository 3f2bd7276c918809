"""Pure JAX surrogate losses of the learning-to-defer (L2D) baselines and their agent scores.

Conventions (see ``core/spec.py``):

* ``y``: (B,) int32 ground-truth classes in ``[0, K)``.
* ``t``: (B, E) int32 expert annotations, ``MISSING`` (-1) where expert j did not annotate.
* Deferral logits are laid out classes first, experts after: ``(B, K + E)``; column
  ``K + j`` is expert j. Agent *scores* are laid out experts first, classifier last:
  ``(B, E + 1)``, probabilities in [0, 1], as in the method contract.
* Every loss returns the batch mean (a scalar) over the rows its missing-annotation
  policy keeps (``methods.missing_policy``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from core.spec import MISSING
from methods.missing_policy import check_policy, resolve_annotations, weighted_row_mean


def cross_entropy(logits: jax.Array, labels_or_probs: jax.Array) -> jax.Array:
    """Per-example cross-entropy over the last axis (not averaged).

    ``labels_or_probs`` is either integer class indices with shape ``logits.shape[:-1]``
    or target probabilities with the shape of ``logits``. Integer labels outside
    ``[0, K)`` (e.g. ``MISSING``) give a finite but meaningless value: mask them.
    """
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    targets = jnp.asarray(labels_or_probs)
    if jnp.issubdtype(targets.dtype, jnp.integer):
        index = jnp.clip(targets, 0, logits.shape[-1] - 1)[..., None]
        return -jnp.take_along_axis(log_probs, index, axis=-1)[..., 0]
    if targets.shape != logits.shape:
        raise ValueError(
            f"soft targets have shape {targets.shape}, expected the logits' shape {logits.shape}"
        )
    return -jnp.sum(targets * log_probs, axis=-1)


def binary_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Element-wise BCE with logits, ``-z log sigmoid(g) - (1-z) log(1 - sigmoid(g))``, stable."""
    targets = targets.astype(logits.dtype)
    return targets * jax.nn.softplus(-logits) + (1.0 - targets) * jax.nn.softplus(logits)


def _split_deferral_logits(logits: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    num_experts = t.shape[-1]
    num_classes = logits.shape[-1] - num_experts
    if num_classes < 1:
        raise ValueError(
            f"deferral logits have {logits.shape[-1]} columns; expected K + E with "
            f"E = {num_experts} experts and K >= 1 classes"
        )
    return logits[..., :num_classes], logits[..., num_classes:]


def _expert_correct(y: jax.Array, t_filled: jax.Array) -> jax.Array:
    """(B, E) bool: expert j's (filled) annotation equals the ground truth."""
    return t_filled == y[:, None]


def softmax_deferral_loss(
    logits: jax.Array,
    y: jax.Array,
    t: jax.Array,
    policy: str,
    t_imputed: jax.Array | None = None,
) -> jax.Array:
    """Multi-expert softmax surrogate (Mozannar & Sontag 2020; Verma et al., AISTATS 2023).

    ``mean_i [ -log s_y - sum_j 1[t_j = y] log s_{K+j} ]`` with ``s = softmax(logits)``,
    logits (B, K + E).

    Policies: "as_incorrect", "drop", "impute". "mask" is refused: the only per-expert
    term is the indicator term, which a missing (as-incorrect) annotation already removes.
    Note that a missing expert's logit still sits in the softmax normaliser under every
    policy, so it is pushed down like that of a wrong expert.
    """
    check_policy("softmax", policy)
    t_filled, term_mask, row_weight = resolve_annotations(t, policy, t_imputed)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    _, expert_log_probs = _split_deferral_logits(log_probs, t)
    classifier_term = -jnp.take_along_axis(log_probs, y[:, None], axis=-1)[:, 0]
    expert_used = _expert_correct(y, t_filled) & term_mask
    expert_term = -jnp.sum(jnp.where(expert_used, expert_log_probs, 0.0), axis=-1)
    return weighted_row_mean(classifier_term + expert_term, row_weight)


def ova_deferral_loss(
    logits: jax.Array,
    y: jax.Array,
    t: jax.Array,
    policy: str,
    t_imputed: jax.Array | None = None,
) -> jax.Array:
    """One-vs-all surrogate (Verma & Nalisnick, ICML 2022).

    ``mean_i [ sum_k BCE(g_k, 1[y = k]) + sum_j BCE(g_{K+j}, 1[t_j = y]) ]``,
    logits (B, K + E).

    Policies: all four. "as_incorrect" trains a missing expert's logit towards 0
    (target 0); "mask" removes that expert's BCE term (its logit gets no gradient from the
    row); "drop" removes the row; "impute" uses the imputed label's correctness as target.
    """
    check_policy("ova", policy)
    t_filled, term_mask, row_weight = resolve_annotations(t, policy, t_imputed)
    class_logits, expert_logits = _split_deferral_logits(logits, t)
    class_targets = jax.nn.one_hot(y, class_logits.shape[-1], dtype=logits.dtype)
    class_term = jnp.sum(binary_cross_entropy(class_logits, class_targets), axis=-1)
    expert_bce = binary_cross_entropy(expert_logits, _expert_correct(y, t_filled))
    expert_term = jnp.sum(jnp.where(term_mask, expert_bce, 0.0), axis=-1)
    return weighted_row_mean(class_term + expert_term, row_weight)


def realizable_deferral_loss(
    logits: jax.Array,
    y: jax.Array,
    t: jax.Array,
    policy: str,
    t_imputed: jax.Array | None = None,
) -> jax.Array:
    """Realizable surrogate (Mozannar et al., AISTATS 2023), multi-expert form.

    ``mean_i -log[(exp g_y + sum_j 1[t_j = y] exp g_{K+j}) / sum_all exp g]``, computed as
    ``logsumexp(g) - logsumexp(g over {y} and the correct experts)``, logits (B, K + E).

    Policies: "as_incorrect", "drop", "impute". "mask" is refused: a missing
    (as-incorrect) expert already leaves the numerator, and it has no term of its own.
    """
    check_policy("realizable", policy)
    t_filled, term_mask, row_weight = resolve_annotations(t, policy, t_imputed)
    num_classes = logits.shape[-1] - t.shape[-1]
    _split_deferral_logits(logits, t)  # shape check
    is_true_class = jax.nn.one_hot(y, num_classes, dtype=bool)
    expert_used = _expert_correct(y, t_filled) & term_mask
    in_numerator = jnp.concatenate([is_true_class, expert_used], axis=-1)
    log_numerator = jax.nn.logsumexp(logits, axis=-1, where=in_numerator)
    log_denominator = jax.nn.logsumexp(logits, axis=-1)
    return weighted_row_mean(log_denominator - log_numerator, row_weight)


def correctness_loss(
    expert_logits: jax.Array,
    y: jax.Array,
    t: jax.Array,
    policy: str,
    t_imputed: jax.Array | None = None,
) -> jax.Array:
    """Per-expert correctness models ``P(t_j = y | x)`` (compare_confidence; Raghu et al. 2019).

    ``mean_i sum_j BCE(h_j, 1[t_j = y])`` with expert_logits ``h`` (B, E). The classifier
    of this baseline is trained separately with ``cross_entropy``.

    Policies: all four. "mask" (train each model on its observed labels only) is the
    natural choice; "as_incorrect" teaches the models that a missing label is a wrong one.
    """
    check_policy("correctness", policy)
    t_filled, term_mask, row_weight = resolve_annotations(t, policy, t_imputed)
    if expert_logits.shape != t.shape:
        raise ValueError(
            f"expert_logits have shape {expert_logits.shape}, expected the shape of t {t.shape}"
        )
    bce = binary_cross_entropy(expert_logits, _expert_correct(y, t_filled))
    return weighted_row_mean(jnp.sum(jnp.where(term_mask, bce, 0.0), axis=-1), row_weight)


def annotator_loss(
    annot_logits: jax.Array,
    t: jax.Array,
    soft_targets: jax.Array | None = None,
    mask_missing: bool = True,
) -> jax.Array:
    """Cross-entropy of annotator models (one per expert) that imitate the experts.

    ``mean_i sum_j m_ij CE(annot_logits_ij, target_ij)`` with annot_logits (B, E, K).
    The target is the observed label ``t_ij`` or, when given, ``soft_targets`` (B, E, K)
    (e.g. smoothed one-hots, or E-step posteriors over missing labels). ``m_ij`` is 1 for
    observed annotations; with ``mask_missing=False`` (only with soft targets) every term
    is kept, as in an EM M-step whose targets also cover the missing labels.

    No policy argument: a missing label cannot be a hard target, so it is always masked
    unless soft targets provide it. The normaliser is the batch size B, like the other
    losses (so the loss scale shrinks with the missing rate under masking).
    """
    if annot_logits.shape[:2] != t.shape:
        raise ValueError(
            f"annot_logits have shape {annot_logits.shape}, "
            f"expected (B, E, K) with (B, E) = {t.shape}"
        )
    if soft_targets is None:
        if not mask_missing:
            raise ValueError("mask_missing=False needs soft_targets for the missing labels")
        targets = t
    else:
        targets = soft_targets
    terms = cross_entropy(annot_logits, targets)
    keep = (t != MISSING) if mask_missing else jnp.ones(t.shape, dtype=bool)
    per_row = jnp.sum(jnp.where(keep, terms, 0.0), axis=-1)
    return jnp.mean(per_row)


def _agent_scores(classifier_score: jax.Array, expert_scores: jax.Array) -> jax.Array:
    """(B, E + 1): experts first, classifier last (the contract's agent order)."""
    return jnp.concatenate([expert_scores, classifier_score[:, None]], axis=-1)


def deferral_scores_softmax(logits: jax.Array, num_experts: int) -> jax.Array:
    """Agent scores for ``softmax_deferral_loss`` logits (B, K + E) -> (B, E + 1).

    Expert j scores ``s_{K+j}``; the classifier scores ``max_k s_k`` with
    ``s = softmax(logits)``. The argmax agrees with the rule "defer to argmax s if it is
    >= K". Probabilities (not log-probabilities), so sums of scores are expected counts.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    num_classes = logits.shape[-1] - num_experts
    return _agent_scores(jnp.max(probs[:, :num_classes], axis=-1), probs[:, num_classes:])


def deferral_scores_realizable(logits: jax.Array, num_experts: int) -> jax.Array:
    """Agent scores for ``realizable_deferral_loss`` logits: same parametrisation and
    decision rule as the softmax surrogate, so the same scores (``deferral_scores_softmax``)."""
    return deferral_scores_softmax(logits, num_experts)


def deferral_scores_ova(logits: jax.Array, num_experts: int) -> jax.Array:
    """Agent scores for ``ova_deferral_loss`` logits (B, K + E) -> (B, E + 1).

    Expert j scores ``sigmoid(g_{K+j})`` (estimated P(expert j correct)); the classifier
    scores ``max_k sigmoid(g_k)`` (estimated P(its top class is correct)).
    """
    probs = jax.nn.sigmoid(logits)
    num_classes = logits.shape[-1] - num_experts
    return _agent_scores(jnp.max(probs[:, :num_classes], axis=-1), probs[:, num_classes:])


# the multi-expert surrogates on (B, K + E) logits by name, each with its agent scores
MULTI_EXPERT_SURROGATES = {"ova": (ova_deferral_loss, deferral_scores_ova),
                           "softmax": (softmax_deferral_loss, deferral_scores_softmax)}


def deferral_scores_correctness(class_logits: jax.Array, expert_logits: jax.Array) -> jax.Array:
    """Agent scores for compare_confidence: (B, K) and (B, E) logits -> (B, E + 1).

    Expert j scores ``sigmoid(h_j)`` (its correctness model); the classifier scores its
    confidence ``max_k softmax(class_logits)_k``.
    """
    confidence = jnp.max(jax.nn.softmax(class_logits, axis=-1), axis=-1)
    return _agent_scores(confidence, jax.nn.sigmoid(expert_logits))
