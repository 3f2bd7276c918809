"""``multi_l2d_ova``: one-vs-all L2D (Verma & Nalisnick, ICML 2022), multi-expert.

One network with K class logits and E deferral logits, loss
``sum_k BCE(g_k, 1[y = k]) + sum_j BCE(g_{K+j}, 1[t_j = y])``; agent scores are the
calibrated sigmoids. Missing policies: "as_incorrect" (default), "drop", "mask" (leave a
missing expert's BCE term out). "impute" is left to ``impute_then_defer``.
"""

from __future__ import annotations

import dataclasses

import jax

from methods import METHODS
from methods.common import DeferralSurrogate
from methods.surrogates import deferral_scores_ova, ova_deferral_loss


@METHODS.register("multi_l2d_ova")
@dataclasses.dataclass(frozen=True)
class MultiL2DOvA(DeferralSurrogate):
    missing_policies = ("as_incorrect", "drop", "mask")
    surrogate = staticmethod(ova_deferral_loss)
    deferral_scores = staticmethod(deferral_scores_ova)

    def class_probabilities(self, model, x):
        """The K one-vs-all sigmoids (calibrated per class; they need not sum to one)."""
        return jax.nn.sigmoid(self.classify(model, x))
