"""lsq: greedy least-squares selection, the channels whose loss the refit repairs best leave first.

From the same calibration Gram matrices as the cost-aware allocation (pfp/cost_aware.py): every
group's channels are removed a few at a time (GREEDY_STEP of those left), each time those whose
removal raises the least-squares residual of the group's consumers least, with the consumers'
remaining weights refit in closed form after every step (block elimination on (G + lam I)^-1).
This is the criterion that matches what reconstruction does afterwards: magnitude criteria rank a
channel by its own weights, while a channel that the others can stand in for (correlated inputs)
costs nothing once the consumer is refit. Data-driven selection of this kind goes back to ThiNet
(Luo et al., 2017) and channel pruning by least squares (He et al., 2017); this is our own greedy
form on the Schur-complement error of cost_aware.py.

Groups it cannot rank that way (grouped/depthwise consumers, a consumer too wide for a full Gram,
channels read with unequal column counts) are ranked by L1, and prune() lists them in the report
(`criterion_fallback`).
"""
from __future__ import annotations

from pfp_deploy.criteria import register_criterion
from pfp_deploy.criteria.magnitude import TorchPruningCriterion


@register_criterion
class GreedyLeastSquares(TorchPruningCriterion):
    name = "lsq"
    summary = "greedy least-squares selection on calibration Grams (what the refit repairs best leaves first)"
    importance_class, options = "GroupMagnitudeImportance", {"p": 1}  # the ranking where greedy cannot run
    needs_gram = True
