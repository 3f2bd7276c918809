"""``random``: random deferral of an exact share of the samples (a reference row).

The classifier is trained by cross-entropy exactly as in ``classifier_only`` (same
initialisation for the same seed). Deferral is random: over an evaluation split of N
samples, exactly ``round(coverage * N)`` samples, drawn at random, go to the classifier
under argmax decisions and the others to a human drawn at random. Every score is a random
draw, independent of whether an agent is right, so a workload-constrained assignment
(which maximises the sum of scores) is random too: under a coverage target c it sends a
random ``round(c N)`` samples to the classifier and the rest to random humans within their
bounds, whatever ``coverage`` says (``experiment=coverage`` compares it so, at every
target). Every draw is a function of the run's seed and of the sample's pixels, so
predictions are reproducible and independent of batching and of the order of the samples.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from core.spec import target_count
from methods import METHODS
from methods.common import (
    CE_CLASSIFIER,
    Constant,
    MethodConfigError,
    Networks,
    ReferenceRowBase,
    mean_cross_entropy,
    require_experts,
    sample_uniform,
)
from methods.nets import Network


@METHODS.register("random")
@dataclasses.dataclass(frozen=True)
class RandomDeferral(ReferenceRowBase):
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
        return mean_cross_entropy(model.classifier(batch.x), batch.y), {}

    def classify(self, model, x):
        return model.classifier(x)

    def agent_scores(self, model, x):
        """Per sample: E uniform human scores in [0, 0.5) and the classifier's draw in [0, 1)
        (``reference_scores`` turns the draws into an exact share)."""
        key = jax.random.key(model.seed[...])
        humans = jnp.stack([sample_uniform(x, jax.random.fold_in(key, j + 1))
                            for j in range(self.num_experts)], axis=1)
        return jnp.concatenate([0.5 * humans, sample_uniform(x, key)[:, None]], axis=1)

    def reference_scores(self, logits, scores, y, t):
        """The ``round(coverage * N)`` samples with the smallest classifier draws score
        ``1 - draw / 2`` (in (0.5, 1], above every human), the others 0: the order among
        them stays random, so any capacity on the classifier keeps a random subset."""
        scores = np.array(scores, dtype=np.float64)
        chosen = np.argsort(scores[:, -1], kind="stable")[: target_count(self.coverage, len(scores))]
        draws = scores[chosen, -1]
        scores[:, -1] = 0.0
        scores[chosen, -1] = 1.0 - 0.5 * draws
        return scores
