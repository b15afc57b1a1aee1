"""Fashion-MNIST: Debian's dataset-fashion-mnist package (or any directory holding the four IDX files,
gzipped or not). 28x28 grayscale, 10 classes, 60k training and 10k test images."""
from __future__ import annotations

import copy
import gzip
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from pfp_deploy.data_formats import DataFormat, Splits, register_data_format
from pfp_deploy.errors import DataError
from pfp_deploy.schema import DEFAULT_FASHION_MNIST_ROOT

FASHION_MNIST_ROOT = DEFAULT_FASHION_MNIST_ROOT  # Debian's dataset-fashion-mnist (the recipe default, in schema)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_UBYTE = 0x08


@register_data_format
class FashionMNIST(DataFormat):
    name = "fashion_mnist"
    summary = "the gzipped IDX files of Fashion-MNIST (data.root, default Debian's package)"
    channels, image_size, num_classes, allowed_channels = 1, 28, 10, (1, 3)  # 3: the gray channel replicated
    default_root = FASHION_MNIST_ROOT

    def load(self, cfg: Any, channels: int, size: tuple[int, int]) -> Splits:
        if channels not in (1, 3):
            raise DataError(f"Fashion-MNIST is grayscale; the model takes {channels} channels (use 1 or 3)")
        root = cfg.root or FASHION_MNIST_ROOT
        mean = (cfg.mean or [FASHION_MNIST_MEAN])[0]
        std = (cfg.std or [FASHION_MNIST_STD])[0]
        train_images, train_labels = load_fashion_mnist(root, "train")
        val_images, val_labels = load_fashion_mnist(root, "test")
        train = TensorImages(train_images, train_labels, channels, size, mean, std, cfg.augment)
        val = TensorImages(val_images, val_labels, channels, size, mean, std)
        return Splits(train, val, train.with_augment(False), list(FASHION_MNIST_CLASSES),
                      f"Fashion-MNIST from {root}")


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
