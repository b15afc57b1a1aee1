"""Architectures by name (builtin, torchvision) and state_dict checkpoints for them: weights are a local
state_dict file, or for torchvision a weights tag already in the hub cache (nothing is downloaded)."""
from __future__ import annotations

from typing import Any

from torch import nn

from pfp_deploy.architectures import known_model_names
from pfp_deploy.errors import closest
from pfp_deploy.model_sources import ModelSource, register_model_source
from pfp_deploy.models import load_weights, named_architecture, torchvision_pretrained, weights_is_tag


def name_problems(cfg: Any, kind: str) -> list[tuple[str, str]]:
    """model.name must be a known architecture ("builtin": builtins only; "any": builtin or torchvision)."""
    if cfg.name is None:
        return []
    known = known_model_names(kind)
    if cfg.name in known:
        return []
    hint = closest(cfg.name, known)
    hint = f' Did you mean "{hint}"?' if hint else ""
    what = "builtin model" if kind == "builtin" else "torchvision or builtin model"
    return [("name", f"unknown {what} {cfg.name!r}.{hint} Builtins: {', '.join(known_model_names('builtin'))}")]


def build_named(cfg: Any, weights: str | None, num_classes: int | None, in_channels: int, source: str) -> nn.Module:
    """model.name's architecture, with the state_dict file `weights` loaded when given."""
    model, arch = named_architecture(cfg, num_classes, in_channels)
    return load_weights(model, weights, arch, num_classes, in_channels, source) if weights else model


@register_model_source
class Torchvision(ModelSource):
    name = "torchvision"
    summary = "a torchvision classification model by name (a builtin name works too), weights a tag or a file"
    required = ("name",)
    in_files = True

    def problems(self, cfg: Any) -> list[tuple[str, str]]:
        return name_problems(cfg, "any")

    def build(self, cfg: Any, num_classes: int | None, in_channels: int) -> nn.Module:
        if cfg.weights and weights_is_tag(cfg.weights) and cfg.name not in known_model_names("builtin"):
            return torchvision_pretrained(cfg.name, cfg.weights, num_classes, in_channels, dict(cfg.kwargs or {}))
        return build_named(cfg, cfg.weights, num_classes, in_channels, self.name)


@register_model_source
class Builtin(ModelSource):
    name = "builtin"
    summary = "a builtin small network (pfp_deploy.architectures: resnet20, vgg_small, ...)"
    required = ("name",)
    in_files = True

    def problems(self, cfg: Any) -> list[tuple[str, str]]:
        return name_problems(cfg, "builtin")

    def build(self, cfg: Any, num_classes: int | None, in_channels: int) -> nn.Module:
        return build_named(cfg, cfg.weights, num_classes, in_channels, self.name)


@register_model_source
class Checkpoint(ModelSource):
    name = "checkpoint"
    summary = "a state_dict file (model.path) for the architecture model.name"
    required = ("name", "path")

    def problems(self, cfg: Any) -> list[tuple[str, str]]:
        problems = name_problems(cfg, "any")
        if cfg.weights is not None:
            problems.append(("weights", "not used with source checkpoint (the weights are model.path); remove it"))
        return problems

    def build(self, cfg: Any, num_classes: int | None, in_channels: int) -> nn.Module:
        return build_named(cfg, cfg.path, num_classes, in_channels, self.name)
