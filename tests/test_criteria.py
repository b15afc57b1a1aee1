"""pfp_deploy.criteria: every registered criterion prunes through the same pipeline as PFP."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers.doc_examples import registered_doc_example

from pfp_deploy.criteria import (
    REGISTRY,
    Criterion,
    criterion_names,
    get_criterion,
    register_criterion,
)
from pfp_deploy.errors import CalibrationError, RecipeError, UsageError
from pfp_deploy.pruning import count_cost, prune
from pfp_deploy.recipe import load_recipe

DOC_EXAMPLE = "mean-abs"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "fashion_mnist_quickstart.yaml"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)  # no BatchNorm: bn_scale falls back to L1 here
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():  # distinct BN scales, so bn_scale has a ranking to give
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.1, 1.0)
    return model


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(1)
    return [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]


X = torch.randn(1, 1, 8, 8)


@pytest.fixture
def doc_criterion(tmp_path):
    """Register the doc's example the way the doc says: import the file that holds it. Removed after."""
    with registered_doc_example("A pruning criterion", "mean_abs_criterion", DOC_EXAMPLE, REGISTRY, tmp_path) as entry:
        yield entry


EVERY = [*criterion_names(), DOC_EXAMPLE]  # every registered entry, and the doc's


def test_the_issue_s_criteria_are_registered():
    assert {"pfp", "l1", "l2", "taylor", "fpgm", "bn_scale", "random"} <= set(criterion_names())


@pytest.mark.parametrize("name", EVERY)
def test_each_criterion_prunes_to_the_target_and_leaves_the_model_alone(name, net, calib, request):
    if name == DOC_EXAMPLE:
        request.getfixturevalue("doc_criterion")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dense_macs = count_cost(net, X)[0]
    result = prune(net, calib, X, keep=0.5, method=name, seed=3, tolerance=0.05, reconstruct="none")
    assert abs(result.report["achieved"] - 0.5) <= result.report["allowed_deviation"]
    assert result.report["method"] == name
    assert result.model(X).shape == net(X).shape == (1, 10)
    assert count_cost(net, X)[0] == dense_macs  # the caller's model: same shapes, weights, no gradient
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert all(p.grad is None for p in result.model.parameters())
    again = prune(net, calib, X, keep=0.5, method=name, seed=3, tolerance=0.05, reconstruct="none")
    assert again.report["groups"] == result.report["groups"]  # same seed, same widths
    assert again.plan.steps[0]["groups"] == result.plan.steps[0]["groups"]  # ... and the same channels


def test_criteria_choose_differently_but_allocate_alike(net, calib):
    kept = {}
    for name in ("pfp", "l1", "random"):
        result = prune(net, calib, X, keep=0.5, method=name, seed=0, tolerance=0.05, reconstruct="none",
                       allocation="uniform")
        kept[name] = result.plan.steps[0]["groups"]
    widths = {n: [g["width_after"] for g in gs] for n, gs in kept.items()}
    assert widths["pfp"] == widths["l1"] == widths["random"]  # uniform allocation: the same widths
    assert kept["l1"] != kept["random"]  # ... but other channels


def test_random_is_seeded(net, calib):
    plans = [prune(net, calib, X, keep=0.5, method="random", seed=s, tolerance=0.05, reconstruct="none").plan
             for s in (0, 0, 1)]
    assert plans[0].steps[0]["groups"] == plans[1].steps[0]["groups"]
    assert plans[0].steps[0]["groups"] != plans[2].steps[0]["groups"]


def test_unknown_method_gets_a_did_you_mean(net, calib):
    with pytest.raises(UsageError, match='unknown pruning method \'tayler\'.*Did you mean "taylor"'):
        prune(net, calib, X, keep=0.5, method="tayler")
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["prune"]["method"] = "fpmg"
    with pytest.raises(RecipeError, match=r"prune\.method: unknown pruning method 'fpmg'.*Did you mean \"fpgm\""):
        load_recipe(recipe)
    recipe["prune"]["method"] = "L1"
    assert load_recipe(recipe).prune.method == "l1"


def test_method_and_importance_are_exclusive_and_variants_are_pfp_s(net, calib):
    with pytest.raises(UsageError, match="not both"):
        prune(net, calib, X, keep=0.5, method="l1", importance=lambda group: torch.ones(len(group[0].idxs)))
    with pytest.raises(UsageError, match="variant: randomized samples channels by PFP's sensitivities"):
        prune(net, calib, X, keep=0.5, method="l1", variant="randomized")


def test_taylor_needs_labelled_batches(net):
    with pytest.raises(CalibrationError, match=r"needs labelled calibration: \(inputs, labels\) batches"):
        prune(net, [torch.randn(8, 1, 8, 8)], X, keep=0.5, method="taylor", reconstruct="none")


def test_registration_refuses_what_would_break_the_registry():
    with pytest.raises(TypeError):
        register_criterion(object)

    class Bad(Criterion):
        name = "Not A Name"

    with pytest.raises(UsageError, match="lower-case name"):
        register_criterion(Bad)

    class Clash(Criterion):
        name = "l1"

    with pytest.raises(UsageError, match="already registered"):
        register_criterion(Clash)
    assert type(get_criterion("l1")).__name__ == "L1"
