"""``conformal_l2d``: multi-expert L2D with conformal ensembles of experts (Verma, Barrejón
& Nalisnick, AISTATS 2023, "Learning to Defer to Multiple Experts: Consistent Surrogate
Losses, Confidence Calibration, and Conformal Ensembles").

Training is the multi-expert surrogate of ``multi_l2d_ova`` (``surrogate=ova``, default) or
``multi_l2d_softmax`` (``surrogate=softmax``): K class logits and E expert logits whose
probabilities estimate P(expert j is right | x). Deciding is unchanged (argmax, or the
capacity-constrained assignment); what changes is who answers a deferred sample: instead of
the one decided expert, the system asks a *conformal set* of experts and outputs their
plurality vote (ties: the answer of the highest-scored expert among the tied ones).

The set, per sample: the experts sorted by score, highest first, taken while the cumulative
score of those already taken is below ``q``: the smallest prefix whose scores sum to at
least ``q`` (always at least the top expert). ``q`` is calibrated on the validation split
(split conformal prediction, over the validation samples the argmax decisions defer; all of
them if none is deferred): a sample's non-conformity score is the cumulative score up to and
including its lowest-ranked *correct* expert (the sum over all experts when none is
correct), and ``q`` is the ``ceil((n + 1)(1 - alpha))``-th smallest of the n scores
(``+inf``, every expert, when that exceeds n). A test sample's set then holds every correct
expert with probability at least ``1 - alpha`` (exchangeability), so the vote is that of a
set which contains all the experts who get it right. The evaluator adds the decided expert
to the set (under a capacity-constrained decision it need not be the top-scored one) and
charges every member's ``expert_cost``; the mean set size is the run metric
``expert_set_size``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from methods import METHODS
from methods.common import DeferralSurrogate, MethodConfigError, check_surrogate
from methods.surrogates import MULTI_EXPERT_SURROGATES as SURROGATES


def ranked_cumulative(expert_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, cumulative): experts per row sorted by score, highest first (ties: lower
    index first), and the cumulative sums of the sorted scores; both (N, E)."""
    order = np.argsort(-expert_scores, axis=1, kind="stable")
    return order, np.cumsum(np.take_along_axis(expert_scores, order, axis=1), axis=1)


def nonconformity(expert_scores: np.ndarray, y: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(N,) the cumulative sorted score up to and including the lowest-ranked expert who is
    right (``t_j = y``); the sum of all scores where no expert is right."""
    order, cumulative = ranked_cumulative(expert_scores)
    right_in_order = np.take_along_axis(t == y[:, None], order, axis=1)
    last = np.where(right_in_order.any(axis=1),
                    t.shape[1] - 1 - np.argmax(right_in_order[:, ::-1], axis=1), t.shape[1] - 1)
    return cumulative[np.arange(len(y)), last]


def conformal_threshold(scores: np.ndarray, alpha: float) -> float:
    """``q``: the ``ceil((n + 1)(1 - alpha))``-th smallest of the n non-conformity
    ``scores`` (``inf`` when that rank exceeds n, or n = 0)."""
    n = len(scores)
    rank = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    return float(np.sort(scores)[rank - 1]) if 1 <= rank <= n else math.inf


def conformal_sets(expert_scores: np.ndarray, threshold: float) -> np.ndarray:
    """(N, E) bool: the smallest prefix of the score-sorted experts whose scores sum to at
    least ``threshold`` (an expert is in while the sum before it is below it)."""
    order, cumulative = ranked_cumulative(expert_scores)
    before = cumulative - np.take_along_axis(expert_scores, order, axis=1)
    taken = (before < threshold) | (np.arange(expert_scores.shape[1]) == 0)
    sets = np.zeros_like(taken)
    np.put_along_axis(sets, order, taken, axis=1)
    return sets


@METHODS.register("conformal_l2d")
@dataclasses.dataclass(frozen=True)
class ConformalL2D(DeferralSurrogate):
    missing_policies = ("as_incorrect", "drop", "mask")  # mask: OvA only
    surrogate: str = "ova"  # ova | softmax: the loss and the correctness scores
    # a set misses a right expert with probability <= alpha; not tuned (experiment=tune): the
    # validation split it would be tuned on is the one the sets are calibrated on
    alpha: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        check_surrogate(self.name, self.surrogate, self.missing_policy, SURROGATES)
        if not 0.0 < self.alpha < 1.0:
            raise MethodConfigError(f"method {self.name!r}: alpha must be in (0, 1), got {self.alpha}.")

    def loss(self, model, batch, inputs):
        loss_fn = SURROGATES[self.surrogate][0]
        return loss_fn(model(batch.x), batch.y, batch.t, self.missing_policy), {}

    def agent_scores(self, model, x):
        return SURROGATES[self.surrogate][1](model(x), self.num_experts)

    def class_probabilities(self, model, x):
        logits = self.classify(model, x)
        return jax.nn.sigmoid(logits) if self.surrogate == "ova" else jax.nn.softmax(logits, axis=-1)

    def expert_sets(self, scores, calibration):
        """(N, E) conformal sets of a split's (N, E+1) ``scores``, ``q`` calibrated on
        ``calibration`` = (scores, y, t) of the validation split."""
        cal_scores, cal_y, cal_t = (np.asarray(a) for a in calibration)
        deferred = cal_scores.argmax(axis=1) < self.num_experts
        rows = deferred if deferred.any() else np.ones_like(deferred)
        experts = slice(0, self.num_experts)
        q = conformal_threshold(nonconformity(cal_scores[rows, experts], cal_y[rows], cal_t[rows]),
                                self.alpha)
        return conformal_sets(np.asarray(scores)[:, experts], q)
