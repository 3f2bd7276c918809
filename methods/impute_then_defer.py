"""``impute_then_defer``: impute missing annotations, then learn to defer (after Hemmer et al., 2023).

Two stages in one compiled step (the stage is chosen with ``jnp.where`` on
``inputs.progress``, the fraction of training done):
1. ``progress < annotator_fraction``: only the E annotator models learn, by cross-entropy on
   the observed labels (``annotator_loss``).
2. Afterwards missing labels are filled with the annotators' argmax (under
   ``stop_gradient``) and the ``multi_l2d_softmax`` loss is trained on the completed
   labels. The annotators keep learning on the observed labels (their loss does not depend
   on the deferral network, so this only refines the imputation).
Missing policy: "impute" only (that is the method).

``annotator_fraction`` (default 0.5, an even split) is searched by ``experiment=tune`` on
validation accuracy; the value a dataset's default grid uses is its tuned preset
(``conf/tuned/<dataset>_impute_then_defer.yaml``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from core.spec import tunable
from methods import METHODS
from methods.common import MethodBase, Networks, after_stage, check_stage_fraction, require_experts
from methods.nets import Network, NetworkStack
from methods.surrogates import annotator_loss, deferral_scores_softmax, softmax_deferral_loss


@METHODS.register("impute_then_defer")
@dataclasses.dataclass(frozen=True)
class ImputeThenDefer(MethodBase):
    missing_policies = ("impute",)
    missing_policy: str = "impute"
    num_experts: int = 0
    annotator_fraction: float = tunable(0.5, 0.05, 0.75)  # share of training on the annotators alone

    def __post_init__(self):
        super().__post_init__()
        check_stage_fraction(self.name, "annotator_fraction", self.annotator_fraction)

    def init_model(self, spec, rngs):
        require_experts(self.name, spec.num_experts)
        channels, classes = spec.input_shape[-1], spec.num_classes
        return Networks(
            annotators=NetworkStack(spec.num_experts, spec.backbone, channels, classes, rngs=rngs),
            deferral=Network(spec.backbone, channels, classes + spec.num_experts, rngs=rngs),
        )

    def _annotator_logits(self, model, x):
        return jnp.swapaxes(model.annotators(x), 0, 1)  # (B, E, K)

    def loss(self, model, batch, inputs):
        annot_logits = self._annotator_logits(model, batch.x)
        annot = annotator_loss(annot_logits, batch.t)
        t_imputed = jnp.argmax(jax.lax.stop_gradient(annot_logits), axis=-1)
        defer = softmax_deferral_loss(model.deferral(batch.x), batch.y, batch.t, "impute", t_imputed)
        total = annot + after_stage(inputs, self.annotator_fraction, defer)
        return total, {"annotator_ce": annot, "deferral_loss": defer}

    def impute(self, model, batch, inputs):
        return jax.nn.softmax(self._annotator_logits(model, batch.x), axis=-1)

    def classify(self, model, x):
        logits = model.deferral(x)
        return logits[:, : logits.shape[-1] - self.num_experts]

    def agent_scores(self, model, x):
        return deferral_scores_softmax(model.deferral(x), self.num_experts)
