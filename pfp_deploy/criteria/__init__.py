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

import importlib
import pkgutil
import re
from collections.abc import Callable
from typing import Any, ClassVar

import torch.nn as nn

from pfp_deploy.errors import UsageError, did_you_mean


class Criterion:
    """One way of choosing channels. Subclass it, set `name` (and `needs_labels` when it takes
    (inputs, labels) batches), implement `importance`, decorate the class with `@register_criterion`."""

    name: ClassVar[str]  # as written in a recipe (prune.method): lower case, e.g. "l1"
    needs_labels: ClassVar[bool] = False  # True: calibration batches must be (inputs, labels)
    summary: ClassVar[str] = ""  # one line for error messages and docs

    def importance(self, model: nn.Module, calibration: Any, seed: int) -> Callable | None:
        """The `importance(tp_group) -> Tensor[width]` callable for `model`, or None for PFP's own scores.

        `model` is prune()'s private copy: a criterion may read it but must leave it as it found it
        (no .grad left behind). The same seed must give the same scores."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<criterion {self.name} ({type(self).__module__}.{type(self).__qualname__})>"


_REGISTRY: dict[str, Criterion] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    """Import every module of this package once (each registers its criteria)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: add a Criterion subclass to the registry under its `name`, and return the class."""
    _load_builtins()  # a criterion of your own must not shadow a built-in by import order
    if not (isinstance(cls, type) and issubclass(cls, Criterion)):
        raise TypeError(f"@register_criterion decorates a subclass of pfp_deploy.criteria.Criterion, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise UsageError(f"{cls.__qualname__}.name must be a lower-case name such as 'l1', got {name!r}")
    old = _REGISTRY.get(name)
    if old is not None and (type(old).__module__, type(old).__qualname__) != (cls.__module__, cls.__qualname__):
        raise UsageError(f"criterion {name!r} is already registered by {type(old).__module__}."
                         f"{type(old).__qualname__}; pick another name or unregister_criterion({name!r}) first")
    _REGISTRY[name] = cls()  # the same class again (its module re-imported) replaces the old entry
    return cls


def unregister_criterion(name: str) -> None:
    """Remove a criterion from the registry (for tests and plugins that replace one)."""
    _REGISTRY.pop(get_criterion(name).name)


def criteria() -> tuple[Criterion, ...]:
    """Every registered criterion, built-ins first."""
    _load_builtins()
    return tuple(_REGISTRY.values())


def criterion_names() -> list[str]:
    return [c.name for c in criteria()]


def get_criterion(name: str) -> Criterion:
    """The criterion registered as `name` (any case); UsageError listing the valid names otherwise."""
    _load_builtins()
    entry = _REGISTRY.get(str(name).strip().lower())
    if entry is None:
        names = list(_REGISTRY)
        raise UsageError(f"unknown pruning method {str(name)!r}; valid: {', '.join(names)}."
                         f"{did_you_mean(name, names)}")
    return entry
