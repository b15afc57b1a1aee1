"""Data sources: IDX parsing, Fashion-MNIST, ImageFolder, synthetic, calibration subsets and size."""
import gzip
from pathlib import Path

import pytest
import torch

from pfp_deploy.data import (
    build_data,
    calibration_size,
    calibration_subset,
    count_output_units,
    load_fashion_mnist,
    paper_calibration_size,
    read_idx,
)
from pfp_deploy.data_formats import data_format_names
from pfp_deploy.errors import DataError, PruningError, UsageError
from pfp_deploy.models import resnet20, vgg_small
from pfp_deploy.recipe import DataConfig

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {FASHION_ROOT} (apt-get install dataset-fashion-mnist)")


def write_idx(path: Path, array: torch.Tensor, magic: bytes | None = None, compress: bool = True) -> Path:
    header = magic or bytes([0, 0, 8, array.dim()])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.to(torch.uint8).numpy().tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def fake_fashion(root: Path, n_train: int = 40, n_test: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", torch.arange(n) % 10)
    return root


# --------------------------------------------------------------------------------------- IDX

def test_read_idx_roundtrip(tmp_path):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    assert torch.equal(read_idx(write_idx(tmp_path / "x.gz", images), 3), images)
    assert torch.equal(read_idx(write_idx(tmp_path / "x", images, compress=False), 3), images)


def test_read_idx_rejects_bad_magic_truncation_and_bad_gzip(tmp_path):
    images = torch.zeros(3, 4, 4)
    with pytest.raises(DataError, match="magic number 00000903"):
        read_idx(write_idx(tmp_path / "magic.gz", images, magic=bytes([0, 0, 9, 3])), 3)
    with pytest.raises(DataError, match="magic"):  # labels file read as images
        read_idx(write_idx(tmp_path / "labels.gz", torch.zeros(3)), 3)
    raw = gzip.decompress(write_idx(tmp_path / "ok.gz", images).read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(DataError, match="corrupt"):
        read_idx(tmp_path / "short.gz", 3)
    good = (tmp_path / "ok.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="not a readable gzip"):
        read_idx(tmp_path / "cut.gz", 3)


@needs_fashion
def test_real_fashion_mnist():
    images, labels = load_fashion_mnist(FASHION_ROOT, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.uint8
    assert set(labels.unique().tolist()) == set(range(10))
    mean = images.float().div(255).mean().item()
    assert abs(mean - 0.2860) < 0.01  # the normalisation constants fit the data


def test_missing_fashion_root_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path / "nowhere", "train")
    assert "data.root" in str(info.value)
    (tmp_path / "partial").mkdir()
    with pytest.raises(DataError, match="is missing"):
        load_fashion_mnist(tmp_path / "partial", "train")


def test_fashion_bundle_from_fake_files(tmp_path):
    root = fake_fashion(tmp_path / "fm")
    cfg = DataConfig(format="fashion_mnist", root=str(root), batch_size=8, train_subset=20,
                     calibration_samples=10)
    bundle = build_data(cfg, [1, 1, 28, 28])
    x, y = next(iter(bundle.train_loader))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(bundle.train_loader.dataset) == 20 and len(bundle.val_loader.dataset) == 12
    assert bundle.num_classes == 10 and bundle.meaningful_accuracy
    assert len(bundle.calib_loader.dataset) == 10
    # 3-channel 32x32 models get the grayscale image replicated and resized
    x3, _ = next(iter(build_data(cfg, [1, 3, 32, 32]).val_loader))
    assert x3.shape == (8, 3, 32, 32) and torch.equal(x3[:, 0], x3[:, 2])


def test_the_finetune_loader_is_unaugmented_unless_asked(tmp_path):
    """finetune.augment false (the default): the fine-tune reads the training images as evaluated (calib_dataset's
    transforms), shuffled; true: train_loader's augmented images (data.augment)."""
    root = fake_fashion(tmp_path / "fm")
    bundle = build_data(DataConfig(format="fashion_mnist", root=str(root), batch_size=40, augment=True), [1, 1, 28, 28])
    plain = bundle.finetune_loader(augment=False)
    assert bundle.finetune_loader(augment=True) is bundle.train_loader
    assert plain is not bundle.train_loader and not plain.dataset.augment and bundle.train_loader.dataset.augment
    def first_batch(loader):
        loader.generator.manual_seed(0)  # the same shuffle each time: what differs is the images' transforms
        return next(iter(loader))[0]

    evaluated = torch.stack([bundle.calib_dataset[i][0] for i in range(40)])
    x = first_batch(plain)
    assert torch.equal(x, first_batch(plain)) and not torch.equal(x, evaluated)  # shuffled, never cropped or flipped
    assert torch.equal(x.flatten(1).sort(0).values, evaluated.flatten(1).sort(0).values)
    assert not torch.equal(first_batch(bundle.train_loader), first_batch(bundle.train_loader))  # random crops/flips


def test_subsets_are_seeded():
    cfg = DataConfig(format="synthetic", train_subset=30, seed=3)
    first = build_data(cfg, [1, 3, 16, 16]).train_loader.dataset.indices
    assert first == build_data(cfg, [1, 3, 16, 16]).train_loader.dataset.indices
    other = build_data(DataConfig(format="synthetic", train_subset=30, seed=4), [1, 3, 16, 16])
    assert other.train_loader.dataset.indices != first


# ------------------------------------------------------------------------------- ImageFolder

def make_image_tree(root: Path, classes=("cat", "dog"), per_class: int = 3) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for i, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(per_class):
                Image.new("RGB", (40, 30), (40 * i, 20 * j, 100)).save(folder / f"{j}.png")
    return root


def test_imagefolder_bundle(tmp_path):
    root = make_image_tree(tmp_path / "images")
    cfg = DataConfig(format="imagefolder", root=str(root), batch_size=4)
    bundle = build_data(cfg, [1, 3, 32, 32])
    assert bundle.class_names == ["cat", "dog"] and bundle.num_classes == 2
    x, y = next(iter(bundle.train_loader))
    assert x.shape == (4, 3, 32, 32)
    xv, _ = next(iter(bundle.val_loader))
    assert xv.shape == (4, 3, 32, 32)
    calib = next(iter(bundle.calibration_loader(4)))[0]
    assert torch.equal(calib, next(iter(bundle.calibration_loader(4)))[0])  # eval transforms: deterministic
    gray = build_data(cfg, [1, 1, 24, 24])
    assert next(iter(gray.val_loader))[0].shape == (4, 1, 24, 24)


def test_imagefolder_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "absent")):
        build_data(DataConfig(format="imagefolder", root=str(tmp_path / "absent")), [1, 3, 32, 32])
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(DataError, match="holds no usable images"):
        build_data(DataConfig(format="imagefolder", root=str(tmp_path / "empty")), [1, 3, 32, 32])
    (tmp_path / "noval" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="val"):
        build_data(DataConfig(format="imagefolder", root=str(tmp_path / "noval")), [1, 3, 32, 32])


def _jpeg_tree(root: Path) -> Path:
    """A 2-class ImageFolder of real JPEGs (noise, so the files are several KB and cutting them hurts)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for j in range(2):
                pixels = torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8, generator=g).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{j}.jpg", quality=90)
    return root


def test_truncated_jpeg_fails_in_the_data_stage_naming_the_file(tmp_path):
    from PIL import Image

    root = _jpeg_tree(tmp_path / "images")
    cfg = DataConfig(format="imagefolder", root=str(root), batch_size=2)
    # A valid JPEG with bytes after its end marker (some cameras append data) is not flagged.
    extra = root / "val" / "dog" / "1.jpg"
    extra.write_bytes(extra.read_bytes() + b"\0" * 16)
    build_data(cfg, [1, 3, 32, 32])

    bad = root / "train" / "dog" / "1.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(OSError, match="truncated"):  # what PIL itself says, with no file name
        with Image.open(bad) as image:
            image.load()
    with pytest.raises(DataError, match=r"1 image file\(s\) under .* cannot be decoded") as info:
        build_data(cfg, [1, 3, 32, 32])
    assert str(bad) in str(info.value) and "truncated" in str(info.value)


def test_image_loader_names_a_file_that_breaks_after_the_data_stage(tmp_path):
    """A file damaged after the check (or inside a complete file) fails at use, still naming the file."""
    root = _jpeg_tree(tmp_path / "images")
    bundle = build_data(DataConfig(format="imagefolder", root=str(root), batch_size=2), [1, 3, 32, 32])
    bad = root / "train" / "cat" / "0.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    index = next(i for i, (path, _) in enumerate(bundle.calib_dataset.samples) if path == str(bad))
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        bundle.calib_dataset[index]
    with pytest.raises(DataError, match=str(bad)):
        list(bundle.calibration_loader(4))


# --------------------------------------------------------------------------------- synthetic

def test_synthetic_is_flagged_and_reproducible():
    cfg = DataConfig(format="synthetic", batch_size=16, synthetic={"num_classes": 4, "num_samples": 64})
    bundle = build_data(cfg, [1, 3, 16, 16])
    assert bundle.meaningful_accuracy is False and bundle.num_classes == 4
    x, y = next(iter(bundle.val_loader))
    assert x.shape == (16, 3, 16, 16) and int(y.max()) < 4
    again, _ = next(iter(build_data(cfg, [1, 3, 16, 16]).val_loader))
    assert torch.equal(x, again)


# ------------------------------------------------------------------------------- calibration

def test_calibration_subset_seeded_and_sharded():
    data = list(range(100))
    draw = calibration_subset(data, 20, seed=1).indices
    assert draw == calibration_subset(data, 20, seed=1).indices and len(set(draw)) == 20
    shards = [calibration_subset(data, 20, seed=1, shard=(r, 3)).indices for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(draw)
    assert len(calibration_subset(data, 500, seed=0)) == 100  # capped at the dataset size
    with pytest.raises(DataError):
        calibration_subset([], 5)


def test_paper_calibration_size():
    units = count_output_units(resnet20(10, 1), torch.zeros(1, 1, 28, 28))
    assert len(units) == 22 and units[0] == 16 * 28 * 28 and units[-1] == 10  # 19 convs + 2 shortcuts + fc
    assert 150 <= paper_calibration_size(units) <= 220
    assert paper_calibration_size([100, 10]) == 145  # ceil(3 ln(8 * 100 * 110 / 1e-16)) = ceil(144.7)
    vgg_units = count_output_units(vgg_small(10, 1, (28, 28)), torch.zeros(1, 1, 28, 28))
    assert vgg_units[-2:] == [256, 10]
    assert calibration_size(64, None, None) == 64
    assert calibration_size("auto", resnet20(10, 1), torch.zeros(1, 1, 28, 28)) == paper_calibration_size(units)
    with pytest.raises(PruningError):
        paper_calibration_size([])


def test_count_output_units_skips_depthwise_and_keeps_mode():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=4), torch.nn.Conv2d(4, 8, 1),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 3))
    model.train()
    assert count_output_units(model, torch.zeros(1, 4, 8, 8)) == [8 * 6 * 6, 3]
    assert model.training


# ----------------------------------------------------------------------- the data format registry

DOC_FORMAT = "tensor-file"


@pytest.fixture
def doc_format(tmp_path):
    """docs/extending.md's example format, imported as a user's own file, with its data on disk."""
    from helpers.doc_examples import registered_doc_example

    from pfp_deploy.data_formats import REGISTRY

    root = tmp_path / "tensors"
    root.mkdir()
    gen = torch.Generator().manual_seed(0)
    for name, n in (("train", 48), ("val", 16)):
        torch.save({"images": torch.randint(0, 256, (n, 20, 20), dtype=torch.uint8, generator=gen),
                    "labels": torch.arange(n) % 4}, root / f"{name}.pt")
    with registered_doc_example("A data format", "tensor_file_format", DOC_FORMAT, REGISTRY, tmp_path) as entry:
        yield entry, root


def _recipe(fmt: str, **data):
    return {"name": "r", "model": {"source": "builtin", "name": "resnet20"}, "data": {"format": fmt, **data},
            "export": {"formats": []}, "checks": {"targets": []}}


def test_the_builtin_formats_are_registered():
    assert {"fashion_mnist", "imagefolder", "synthetic"} <= set(data_format_names())


@pytest.mark.parametrize("name", data_format_names())
def test_every_format_validates_and_fills_the_input_shape_from_its_defaults(name, tmp_path):
    from pfp_deploy.data_formats import get_data_format
    from pfp_deploy.recipe import load_recipe

    fmt = get_data_format(name)
    recipe = load_recipe(_recipe(name, root=str(tmp_path)))
    assert recipe.data.format == name
    assert recipe.model.input_shape == [1, fmt.channels, fmt.image_size, fmt.image_size]
    with pytest.raises(UsageError, match=f'Did you mean "{name}"'):
        load_recipe(_recipe(name[:-1] + "x" + name[-1], root=str(tmp_path)))


def test_the_documented_format_runs_a_recipe(doc_format, tmp_path):
    from pfp_deploy.errors import RecipeError
    from pfp_deploy.pipeline import optimize
    from pfp_deploy.recipe import load_recipe

    entry, root = doc_format
    with pytest.raises(RecipeError, match="data.root: required"):  # the format's own recipe-time check
        load_recipe(_recipe(DOC_FORMAT))
    bundle = build_data(load_recipe(_recipe(DOC_FORMAT, root=str(root))).data, [1, 3, 32, 32])
    x, y = bundle.train_loader.dataset[0]
    assert x.shape == (3, 32, 32) and bundle.num_classes == 4 and "tensor files" in bundle.description
    recipe = _recipe(DOC_FORMAT, root=str(root), batch_size=16, calibration_samples=16)
    recipe.update(prune={"keep": 0.6, "round_to": 1}, finetune={"epochs": 0})
    result = optimize(recipe, output_dir=tmp_path / "runs", progress=False).raise_for_status()
    assert result.report["data"]["format"] == DOC_FORMAT and result.report["prune"]["steps"]
