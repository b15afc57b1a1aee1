"""prune(allocation=...): paper, uniform and the least-squares cost-aware allocation."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from pfp_deploy.criteria.lsq import GreedyLeastSquares
from pfp_deploy.errors import RecipeError, UsageError
from pfp_deploy.models import resnet20
from pfp_deploy.pfp import cost_aware
from pfp_deploy.pfp.groups import build_graph, collect_groups, output_layers
from pfp_deploy.pfp.sensitivity import sensitivity
from pfp_deploy.pruning import count_cost, prune
from pfp_deploy.recipe import PruneConfig, validate_section
from pfp_deploy.schema import ReconstructConfig

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
    result = prune(model, calib, x, keep=0.6, allocation="cost_aware", tolerance=0.03)
    widths = {g["name"]: g["width_after"] for g in result.report["groups"]}
    assert widths["a"] < widths["b"], widths  # copies are free only because the refit restores them:
    unrepaired = prune(model, calib, x, keep=0.6, allocation="cost_aware_norefit", reconstruct="none", tolerance=0.03)
    unrepaired_widths = {g["name"]: g["width_after"] for g in unrepaired.report["groups"]}
    assert unrepaired_widths["a"] > widths["a"], unrepaired_widths  # without it they cost what any channel does
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


def test_error_curve_is_the_least_squares_residual_and_no_refit_where_reconstruction_skips():
    """A Linear consumer with 10 calibration rows and 24 inputs + bias: widths keeping <= 9 inputs
    are refit (the curve is the explicit least-squares residual), wider ones are underdetermined,
    so reconstruction skips them and the curve is the error of dropping the columns unrefit."""
    torch.manual_seed(0)
    layer = nn.Linear(24, 6)
    x = torch.randn(10, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)
    stats = cost_aware.gram_statistics(nn.Sequential(layer), [x.float()], ["0"])["0"]
    assert stats.rows == 10 and stats.has_bias
    order = torch.randperm(24).numpy()
    curve = cost_aware.consumer_curve(stats, np.arange(24), np.arange(24), order, ridge=0.0)

    a = np.concatenate([x.float().double().numpy(), np.ones((10, 1))], 1)  # the rows gram_statistics saw
    w = np.concatenate([layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()[:, None]], 1)
    y = a @ w.T
    energy = ((y - y.mean(0)) ** 2).sum(0)
    for removed in (19, 21, 24, 3, 10):  # refit: kept 5, 3, 0 (+ bias); underdetermined: 21, 14
        kept = np.setdiff1d(np.arange(25), order[:removed])
        if kept.size <= 10:
            fit, *_ = np.linalg.lstsq(a[:, kept], y, rcond=None)
            residual = ((a[:, kept] @ fit - y) ** 2).sum(0)
        else:
            residual = ((a[:, order[:removed]] @ w[:, order[:removed]].T) ** 2).sum(0)
        expected = float((residual / energy).mean())
        assert curve[removed] == pytest.approx(expected, rel=1e-3, abs=1e-9), removed  # rel: the 1e-6 ridge floor


def test_lsq_removes_what_the_refit_restores_first_and_each_step_is_the_best_single_removal():
    torch.manual_seed(0)
    model = Redundant().eval()
    calib = [torch.randn(16, 3, 8, 8)]
    result = prune(model, calib, torch.randn(1, 3, 8, 8), keep=0.6, method="lsq", tolerance=0.03)
    assert result.report["method"] == "lsq" and result.report["criterion_fallback"] == []
    kept_a = next(g["kept"] for g in result.plan.steps[0]["groups"] if g["root"] == "a")
    assert {k % 4 for k in kept_a} == {0, 1, 2, 3}  # one of each distinct filter survives, copies go first

    graph = build_graph(model, torch.randn(1, 3, 8, 8))
    groups = {g.root_name: g for g in collect_groups(model, graph, output_layers(graph))[0]}
    stats = cost_aware.gram_statistics(model, calib, ["b", "c"])
    order = cost_aware.greedy_order(groups["b"], stats, ridge=1e-3)
    assert sorted(order.tolist()) == list(range(16))
    consumer = groups["b"].consumers[0]
    idx, root = consumer.in_idxs.numpy(), consumer.root_idxs.numpy()

    def first_removal_error(channel):
        rest = [c for c in range(16) if c != channel]
        return cost_aware.consumer_curve(stats["c"], idx, root, np.array([channel, *rest]), ridge=1e-3)[1]

    singles = [first_removal_error(c) for c in range(16)]
    assert first_removal_error(order[0]) == pytest.approx(min(singles), rel=1e-9)
    l1_first = int(np.argmin(model.b.weight.detach().abs().sum((1, 2, 3)).numpy()))
    assert first_removal_error(order[0]) <= first_removal_error(l1_first)


def test_lsq_ranks_with_its_own_selection_ridge_whatever_the_refits():
    """prune(method="lsq") keeps, in every group, the channels that greedy elimination at the
    criterion's selection ridge leaves last, with the refit's ridge at its default or 0; greedy at a
    tiny ridge would keep other channels here, so the test sees which ridge ranked them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5)).eval()
    calib = [torch.randn(256, 6)]
    example = torch.randn(1, 6)
    ridge = GreedyLeastSquares.selection_ridge
    assert ridge is not None and ridge != ReconstructConfig().ridge
    graph = build_graph(model, example)
    groups = {g.root_name: g for g in collect_groups(model, graph, output_layers(graph))[0]}
    stats = cost_aware.gram_statistics(model, calib, ["2", "4"])

    def greedy_kept(root, width, at):
        return sorted(cost_aware.greedy_order(groups[root], stats, ridge=at)[-width:].tolist())

    differs = []
    for refit_ridge in (ReconstructConfig().ridge, 0.0):
        result = prune(model, calib, example, keep=0.5, method="lsq", tolerance=0.05,
                       reconstruct={"ridge": refit_ridge})
        for group in result.plan.steps[0]["groups"]:
            kept = sorted(group["kept"])
            assert kept == greedy_kept(group["root"], len(kept), ridge), (refit_ridge, group["root"])
            differs.append(kept != greedy_kept(group["root"], len(kept), 1e-6))
        assert result.report["selection_ridge"] == ridge
    assert any(differs)


def test_an_underdetermined_consumer_keeps_its_rows_and_greedy_takes_the_no_refit_error_step_by_step():
    """Fewer calibration rows than columns: the statistics hold the rows (no Gram, far less work on
    small calibration sets), and each greedy step removes the channel whose unrefit removal adds the
    least to the explicit error ||X_R W_R^T||^2 (reconstruction skips such a layer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Linear(16, 5)).eval()
    calib = [torch.randn(9, 12)]
    stats = cost_aware.gram_statistics(model, calib, ["0", "1"])
    layer = stats["1"]
    assert layer.gram is None and layer.patches.shape == (9, 17) and layer.rows == 9
    graph = build_graph(model, torch.randn(1, 12))
    group = next(g for g in collect_groups(model, graph, output_layers(graph))[0] if g.root_name == "0")
    order = cost_aware.greedy_order(group, {"1": layer}, ridge=1e-3)

    x = layer.patches
    w = layer.weight / np.sqrt(((x @ layer.weight.T - (x @ layer.weight.T).mean(0)) ** 2).sum(0))[:, None]
    removed: list[int] = []
    for step in order:  # 16 channels: one per step
        def error(channels):
            return float(((x[:, channels] @ w[:, channels].T) ** 2).sum())
        best = min(error(removed + [c]) for c in range(16) if c not in removed)
        assert error(removed + [int(step)]) == pytest.approx(best, rel=1e-9)
        removed.append(int(step))
    # the Gram formed from the rows is the one a Gram accumulation gives
    with torch.no_grad():
        inputs = model[0](calib[0]).double().numpy()
    rows = np.concatenate([inputs, np.ones((9, 1))], 1)
    assert np.allclose(layer.full_gram(), rows.T @ rows)
    wide = cost_aware.gram_statistics(model, [torch.randn(40, 12)], ["1"])["1"]  # more rows than columns
    assert wide.patches is None and wide.gram.shape == (17, 17) and wide.rows == 40
