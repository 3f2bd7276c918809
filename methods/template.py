"""Template for a new L2D method: copy to ``methods/<name>.py``, then add
``conf/method/<name>.yaml`` (``name: <name>`` and ``params:`` with your fields).

The runner imports every module in ``methods/`` (this template is skipped), so a
registered method appears in every sweep (``method=glob(*)``) and report. The shared
trainer (``benchmark/training.py``) owns the optimiser and loop; the evaluator
(``benchmark/evaluator.py``) turns your ``agent_scores`` into decisions, so every method is
scored the same way. Agents are ``0..E-1`` (humans) then ``E`` (the classifier).
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from benchmark.spec import Batch, TaskSpec
from methods import METHODS
from methods.common import MethodBase
from methods.nets import Network


# @METHODS.register("my_method")   # <- uncomment with your method's name
@dataclasses.dataclass(frozen=True)  # frozen + hashable: passed to jax.jit as a static argument
class MyMethod(MethodBase):
    name = "my_method"
    # Class attributes read by the runner (defaults in MethodBase):
    trains = True                   # False for reference rows that take no gradient step
    workload_in_training = False    # True if workload bounds (aux["lo"], aux["hi"]) shape training
    missing_policies = ("as_incorrect", "drop")  # accepted values of `missing_policy`

    # Hyper-parameters: fields with defaults, set from conf/method/<name>.yaml `params:`.
    # `num_experts` / `num_classes`, if declared, are filled in by the runner.
    num_experts: int = 0
    num_classes: int = 0
    missing_policy: str = "as_incorrect"

    def init_model(self, spec: TaskSpec, rngs):
        """Build every network of the method (an nnx.Module) from `nnx.Rngs`."""
        return Network(spec.backbone, spec.input_shape[-1], spec.num_classes + spec.num_experts, rngs=rngs)

    def loss(self, model, batch: Batch, aux):
        """(scalar loss, dict of scalar metrics); pure and jittable.

        batch.x (B,H,W,C), batch.y (B,), batch.t (B,E) with -1 for a missing annotation;
        aux: {"lo", "hi"} workload bounds (E+1,) and "progress" in [0, 1].
        """
        logits = model(batch.x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, : self.num_classes], batch.y).mean()
        return loss, {"classifier_ce": loss}

    def classify(self, model, x):
        """(B, K) class logits."""
        return model(x)[:, : self.num_classes]

    def agent_scores(self, model, x):
        """(B, E+1) scores, higher = better agent; experts first, classifier last."""
        logits = model(x)
        experts = logits[:, self.num_classes :]
        classifier = logits[:, : self.num_classes].max(axis=-1, keepdims=True)
        return jax.numpy.concatenate([experts, classifier], axis=-1)

    # Optional hooks (see methods/common.py): prepare(model, train_split) before training;
    # impute(model, batch, aux) -> (B, E, K) inferred expert labels (scores imputation);
    # sees_test_labels + scores_from_labels(...) for reference rows such as the oracle.
