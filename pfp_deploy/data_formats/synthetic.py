"""Synthetic: seeded random images with a weak per-class pattern. Exercises the pipeline anywhere,
with no data at hand; its accuracy figures are reported as not meaningful."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from pfp_deploy.data_formats import DataFormat, Splits, register_data_format


@register_data_format
class Synthetic(DataFormat):
    name = "synthetic"
    summary = "random tensors (data.synthetic: num_classes, num_samples); accuracy is meaningless"
    channels, image_size, num_classes = 3, 32, None

    def classes(self, cfg: Any) -> int | None:
        return cfg.synthetic.num_classes

    def load(self, cfg: Any, channels: int, size: tuple[int, int]) -> Splits:
        syn, shape = cfg.synthetic, (channels, *size)
        train = SyntheticImages(syn.num_samples, syn.num_classes, shape, cfg.seed)
        val = SyntheticImages(max(1, syn.num_samples // 4), syn.num_classes, shape, cfg.seed + 1)
        return Splits(train, val, train, [str(i) for i in range(syn.num_classes)],
                      f"synthetic random tensors {list(shape)} (accuracy is not meaningful)", meaningful_accuracy=False)


class SyntheticImages(Dataset):
    """Random images with a weak class pattern (so losses can fall); accuracy means nothing."""

    def __init__(self, num_samples: int, num_classes: int, shape: Sequence[int], seed: int = 0):
        self.num_samples, self.num_classes, self.shape, self.seed = num_samples, num_classes, tuple(shape), seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(self.num_classes, (), generator=gen))
        pattern_gen = torch.Generator().manual_seed(self.seed * 7919 + label)
        pattern = torch.randn(self.shape[0], 4, 4, generator=pattern_gen)
        pattern = F.interpolate(pattern[None], size=self.shape[1:], mode="nearest")[0]
        return torch.randn(self.shape, generator=gen) + pattern, label
