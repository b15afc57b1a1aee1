"""pruned: the model.pt (or the run directory) of an earlier pfp-deploy run, rebuilt from its base
architecture record + plan + state_dict (models.load_pruned: nothing is unpickled). The file's
architecture record is data only; a factory base must come from the recipe (model.factory)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pfp_deploy.model_sources import ModelSource, register_model_source
from pfp_deploy.models import from_factory, load_pruned


@register_model_source
class Pruned(ModelSource):
    name = "pruned"
    summary = "model.pt or the run directory of an earlier pfp-deploy run (model.factory: its base, if code)"
    required = ("path",)

    def build(self, cfg: Any, num_classes: int | None, in_channels: int) -> nn.Module:
        path = Path(cfg.path)
        if path.is_dir():  # a run directory of an earlier `pfp-deploy optimize`
            path = path / "model.pt"
        base = from_factory(cfg.factory, dict(cfg.kwargs or {}), num_classes, in_channels) if cfg.factory else None
        return load_pruned(path, base_model=base)
