"""Missing-annotation policies: how a loss treats an expert label that was not given.

``policy`` is a static Python string:

``"as_incorrect"``
    A missing annotation counts as a wrong answer (it is kept as ``MISSING``, which never
    equals ``y``). This is what the reference implementations do.
``"mask"``
    The per-expert loss term of a missing annotation is left out of the loss. Only
    meaningful for losses that *have* a separate term per expert and per outcome (OvA,
    correctness); see ``SUPPORTED_POLICIES``.
``"drop"``
    Rows with any missing annotation are removed (weight 0): training on fully annotated
    samples only.
``"impute"``
    Missing annotations are replaced by ``t_imputed`` (e.g. the argmax of annotator
    models), then the loss is the complete-data loss.

``resolve_annotations`` is the single place that turns a policy into the annotations,
term mask and row weights every loss uses. ``check_policy`` validates a (loss, policy)
pair with an error that lists the valid choices. Rows carry an explicit weight (0 or 1)
and ``weighted_row_mean`` averages over the rows kept; when no row is kept the loss is
exactly 0 (no NaN, zero gradients).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from core.registry import did_you_mean
from core.spec import MISSING

POLICIES: tuple[str, ...] = ("as_incorrect", "drop", "mask", "impute")

# Which policies each loss supports. Softmax and realizable have no separate term for
# "expert j was wrong": a missing expert's indicator term 1[t_j = y] simply vanishes, which
# is exactly what "as_incorrect" does, so "mask" would silently duplicate it and is refused.
SUPPORTED_POLICIES: dict[str, tuple[str, ...]] = {
    "softmax": ("as_incorrect", "drop", "impute"),
    "ova": ("as_incorrect", "drop", "mask", "impute"),
    "realizable": ("as_incorrect", "drop", "impute"),
    "correctness": ("as_incorrect", "drop", "mask", "impute"),
}

_UNSUPPORTED_REASONS: dict[tuple[str, str], str] = {
    ("softmax", "mask"): (
        "the softmax loss has no term for a wrong expert: a missing expert's term "
        "1[t_j = y] log s_{K+j} contributes nothing under 'as_incorrect' already, so "
        "'mask' would coincide with 'as_incorrect'"
    ),
    ("realizable", "mask"): (
        "the realizable loss has no term for a wrong expert: a missing expert's "
        "exp g_{K+j} leaves the numerator under 'as_incorrect' already, so 'mask' "
        "would coincide with 'as_incorrect'"
    ),
}


def _quoted(names) -> str:
    return ", ".join(repr(n) for n in names)


def check_policy(loss_name: str, policy: str) -> None:
    """Raise ``ValueError`` unless ``policy`` is supported by loss ``loss_name``.

    The message names the valid choices (and, for a typo, the closest one).
    """
    if loss_name not in SUPPORTED_POLICIES:
        raise ValueError(
            f"unknown loss {loss_name!r}; valid losses: {_quoted(SUPPORTED_POLICIES)}"
        )
    valid = SUPPORTED_POLICIES[loss_name]
    if policy in valid:
        return
    message = (
        f"missing-annotation policy {policy!r} is not supported by the {loss_name!r} "
        f"loss; valid choices: {_quoted(valid)}"
    )
    reason = _UNSUPPORTED_REASONS.get((loss_name, policy))
    if reason is not None:
        message += f" ({reason})"
    elif policy not in POLICIES:
        message += ";" + did_you_mean(policy, valid, n=1)
    raise ValueError(message)


def resolve_annotations(
    t: jax.Array, policy: str, t_imputed: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Apply a missing-annotation policy to expert annotations.

    Args:
      t: (B, E) int annotations, ``MISSING`` (-1) where absent.
      policy: one of ``POLICIES`` (static).
      t_imputed: (B, E) int labels used where ``t`` is missing; required for "impute".

    Returns:
      ``(t_filled, term_mask, row_weight)``:
      ``t_filled`` (B, E) int, the annotations the loss compares with ``y`` (``MISSING``
      left in place for "as_incorrect", "mask" and "drop": it never equals ``y``);
      ``term_mask`` (B, E) bool, which per-(row, expert) loss terms are kept (False only
      for missing annotations under "mask");
      ``row_weight`` (B,) float32, 0 for rows removed by "drop", else 1.
    """
    if policy not in POLICIES:
        raise ValueError(
            f"unknown missing-annotation policy {policy!r}; valid choices: {_quoted(POLICIES)}"
        )
    t = jnp.asarray(t)
    observed = t != MISSING
    ones_terms = jnp.ones(t.shape, dtype=bool)
    ones_rows = jnp.ones(t.shape[:1], dtype=jnp.float32)
    if policy == "as_incorrect":
        return t, ones_terms, ones_rows
    if policy == "mask":
        return t, observed, ones_rows
    if policy == "drop":
        return t, ones_terms, jnp.all(observed, axis=-1).astype(jnp.float32)
    # impute
    if t_imputed is None:
        raise ValueError("policy 'impute' needs t_imputed, a (B, E) int array of labels")
    t_imputed = jnp.asarray(t_imputed)
    if t_imputed.shape != t.shape:
        raise ValueError(
            f"t_imputed has shape {t_imputed.shape}, expected the shape of t {t.shape}"
        )
    return jnp.where(observed, t, t_imputed.astype(t.dtype)), ones_terms, ones_rows


def weighted_row_mean(per_row: jax.Array, row_weight: jax.Array) -> jax.Array:
    """``sum_i w_i l_i / sum_i w_i``, and exactly 0 (zero gradient) when all weights are 0."""
    row_weight = row_weight.astype(per_row.dtype)
    total = jnp.sum(row_weight)
    safe_total = jnp.where(total > 0, total, 1.0)
    kept = jnp.where(row_weight > 0, per_row, 0.0)  # a removed row can never leak a NaN
    return jnp.where(total > 0, jnp.sum(row_weight * kept) / safe_total, 0.0)
