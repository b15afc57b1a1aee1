"""ImageFolder: <root>/train/<class>/*.jpg|png and <root>/val/<class>/..., read with torchvision.

Truncated JPEG/PNG files are found in the data stage (a cheap end-marker check of every file, a full
decode only of suspects), naming the files, rather than hours later inside a training epoch."""
from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from pfp_deploy.data_formats import DataFormat, Splits, register_data_format
from pfp_deploy.errors import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@register_data_format
class ImageFolderFormat(DataFormat):
    name = "imagefolder"
    summary = "<root>/train and <root>/val with one folder of images per class"
    channels, image_size, num_classes = 3, 224, None

    def problems(self, cfg: Any) -> list[tuple[str, str]]:
        if not cfg.root:
            return [("root", "required for format imagefolder: a directory holding train/ "
                     "and val/ class folders, e.g. root: /data/imagenet")]
        return []

    def load(self, cfg: Any, channels: int, size: tuple[int, int]) -> Splits:
        mean = cfg.mean or (IMAGENET_MEAN if channels == 3 else [sum(IMAGENET_MEAN) / 3])
        std = cfg.std or (IMAGENET_STD if channels == 3 else [sum(IMAGENET_STD) / 3])
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"data.mean/std have {len(mean)}/{len(std)} entries but the model takes "
                            f"{channels} channels")
        train, val, calib = load_imagefolder(cfg.root, size, channels, mean, std, cfg.augment)
        return Splits(train, val, calib, list(train.classes), f"ImageFolder {cfg.root}")


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
