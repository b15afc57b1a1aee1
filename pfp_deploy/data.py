"""Data sources (Fashion-MNIST IDX files, ImageFolder, synthetic) and the PFP calibration set.

`build_data` is the one entry point. The calibration set is drawn from the training images with
evaluation transforms (no augmentation), as the paper does, with a seeded, shardable draw.
"""
from __future__ import annotations

import copy
import gzip
import logging
import math
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from pfp_deploy.errors import DataError, PruningError
from pfp_deploy.recipe import DEFAULT_FASHION_MNIST_ROOT

log = logging.getLogger(__name__)

FASHION_MNIST_ROOT = DEFAULT_FASHION_MNIST_ROOT  # Debian's dataset-fashion-mnist (one definition, in recipe)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_UBYTE = 0x08


# ------------------------------------------------------------------------------- Fashion-MNIST

def read_idx(path: str | Path, ndim: int) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (gzipped or not) as a uint8 tensor with ndim dimensions."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is not a readable gzip file ({exc}); the download is probably "
                        "truncated: reinstall the dataset (apt-get install --reinstall "
                        "dataset-fashion-mnist) or replace the file") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        got = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise DataError(f"{path} is not an IDX file of uint8 with {ndim} dimensions: magic number "
                        f"{got}, expected 000008{ndim:02x}. Replace the file with the original.")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    count = math.prod(dims)
    if len(raw) - header != count:
        raise DataError(f"{path} is corrupt: the header promises {dims} = {count} bytes of data but "
                        f"the file holds {len(raw) - header}. Replace the file with the original.")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def load_fashion_mnist(root: str | Path = FASHION_MNIST_ROOT, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of the train or test (alias val) split."""
    root = Path(root)
    split = "test" if split == "val" else split
    if split not in _IDX_FILES:
        raise DataError(f"Fashion-MNIST split must be train or test (val), got {split!r}")
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST directory {root} does not exist. Install it with "
                        "`apt-get install dataset-fashion-mnist`, or set data.root to a directory "
                        f"holding {_IDX_FILES['train'][0]}.gz and the three other IDX files.")
    files = []
    for stem in _IDX_FILES[split]:
        found = [root / name for name in (f"{stem}.gz", stem) if (root / name).is_file()]
        if not found:
            raise DataError(f"Fashion-MNIST file {root / (stem + '.gz')} is missing. Put the four IDX "
                            "files (gzipped or not) in data.root, or reinstall dataset-fashion-mnist.")
        files.append(found[0])
    images, labels = read_idx(files[0], 3), read_idx(files[1], 1)
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels in {root}")
    if labels.numel() and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"Fashion-MNIST {split}: label {int(labels.max())} is out of range 0-9 in {files[1]}")
    return images, labels


class TensorImages(Dataset):
    """uint8 images [N, H, W] -> normalised float [C, h, w]; optional crop-with-padding + flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, channels: int, size: Sequence[int],
                 mean: float, std: float, augment: bool = False):
        self.images, self.labels = images, labels.long()
        self.channels, self.size = channels, tuple(size)
        self.mean, self.std, self.augment = mean, std, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].float().div_(255).unsqueeze(0)
        if self.augment:
            pad, (h, w) = 2, x.shape[1:]
            x = F.pad(x, (pad, pad, pad, pad))
            top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            x = x[:, top:top + h, left:left + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        if x.shape[1:] != self.size:
            x = F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False)[0]
        x = (x - self.mean) / self.std
        return x.expand(self.channels, -1, -1).contiguous(), int(self.labels[index])

    def with_augment(self, augment: bool) -> TensorImages:
        """The same images (shared memory) with augmentation switched on or off."""
        view = copy.copy(self)
        view.augment = augment
        return view


# ---------------------------------------------------------------------------------- ImageFolder

def imagefolder_transforms(size: Sequence[int], channels: int, mean: Sequence[float], std: Sequence[float],
                           augment: bool) -> tuple[Any, Any]:
    """(train, eval) torchvision transforms: random-resized-crop + flip / resize + center-crop."""
    from torchvision import transforms as T

    gray = [T.Grayscale(1)] if channels == 1 else []
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    resize = [int(round(s * 256 / 224)) for s in size]  # the usual 256 -> 224 ratio
    eval_tf = T.Compose(gray + [T.Resize(resize), T.CenterCrop(size)] + finish)
    train_tf = T.Compose(gray + [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] + finish) if augment else eval_tf
    return train_tf, eval_tf


def load_imagefolder(root: str | Path, size: Sequence[int], channels: int,
                     mean: Sequence[float], std: Sequence[float], augment: bool = True) -> tuple[Dataset, Dataset, Dataset]:
    """(train, val, train with eval transforms) from <root>/train and <root>/val."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"ImageFolder root {root} does not exist. Set data.root to a directory with "
                        "train/<class>/*.jpg and val/<class>/*.jpg.")
    train_tf, eval_tf = imagefolder_transforms(size, channels, mean, std, augment)
    parts = {}
    for split, tf in (("train", train_tf), ("val", eval_tf)):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"ImageFolder split {folder} does not exist. data.root must contain train/ "
                            "and val/, each with one sub-directory of images per class.")
        try:
            parts[split] = ImageFolder(str(folder), transform=tf, loader=load_image)
        except (FileNotFoundError, RuntimeError) as exc:  # no class folders / no images
            raise DataError(f"ImageFolder {folder} holds no usable images ({exc}). Expected "
                            f"{folder}/<class name>/<image>.jpg|png.") from None
    train, val = parts["train"], parts["val"]
    if train.classes != val.classes:
        extra = sorted(set(train.classes) ^ set(val.classes))[:5]
        raise DataError(f"{root}: train/ and val/ have different class folders (e.g. {extra}); "
                        "they must match so labels agree.")
    check_images([path for part in (train, val) for path, _ in part.samples], root)
    calib = copy.copy(train)  # same file list, evaluation transforms
    calib.transform = eval_tf
    return train, val, calib


def load_image(path: str) -> Any:
    """The ImageFolder loader: an RGB PIL image, or DataError naming the file PIL cannot decode."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... per format
        raise DataError(f"cannot decode image {path} ({type(exc).__name__}: {exc}); the file is probably "
                        "truncated or corrupt: replace it or delete it from the dataset") from None


# The last bytes of a complete file, per extension: JPEG ends in EOI, PNG in the IEND chunk (with its CRC).
_END_MARKERS = {".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9", ".png": b"IEND\xaeB`\x82"}
_CHECK_CHUNK = 512  # files per thread-pool task


def check_images(paths: Sequence[str], root: str | Path = "", show: int = 5) -> None:
    """Fail in the data stage, naming the files, when images are cut short (an interrupted copy or download).

    Cheap enough for every file: one small read of each JPEG/PNG's last bytes (in a thread pool: I/O
    bound). Only a file without its end marker is decoded in full, so a valid image with trailing bytes
    passes; other formats, and damage inside a complete file, are caught by load_image when read."""
    paths = list(paths)
    chunks = [paths[i:i + _CHECK_CHUNK] for i in range(0, len(paths), _CHECK_CHUNK)]
    workers = min(16, 2 * (os.cpu_count() or 1), len(chunks)) or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        bad = [problem for found in pool.map(_check_chunk, chunks) for problem in found]
    if bad:
        listed = "; ".join(f"{path} ({why})" for path, why in bad[:show])
        more = f" and {len(bad) - show} more" if len(bad) > show else ""
        raise DataError(f"{len(bad)} image file(s) under {root or 'the dataset'} cannot be decoded: {listed}"
                        f"{more}. They are probably truncated (an interrupted copy or download): replace "
                        "them, or delete them from their class folders.")


def _check_chunk(paths: Sequence[str]) -> list[tuple[str, str]]:
    problems = []
    for path in paths:
        if not _ends_complete(path):
            why = _decode_problem(path)
            if why is not None:
                problems.append((path, why))
    return problems


def _ends_complete(path: str) -> bool:
    """True when the file ends with its format's end marker, or its format has none we check."""
    marker = _END_MARKERS.get(os.path.splitext(path)[1].lower())
    if marker is None:
        return True
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < len(marker):
                return False
            f.seek(size - len(marker))
            return f.read(len(marker)) == marker
    except OSError:
        return False


def _decode_problem(path: str) -> str | None:
    """Why PIL cannot decode the file in full, or None when it can."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - any failure to decode is the answer
        return f"{type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------------------------ synthetic

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


# ----------------------------------------------------------------------------------- the bundle

@dataclass
class DataBundle:
    """Everything the pipeline needs from the data section."""

    train_loader: DataLoader
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
    fmt, seed, augment = data_cfg.format, data_cfg.seed, data_cfg.augment
    meaningful = True
    if fmt == "fashion_mnist":
        if channels not in (1, 3):
            raise DataError(f"Fashion-MNIST is grayscale; the model takes {channels} channels (use 1 or 3)")
        root = data_cfg.root or FASHION_MNIST_ROOT
        mean = (data_cfg.mean or [FASHION_MNIST_MEAN])[0]
        std = (data_cfg.std or [FASHION_MNIST_STD])[0]
        train_images, train_labels = load_fashion_mnist(root, "train")
        val_images, val_labels = load_fashion_mnist(root, "test")
        train = TensorImages(train_images, train_labels, channels, size, mean, std, augment)
        val = TensorImages(val_images, val_labels, channels, size, mean, std)
        calib = train.with_augment(False)
        class_names, description = list(FASHION_MNIST_CLASSES), f"Fashion-MNIST from {root}"
    elif fmt == "imagefolder":
        mean = data_cfg.mean or (IMAGENET_MEAN if channels == 3 else [sum(IMAGENET_MEAN) / 3])
        std = data_cfg.std or (IMAGENET_STD if channels == 3 else [sum(IMAGENET_STD) / 3])
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"data.mean/std have {len(mean)}/{len(std)} entries but the model takes "
                            f"{channels} channels")
        train, val, calib = load_imagefolder(data_cfg.root, size, channels, mean, std, augment)
        class_names, description = list(train.classes), f"ImageFolder {data_cfg.root}"
    elif fmt == "synthetic":
        syn = data_cfg.synthetic
        shape = (channels, *size)
        train = SyntheticImages(syn.num_samples, syn.num_classes, shape, seed)
        val = SyntheticImages(max(1, syn.num_samples // 4), syn.num_classes, shape, seed + 1)
        calib = train
        class_names, meaningful = [str(i) for i in range(syn.num_classes)], False
        description = f"synthetic random tensors {list(shape)} (accuracy is not meaningful)"
    else:
        raise DataError(f"unknown data.format {fmt!r}; valid: imagefolder, fashion_mnist, synthetic")

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
