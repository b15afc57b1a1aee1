"""Model sources: where a recipe's dense model comes from (`model.source`). One file each in this
package, registered with `@register_model_source`.

A `ModelSource` builds the model from the validated `model` section (schema.ModelConfig), with the
data's number of classes and input channels. Its `required` keys and `problems(cfg)` are checked when
the recipe loads, so a bad model section fails before any work. Only sources whose `in_files` is
True may be named by a saved model file's architecture record (models.architecture_from_file): a
file may name an architecture, never code to run or another file to read.

Every module here whose name does not start with "_" is imported on first use of the registry, so a
new built-in source is one new file; a source of your own is one decorated class in your code,
imported before a recipe names it.
"""
from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from pfp_deploy.registry import Registry


class ModelSource:
    """One way of getting the dense model. Subclass it, set `name` (and `required`), implement `build`,
    and decorate the class with `@register_model_source`."""

    name: ClassVar[str]  # as written in a recipe (model.source)
    summary: ClassVar[str] = ""  # one line for error messages and docs
    required: ClassVar[tuple[str, ...]] = ()  # model-section keys that must be set
    in_files: ClassVar[bool] = False  # may a saved model file name this source (data only, no code)?

    def problems(self, cfg: Any) -> list[tuple[str, str]]:
        """Recipe-time checks beyond `required`: (key, message) pairs; none by default."""
        return []

    def build(self, cfg: Any, num_classes: int | None, in_channels: int) -> nn.Module:
        """The dense model, weights loaded, in train mode. ModelLoadError naming the file or name and
        how to fix it when it cannot be built."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<model source {self.name} ({type(self).__module__}.{type(self).__qualname__})>"


REGISTRY: Registry[ModelSource] = Registry("model source", ModelSource, __name__, example="torchvision")
register_model_source = REGISTRY.register
unregister_model_source = REGISTRY.unregister
model_sources = REGISTRY.all
model_source_names = REGISTRY.names
get_model_source = REGISTRY.get
