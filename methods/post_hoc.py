"""``post_hoc``: a base classifier, then post-hoc correctness estimators combined by the
Bayes-optimal rule (Narasimhan, Jitkrittum, Menon, Rawat & Kumar, NeurIPS 2022,
"Post-hoc estimators for learning to defer to an expert").

Base model: a classifier trained by cross-entropy on ``y`` (it never sees the deferral
loss). Post hoc, for the base model as it is (``stop_gradient``): one estimator per expert
of ``P(t_j = y | x)``, trained by BCE on ``1[t_j = y]``, whose input is the image *and the
base model's class probabilities*, so deferral depends on what the base model predicts
(the paper's fix for deferral functions that ignore it and for the softmax surrogate's
underfitting). The estimators start after ``first_stage_fraction`` of the training steps.
Decision (the Bayes-optimal rule with equal costs): the agent most likely to be right,
the classifier scoring ``max_y P(y | x)``, expert j its estimate.

Missing annotations: ``mask`` (default; each estimator learns from its expert's observed
labels only), ``as_incorrect`` (a missing answer counts as wrong), ``drop`` (fully annotated
samples only).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from methods import METHODS
from methods.common import ClassifierThenStage, Networks, require_experts
from methods.nets import Network
from methods.surrogates import correctness_loss, deferral_scores_correctness


class CorrectnessEstimators(nnx.Module):
    """E logits of ``P(t_j = y | x)`` from the image and the base model's probabilities."""

    def __init__(self, backbone: str, channels: int, num_classes: int, num_experts: int,
                 rngs: nnx.Rngs):
        self.image = Network(backbone, channels, num_experts, rngs=rngs)
        self.base = nnx.Linear(num_classes, num_experts, rngs=rngs)

    def __call__(self, x, base_probs):
        return self.image(x) + self.base(jax.lax.stop_gradient(base_probs))


@METHODS.register("post_hoc")
@dataclasses.dataclass(frozen=True)
class PostHoc(ClassifierThenStage):
    missing_policies = ("mask", "as_incorrect", "drop")
    stage_metric = "correctness_bce"
    missing_policy: str = "mask"
    num_experts: int = 0
    num_classes: int = 0

    def init_model(self, spec, rngs):
        require_experts(self.name, spec.num_experts)
        channels = spec.input_shape[-1]
        return Networks(
            classifier=Network(spec.backbone, channels, spec.num_classes, rngs=rngs),
            estimators=CorrectnessEstimators(spec.backbone, channels, spec.num_classes,
                                             spec.num_experts, rngs=rngs))

    def _estimates(self, model, x, class_logits):
        return model.estimators(x, jax.nn.softmax(class_logits, axis=-1))

    def stage_loss(self, model, batch, class_logits):
        return correctness_loss(self._estimates(model, batch.x, class_logits), batch.y, batch.t,
                                self.missing_policy)

    def agent_scores(self, model, x):
        class_logits = model.classifier(x)
        return deferral_scores_correctness(class_logits, self._estimates(model, x, class_logits))
