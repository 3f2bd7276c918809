"""``random``: random deferral at a fixed coverage (a reference row).

The classifier is trained by cross-entropy exactly as in ``classifier_only`` (same
initialisation for the same seed, so the two rows share their classifier); only the
deferral is random: each sample goes to the classifier with probability ``coverage``
(default 0.5; set it to a learned method's coverage for a matched comparison), otherwise
to a uniformly drawn human. The draw is a deterministic function of the run's seed and of
the sample's pixels (a hash of ``x`` folded into a PRNG key kept in the model), so
predictions are reproducible and independent of batching.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from methods import METHODS
from methods.common import (Constant, MethodBase, MethodConfigError, Networks, cross_entropy,
                            require_experts)
from methods.nets import Network


def hash_rows(x: jax.Array) -> jax.Array:
    """(B,) uint32 hash of each row's bytes (a fixed random linear form, wrapping mod 2^32)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(x.shape[0], -1)
    weights = np.random.default_rng(0).integers(0, 2**31, bits.shape[1], dtype=np.uint32) * 2 + 1
    return jnp.sum(bits * jnp.asarray(weights, jnp.uint32), axis=1, dtype=jnp.uint32)


@METHODS.register("random")
@dataclasses.dataclass(frozen=True)
class RandomDeferral(MethodBase):
    name = "random"
    role = "reference"
    num_experts: int = 0
    coverage: float = 0.5  # probability that a sample goes to the classifier

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
        key = jax.random.key(model.seed[...])
        draws = jax.vmap(lambda h: jax.random.uniform(jax.random.fold_in(key, h), (2,)))(hash_rows(x))
        human = jnp.minimum(jnp.floor(draws[:, 1] * self.num_experts), self.num_experts - 1)
        agent = jnp.where(draws[:, 0] < self.coverage, self.num_experts, human.astype(jnp.int32))
        return jax.nn.one_hot(agent, self.num_experts + 1)
