"""Builtin architectures: small CNNs for 28x28 / 32x32 images, sized for 2-core CPU benchmarks.

`BUILTIN_MODELS` is the table `model.builtin` (recipes) and `--model` (CLI) look names up in. Add an
architecture by writing its constructor here (keyword arguments num_classes and in_channels) and one
entry in the table.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pfp_deploy.errors import ModelLoadError


class BasicBlock(nn.Module):
    """CIFAR ResNet block: two 3x3 conv-BN, plus a 1x1 conv-BN shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:  # option B: projection shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images (He et al. 2016, sec. 4.2): 3 stages of BasicBlocks, widths 16/32/64."""

    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10, in_channels: int = 3,
                 widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, in_planes = [], widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_planes, width, stride))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class VGGSmall(nn.Module):
    """VGG-style conv-BN-ReLU stack ending in flatten -> Linear -> ReLU -> Linear.

    Flatten (not global pooling) on purpose: pruning must map conv channels to Linear features.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: tuple[int, int] = (32, 32),
                 config: tuple = (32, 32, "M", 64, 64, "M", 128, 128, "M"), hidden: int = 256):
        super().__init__()
        layers: list[nn.Module] = []
        channels, (height, width) = in_channels, image_size
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        if height < 1 or width < 1:
            raise ModelLoadError(f"vgg_small: input {image_size} is too small for {config.count('M')} "
                                 "max-pools; use images of at least 8x8")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, hidden),
                                        nn.ReLU(), nn.Linear(hidden, num_classes))
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block (Sandler et al. 2018): 1x1 expansion conv-BN-ReLU6 (absent when expand == 1),
    depthwise 3x3 conv-BN-ReLU6 (groups = channels, carries the stride), 1x1 linear projection conv-BN;
    plus the input when the stride is 1 and the widths match (residual add)."""

    def __init__(self, in_planes: int, planes: int, stride: int, expand: int):
        super().__init__()
        hidden = in_planes * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, planes, 1, bias=False), nn.BatchNorm2d(planes)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_planes == planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Small(nn.Module):
    """MobileNetV2-style net for 28x28 / 32x32 inputs: a stride-1 3x3 stem, inverted residual stages
    (expand t, width c, blocks n, first stride s), a 1x1 conv-BN-ReLU6 head, global pooling, Linear.

    Three stride-2 stages (28 -> 14 -> 7 -> 4, 32 -> 16 -> 8 -> 4) instead of the ImageNet net's five.
    """

    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 2), (4, 96, 1, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 3, stem: int = 16, head: int = 256,
                 settings: tuple = SETTINGS):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU6())
        blocks: list[nn.Module] = []
        in_planes = stem
        for expand, planes, repeats, stride in settings:
            for i in range(repeats):
                blocks.append(InvertedResidual(in_planes, planes, stride if i == 0 else 1, expand))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(in_planes, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _kaiming_init(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def resnet20(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> CifarResNet:
    """CIFAR-style ResNet-20 (0.27M parameters at 10 classes)."""
    return CifarResNet(3, num_classes, in_channels, **kwargs)


def vgg_small(num_classes: int = 10, in_channels: int = 3, image_size: tuple[int, int] = (32, 32),
              **kwargs: Any) -> VGGSmall:
    """Small VGG for 28x28 / 32x32 inputs; image_size sets the flatten -> Linear width."""
    return VGGSmall(num_classes, in_channels, tuple(image_size), **kwargs)


def mobilenetv2_small(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> MobileNetV2Small:
    """MobileNetV2-style depthwise-separable net for 28x28 / 32x32 inputs (inverted residuals, expansion 4)."""
    return MobileNetV2Small(num_classes, in_channels, **kwargs)


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"resnet20": resnet20, "vgg_small": vgg_small,
                                                       "mobilenetv2_small": mobilenetv2_small}


def known_model_names(kind: str = "any") -> list[str]:
    """Model names for `builtin`, `torchvision` (classification models) or `any` (both)."""
    names = list(BUILTIN_MODELS) if kind in ("builtin", "any") else []
    if kind in ("torchvision", "any"):
        import torchvision

        names += torchvision.models.list_models(module=torchvision.models)
    return names
