"""``classifier_only``: the classifier answers every sample (a reference row).

Trained by cross-entropy on the ground truth; expert annotations are ignored. Under a
workload preset that forces deferral, its least confident samples go to the humans.
"""

from __future__ import annotations

import dataclasses

from benchmark.spec import TaskSpec
from methods import METHODS
from methods.common import MethodBase, classifier_confidence_scores, cross_entropy
from methods.nets import Network


@METHODS.register("classifier_only")
@dataclasses.dataclass(frozen=True)
class ClassifierOnly(MethodBase):
    name = "classifier_only"
    role = "reference"
    num_experts: int = 0

    def init_model(self, spec: TaskSpec, rngs):
        return Network(spec.backbone, spec.input_shape[-1], spec.num_classes, rngs=rngs)

    def loss(self, model, batch, inputs):
        loss = cross_entropy(model(batch.x), batch.y)
        return loss, {}

    def classify(self, model, x):
        return model(x)

    def agent_scores(self, model, x):
        return classifier_confidence_scores(model(x), self.num_experts)
