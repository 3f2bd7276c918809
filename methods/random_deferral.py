"""``random``: random deferral of an exact share of the samples (a reference row).

The classifier is trained by cross-entropy exactly as in ``classifier_only`` (same
initialisation for the same seed). Deferral is random: over an evaluation split of N
samples, exactly ``round(coverage * N)`` samples, drawn at random, go to the classifier
(score 1) and the others to a human drawn at random (each human's score is an independent
uniform draw below 1, so a workload-constrained assignment, which maximises the sum of
scores, still picks humans at random within the bounds). Every draw is a function of the
run's seed and of the sample's pixels, so predictions are reproducible and independent of
batching and of the order of the samples. To compare with a learned method at its
coverage, set ``method.params.coverage`` to it (the coverage sweep does so over a grid).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from methods import METHODS
from methods.common import (CE_CLASSIFIER, Constant, MethodBase, MethodConfigError, Networks,
                            cross_entropy, require_experts, sample_uniform)
from methods.nets import Network


@METHODS.register("random")
@dataclasses.dataclass(frozen=True)
class RandomDeferral(MethodBase):
    name = "random"
    role = "reference"
    training_problem = CE_CLASSIFIER  # the same trained classifier as the other reference rows
    num_experts: int = 0
    coverage: float = 0.5  # share of the samples that goes to the classifier

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.coverage <= 1.0:
            raise MethodConfigError(f"method 'random': coverage must be in [0, 1], got {self.coverage}.")

    def init_model(self, spec, rngs):
        require_experts(self.name, spec.num_experts)
        classifier = Network(spec.backbone, spec.input_shape[-1], spec.num_classes, rngs=rngs)
        seed = jax.random.randint(rngs.default(), (), 0, jnp.iinfo(jnp.int32).max)
        return Networks(classifier=classifier, seed=Constant(seed))

    def loss(self, model, batch, inputs):
        return cross_entropy(model.classifier(batch.x), batch.y), {}

    def classify(self, model, x):
        return model.classifier(x)

    def agent_scores(self, model, x):
        """Per sample: E uniform human scores in [0, 0.5) and the classifier's draw in [0, 1)
        (``finalize_scores`` turns the draws into an exact share)."""
        key = jax.random.key(model.seed[...])
        humans = jnp.stack([sample_uniform(x, jax.random.fold_in(key, j + 1))
                            for j in range(self.num_experts)], axis=1)
        return jnp.concatenate([0.5 * humans, sample_uniform(x, key)[:, None]], axis=1)

    def finalize_scores(self, scores):
        """The ``round(coverage * N)`` samples with the smallest draws go to the classifier."""
        scores = np.array(scores, dtype=np.float64)
        chosen = np.argsort(scores[:, -1], kind="stable")[: int(round(self.coverage * len(scores)))]
        scores[:, -1] = 0.0
        scores[chosen, -1] = 1.0
        return scores
