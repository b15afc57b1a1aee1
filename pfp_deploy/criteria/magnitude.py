"""Data-free torch-pruning importances: l1, l2 (group magnitude), fpgm, bn_scale, random."""
from __future__ import annotations

from typing import Any, ClassVar

from pfp_deploy.criteria import Criterion, register_criterion
from pfp_deploy.criteria._scorer import GroupScorer


class TorchPruningCriterion(Criterion):
    """A torch-pruning importance class (`tp.importance.<importance_class>(**options)`) as a criterion."""

    importance_class: ClassVar[str]
    options: ClassVar[dict[str, Any]] = {}
    seeded: ClassVar[bool] = False  # random scores: seeded per group from `seed`

    def make(self) -> Any:
        import torch_pruning as tp

        return getattr(tp.importance, self.importance_class)(**self.options)

    def importance(self, model, calibration, seed) -> GroupScorer:
        return GroupScorer(self.name, self.make(), seed=seed, seeded=self.seeded)


@register_criterion
class L1(TorchPruningCriterion):
    name, summary = "l1", "L1 norm of the group's weights (torch-pruning GroupMagnitudeImportance p=1)"
    importance_class, options = "GroupMagnitudeImportance", {"p": 1}


@register_criterion
class L2(TorchPruningCriterion):
    name, summary = "l2", "L2 norm of the group's weights (torch-pruning GroupMagnitudeImportance p=2)"
    importance_class, options = "GroupMagnitudeImportance", {"p": 2}


@register_criterion
class FPGM(TorchPruningCriterion):
    name, summary = "fpgm", "distance to the geometric median of the filters (torch-pruning FPGMImportance)"
    importance_class = "FPGMImportance"


@register_criterion
class BNScale(TorchPruningCriterion):
    name, summary = "bn_scale", "|BatchNorm gamma| (torch-pruning BNScaleImportance; L1 where a group has no BN)"
    importance_class = "BNScaleImportance"


@register_criterion
class Random(TorchPruningCriterion):
    name, summary = "random", "seeded random scores (the floor any criterion should beat)"
    importance_class, seeded = "RandomImportance", True
