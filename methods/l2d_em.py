"""``l2d_em``: L2D as a mixture of experts trained by EM (the Prob-L2D paper's EM baseline).

A classifier ``p(c | x)`` trained by cross-entropy on ``y`` and a gating network
``p(z = k | x)`` over the E+1 agents, trained by cross-entropy against the workload-
constrained posterior ``q'(z)``. E-step (no annotator models):
``q(z = k) ∝ p(z = k | x) p(y | t_k)`` with ``p(y | c) = (1 - a) 1[y = c] + a / K``;
a human uses its observed label, the classifier its marginal ``sum_c p(c | x) p(y | c)``;
then ``q' = constrain_posterior(q, lo, hi)`` (the workload bounds of ``TrainInputs``), all under ``stop_gradient``.
A missing human label, by ``missing_policy``: "as_incorrect" (default: ``p(y | t) = a / K``)
or "mask" (that agent is excluded from the row: ``q(z = k) = 0``).
Agent scores are the gating probabilities.

Behaviour to expect: the posterior weighs the classifier by its probability of ``y``
(well below 1 on hard inputs, even when its argmax is right) and a correct human by about
1, so without a workload floor on the classifier the gating defers most samples (digits:
coverage ~0.06) and the system is about as accurate as routing among the humans.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from core.spec import MISSING
from methods import METHODS
from methods.common import MethodBase, Networks, mean_cross_entropy, require_experts
from methods.nets import Network
from methods.projection import constrain_posterior
from methods.surrogates import cross_entropy as soft_cross_entropy


def em_posterior(class_logits, gate_logits, y, t, policy: str, label_noise: float):
    """Unconstrained E-step posterior ``q(z)`` (B, E+1) (no gradient flows through it)."""
    class_logits, gate_logits = jax.lax.stop_gradient((class_logits, gate_logits))
    num_classes = class_logits.shape[-1]
    log_hit = jnp.log((1.0 - label_noise) + label_noise / num_classes)
    log_miss = jnp.log(label_noise / num_classes)
    human = jnp.where(t == y[:, None], log_hit, log_miss)
    if policy == "mask":
        human = jnp.where(t == MISSING, -jnp.inf, human)
    p_y = jnp.take_along_axis(jax.nn.softmax(class_logits, axis=-1), y[:, None], axis=-1)
    machine = jnp.log((1.0 - label_noise) * p_y + label_noise / num_classes)
    log_lik = jnp.concatenate([human, machine], axis=-1)
    return jax.nn.softmax(jax.nn.log_softmax(gate_logits, axis=-1) + log_lik, axis=-1)


@METHODS.register("l2d_em")
@dataclasses.dataclass(frozen=True)
class L2DEM(MethodBase):
    workload_in_training = True
    missing_policies = ("as_incorrect", "mask")
    missing_policy: str = "as_incorrect"
    label_noise: float = 1e-3  # the ``a`` of p(y | c)

    def init_model(self, spec, rngs):
        require_experts(self.name, spec.num_experts)
        channels = spec.input_shape[-1]
        return Networks(
            classifier=Network(spec.backbone, channels, spec.num_classes, rngs=rngs),
            gating=Network(spec.backbone, channels, spec.num_experts + 1, rngs=rngs),
        )

    def gating_target(self, class_logits, gate_logits, batch, inputs):
        """Workload-constrained posterior ``q'(z)`` (B, E+1) and the solver's violation."""
        q = em_posterior(class_logits, gate_logits, batch.y, batch.t, self.missing_policy,
                         self.label_noise)
        q_new, info = constrain_posterior(q, *inputs.bounds)
        return jax.lax.stop_gradient(q_new), info["violation"]

    def loss(self, model, batch, inputs):
        class_logits, gate_logits = model.classifier(batch.x), model.gating(batch.x)
        target, violation = self.gating_target(class_logits, gate_logits, batch, inputs)
        classifier = mean_cross_entropy(class_logits, batch.y)
        gating = soft_cross_entropy(gate_logits, target).mean()
        metrics = {"classifier_ce": classifier, "gating_ce": gating, "target_violation": violation,
                   "target_coverage": target[:, -1].mean()}
        return classifier + gating, metrics

    def classify(self, model, x):
        return model.classifier(x)

    def agent_scores(self, model, x):
        return jax.nn.softmax(model.gating(x), axis=-1)
