"""``classifier_only``: the classifier answers every sample (a reference row).

Trained by cross-entropy on the ground truth; expert annotations are ignored. Scores: the
classifier its max-probability (plus an order-independent tie-break of at most 1e-5 from
the sample's pixels), each human ``1e-3 x`` its accuracy on its observed training labels
(with the same kind of tie-break per sample and human).
So when a workload forces deferral, the least confident samples go to the humans, the most
accurate human first: a stated rule, not the solver's tie-breaking.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from core.spec import TaskSpec
from methods import METHODS
from methods.common import (
    CE_CLASSIFIER,
    TIE_BREAK_SCALE,
    Constant,
    Networks,
    ReferenceRowBase,
    expert_accuracies,
    human_scores,
    mean_cross_entropy,
    sample_uniform,
)
from methods.nets import Network

HUMAN_SCALE = 1e-3  # humans' scores: their training accuracy, scaled below any confidence gap


@METHODS.register("classifier_only")
@dataclasses.dataclass(frozen=True)
class ClassifierOnly(ReferenceRowBase):
    training_problem = CE_CLASSIFIER  # the same trained classifier as the other reference rows
    num_experts: int = 0

    def init_model(self, spec: TaskSpec, rngs):
        classifier = Network(spec.backbone, spec.input_shape[-1], spec.num_classes, rngs=rngs)
        return Networks(classifier=classifier,
                        expert_accuracy=Constant(jnp.zeros((spec.num_experts,), jnp.float32)))

    def prepare(self, model, train_split):
        """Store each expert's accuracy on its observed training labels (the tie-break rule)."""
        accuracy = expert_accuracies(np.asarray(train_split.y), np.asarray(train_split.t))
        model.expert_accuracy[...] = jnp.asarray(accuracy, jnp.float32)

    def loss(self, model, batch, inputs):
        return mean_cross_entropy(model.classifier(batch.x), batch.y), {}

    def classify(self, model, x):
        return model.classifier(x)

    def agent_scores(self, model, x):
        confidence = jax.nn.softmax(model.classifier(x), axis=-1).max(axis=-1)
        classifier = (1.0 - TIE_BREAK_SCALE) * confidence + TIE_BREAK_SCALE * sample_uniform(x)
        return jnp.concatenate([human_scores(HUMAN_SCALE * model.expert_accuracy[...], x),
                                classifier[:, None]], axis=1)
