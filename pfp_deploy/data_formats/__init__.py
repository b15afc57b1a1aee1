"""Data formats: where a recipe's `data` section reads images from. One file each in this package,
registered with `@register_data_format`.

A `DataFormat` turns the validated `data` section (schema.DataConfig) and the model's input shape into
the training, validation and calibration datasets (`Splits`); data.build_data wraps them in loaders
(subsets, batching, seeded shuffling, the calibration draw) the same way for every format. Its class
attributes give the recipe defaults when the model section leaves them open: input channels, image
size, number of classes (None: read from the data).

Every module here whose name does not start with "_" is imported on first use of the registry, so a new
built-in format is one new file. A format of your own lives in your code: import its module before
loading a recipe that names it (docs/extending.md, "A data format").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch.utils.data import Dataset

from pfp_deploy.registry import Registry


@dataclass
class Splits:
    """What a format loads: datasets of (image tensor [C, H, W], int label) pairs."""

    train: Dataset  # with training augmentation when data.augment
    val: Dataset
    calib: Dataset  # the training images with evaluation transforms (the calibration draw's source)
    class_names: list[str]
    description: str  # one line for the report, e.g. "Fashion-MNIST from /usr/share/datasets/fashion-mnist"
    meaningful_accuracy: bool = True  # False: accuracy figures are reported as not meaningful
    notes: list[str] = field(default_factory=list)


class DataFormat:
    """One source of images. Subclass it, set `name` and the defaults, implement `load`, and decorate
    the class with `@register_data_format`."""

    name: ClassVar[str]  # as written in a recipe (data.format)
    summary: ClassVar[str] = ""  # one line for error messages and docs
    channels: ClassVar[int] = 3  # default model input channels
    image_size: ClassVar[int] = 224  # default square input size
    num_classes: ClassVar[int | None] = None  # None: the data says (e.g. its class folders)
    allowed_channels: ClassVar[tuple[int, ...] | None] = None  # model input channels it can feed (None: any)
    default_root: ClassVar[str | None] = None  # data.root when the recipe leaves it out

    def problems(self, cfg: Any) -> list[tuple[str, str]]:
        """Recipe-time checks of the data section (schema.DataConfig): (key, message) pairs; none by default."""
        return []

    def classes(self, cfg: Any) -> int | None:
        """The number of classes the data has, when known before loading (None: read at load time)."""
        return self.num_classes

    def load(self, cfg: Any, channels: int, size: tuple[int, int]) -> Splits:
        """The datasets for data section `cfg`, images shaped [channels, *size]. Raise DataError (naming
        the file or directory and how to fix it) for missing or malformed data."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<data format {self.name} ({type(self).__module__}.{type(self).__qualname__})>"


REGISTRY: Registry[DataFormat] = Registry("data format", DataFormat, __name__, example="fashion_mnist")
register_data_format = REGISTRY.register
unregister_data_format = REGISTRY.unregister
data_formats = REGISTRY.all
data_format_names = REGISTRY.names
get_data_format = REGISTRY.get
