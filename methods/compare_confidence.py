"""``compare_confidence``: compare classifier and expert confidences (Raghu et al., 2019).

A classifier trained by cross-entropy on ``y`` and a correctness network with E sigmoid
outputs ``P(t_j = y | x)`` trained by BCE (``correctness_loss``); each sample goes to the
agent with the highest confidence (classifier: its max softmax probability). Missing
policies: "mask" (default: each correctness model learns from its observed labels only),
"as_incorrect", "drop". "impute" is left to ``impute_then_defer``.
"""

from __future__ import annotations

import dataclasses

from methods import METHODS
from methods.common import MethodBase, Networks, mean_cross_entropy, require_experts
from methods.nets import Network
from methods.surrogates import correctness_loss, deferral_scores_correctness


@METHODS.register("compare_confidence")
@dataclasses.dataclass(frozen=True)
class CompareConfidence(MethodBase):
    missing_policies = ("mask", "as_incorrect", "drop")
    missing_policy: str = "mask"

    def init_model(self, spec, rngs):
        require_experts(self.name, spec.num_experts)
        channels = spec.input_shape[-1]
        return Networks(
            classifier=Network(spec.backbone, channels, spec.num_classes, rngs=rngs),
            correctness=Network(spec.backbone, channels, spec.num_experts, rngs=rngs),
        )

    def loss(self, model, batch, inputs):
        classifier = mean_cross_entropy(model.classifier(batch.x), batch.y)
        correct = correctness_loss(model.correctness(batch.x), batch.y, batch.t, self.missing_policy)
        return classifier + correct, {"classifier_ce": classifier, "correctness_bce": correct}

    def classify(self, model, x):
        return model.classifier(x)

    def agent_scores(self, model, x):
        return deferral_scores_correctness(model.classifier(x), model.correctness(x))
