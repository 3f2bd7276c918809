"""``oracle``: correct whenever some agent is correct (a reference row; sees test labels).

The classifier is trained by cross-entropy as in ``classifier_only``. At test time
``reference_scores`` scores the classifier 1 if its argmax is right, a correct expert
``1 - TIE_BREAK`` and a wrong agent 0: among correct agents the classifier is preferred, so the oracle's coverage is
the largest that still attains its accuracy (it defers only when it must). Ties among
humans go to the lowest index.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from methods import METHODS
from methods.common import CE_CLASSIFIER, Networks, ReferenceRowBase, classifier_confidence_scores, mean_cross_entropy
from methods.nets import Network

TIE_BREAK = 1e-3


@METHODS.register("oracle")
@dataclasses.dataclass(frozen=True)
class Oracle(ReferenceRowBase):
    training_problem = CE_CLASSIFIER  # the same trained classifier as the other reference rows
    sees_test_labels = True
    num_experts: int = 0

    def init_model(self, spec, rngs):
        return Networks(classifier=Network(spec.backbone, spec.input_shape[-1], spec.num_classes,
                                           rngs=rngs))

    def loss(self, model, batch, inputs):
        return mean_cross_entropy(model.classifier(batch.x), batch.y), {}

    def classify(self, model, x):
        return model.classifier(x)

    def agent_scores(self, model, x):
        return classifier_confidence_scores(model.classifier(x), self.num_experts)

    def reference_scores(self, logits, scores, y, t):
        """(N, E+1) numpy: classifier 1 if correct, expert ``1 - TIE_BREAK`` if correct, else 0."""
        y = np.asarray(y)
        correct = np.concatenate(
            [np.asarray(t) == y[:, None], (np.asarray(logits).argmax(axis=1) == y)[:, None]], axis=1
        ).astype(np.float64)
        correct[:, :-1] *= 1.0 - TIE_BREAK
        return correct
