"""pfp_deploy.architectures: the builtin mobilenetv2_small (depthwise-separable, inverted residuals)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pfp_deploy.architectures import BUILTIN_MODELS, InvertedResidual, mobilenetv2_small
from pfp_deploy.pruning import count_cost, prune


def test_mobilenetv2_small_is_registered_and_runs_at_28_and_32_pixels():
    assert BUILTIN_MODELS["mobilenetv2_small"] is mobilenetv2_small
    torch.manual_seed(0)
    for in_channels, size in ((1, 28), (3, 32)):
        model = mobilenetv2_small(num_classes=7, in_channels=in_channels).eval()
        assert model(torch.randn(2, in_channels, size, size)).shape == (2, 7)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert any(b.use_residual for b in blocks) and not all(b.use_residual for b in blocks)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


@pytest.mark.parametrize("allocation", ["cost_aware", "uniform", "paper"])
def test_prune_keeps_half_the_macs_of_mobilenetv2_small(allocation):
    torch.manual_seed(0)
    model = mobilenetv2_small(num_classes=10, in_channels=1).eval()
    example = torch.randn(1, 1, 28, 28)
    calibration = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(2)]
    dense_macs = count_cost(model, example)[0]
    result = prune(model, calibration, example, keep=0.5, allocation=allocation,
                   reconstruct="least_squares" if allocation == "cost_aware" else "none")
    macs = count_cost(result.model, example)[0]
    assert abs(macs / dense_macs - 0.5) <= 0.01
    assert result.model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    for m in result.model.modules():  # depthwise convs stay depthwise after channel removal
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels
