"""taylor: first-order Taylor importance |w * dL/dw| from labelled calibration batches."""
from __future__ import annotations

import time

from pfp_deploy.criteria import register_criterion
from pfp_deploy.criteria._scorer import GroupScorer, taylor_gradients
from pfp_deploy.criteria.magnitude import TorchPruningCriterion


@register_criterion
class Taylor(TorchPruningCriterion):
    name = "taylor"
    summary = "first-order Taylor |w * grad| (torch-pruning GroupTaylorImportance); needs (inputs, labels) batches"
    needs_labels = True
    importance_class = "GroupTaylorImportance"

    def importance(self, model, calibration, seed) -> GroupScorer:
        started = time.perf_counter()
        grads = taylor_gradients(model, calibration)  # on a private copy: no .grad left on `model`
        return GroupScorer(self.name, self.make(), seed=seed, grads=grads, seconds=time.perf_counter() - started)
