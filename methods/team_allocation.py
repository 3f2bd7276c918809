"""``team_allocation``: a classifier and an allocation network trained together on the
team's prediction (Hemmer, Schellhammer, Vössing, Jakubik & Satzger, IJCAI 2022, "Forming
Effective Human-AI Teams: Building Machine Learning Models that Complement the
Capabilities of Multiple Experts").

The team's prediction mixes its members' answers with the allocation weights
``w = softmax(a(x))`` over the E+1 agents: ``P(y | x) = sum_j w_j onehot(t_j)[y] +
w_E softmax(f(x))[y]``. Loss: ``-log P(y | x)``, end to end, so the classifier learns
where the humans are wrong and the allocation where each member is right. Decisions: the
agent of highest weight; scores are the weights.

Missing annotations: ``mask`` (default; a missing expert leaves the team for that sample:
the weights are renormalised over the members who answered), ``as_incorrect`` (a missing
answer puts no mass on y), ``drop`` (fully annotated samples only).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from methods import METHODS
from methods.common import MethodBase, Networks, require_experts
from methods.missing_policy import resolve_annotations, weighted_row_mean
from methods.nets import Network

TINY = 1e-12  # floor of P(y | x) inside the log


def team_loss(allocation_logits, class_logits, y, t, policy: str):
    """Mean over kept rows of ``-log sum_k w_k p_k(y)``; allocation_logits (B, E+1),
    class_logits (B, K), members outside the team of a row (policy "mask") get no weight."""
    t_filled, term_mask, row_weight = resolve_annotations(t, policy)
    members = jnp.concatenate([term_mask, jnp.ones((t.shape[0], 1), bool)], axis=1)
    log_w = jax.nn.log_softmax(jnp.where(members, allocation_logits, -jnp.inf), axis=-1)
    humans_right = (t_filled == y[:, None]).astype(jnp.float32)
    classifier_p_y = jnp.take_along_axis(jax.nn.softmax(class_logits, axis=-1), y[:, None], axis=1)
    p_y = jnp.concatenate([humans_right, classifier_p_y], axis=1)
    team = jnp.sum(jnp.where(members, jnp.exp(log_w) * p_y, 0.0), axis=1)
    return weighted_row_mean(-jnp.log(jnp.maximum(team, TINY)), row_weight)


@METHODS.register("team_allocation")
@dataclasses.dataclass(frozen=True)
class TeamAllocation(MethodBase):
    missing_policies = ("mask", "as_incorrect", "drop")
    missing_policy: str = "mask"
    num_experts: int = 0

    def init_model(self, spec, rngs):
        require_experts(self.name, spec.num_experts)
        channels = spec.input_shape[-1]
        return Networks(classifier=Network(spec.backbone, channels, spec.num_classes, rngs=rngs),
                        allocation=Network(spec.backbone, channels, spec.num_agents, rngs=rngs))

    def loss(self, model, batch, inputs):
        loss = team_loss(model.allocation(batch.x), model.classifier(batch.x), batch.y, batch.t,
                         self.missing_policy)
        return loss, {"team_nll": loss}

    def classify(self, model, x):
        return model.classifier(x)

    def agent_scores(self, model, x):
        return jax.nn.softmax(model.allocation(x), axis=-1)
