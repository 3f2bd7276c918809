"""``best_expert``: the single most accurate human answers every sample (a reference row).

Nothing is trained. ``prepare`` stores each expert's training accuracy, measured on its
observed labels ("mask", default) or over all samples with a missing label counted as
wrong ("as_incorrect"). Scores: each human its accuracy (plus an order-independent
tie-break of at most 1e-5 from the sample's pixels), the classifier 0, so the best expert
answers everything, and when a workload caps it the next most accurate humans take the
rest (samples chosen by the tie-break): a stated rule, not the solver's. The classifier
is unused: its logits are uniform (zeros), so its classifier metrics are a constant guess's.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from methods import METHODS
from methods.common import Constant, Networks, ReferenceRowBase, expert_accuracies, human_scores, require_experts


@METHODS.register("best_expert")
@dataclasses.dataclass(frozen=True)
class BestExpert(ReferenceRowBase):
    trains = False
    missing_policies = ("mask", "as_incorrect")
    missing_policy: str = "mask"
    num_experts: int = 0
    num_classes: int = 0

    def init_model(self, spec, rngs):
        require_experts(self.name, spec.num_experts)
        return Networks(accuracy=Constant(jnp.zeros((spec.num_experts,), jnp.float32)))

    def prepare(self, model, train_split):
        """Store every expert's accuracy on ``train_split`` (y, t) in ``model``."""
        accuracy = expert_accuracies(np.asarray(train_split.y), np.asarray(train_split.t),
                                     self.missing_policy)
        model.accuracy[...] = jnp.asarray(accuracy, jnp.float32)

    def loss(self, model, batch, inputs):
        return jnp.float32(0.0), {}

    def classify(self, model, x):
        return jnp.zeros((x.shape[0], self.num_classes), jnp.float32)

    def agent_scores(self, model, x):
        return jnp.concatenate([human_scores(model.accuracy[...], x), jnp.zeros((x.shape[0], 1))],
                               axis=1)
