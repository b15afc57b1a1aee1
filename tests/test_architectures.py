"""Architecture coverage: torchvision models pruned to half their MACs (random init, 32 px)."""
import pytest
import torch
import torchvision

from pfp_deploy.errors import UnsupportedModelError
from pfp_deploy.pruning import count_cost, prune

# The default suite keeps one of each kind: inverted residual (mobilenet_v2), depthwise + SE
# (mobilenet_v3_small), grouped (regnet_x_400mf); the rest run with --runslow (vgg11_bn alone is 12 s:
# reconstruction of its 4096-wide classifier; resnext50 and efficientnet_b0 10-15 s: wide Grams).
FAST = ["mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf"]
SLOW = ["resnet18", "resnet50", "vgg11_bn", "densenet121", "convnext_tiny", "efficientnet_b0", "resnext50_32x4d"]
ARCHS = FAST + [pytest.param(arch, marks=pytest.mark.slow) for arch in SLOW]


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_half_macs(arch):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, [torch.randn(2, 3, 32, 32)], x, keep=0.5)
    macs0, _ = count_cost(model, x)
    macs1, _ = count_cost(result.model, x)
    assert abs(macs1 / macs0 - 0.5) <= 0.01, f"{arch}: achieved {macs1 / macs0:.4f}"
    with torch.no_grad():
        assert result.model(x).shape == model(x).shape
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model changed"
    assert result.report["skipped_groups"] == [], f"{arch}: {result.report['skipped_groups']}"  # all removable


def test_shufflenet_is_reported_unsupported_with_the_op():
    model = torchvision.models.shufflenet_v2_x1_0(weights=None, num_classes=10).eval()
    with pytest.raises(UnsupportedModelError, match="ShuffleNetV2 at op .*Reshape"):
        prune(model, [torch.randn(2, 3, 32, 32)], torch.randn(1, 3, 32, 32), keep=0.5)
