"""factory: 'package.module:callable' (or 'path/to/file.py:callable') returning an nn.Module. This imports
and runs that code, so it comes only from the recipe or the caller, never from a saved file."""
from __future__ import annotations

from typing import Any

from torch import nn

from pfp_deploy.model_sources import ModelSource, register_model_source
from pfp_deploy.models import from_factory, load_weights


@register_model_source
class Factory(ModelSource):
    name = "factory"
    summary = "'package.module:callable' returning an nn.Module (runs that code: use factories you trust)"
    required = ("factory",)

    def build(self, cfg: Any, num_classes: int | None, in_channels: int) -> nn.Module:
        model = from_factory(cfg.factory, dict(cfg.kwargs or {}), num_classes, in_channels)
        return load_weights(model, cfg.weights, cfg.factory, num_classes, in_channels, self.name) if cfg.weights \
            else model
