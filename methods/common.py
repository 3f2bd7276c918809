"""Defaults shared by method classes (the contract itself is ``benchmark.spec.Method``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

MISSING_POLICIES = ("as_incorrect", "drop", "mask", "impute")


class MethodConfigError(ValueError):
    """A method's configuration is invalid (message says which option and why)."""


@dataclasses.dataclass(frozen=True)
class MethodBase:
    """Base of registered methods: a frozen, hashable dataclass of hyper-parameters.

    Class attributes describe the method to the runner:
    - ``trains``: False for reference rows that need no gradient steps.
    - ``workload_in_training``: True if the workload bounds change training (then the
      runner cannot reuse one trained model across workload presets).
    - ``missing_policies``: the ``missing_policy`` values the method accepts.
    - ``sees_test_labels``: True only for reference rows (the oracle) whose test-time
      scores are ``scores_from_labels(logits, scores, y, t)``, computed on the host.
    """

    name: ClassVar[str] = ""
    trains: ClassVar[bool] = True
    workload_in_training: ClassVar[bool] = False
    missing_policies: ClassVar[tuple[str, ...]] = ()
    sees_test_labels: ClassVar[bool] = False

    missing_policy: str = "as_incorrect"

    def __post_init__(self):
        if self.missing_policies and self.missing_policy not in self.missing_policies:
            raise MethodConfigError(
                f"method {self.name!r} does not support missing_policy={self.missing_policy!r}; "
                f"choose one of {', '.join(self.missing_policies)}."
            )

    def prepare(self, model: Any, train_split: Any) -> None:
        """Hook run before training with the in-memory training split (default: nothing)."""

    def scores_from_labels(self, logits, scores, y, t):
        """Test-time scores for reference rows that may look at the labels (default: as is)."""
        return scores

    def impute(self, model: Any, batch: Any, aux: Any) -> jax.Array | None:
        """(B, E, K) inferred distribution of expert labels, or None if not modelled."""
        return None


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of integer ``labels`` under ``logits``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def classifier_confidence_scores(logits: jax.Array, num_experts: int) -> jax.Array:
    """Agent scores for a method that models no human: humans 0, classifier max-prob."""
    confidence = jax.nn.softmax(logits, axis=-1).max(axis=-1, keepdims=True)
    return jnp.concatenate([jnp.zeros((logits.shape[0], num_experts)), confidence], axis=-1)
