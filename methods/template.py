"""Template for a new L2D method: copy to ``methods/<name>.py``, rename the class and
uncomment ``@METHODS.register``. That one file is the whole method: its registered name and
its dataclass fields (with their defaults) become the Hydra config ``method=<name>``
(``./run.sh --cfg job method=<name>`` shows it; ``method.params.<field>=...`` sets a field).

The runner imports every module in ``methods/`` (this template is skipped), so a
registered method appears in every sweep (``method=glob(*)``) and report. A method kept
outside this repository joins too when its module is named in ``L2D_METHODS``.
The contract, with the default of every optional member, is ``core/spec.py``; the
shared trainer (``benchmark/training.py``) owns the optimiser and loop, and the evaluator
turns your ``agent_scores`` into decisions, so every method is scored the same way.
Agents are ``0..E-1`` (humans) then ``E`` (the classifier).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from core.spec import Batch, TaskSpec, TrainInputs
from methods import METHODS  # noqa: F401 (used once the decorator below is uncommented)
from methods.common import MethodBase
from methods.nets import Network


# @METHODS.register("my_method")   # <- uncomment with your method's name
@dataclasses.dataclass(frozen=True)  # frozen + hashable: passed to jax.jit as a static argument
class MyMethod(MethodBase):
    # The registry sets `name`. Class attributes to change only where the default in
    # MethodBase does not fit (meaning in core/spec.py): trains, workload_in_training,
    # missing_policies, training_problem.
    missing_policies = ("as_incorrect", "drop")  # accepted values of `missing_policy`

    # Options: fields with defaults (typed: Hydra checks overrides against these types).
    # `num_experts` / `num_classes`, if declared, are filled in from the task by the runner.
    num_experts: int = 0
    num_classes: int = 0
    missing_policy: str = "as_incorrect"

    def init_model(self, spec: TaskSpec, rngs):
        """Build every network of the method (an nnx.Module) from `nnx.Rngs`."""
        return Network(spec.backbone, spec.input_shape[-1], spec.num_classes + spec.num_experts, rngs=rngs)

    def loss(self, model, batch: Batch, inputs: TrainInputs):
        """(scalar loss, dict of scalar metrics); pure and jittable.

        batch.x (B,H,W,C), batch.y (B,), batch.t (B,E) with -1 for a missing annotation;
        inputs.progress in [0, 1]; inputs.bounds -> (lo, hi) (E+1,) if workload_in_training.
        """
        logits = model(batch.x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, : self.num_classes], batch.y).mean()
        return loss, {"classifier_ce": loss}

    def classify(self, model, x):
        """(B, K) class logits."""
        return model(x)[:, : self.num_classes]

    def agent_scores(self, model, x):
        """(B, E+1) probabilities in [0, 1], higher = better agent; experts first, classifier last."""
        probs = jax.nn.softmax(model(x), axis=-1)
        experts = probs[:, self.num_classes :]
        classifier = probs[:, : self.num_classes].max(axis=-1, keepdims=True)
        return jnp.concatenate([experts, classifier], axis=-1)

    # Optional hooks (defaults in MethodBase): prepare(model, train_split) before training;
    # impute(model, batch, inputs) -> (B, E, K) inferred expert labels (scores imputation);
    # diagnostics(...) -> extra run metrics. A reference row (oracle, random, ...) subclasses
    # ReferenceRowBase instead and may state its test-time rule in reference_scores(...).
