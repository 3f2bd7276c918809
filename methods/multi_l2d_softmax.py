"""``multi_l2d_softmax``: multi-expert softmax L2D (Verma et al., AISTATS 2023).

The multi-expert form of Mozannar & Sontag (ICML 2020): one network with K class logits and
E deferral logits, loss ``-log s_y - sum_j 1[t_j = y] log s_{K+j}`` with ``s = softmax``.
Missing policies: "as_incorrect" (default; the reference code's choice) and "drop". "mask"
would coincide with "as_incorrect" (see ``methods.surrogates``); "impute" is provided by the
``impute_then_defer`` method, which is exactly this loss on imputed labels.
"""

from __future__ import annotations

import dataclasses

from methods import METHODS
from methods.common import DeferralSurrogate
from methods.surrogates import deferral_scores_softmax, softmax_deferral_loss


@METHODS.register("multi_l2d_softmax")
@dataclasses.dataclass(frozen=True)
class MultiL2DSoftmax(DeferralSurrogate):
    missing_policies = ("as_incorrect", "drop")
    surrogate = staticmethod(softmax_deferral_loss)
    deferral_scores = staticmethod(deferral_scores_softmax)
