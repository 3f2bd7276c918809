"""``two_stage_cost``: two-stage deferral with a cost per expert consulted (the
cost-sensitive form of Mao, Mohri, Mohri & Zhong, NeurIPS 2023, "Two-Stage Learning to
Defer with Multiple Experts").

The classifier and the rejector are those of ``two_stage`` (classifier by cross-entropy; a
rejector over the E experts and the classifier, trained after ``first_stage_fraction`` of
training under ``stop_gradient``). Only the agents' costs change: consulting expert j costs
its error plus its consultation cost ``beta_j``,

    c_j = 1[t_j != y] + beta_j,   c_E = 1[classifier wrong],
    loss = sum_k tau_k(x, y) * (-log softmax(r(x))_k),   tau_k = sum_{i != k} c_i,

so the rejector learns the agent of least expected cost: an expert is worth asking only
where its accuracy gain over the classifier exceeds its price. ``beta`` is the dataset's
``expert_cost`` (one value per expert, 0 by default: then this is ``two_stage``); the
evaluator charges the same costs in ``cost_aware_accuracy``, so training and scoring price
the experts alike. Decisions: the agent of highest ``softmax(r(x))``.

Missing annotations as in ``two_stage``: ``mask`` (default), ``as_incorrect`` (a missing
answer costs 1 + beta_j), ``drop``.
"""

from __future__ import annotations

import dataclasses

from methods import METHODS
from methods.two_stage import TwoStage, two_stage_surrogate


@METHODS.register("two_stage_cost")
@dataclasses.dataclass(frozen=True)
class TwoStageCost(TwoStage):
    expert_cost: tuple[float, ...] = ()  # filled from the task (dataset.expert_cost); () = 0

    def stage_loss(self, model, batch, class_logits):
        return two_stage_surrogate(model.rejector(batch.x), class_logits, batch.y, batch.t,
                                   self.missing_policy, self.expert_cost)
