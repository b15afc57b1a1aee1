"""Model sources: builtins, torchvision, checkpoints, factories, and the offline weights rule."""
import sys

import pytest
import torch
from torch import nn

from pfp_deploy.errors import ModelLoadError
from pfp_deploy.models import (
    BUILTIN_MODELS,
    build_model,
    known_model_names,
    load_checkpoint_state,
    resnet20,
    torchvision_weights_file,
    vgg_small,
)
from pfp_deploy.recipe import ModelConfig


def cfg(**values) -> ModelConfig:
    return ModelConfig(**values)


@pytest.mark.parametrize("name", ["resnet20", "vgg_small"])
def test_builtin_forward_shapes(name):
    model = build_model(cfg(source="builtin", name=name, input_shape=[1, 1, 28, 28]), 10, 1).eval()
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_builtin_structure():
    net = resnet20(10, 1)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 21 and convs[0].in_channels == 1  # 19 + two 1x1 projection shortcuts
    assert 0.25e6 < sum(p.numel() for p in net.parameters()) < 0.3e6
    vgg = vgg_small(10, 3, (32, 32))
    assert any(isinstance(m, nn.Flatten) for m in vgg.modules())
    assert not any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)) for m in vgg.modules())
    assert vgg.classifier[1].in_features == 128 * 4 * 4
    assert vgg(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_by_name():
    model = build_model(cfg(source="torchvision", name="resnet18"), num_classes=7, in_channels=1)
    assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 7)
    with pytest.raises(ModelLoadError, match='Did you mean "resnet18"'):
        build_model(ModelConfig.model_construct(source="torchvision", name="resnet81", weights=None,
                                                kwargs={}, num_classes=10, in_channels=3))


def test_checkpoint_roundtrip_and_wrappers(tmp_path):
    model = resnet20(10, 1)
    path = tmp_path / "dense.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    before = path.read_bytes()
    loaded = build_model(cfg(source="checkpoint", name="resnet20", path=str(path)), 10, 1)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert path.read_bytes() == before  # the input file is never modified
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, ddp)
    assert set(load_checkpoint_state(ddp)) == set(model.state_dict())
    via_weights = build_model(cfg(source="builtin", name="resnet20", weights=str(ddp)), 10, 1)
    assert torch.equal(via_weights.fc.weight, model.fc.weight)


def test_mismatched_checkpoint_lists_keys(tmp_path):
    path = tmp_path / "vgg.pt"
    torch.save(vgg_small(10, 1, (28, 28)).state_dict(), path)
    with pytest.raises(ModelLoadError) as info:
        build_model(cfg(source="checkpoint", name="resnet20", path=str(path)), 10, 1)
    message = str(info.value)
    assert "does not fit resnet20" in message and "missing keys" in message and "conv1.weight" in message
    other_classes = tmp_path / "r20_5.pt"
    torch.save(resnet20(5, 1).state_dict(), other_classes)
    with pytest.raises(ModelLoadError, match=r"fc.weight: checkpoint \(5, 64\) vs model \(10, 64\)"):
        build_model(cfg(source="checkpoint", name="resnet20", path=str(other_classes)), 10, 1)


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_checkpoint_state(tmp_path / "nothing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="torch.save\\(model.state_dict\\(\\), path\\)"):
        load_checkpoint_state(tmp_path / "junk.pt")
    torch.save(resnet20(10, 1), tmp_path / "pickled.pt")  # a whole pickled module
    with pytest.raises(ModelLoadError, match="weights only"):
        load_checkpoint_state(tmp_path / "pickled.pt")


def test_factory(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def tiny(num_classes, width=4):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, width),\n"
        "                               torch.nn.Linear(width, num_classes))\n"
        "def not_a_model():\n    return 42\n"
        "def broken():\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_models", None)
    model = build_model(cfg(source="factory", factory="my_models:tiny", kwargs={"width": 8}), 3, 1)
    assert model(torch.zeros(2, 1, 4, 4)).shape == (2, 3) and model[1].out_features == 8
    by_file = build_model(cfg(source="factory", factory=f"{tmp_path}/my_models.py:tiny"), 5, 1)
    assert by_file[2].out_features == 5
    for spec, match in (("no_such_module:f", "cannot import 'no_such_module'"),
                        ("my_models:tinny", 'Did you mean "tiny"'),
                        ("my_models:not_a_model", "not a torch nn.Module"),
                        ("my_models:broken", "raised RuntimeError: boom")):
        with pytest.raises(ModelLoadError, match=match):
            build_model(cfg(source="factory", factory=spec), 3, 1)


def test_weights_tag_offline_says_how_to_provide(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    weights, cached = torchvision_weights_file("resnet50", "IMAGENET1K_V2")
    assert cached == tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    with pytest.raises(ModelLoadError) as info:
        build_model(cfg(source="torchvision", name="resnet50", weights="IMAGENET1K_V2"), 1000, 3)
    message = str(info.value)
    assert "never downloads" in message and str(cached) in message and "weights: /path/to/file.pth" in message
    with pytest.raises(ModelLoadError, match='Did you mean "IMAGENET1K_V2"'):
        build_model(cfg(source="torchvision", name="resnet50", weights="IMAGENET1K_V3"), 1000, 3)


def test_weights_tag_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    _, cached = torchvision_weights_file("resnet18", "IMAGENET1K_V1")
    cached.parent.mkdir(parents=True)
    reference = build_model(cfg(source="torchvision", name="resnet18"), 1000, 3)
    torch.save(reference.state_dict(), cached)  # stands in for the real file (no download here)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    model = build_model(cfg(source="torchvision", name="resnet18", weights="IMAGENET1K_V1"), 1000, 3)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    new_head = build_model(cfg(source="torchvision", name="resnet18", weights="IMAGENET1K_V1"), 4, 1)
    assert new_head.fc.out_features == 4 and new_head.conv1.in_channels == 1
    assert torch.allclose(new_head.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))


def test_known_model_names():
    assert known_model_names("builtin") == list(BUILTIN_MODELS) and "resnet20" in BUILTIN_MODELS
    assert "resnet50" in known_model_names("torchvision") and "resnet20" in known_model_names()


def test_a_checkpoint_with_a_card_is_verified_and_names_the_command_that_recreates_it(tmp_path):
    import json

    from pfp_deploy.fileio import file_sha256

    path = tmp_path / "weights" / "net.pt"
    path.parent.mkdir()
    torch.save(resnet20(10, 1).state_dict(), path)
    card = {"sha256": file_sha256(path), "command": "python -m benchmarks.train_baseline --out X"}
    path.with_suffix(".json").write_text(json.dumps(card))
    model_cfg = cfg(source="builtin", name="resnet20", in_channels=1, weights=str(path))
    assert isinstance(build_model(model_cfg, 10, 1), nn.Module)

    with path.open("r+b") as f:  # one flipped byte near the end: a corrupt download or copy
        f.seek(-10, 2)
        byte = f.read(1)
        f.seek(-10, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelLoadError, match="corrupt or was replaced. Recreate it with `python -m benchmarks"):
        build_model(model_cfg, 10, 1)
    path.unlink()
    with pytest.raises(ModelLoadError, match="does not exist.*made by `python -m benchmarks.train_baseline"):
        build_model(model_cfg, 10, 1)


# --------------------------------------------------------------------- the model source registry

from pfp_deploy.model_sources import model_source_names  # noqa: E402
from pfp_deploy.recipe import validate_section  # noqa: E402


def test_the_builtin_sources_are_registered_and_only_data_sources_may_be_named_by_files():
    from pfp_deploy.model_sources import model_sources

    assert {"torchvision", "builtin", "checkpoint", "factory", "pruned"} <= set(model_source_names())
    assert {s.name for s in model_sources() if s.in_files} == {"torchvision", "builtin"}


@pytest.mark.parametrize("name", model_source_names())
def test_every_source_names_its_required_keys_and_a_misspelt_source_points_at_it(name):
    from pfp_deploy.errors import RecipeError
    from pfp_deploy.model_sources import get_model_source

    required = get_model_source(name).required
    if required:
        with pytest.raises(RecipeError) as info:
            validate_section(ModelConfig, {"source": name}, "model")
        for key in required:
            assert f"model.{key}: required when model.source is {name}" in str(info.value)
    with pytest.raises(RecipeError, match=f'Did you mean "{name}"'):
        validate_section(ModelConfig, {"source": name[:-1] + "q", "name": "resnet20"}, "model")


def test_each_builtin_source_builds_a_model(tmp_path):
    state = tmp_path / "r20.pt"
    torch.save(resnet20(num_classes=10, in_channels=1).state_dict(), state)
    settings = {"builtin": {"name": "resnet20"}, "torchvision": {"name": "resnet18"},
                "checkpoint": {"name": "resnet20", "path": str(state)},
                "factory": {"factory": "pfp_deploy.architectures:resnet20"}}
    for source, fields in settings.items():
        model = build_model(validate_section(ModelConfig, {"source": source, **fields}, "model"),
                            num_classes=10, in_channels=1)
        assert model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 10), source
