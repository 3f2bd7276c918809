"""Defaults shared by method classes (the contract itself is ``benchmark.spec.Method``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmark.spec import Batch, TrainInputs
from methods.nets import Network



class MethodConfigError(ValueError):
    """A method's configuration is invalid (message says which option and why)."""


@dataclasses.dataclass(frozen=True)
class MethodBase:
    """Base of registered methods: a frozen, hashable dataclass of hyper-parameters.

    Supplies the defaults of every optional member of ``benchmark.spec.Method`` (see there
    for what each means). A method that accepts ``missing_policy`` declares the field and
    the accepted values in ``missing_policies``; an unsupported value is refused here.
    """

    name: ClassVar[str] = ""
    trains: ClassVar[bool] = True
    workload_in_training: ClassVar[bool] = False
    missing_policies: ClassVar[tuple[str, ...]] = ()
    sees_test_labels: ClassVar[bool] = False
    role: ClassVar[str] = "method"

    def __post_init__(self):
        policy = getattr(self, "missing_policy", None)
        if self.missing_policies and policy not in self.missing_policies:
            raise MethodConfigError(
                f"method {self.name!r} does not support missing_policy={policy!r}; "
                f"choose one of {', '.join(self.missing_policies)}."
            )

    def prepare(self, model: Any, train_split: Any) -> None:
        """Hook run before training with the in-memory training split (default: nothing)."""

    def class_probabilities(self, model: Any, x: jax.Array) -> jax.Array:
        """(B, K) class probabilities for calibration (default: softmax of ``classify``)."""
        return jax.nn.softmax(self.classify(model, x), axis=-1)

    def scores_from_labels(self, logits, scores, y, t):
        """Test-time scores for reference rows that may look at the labels (default: as is)."""
        return scores

    def impute(self, model: Any, batch: Batch, inputs: TrainInputs) -> jax.Array | None:
        """(B, E, K) inferred distribution of expert labels, or None if not modelled."""
        return None


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of integer ``labels`` under ``logits``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def classifier_confidence_scores(logits: jax.Array, num_experts: int) -> jax.Array:
    """Agent scores for a method that models no human: humans 0, classifier max-prob."""
    confidence = jax.nn.softmax(logits, axis=-1).max(axis=-1, keepdims=True)
    return jnp.concatenate([jnp.zeros((logits.shape[0], num_experts)), confidence], axis=-1)


# ----------------------------------------------------------------------------- shared by methods


class Networks(nnx.Module):
    """A named bundle of the networks (and other NNX variables) making up one method's model."""

    def __init__(self, **parts: Any):
        for name, part in parts.items():
            setattr(self, name, part)


class Constant(nnx.Variable):
    """Model state that is not a parameter (never trained, kept in the model's state)."""


@dataclasses.dataclass(frozen=True)
class DeferralSurrogate(MethodBase):
    """A single network with K class logits then E deferral logits, trained with a surrogate.

    Subclasses define ``surrogate(logits, y, t, policy)`` (a loss from ``methods.surrogates``)
    and ``deferral_scores(logits, num_experts)`` (its ``deferral_scores_*`` helper) as
    static methods. The classifier's logits are the first K outputs.
    """

    num_experts: int = 0
    missing_policy: str = "as_incorrect"

    def init_model(self, spec, rngs):
        outputs = spec.num_classes + spec.num_experts
        return Network(spec.backbone, spec.input_shape[-1], outputs, rngs=rngs)

    def loss(self, model, batch, inputs):
        return self.surrogate(model(batch.x), batch.y, batch.t, self.missing_policy), {}

    def classify(self, model, x):
        logits = model(x)
        return logits[:, : logits.shape[-1] - self.num_experts]

    def agent_scores(self, model, x):
        return self.deferral_scores(model(x), self.num_experts)


def require_experts(name: str, num_experts: int) -> None:
    """Raise ``MethodConfigError`` if a method that routes to humans gets none."""
    if num_experts < 1:
        raise MethodConfigError(f"method {name!r} needs at least one human expert, got 0.")
