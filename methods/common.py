"""Defaults shared by method classes (the contract itself is ``core.spec.Method``)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from core.spec import MISSING, Batch, TrainInputs
from methods.missing_policy import check_policy
from methods.nets import Network


class MethodConfigError(ValueError):
    """A method's configuration is invalid (message says which option and why)."""


@dataclasses.dataclass(frozen=True)
class MethodBase:
    """Base of registered methods: a frozen, hashable dataclass of hyper-parameters.

    Supplies the defaults of every optional member of ``core.spec.Method`` (see there
    for what each means). A method that accepts ``missing_policy`` declares the field and
    the accepted values in ``missing_policies``; an unsupported value is refused here.
    """

    name: ClassVar[str] = ""  # set by METHODS.register
    trains: ClassVar[bool] = True
    if TYPE_CHECKING:  # a class attribute, or a property where an option decides it (prob_l2d)
        @property
        def workload_in_training(self) -> bool: ...

        def classify(self, model: Any, x: jax.Array) -> jax.Array:
            """Every method defines it (``core.spec.Method``); the defaults below call it."""
            ...
    else:
        workload_in_training = False
    missing_policies: ClassVar[tuple[str, ...]] = ()
    training_problem: ClassVar[str | None] = None

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

    def diagnostics(self, model: Any, batch: Batch, inputs: TrainInputs) -> dict[str, float]:
        """Extra run metrics after training (default: none)."""
        return {}

    def impute(self, model: Any, batch: Batch, inputs: TrainInputs) -> jax.Array | None:
        """(B, E, K) inferred distribution of expert labels, or None if not modelled."""
        return None


@dataclasses.dataclass(frozen=True)
class ReferenceRowBase(MethodBase):
    """Base of reference rows (``core.spec.ReferenceRow``): listed apart, never ranked."""

    sees_test_labels: ClassVar[bool] = False

    def reference_scores(self, logits, scores, y, t):
        """The split's scores under the row's rule (default: the scores as they are)."""
        return scores


CE_CLASSIFIER = "cross_entropy_classifier"  # training problem: Networks(classifier=Network) by CE


def mean_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Batch mean of the cross-entropy of integer ``labels`` under ``logits``
    (``methods.surrogates.cross_entropy`` is the per-example one)."""
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


TIE_BREAK_SCALE = 1e-5  # below any meaningful score difference, above the LP solver's tolerance


def sample_uniform(x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """(B,) uniform draws in [0, 1) that depend only on each sample's pixels (and ``key``):
    a stated, order-independent tie-break, the same whatever the batching."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(x.shape[0], -1)
    weights = np.random.default_rng(0).integers(0, 2**31, bits.shape[1], dtype=np.uint32) * 2 + 1
    hashed = jnp.sum(bits * jnp.asarray(weights, jnp.uint32), axis=1, dtype=jnp.uint32)
    key = jax.random.key(0) if key is None else key
    return jax.vmap(lambda h: jax.random.uniform(jax.random.fold_in(key, h)))(hashed)


def human_scores(accuracy: jax.Array, x: jax.Array) -> jax.Array:
    """(B, E) each human's accuracy, with a tie-break of at most ``TIE_BREAK_SCALE`` drawn
    per sample and human from the pixels (which sample a capped human gives up is then
    a stated, order-independent rule, not the solver's choice)."""
    draws = jnp.stack([sample_uniform(x, jax.random.key(j + 1)) for j in range(accuracy.shape[0])],
                      axis=1)
    return (1.0 - TIE_BREAK_SCALE) * accuracy[None, :] + TIE_BREAK_SCALE * draws


def expert_accuracies(y: np.ndarray, t: np.ndarray, policy: str = "mask") -> np.ndarray:
    """(E,) training accuracy of each expert: on its observed labels ("mask") or over all
    samples with a missing label counted as wrong ("as_incorrect")."""
    correct = (t == y[:, None]).sum(axis=0)
    seen = (t != MISSING).sum(axis=0) if policy == "mask" else np.full(t.shape[1], len(y))
    return correct / np.maximum(seen, 1)


def check_stage_fraction(method: str, option: str, value: float) -> None:
    """Raise ``MethodConfigError`` unless a stage boundary (a share of training) is in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise MethodConfigError(f"method {method!r}: {option} must be in [0, 1), got {value}.")


def after_stage(inputs: TrainInputs, fraction: float, loss: jax.Array) -> jax.Array:
    """``loss`` once ``fraction`` of training is done, 0 (and no gradient) before."""
    return jnp.where(inputs.progress >= fraction, loss, 0.0)


@dataclasses.dataclass(frozen=True)
class ClassifierThenStage(MethodBase):
    """A classifier trained by cross-entropy on ``y`` throughout (``model.classifier``),
    plus a second-stage model whose loss (``stage_loss``, logged as ``stage_metric``) joins
    after ``first_stage_fraction`` of training (``two_stage``, ``post_hoc``)."""

    first_stage_fraction: float = 0.5  # share of training before the second stage starts
    stage_metric: ClassVar[str] = "stage_loss"

    def __post_init__(self):
        super().__post_init__()
        check_stage_fraction(self.name, "first_stage_fraction", self.first_stage_fraction)

    def stage_loss(self, model, batch: Batch, class_logits: jax.Array) -> jax.Array:
        """The second stage's loss on ``batch`` (``class_logits``: the classifier's)."""
        raise NotImplementedError

    def loss(self, model, batch, inputs):
        class_logits = model.classifier(batch.x)
        classifier = mean_cross_entropy(class_logits, batch.y)
        stage = self.stage_loss(model, batch, class_logits)
        total = classifier + after_stage(inputs, self.first_stage_fraction, stage)
        return total, {"classifier_ce": classifier, self.stage_metric: stage}

    def classify(self, model, x):
        return model.classifier(x)


def check_surrogate(name: str, surrogate: str, policy: str, surrogates) -> None:
    """Raise ``MethodConfigError`` unless ``surrogate`` is one of ``surrogates`` (by name) and
    supports the missing-annotation ``policy``."""
    if surrogate not in surrogates:
        raise MethodConfigError(f"method {name!r}: surrogate must be one of "
                                f"{', '.join(surrogates)}, got {surrogate!r}.")
    try:
        check_policy(surrogate, policy)
    except ValueError as err:
        raise MethodConfigError(f"method {name!r}: {err}") from None


def require_experts(name: str, num_experts: int) -> None:
    """Raise ``MethodConfigError`` if a method that routes to humans gets none."""
    if num_experts < 1:
        raise MethodConfigError(f"method {name!r} needs at least one human expert, got 0.")
