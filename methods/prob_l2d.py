"""``prob_l2d``: Probabilistic L2D (Nguyen, Do & Carneiro, ICLR 2025).

Model per sample: a gating network ``p(z | x)`` over the E+1 agents, one annotator model
``p(t_j | x)`` per human (it imitates expert j and fills in missing labels) and the
classifier ``p(t_E | x)``; ``p(y | t, z = k) = Cat(y; (1-a) onehot(t_k) + a/K)``.
Each train step is one EM iteration on the batch: the E-step (``estep``: exact,
meanfield or reference; ``methods/estep.py``) gives ``q(z)`` and ``q(t)``, the workload
constraint projects ``q(z)`` onto the bounds (``methods.projection.constrain_posterior``)
and the M-step takes one optimiser step on
``CE(gating, q'(z)) + sum_j CE(annotator_j, q(t_j)) + CE(classifier, y)``.

``networks``: ``shared`` (default: one backbone with a gating head and E+1 class heads,
about E+2 times cheaper; the compute the baselines get) or ``separate`` (the reference:
independent networks for the gating, every annotator and the classifier, evaluated together).

``train_with_workload``: True (default, the paper's method) constrains ``q(z)`` to the
workload bounds in every E-step, so the model is trained once per workload; False trains
it once with a free E-step and leaves the bounds to the evaluator's post-hoc assignment
(``method=prob_l2d_posthoc``), which measures what training-time constraints add.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from core.compile import jit
from core.spec import TaskSpec
from methods import METHODS
from methods.common import MethodBase, MethodConfigError
from methods.estep import ESTEP_KINDS, estep
from methods.fused_estep import fused_exact_constrained
from methods.nets import BACKBONES, Network, NetworkStack
from methods.projection import NUM_ITERS, PROJECTION_LOOPS, constrain_posterior

NETWORKS = ("separate", "shared")
PROJECTIONS = ("auto", *PROJECTION_LOOPS, "fused")
DIAGNOSTIC_REPEATS = 20


class SeparateNets(nnx.Module):
    """Gating network + a stack of E annotator models and the classifier (index E)."""

    def __init__(self, spec: TaskSpec, rngs: nnx.Rngs):
        channels = spec.input_shape[-1]
        self.gating = Network(spec.backbone, channels, spec.num_agents, rngs=rngs)
        self.agents = NetworkStack(spec.num_agents, spec.backbone, channels, spec.num_classes, rngs=rngs)

    def __call__(self, x):
        return self.gating(x), jnp.swapaxes(self.agents(x), 0, 1)  # (B, A), (B, A, K)


class SharedNets(nnx.Module):
    """One backbone with a gating head and E+1 class heads."""

    def __init__(self, spec: TaskSpec, rngs: nnx.Rngs):
        self.backbone = BACKBONES.get(spec.backbone)(spec.input_shape[-1], rngs=rngs)
        self.gating = nnx.Linear(self.backbone.features, spec.num_agents, rngs=rngs)
        self.agents = nnx.Linear(self.backbone.features, spec.num_agents * spec.num_classes, rngs=rngs)
        self.shape = (spec.num_agents, spec.num_classes)

    def __call__(self, x):
        features = self.backbone(x)
        return self.gating(features), self.agents(features).reshape(x.shape[0], *self.shape)


@functools.partial(jit, static_argnums=0)
def _constrained_estep(method, gating_logits, agent_logits, batch, inputs):
    """``q'(z)`` of ``method.posterior`` as one jitted program (timed by ``diagnostics``)."""
    return method.posterior(gating_logits, agent_logits, batch, inputs)[0]


@METHODS.register("prob_l2d")
@dataclasses.dataclass(frozen=True)
class ProbL2D(MethodBase):
    missing_policies = ()  # missing labels are latent variables, inferred by the E-step

    num_experts: int = 0
    num_classes: int = 0
    estep: str = "exact"
    estep_iters: int = 10  # fixed-point iterations of the meanfield / reference E-steps
    label_noise: float = 1e-3
    networks: str = "shared"  # shared backbone + heads (the baselines' compute); separate: the reference's
    solver_iters: int = NUM_ITERS  # most iterations of the workload projection (methods.projection)
    # auto: the backend's loop (early exit on CPU, fixed elsewhere); fixed / early_exit; fused:
    # exact E-step + projection as one Pallas kernel (methods.fused_estep; opt-in, not yet
    # measured on a GPU; interpret mode, slow, off GPUs)
    projection: str = "auto"
    train_with_workload: bool = True  # False: free E-step; the bounds act only at test time

    @property
    def workload_in_training(self) -> bool:  # the contract's flag, set by an option here
        return self.train_with_workload

    def __post_init__(self):
        super().__post_init__()
        if self.estep not in ESTEP_KINDS:
            raise MethodConfigError(f"prob_l2d: estep={self.estep!r} is not one of {', '.join(ESTEP_KINDS)}.")
        if self.networks not in NETWORKS:
            raise MethodConfigError(f"prob_l2d: networks={self.networks!r} is not one of {', '.join(NETWORKS)}.")
        if self.projection not in PROJECTIONS:
            raise MethodConfigError(f"prob_l2d: projection={self.projection!r} is not one of "
                                    f"{', '.join(PROJECTIONS)}.")
        if self.projection == "fused" and self.estep != "exact":
            raise MethodConfigError(f"prob_l2d: projection=fused fuses the exact E-step; with "
                                    f"estep={self.estep!r} use projection=auto, fixed or early_exit.")

    def init_model(self, spec: TaskSpec, rngs):
        return (SeparateNets if self.networks == "separate" else SharedNets)(spec, rngs)

    def posterior(self, gating_logits, agent_logits, batch, inputs):
        """E-step + workload constraint: ``(q'(z), q(t), solver info)``, no gradient."""
        log_p_z = jax.nn.log_softmax(jax.lax.stop_gradient(gating_logits))
        log_p_t = jax.nn.log_softmax(jax.lax.stop_gradient(agent_logits))
        if self.projection == "fused" and self.train_with_workload:
            q_z, q_t, info = fused_exact_constrained(log_p_z, log_p_t, batch.y, batch.t, *inputs.bounds,
                                                     label_noise=self.label_noise,
                                                     num_iters=self.solver_iters)
            return jax.lax.stop_gradient(q_z), jax.lax.stop_gradient(q_t), info
        q_z, q_t = estep(self.estep, log_p_z, log_p_t, batch.y, batch.t,
                         label_noise=self.label_noise, num_iters=self.estep_iters)
        if not self.train_with_workload:
            return jax.lax.stop_gradient(q_z), jax.lax.stop_gradient(q_t), {"violation": jnp.float32(0.0)}
        q_z, info = constrain_posterior(q_z, *inputs.bounds, num_iters=self.solver_iters,
                                        loop=self.projection)
        return jax.lax.stop_gradient(q_z), jax.lax.stop_gradient(q_t), info

    def loss(self, model, batch, inputs):
        gating_logits, agent_logits = model(batch.x)
        q_z, q_t, info = self.posterior(gating_logits, agent_logits, batch, inputs)
        gating = optax.softmax_cross_entropy(gating_logits, q_z).mean()
        annotators = optax.softmax_cross_entropy(
            agent_logits[:, : self.num_experts], q_t[:, : self.num_experts]
        ).sum(axis=1).mean()
        classifier = optax.softmax_cross_entropy_with_integer_labels(
            agent_logits[:, self.num_experts], batch.y
        ).mean()
        metrics = {"gating_loss": gating, "annotator_loss": annotators,
                   "classifier_loss": classifier, "workload_violation": info["violation"]}
        return gating + annotators + classifier, metrics

    def classify(self, model, x):
        return model(x)[1][:, self.num_experts]

    def agent_scores(self, model, x):
        """The gating distribution ``p(z = k | x)`` (probabilities, as the contract asks)."""
        return jax.nn.softmax(model(x)[0], axis=-1)

    def diagnostics(self, model, batch, inputs):
        """``estep_ms``: median time of one jitted E-step + workload projection on ``batch``
        (network outputs computed beforehand; compilation excluded)."""
        gating_logits, agent_logits = model(batch.x)
        args = (self, gating_logits, agent_logits, batch, inputs)
        jax.block_until_ready(_constrained_estep(*args))  # compiled once per method and shape
        times = []
        for _ in range(DIAGNOSTIC_REPEATS):
            start = time.perf_counter()
            jax.block_until_ready(_constrained_estep(*args))
            times.append(time.perf_counter() - start)
        return {"estep_ms": 1000.0 * float(np.median(times))}

    def impute(self, model, batch, inputs):
        """Posterior ``q(t_j)`` of every human's label given x, y and the observed labels."""
        gating_logits, agent_logits = model(batch.x)
        _, q_t, _ = self.posterior(gating_logits, agent_logits, batch, inputs)
        return q_t[:, : self.num_experts]
