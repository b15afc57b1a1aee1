"""Loaders for a recipe's data section, and the PFP calibration set.

`build_data` is the one entry point: the data format (pfp_deploy/data_formats/, a registry: Fashion-MNIST
IDX files, ImageFolder, synthetic) loads the datasets; subsets, batching, seeded shuffling and the
calibration draw are the same for every format. The calibration set is drawn from the training images
with evaluation transforms (no augmentation), as the paper does, with a seeded, shardable draw.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from pfp_deploy.data_formats import get_data_format
from pfp_deploy.data_formats.fashion_mnist import (  # noqa: F401 (re-exported: the documented loaders)
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_ROOT,
    FASHION_MNIST_STD,
    TensorImages,
    load_fashion_mnist,
    read_idx,
)
from pfp_deploy.data_formats.imagefolder import IMAGENET_MEAN, IMAGENET_STD, check_images, load_imagefolder  # noqa: F401
from pfp_deploy.data_formats.synthetic import SyntheticImages  # noqa: F401
from pfp_deploy.errors import DataError, PruningError

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------- the bundle

@dataclass
class DataBundle:
    """Everything the pipeline needs from the data section."""

    train_loader: DataLoader  # data.augment's training transforms (model.pretrain; finetune.augment: true)
    plain_train_loader: DataLoader  # the same images with evaluation transforms, shuffled: the fine-tune's default
    val_loader: DataLoader
    calib_dataset: Dataset  # training images with evaluation transforms (full set)
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    class_names: list[str]
    meaningful_accuracy: bool  # False for synthetic data: report accuracy as not meaningful
    description: str
    batch_size: int = 64
    num_workers: int = 0
    seed: int = 0
    calib_loader: DataLoader | None = None  # data.calibration_samples draws when it is an int

    def finetune_loader(self, augment: bool) -> DataLoader:
        """The fine-tune's training loader: augmented (train_loader) or not (finetune.augment)."""
        return self.train_loader if augment else self.plain_train_loader

    def calibration_loader(self, n: int, seed: int | None = None, shard: tuple[int, int] | None = None,
                           batch_size: int | None = None) -> DataLoader:
        """A loader over a seeded draw of n training images (eval transforms), optionally one shard of it."""
        subset = calibration_subset(self.calib_dataset, n, self.seed if seed is None else seed, shard)
        return make_loader(subset, batch_size or self.batch_size, shuffle=False, num_workers=self.num_workers)


def calibration_subset(dataset: Dataset, n: int, seed: int = 0, shard: tuple[int, int] | None = None) -> Subset:
    """A seeded draw of n samples (all if fewer); with shard=(rank, world) this rank's slice of it.

    Every rank draws the same n indices, so the shards are disjoint and together are the full draw.
    """
    total = len(dataset)
    if total == 0:
        raise DataError("the calibration source is empty; check data.root and data.train_subset")
    if n > total:
        log.warning("calibration asks for %d samples but only %d exist; using all of them", n, total)
    indices = seeded_indices(total, min(n, total), seed)
    if shard is not None:
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        indices = indices[rank::world]
    return Subset(dataset, indices)


def seeded_indices(total: int, n: int, seed: int) -> list[int]:
    """n distinct indices out of range(total), the same for the same seed."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader whose shuffling is reproducible from seed."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      drop_last=drop_last, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)


def build_data(data_cfg: Any, model_input_shape: Sequence[int]) -> DataBundle:
    """Loaders for a recipe's `data` section, shaped for a model taking model_input_shape [N, C, H, W]."""
    if len(model_input_shape) != 4:
        raise DataError(f"model input shape must be [N, C, H, W], got {list(model_input_shape)}")
    channels, size = int(model_input_shape[1]), (int(model_input_shape[2]), int(model_input_shape[3]))
    seed = data_cfg.seed
    splits = get_data_format(data_cfg.format).load(data_cfg, channels, size)
    train, val, calib, class_names, description = (splits.train, splits.val, splits.calib, splits.class_names,
                                                    splits.description)
    meaningful = splits.meaningful_accuracy

    if data_cfg.train_subset:  # the same indices for train and calib, so calibration stays in-subset
        keep = seeded_indices(len(train), min(data_cfg.train_subset, len(train)), seed)
        train, calib = Subset(train, keep), Subset(calib, keep)
    if data_cfg.val_subset:
        val = Subset(val, seeded_indices(len(val), min(data_cfg.val_subset, len(val)), seed + 1))
    for split, ds in (("training", train), ("validation", val)):
        if len(ds) == 0:
            raise DataError(f"the {split} set of {description} is empty")

    batch, workers = data_cfg.batch_size, data_cfg.num_workers
    bundle = DataBundle(
        train_loader=make_loader(train, batch, shuffle=True, num_workers=workers, seed=seed,
                                 drop_last=len(train) > batch),  # no size-1 batch for BatchNorm
        plain_train_loader=make_loader(calib, batch, shuffle=True, num_workers=workers, seed=seed,
                                       drop_last=len(calib) > batch),
        val_loader=make_loader(val, batch, shuffle=False, num_workers=workers),
        calib_dataset=calib, num_classes=len(class_names), in_channels=channels, image_size=size,
        class_names=class_names, meaningful_accuracy=meaningful, description=description,
        batch_size=batch, num_workers=workers, seed=seed)
    if isinstance(data_cfg.calibration_samples, int):
        bundle.calib_loader = bundle.calibration_loader(data_cfg.calibration_samples)
    return bundle


# ---------------------------------------------------------------------------- calibration size

def count_output_units(model: nn.Module, example_input: torch.Tensor) -> list[int]:
    """Output units per sample of each dense layer in call order: C_out*H_out*W_out per Conv2d
    with groups == 1, out_features per Linear (depthwise / grouped convs are not dense)."""
    units: dict[nn.Module, int] = {}

    def record(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if module not in units:
            units[module] = module.out_features if isinstance(module, nn.Linear) else output[0].numel()

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return list(units.values())


def paper_calibration_size(dense_output_units: Sequence[int], delta: float = 1e-16) -> int:
    """PFP's |S| = ceil(3 ln(8 eta_max eta / delta)); eta = all dense output units, eta_max the largest layer's."""
    if not dense_output_units:
        raise PruningError("the model has no dense Conv2d/Linear layers, so there is nothing for PFP to prune")
    eta, eta_max = sum(dense_output_units), max(dense_output_units)
    return math.ceil(3 * math.log(8 * eta_max * eta / delta))


def calibration_size(calibration_samples: int | str, model: nn.Module, example_input: torch.Tensor,
                     delta: float = 1e-16) -> int:
    """data.calibration_samples resolved: the int as given, or the paper's size for "auto"."""
    if calibration_samples == "auto":
        return paper_calibration_size(count_output_units(model, example_input), delta)
    return int(calibration_samples)
