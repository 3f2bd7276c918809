"""``two_stage``: two-stage deferral to multiple experts (Mao, Mohri, Mohri & Zhong,
NeurIPS 2023, "Two-Stage Learning to Defer with Multiple Experts").

Stage one: a classifier trained by cross-entropy on ``y``; its training never sees the
deferral loss. Stage two: a rejector ``r`` with E+1 outputs (the E experts, then the
classifier) learned for the classifier as it is, under ``stop_gradient``: each agent k has
a cost ``c_k = 1[agent k is wrong]`` (the classifier's from its own argmax), and the
rejector minimises the paper's score-based two-stage surrogate with the logistic loss,

    sum_k tau_k(x, y) * (-log softmax(r(x))_k),   tau_k = sum_{i != k} c_i,

so an agent gains weight by the costs of the others: the only correct agent is pulled up
by every wrong one, and a sample every agent gets right (or wrong) teaches nothing. The
rejector starts after ``first_stage_fraction`` of the training steps (the classifier is
trained by then; it goes on being trained by cross-entropy alone). Decisions: the agent
of highest ``softmax(r(x))``; scores are those probabilities.

Missing annotations: ``mask`` (default; a missing expert leaves the rejector's softmax and
the other agents' weights for that sample), ``as_incorrect`` (a missing answer costs 1),
``drop`` (rejector trained on fully annotated samples only).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from methods import METHODS
from methods.common import ClassifierThenStage, Networks, require_experts
from methods.missing_policy import resolve_annotations, weighted_row_mean
from methods.nets import Network


def two_stage_surrogate(rejector_logits, class_logits, y, t, policy: str, expert_cost=None):
    """Mean over kept rows of ``sum_k tau_k CE_k``, ``tau_k = sum_{i != k} c_i`` over the
    agents available for the row; rejector_logits (B, E+1), class_logits (B, K).
    ``expert_cost`` (E,) adds each expert's consultation cost to its ``c_j`` (cost-sensitive
    form; none: 0)."""
    t_filled, term_mask, row_weight = resolve_annotations(t, policy)
    classifier_wrong = jnp.argmax(jax.lax.stop_gradient(class_logits), axis=-1) != y
    cost = jnp.concatenate([t_filled != y[:, None], classifier_wrong[:, None]], axis=1)
    available = jnp.concatenate([term_mask, jnp.ones_like(classifier_wrong)[:, None]], axis=1)
    if expert_cost:
        cost = cost + jnp.asarray((*expert_cost, 0.0), jnp.float32)
    cost = jnp.where(available, cost, 0).astype(jnp.float32)
    tau = jnp.where(available, cost.sum(axis=1, keepdims=True) - cost, 0.0)
    logits = jnp.where(available, rejector_logits, -jnp.inf)
    neg_log_softmax = -jnp.where(available, jax.nn.log_softmax(logits, axis=-1), 0.0)
    return weighted_row_mean(jnp.sum(tau * neg_log_softmax, axis=1), row_weight)


@METHODS.register("two_stage")
@dataclasses.dataclass(frozen=True)
class TwoStage(ClassifierThenStage):
    missing_policies = ("mask", "as_incorrect", "drop")
    stage_metric = "rejector_surrogate"
    missing_policy: str = "mask"
    num_experts: int = 0

    def init_model(self, spec, rngs):
        require_experts(self.name, spec.num_experts)
        channels = spec.input_shape[-1]
        return Networks(classifier=Network(spec.backbone, channels, spec.num_classes, rngs=rngs),
                        rejector=Network(spec.backbone, channels, spec.num_agents, rngs=rngs))

    def stage_loss(self, model, batch, class_logits):
        return two_stage_surrogate(model.rejector(batch.x), class_logits, batch.y, batch.t,
                                   self.missing_policy)

    def agent_scores(self, model, x):
        return jax.nn.softmax(model.rejector(x), axis=-1)
