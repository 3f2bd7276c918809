"""``realizable``: realizable-consistent L2D (Mozannar et al., AISTATS 2023), multi-expert.

One network with K class logits and E deferral logits, loss
``-log[(exp g_y + sum_j 1[t_j = y] exp g_{K+j}) / sum_all exp g]``; decisions as in the
softmax surrogate. Missing policies: "as_incorrect" (default) and "drop"; "mask" would
coincide with "as_incorrect", and "impute" is left to ``impute_then_defer``.

Behaviour to expect: when some expert is right on most training samples, the correct
experts' logits fill the numerator and the class logits learn almost only from the rest,
so the classifier trains slowly and the model defers nearly everything until trained long
(digits: coverage 0 after 40 epochs, ~0.1 after 100).
"""

from __future__ import annotations

import dataclasses

from methods import METHODS
from methods.common import DeferralSurrogate
from methods.surrogates import deferral_scores_realizable, realizable_deferral_loss


@METHODS.register("realizable")
@dataclasses.dataclass(frozen=True)
class Realizable(DeferralSurrogate):
    missing_policies = ("as_incorrect", "drop")
    surrogate = staticmethod(realizable_deferral_loss)
    deferral_scores = staticmethod(deferral_scores_realizable)
