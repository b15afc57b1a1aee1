"""prune(allocation=...): paper, uniform and the least-squares cost-aware allocation."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from pfp_deploy.errors import RecipeError, UsageError
from pfp_deploy.models import resnet20
from pfp_deploy.pfp import cost_aware
from pfp_deploy.pfp.sensitivity import sensitivity
from pfp_deploy.pruning import count_cost, prune
from pfp_deploy.recipe import PruneConfig, validate_section

X = torch.randn(1, 1, 8, 8)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = resnet20(num_classes=10, in_channels=1).eval()
    calib = [torch.randn(16, 1, 8, 8)]
    return model, calib, sensitivity(model, calib)


def run(toy, **kwargs):
    model, calib, scores = toy
    return prune(model, calib, X, sensitivities=scores, reconstruct="none", **kwargs)


def achieved(model, pruned):
    return count_cost(pruned, X)[0] / count_cost(model, X)[0]


def test_report_names_the_allocation_and_the_papers_eps(toy):
    paper = run(toy, keep=0.5, allocation="paper")
    chosen = run(toy, keep=0.5)  # the default
    assert chosen.report["allocation"] == cost_aware.DEFAULT_ALLOCATION == PruneConfig().allocation
    assert paper.report["allocation"] == "paper"
    assert chosen.report["epsilon"] == paper.report["epsilon"]  # the paper's eps for the same target
    assert paper.report["epsilon_widths"] == paper.report["epsilon"]
    assert chosen.plan.steps[0]["allocation"] == chosen.report["allocation"]


def test_uniform_hits_the_target_with_near_equal_ratios(toy):
    result = run(toy, keep=0.5, allocation="uniform")
    assert abs(achieved(toy[0], result.model) - 0.5) <= 0.01
    ratios = [g["width_after"] / g["width_before"] for g in result.report["groups"]]
    assert max(ratios) - min(ratios) <= 1.0 / 16 + 1e-9  # one channel of the narrowest group


@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_cost_aware_hits_the_target_and_respects_constraints(toy, keep):
    model = toy[0]
    result = run(toy, keep=keep, allocation="cost_aware", round_to=4, min_channels=8,
                 ignored_layers=["layer1.0.conv1"])
    assert abs(achieved(model, result.model) - keep) <= 0.01
    for group in result.report["groups"]:
        assert group["width_after"] >= min(8, group["width_before"])
        assert group["width_after"] % 4 == 0 or group["width_after"] == group["width_before"]
    assert result.model.layer1[0].conv1.out_channels == 16  # ignored
    assert result.model(X).shape == (1, 10)
    norefit = run(toy, keep=keep, allocation="cost_aware_norefit")
    assert abs(achieved(model, norefit.model) - keep) <= 0.01


class Redundant(nn.Module):
    """Two 16-channel groups of equal cost; the first one's channels are 4 copies of 4 filters."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.c = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.head = nn.Linear(16, 5)
        with torch.no_grad():
            self.a.weight.copy_(self.a.weight[:4].repeat(4, 1, 1, 1))

    def forward(self, x):
        x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.head(x.mean((2, 3)))


def test_cost_aware_prunes_the_redundant_group_more():
    torch.manual_seed(0)
    model = Redundant().eval()
    calib = [torch.randn(16, 3, 8, 8)]
    x = torch.randn(1, 3, 8, 8)
    result = prune(model, calib, x, keep=0.6, allocation="cost_aware", reconstruct="none", tolerance=0.03)
    widths = {g["name"]: g["width_after"] for g in result.report["groups"]}
    assert widths["a"] < widths["b"], widths
    # the error curve of the redundant group is flat until only the 4 distinct filters remain
    stats = cost_aware.gram_statistics(model, calib, ["b"])
    order = np.arange(16)[::-1]  # copies 4..15 leave first
    curve = cost_aware.consumer_curve(stats["b"], np.arange(16), np.arange(16), order, ridge=1e-6)
    assert curve[12] < 1e-4 < curve[13]


def test_bad_allocation_name_suggests_the_right_one(toy):
    with pytest.raises(UsageError, match='Did you mean "uniform"'):
        run(toy, keep=0.5, allocation="unifrom")
    with pytest.raises(RecipeError, match='Did you mean "cost_aware"'):
        validate_section(PruneConfig, {"allocation": "cost-aware"}, "prune")
    assert validate_section(PruneConfig, {"allocation": "paper"}, "prune").allocation == "paper"


def test_a_missed_coarse_target_falls_back_to_another_allocation():
    """Greedy searches over rounded widths can miss a coarse target: prune() then tries the next
    allocation (reported as allocation_used) instead of failing. This case (l1 scores, 16 px ResNet-20,
    round_to 16, keep 0.7) is one the cost-aware search misses."""
    torch.manual_seed(0)
    model = resnet20(num_classes=4).eval()
    calib = [torch.randn(16, 3, 16, 16) for _ in range(2)]
    result = prune(model, calib, torch.zeros(1, 3, 16, 16), keep=0.7, round_to=16, method="l1")
    report = result.report
    assert report["allocation"] == "cost_aware" and report["allocation_used"] == "uniform"  # measured: 0.688
    assert abs(report["achieved"] - 0.7) <= 0.01 and result.plan.steps[0]["allocation"] == "uniform"
