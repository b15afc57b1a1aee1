"""GroupScorer: a torch-pruning importance usable by PFP's allocation and by torch-pruning's MetaPruner."""
from __future__ import annotations

import copy
import time
import zlib
from typing import Any

import torch
import torch.nn as nn

from pfp_deploy.errors import CalibrationError


class GroupScorer:
    """A torch-pruning importance, computed once per group and usable on any deep copy of one model.

    Groups are recognised by their root layer's name (torch-pruning and PFP both root groups at a
    conv/linear output), so MetaPruner's bisection and PFP's allocation see the same scores.
    Gradients (Taylor) are taken once, on a private copy, and lent to whichever copy is scored
    (deep copies drop .grad), then taken back, so no gradient is left on any model; `seeded` scores
    (random) are seeded per group, so repeated calls agree. `seconds` is the wall time of the
    scoring itself (gradient pass included).

    `need_vector`: a criterion with nothing to say about a group (BN scale on a group without
    BatchNorm) falls back to L1 there, since PFP's allocation needs a ranking for every group;
    False returns None instead (MetaPruner then leaves the group alone).
    """

    def __init__(self, name: str, importance: Any, seed: int = 0, grads: dict[str, torch.Tensor] | None = None,
                 need_vector: bool = True, seeded: bool = False, seconds: float = 0.0):
        import torch_pruning as tp

        self.__name__ = self.name = name  # what prune()'s report records as the importance
        self.importance, self.seed, self.grads = importance, seed, grads or {}
        self.need_vector, self.seeded, self.seconds = need_vector, seeded, seconds
        self.fallback = tp.importance.GroupMagnitudeImportance(p=1)
        self.cache: dict[tuple[str, int], torch.Tensor | None] = {}

    def __call__(self, group) -> torch.Tensor | None:
        names = group._DG._module2name
        key = (names[group[0].dep.target.module], len(group[0].idxs))
        if key not in self.cache:
            started = time.perf_counter()
            self.cache[key] = self._score(group, key)
            self.seconds += time.perf_counter() - started
        scores = self.cache[key]
        if scores is None and self.need_vector:
            scores = self.fallback(group)
        return None if scores is None else scores.clone()

    def _score(self, group, key) -> torch.Tensor | None:
        if self.seeded:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1_000_003 + zlib.crc32(repr(key).encode()))
                return self.importance(group)
        # The scored model may be the caller's own (a graph built on it): lend it this scorer's
        # gradients and give its own back, so no stale gradient survives into another call.
        params = dict(group._DG.model.named_parameters()) if self.grads else {}
        own = {name: param.grad for name, param in params.items()}
        try:
            for name, param in params.items():
                if name in self.grads and self.grads[name].shape == param.shape:
                    param.grad = self.grads[name].to(param.device)
            with torch.no_grad():
                scores = self.importance(group)
        finally:
            for name, param in params.items():
                param.grad = own[name]
        return None if scores is None else scores.detach().float().cpu()


def taylor_gradients(model: nn.Module, calibration: Any) -> dict[str, torch.Tensor]:
    """Gradients of the summed cross-entropy over the (inputs, labels) calibration batches, on a
    private copy in eval mode (BN statistics untouched); summed across ranks under torchrun."""
    from pfp_deploy.distributed import all_reduce_sum

    work = copy.deepcopy(model).eval()
    work.zero_grad(set_to_none=True)
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    batches = 0
    for batch in calibration:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor)):
            raise CalibrationError(
                "the taylor criterion needs labelled calibration: (inputs, labels) batches, got "
                f"{type(batch).__name__} batches; pass a loader or list of (inputs, labels) pairs")
        x, y = batch[0], batch[1]
        nn.functional.cross_entropy(work(x.to(device)), y.to(device), reduction="sum").backward()
        batches += 1
    if not batches:
        raise CalibrationError("the taylor criterion needs labelled calibration batches; the calibration is empty")
    return {n: all_reduce_sum(p.grad.detach().clone()) for n, p in work.named_parameters() if p.grad is not None}
