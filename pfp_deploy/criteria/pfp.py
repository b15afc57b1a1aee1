"""pfp: PFP's own sensitivity scores choose the channels (Liebenwein et al. 2020); the default."""
from __future__ import annotations

from pfp_deploy.criteria import Criterion, register_criterion


@register_criterion
class PFP(Criterion):
    name = "pfp"
    summary = "Provable Filter Pruning's data-informed sensitivities (the variant decides how they are used)"

    def importance(self, model, calibration, seed):
        return None  # prune() uses PFP's sensitivities, and its variant (deterministic/randomized/hybrid)
