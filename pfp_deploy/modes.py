"""Train/eval flags, saved and restored per module: the one place pfp-deploy switches modes.

A caller's model comes back in exactly the modes it had, module by module (a deliberately frozen,
eval-mode submodule stays frozen), whatever happened in between.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def saved_modes(model: nn.Module) -> list[bool]:
    """Every module's train/eval flag, in model.modules() order (the same order in a deep copy)."""
    return [m.training for m in model.modules()]


def restore_modes(model: nn.Module, modes: list[bool]) -> None:
    """Put every module's flag back to `modes`.

    train() runs first so that modules whose train() drops what they cache in eval mode (timm
    LeViT's attention-bias cache) forget tensors an eval forward stored: after torch-pruning's
    traced forward those are attached to the autograd graph (deepcopy refuses them) and after
    removal they are sized for the unpruned layers.
    """
    model.train()
    for module, training in zip(model.modules(), modes):
        module.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """model.eval() for the block; every module's own flag comes back afterwards, even on error."""
    modes = saved_modes(model)
    model.eval()
    try:
        yield model
    finally:
        restore_modes(model, modes)
