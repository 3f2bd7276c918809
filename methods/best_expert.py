"""``best_expert``: the single most accurate human answers every sample (a reference row).

Nothing is trained. ``prepare`` picks the expert with the highest training accuracy and
stores its index in the model; agent scores are one-hot on that expert. Accuracy is
measured on each expert's observed labels ("mask", default) or over all samples with a
missing label counted as wrong ("as_incorrect"). The classifier is unused: its logits are
uniform (zeros), so its reported classifier metrics are those of a constant guess.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmark.spec import MISSING
from methods import METHODS
from methods.common import Constant, MethodBase, Networks, require_experts


def expert_accuracies(y: np.ndarray, t: np.ndarray, policy: str) -> np.ndarray:
    """(E,) training accuracy of each expert under ``policy`` ("mask" or "as_incorrect")."""
    correct = (t == y[:, None]).sum(axis=0)
    seen = (t != MISSING).sum(axis=0) if policy == "mask" else np.full(t.shape[1], len(y))
    return correct / np.maximum(seen, 1)


@METHODS.register("best_expert")
@dataclasses.dataclass(frozen=True)
class BestExpert(MethodBase):
    name = "best_expert"
    role = "reference"
    trains = False
    missing_policies = ("mask", "as_incorrect")
    missing_policy: str = "mask"
    num_experts: int = 0
    num_classes: int = 0

    def init_model(self, spec, rngs):
        require_experts(self.name, spec.num_experts)
        return Networks(expert=Constant(jnp.zeros((), jnp.int32)))

    def prepare(self, model, train_split):
        """Store the index of the most accurate expert on ``train_split`` (y, t) in ``model``."""
        accuracy = expert_accuracies(np.asarray(train_split.y), np.asarray(train_split.t),
                                     self.missing_policy)
        model.expert[...] = jnp.int32(np.argmax(accuracy))

    def loss(self, model, batch, inputs):
        return jnp.float32(0.0), {}

    def classify(self, model, x):
        return jnp.zeros((x.shape[0], self.num_classes), jnp.float32)

    def agent_scores(self, model, x):
        choice = jnp.broadcast_to(model.expert[...], (x.shape[0],))
        return jax.nn.one_hot(choice, self.num_experts + 1)
