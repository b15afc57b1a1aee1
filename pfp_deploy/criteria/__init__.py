"""Pruning criteria: which channels a group keeps. One file each in this package, registered with
`@register_criterion`.

A `Criterion` turns (model, calibration, seed) into the `importance(tp_group) -> Tensor[width]`
callable that `pfp_deploy.pruning.prune` takes, or None for "pfp" (PFP's own sensitivity scores).
Everything else stays PFP's: the channel groups, how many channels each keeps (allocation),
least-squares reconstruction and removal, so criteria are compared like with like. The recipe's
`prune.method`, `prune(method=...)` and benchmarks/compare.py all go through this registry.

Every module in this package whose name does not start with "_" is imported on first use of the
registry, so a new built-in criterion is one new file here. A criterion of your own lives in your
code: import its module before loading a recipe that names it (docs/extending.md, "A pruning criterion").
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch.nn as nn

from pfp_deploy.registry import Registry


class Criterion:
    """One way of choosing channels. Subclass it, set `name` (and `needs_labels` when it takes
    (inputs, labels) batches), implement `importance`, decorate the class with `@register_criterion`."""

    name: ClassVar[str]  # as written in a recipe (prune.method): lower case, e.g. "l1"
    needs_labels: ClassVar[bool] = False  # True: calibration batches must be (inputs, labels)
    # True: prune() re-ranks each group from the calibration Gram matrices it already takes for the
    # cost-aware allocation (cost_aware.greedy_scores); `importance` then ranks only the groups
    # where that cannot run.
    needs_gram: ClassVar[bool] = False
    # A needs_gram criterion's ridge for that re-ranking, relative to each consumer's mean Gram
    # diagonal as in reconstruction; None: the refit's own (prune.reconstruct.ridge).
    selection_ridge: ClassVar[float | None] = None
    summary: ClassVar[str] = ""  # one line for error messages and docs

    def importance(self, model: nn.Module, calibration: Any, seed: int) -> Callable | None:
        """The `importance(tp_group) -> Tensor[width]` callable for `model`, or None for PFP's own scores.

        `model` is prune()'s private copy: a criterion may read it but must leave it as it found it
        (no .grad left behind). The same seed must give the same scores."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<criterion {self.name} ({type(self).__module__}.{type(self).__qualname__})>"


REGISTRY: Registry[Criterion] = Registry("pruning method", Criterion, __name__, example="l1")
register_criterion = REGISTRY.register
unregister_criterion = REGISTRY.unregister
criteria = REGISTRY.all
criterion_names = REGISTRY.names
get_criterion = REGISTRY.get
