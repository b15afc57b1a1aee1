"""Tiny models and synthetic data for the fine-tuning tests (also used by the torchrun worker)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


def quadrant_data(n: int, seed: int = 0, noise: float = 0.3) -> TensorDataset:
    """1x8x8 images whose class (0..3) is the one bright 4x4 quadrant: easy to learn."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = noise * torch.randn(n, 1, 8, 8, generator=g)
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, 0, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4] += 1.0
    return TensorDataset(images, labels)


class TinyNet(nn.Module):
    """conv -> (BN) -> ReLU -> 2x2 pool -> (dropout) -> linear."""

    def __init__(self, num_classes: int = 4, batchnorm: bool = True, dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if batchnorm else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(self.dropout(x.flatten(1)))


def tiny_net(seed: int = 0, **kwargs) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kwargs)
