"""reconstruct(): least-squares refit of pruned consumers onto the dense model's outputs.

Also the worker of the 2-process torchrun test: `torchrun ... tests/test_reconstruction.py OUT_DIR ARCH`.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pfp_deploy.errors import CalibrationError, UsageError
from pfp_deploy.models import resnet20, vgg_small
from pfp_deploy.pruning import Plan, apply_plan, prune
from pfp_deploy.reconstruction import IndexMap, ReconstructionResult, index_maps_from_plan, reconstruct

TORCHRUN = Path(sys.executable).with_name("torchrun")
TORCHRUN_CMD = [str(TORCHRUN)] if TORCHRUN.exists() else [sys.executable, "-m", "torch.distributed.run"]


# ------------------------------------------------------------------------------ models and helpers

class ConcatNet(nn.Module):
    """Two branches concatenated, then a conv, pooling and a Linear (concat index mapping)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 10, 3, padding=1), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.mix(torch.cat([self.a(x), self.b(x)], 1))
        return self.fc(x.mean((2, 3)))


class DepthwiseNet(nn.Module):
    """conv -> depthwise conv -> conv -> Linear (the depthwise conv is refit per channel)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.conv2 = nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.conv1(x))))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def batches(n_batches: int, batch: int, shape, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g) for _ in range(n_batches)]


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = resnet20(num_classes=10, in_channels=1, widths=(8, 16, 32))
    _randomise_bn(model)
    return model.eval()


def _randomise_bn(model: nn.Module) -> None:
    """BN statistics that are not the identity, so that BN placement matters."""
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def output_error(dense: nn.Module, pruned: nn.Module, data) -> float:
    with torch.no_grad():
        num = sum(float((pruned(x) - dense(x)).pow(2).sum()) for x in data)
        den = sum(float(dense(x).pow(2).sum()) for x in data)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def resnet_case():
    dense = small_resnet()
    calib = batches(4, 16, (1, 16, 16), seed=1)
    # The paper's allocation prunes every stream here (conv1 included), which these tests rely on.
    result = prune(dense, calib, calib[0][:1], keep=0.5, reconstruct="none", allocation="paper")
    return dense, calib, result


# ------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_removed_channels_that_are_combinations_of_kept_ones_reconstruct_exactly(kind):
    torch.manual_seed(0)
    if kind == "conv":  # 1x1 conv -> 3x3 conv with bias
        dense = nn.Sequential(nn.Conv2d(3, 6, 1, bias=False), nn.Conv2d(6, 5, 3, padding=1))
    else:  # conv -> flatten -> Linear: one channel maps to 16 features
        dense = nn.Sequential(nn.Conv2d(3, 6, 1, bias=False), nn.Flatten(), nn.Linear(6 * 16, 5))
    with torch.no_grad():
        w = dense[0].weight
        w[4] = w[0] + 2 * w[1]  # channel 4 = x0 + 2 x1, channel 5 = x2 - x3 (no nonlinearity between)
        w[5] = w[2] - w[3]
    dense.eval()
    calib = batches(5, 40, (3, 4, 4), seed=2)
    plan = Plan([{"groups": [{"root": "0", "width_before": 6, "width_after": 4, "kept": [0, 1, 2, 3]}]}])
    pruned = apply_plan(dense, plan, calib[0][:1])
    consumer = "1" if kind == "conv" else "2"
    assert output_error(dense, pruned, calib) > 0.1

    result = reconstruct(dense, pruned, calib, plan=plan, ridge=1e-12, progress=True)
    layer = {entry.name: entry for entry in result.layers}[consumer]
    assert layer.error_before > 0.1 and layer.error_after < 1e-6
    assert layer.kept_in == (4 if kind == "conv" else 64) and layer.kept_out == 5 and layer.status == "refit"
    assert output_error(dense, pruned, calib) < 1e-5
    test = batches(1, 8, (3, 4, 4), seed=9)  # exact on unseen inputs too: the relation is linear
    assert output_error(dense, pruned, test) < 1e-5


# ------------------------------------------------------------------------------ error never increases

def test_reconstruction_never_increases_a_consumers_error_and_leaves_dense_alone(resnet_case):
    dense, calib, pruned_result = resnet_case
    dense.train()  # its mode must come back
    before_state = snapshot(dense)
    pruned = copy.deepcopy(pruned_result.model)
    err0 = output_error(dense.eval(), pruned, calib)
    dense.train()
    result = reconstruct(dense, pruned, calib, plan=pruned_result.plan)
    assert dense.training and all(m.training for m in dense.modules())
    assert all(torch.equal(v, before_state[k]) for k, v in dense.state_dict().items())
    assert isinstance(result, ReconstructionResult) and result.layers
    for layer in result.layers:
        assert layer.error_after <= layer.error_before + 1e-9, layer
        assert layer.ridge_used > 0 and layer.rows > 0
    assert sum(layer.status == "refit" for layer in result.layers) >= len(result.layers) - 2
    dense.eval()
    assert output_error(dense, pruned, calib) < 0.5 * err0
    report = result.to_dict()
    assert set(report["layers"][0]) >= {"name", "error_before", "error_after", "ridge_used", "kept_in", "kept_out"}
    assert report["seconds"] > 0 and report["samples"] == 64
    json.dumps(report)  # serialisable


def test_reconstruction_generalises_to_unseen_inputs(resnet_case):
    dense, calib, pruned_result = resnet_case
    pruned = copy.deepcopy(pruned_result.model)
    held_out = batches(2, 16, (1, 16, 16), seed=7)
    err0 = output_error(dense, pruned, held_out)
    reconstruct(dense, pruned, calib, plan=pruned_result.plan)
    assert output_error(dense, pruned, held_out) < err0


def test_layers_pruned_only_refits_changed_shapes(resnet_case):
    dense, calib, pruned_result = resnet_case
    pruned = copy.deepcopy(pruned_result.model)
    result = reconstruct(dense, pruned, calib, plan=pruned_result.plan, layers="pruned")
    for layer in result.layers:
        assert (layer.kept_in, layer.kept_out) != (layer.in_before, layer.out_before)


# ------------------------------------------------------------------------------ architectures

@pytest.mark.parametrize("arch", ["resnet", "concat", "vgg_flatten", "depthwise"])
def test_shapes_are_kept_on_residual_concat_flatten_and_depthwise_models(arch):
    torch.manual_seed(0)
    if arch == "resnet":
        dense, shape = small_resnet(), (1, 16, 16)
    elif arch == "concat":
        dense, shape = ConcatNet().eval(), (3, 8, 8)
    elif arch == "vgg_flatten":
        dense = vgg_small(num_classes=4, in_channels=1, image_size=(8, 8), config=(8, "M", 16, "M"), hidden=12).eval()
        shape = (1, 8, 8)
    else:
        dense, shape = DepthwiseNet().eval(), (3, 8, 8)
    calib = batches(4, 32, shape, seed=3)
    result = prune(dense, calib, calib[0][:1], keep=0.5, tolerance=0.05,  # tiny models: coarse steps
                   reconstruct="none")
    pruned = copy.deepcopy(result.model)
    err0 = output_error(dense, pruned, calib)
    rec = reconstruct(dense, pruned, calib, plan=result.plan)
    with torch.no_grad():
        assert pruned(calib[0]).shape == dense(calib[0]).shape
    assert output_error(dense, pruned, calib) < err0
    assert all(layer.error_after <= layer.error_before + 1e-9 for layer in rec.layers)
    if arch == "vgg_flatten":  # the flatten -> Linear consumer is refit with feature-level maps
        fc = {layer.name: layer for layer in rec.layers}["classifier.1"]
        assert fc.in_before == 16 * 2 * 2 and fc.kept_in % 4 == 0 and fc.kept_in < fc.in_before
    if arch == "depthwise":  # refit per channel, reported with the layer's channel counts
        dw = {layer.name: layer for layer in rec.layers}["dw"]
        assert (dw.kept_in, dw.kept_out, dw.in_before, dw.out_before) == (6, 6, 12, 12)
        assert not rec.skipped


class GroupedNet(nn.Module):
    """conv -> grouped conv (3 groups, 2 outputs per group) -> depthwise conv -> Linear."""

    def __init__(self, bias: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.grouped = nn.Conv2d(12, 6, 3, padding=1, groups=3, bias=bias)
        self.dw = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=bias)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.dw(torch.relu(self.grouped(torch.relu(self.conv1(x)))))
        return self.fc(torch.relu(x).mean((2, 3)))


@pytest.mark.parametrize("bias", [True, False])
def test_grouped_and_depthwise_convs_are_refit_per_group_exactly(bias):
    """Each group's outputs are a linear function of its own inputs: with the dense inputs, a grouped
    or depthwise conv whose weights were disturbed is refit back to the dense weights (~0 error),
    group by group, and the groups a refit would not improve keep their weights."""
    torch.manual_seed(0)
    dense = GroupedNet(bias).eval()
    calib = batches(4, 32, (3, 8, 8), seed=3)
    pruned = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        pruned.grouped.weight.add_(0.3 * torch.randn(pruned.grouped.weight.shape, generator=g))
        pruned.dw.weight[:3].mul_(1.5)  # channels 3..5 keep the dense weights
    rec = reconstruct(dense, pruned, calib, ridge=0.0)
    layers = {layer.name: layer for layer in rec.layers}
    assert layers["grouped"].error_before > 0.1 and layers["grouped"].error_after < 1e-6
    assert torch.allclose(pruned.grouped.weight, dense.grouped.weight, atol=1e-4)
    assert torch.allclose(pruned.dw.weight, dense.dw.weight, atol=1e-4)
    if bias:
        assert torch.allclose(pruned.dw.bias, dense.dw.bias, atol=1e-4)
    assert layers["dw"].error_after < 1e-6 and layers["dw"].rows == 4 * 32 * 4 * 4
    assert output_error(dense, pruned, calib) < 1e-5


def test_a_dead_depthwise_channel_with_ridge_0_takes_the_minimum_norm_solution():
    torch.manual_seed(0)
    dense = GroupedNet(True).eval()
    with torch.no_grad():  # grouped output 1 is always 0: dw channel 1's normal equations are singular
        dense.grouped.weight[1].zero_()
        dense.grouped.bias[1] = 0.0
    calib = batches(3, 32, (3, 8, 8), seed=3)
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned.dw.weight.mul_(1.3)
    rec = reconstruct(dense, pruned, calib, ridge=0.0)
    dw = {layer.name: layer for layer in rec.layers}["dw"]
    assert dw.error_after < 1e-6 < dw.error_before
    assert torch.isfinite(pruned.dw.weight).all()
    assert float(pruned.dw.weight.detach()[1].abs().max()) == 0.0  # minimum norm: nothing for an input that is 0
    assert torch.allclose(pruned.dw.bias, dense.dw.bias, atol=1e-5)


def test_grouped_layers_follow_a_pruning_plan_and_never_get_worse():
    """After pruning (the plan gives the kept channels of every grouped conv) the grouped layers are
    refit, no layer's calibration error goes up, and a grouped conv whose kept channels are unknown
    (no plan, shapes differ) is left unchanged and reported."""
    torch.manual_seed(0)
    dense = GroupedNet(True).eval()
    calib = batches(4, 32, (3, 8, 8), seed=3)
    result = prune(dense, calib, calib[0][:1], keep=0.8, tolerance=0.05, reconstruct="none")
    pruned = copy.deepcopy(result.model)
    err0 = output_error(dense, pruned, calib)
    rec = reconstruct(dense, pruned, calib, plan=result.plan)
    assert pruned.grouped.out_channels < dense.grouped.out_channels  # the plan pruned through both
    names = {layer.name for layer in rec.layers}
    assert "dw" in names and "grouped" in names | set(rec.exact)  # exact: dense inputs, dense kept rows
    assert all(layer.error_after <= layer.error_before + 1e-9 for layer in rec.layers)
    assert output_error(dense, pruned, calib) <= err0 + 1e-7
    maps = index_maps_from_plan(dense, result.plan, calib[0][:1])
    assert maps["dw"].kept_in is None and maps["dw"].kept_out.numel() == pruned.dw.out_channels
    other = copy.deepcopy(result.model)  # the same maps without the grouped convs' entries
    rec2 = reconstruct(dense, other, calib, index_maps={n: m for n, m in maps.items() if n not in ("grouped", "dw")})
    assert {s["name"] for s in rec2.skipped if "not known" in s["reason"]} == {"grouped", "dw"}
    assert torch.equal(other.dw.weight, result.model.dw.weight)
    with pytest.raises(UsageError, match="kept_out only"):
        reconstruct(dense, copy.deepcopy(result.model), calib, index_maps={**maps, "dw": (torch.tensor([0]), None)})


def test_independent_branches_share_a_pass():
    dense = ConcatNet().eval()
    calib = batches(3, 32, (3, 8, 8), seed=3)
    plan = Plan([{"groups": [{"root": "stem.0", "width_before": 8, "width_after": 5, "kept": [0, 2, 3, 5, 7]}]}])
    pruned = apply_plan(dense, plan, calib[0][:1])
    rec = reconstruct(dense, pruned, calib, plan=plan)
    assert [layer.name for layer in rec.layers] == ["a.0", "b.0", "mix.0", "fc"]  # forward order
    assert rec.exact == ["stem.0"]  # only its outputs were removed: the kept ones are exact
    assert rec.passes["pruned"] == 3  # a and b read the stem, not each other: one pass for both


def test_after_randomized_variant_and_in_a_cascade(resnet_case):
    dense, calib, _ = resnet_case
    randomized = prune(dense, calib, calib[0][:1], keep=0.5, variant="randomized", seed=3, reconstruct="none")
    pruned = copy.deepcopy(randomized.model)
    err0 = output_error(dense, pruned, calib)
    rec = reconstruct(dense, pruned, calib, plan=randomized.plan)
    assert output_error(dense, pruned, calib) < err0
    assert all(layer.error_after <= layer.error_before + 1e-9 for layer in rec.layers)

    stage1 = prune(dense, calib, calib[0][:1], keep=0.75, reconstruct="none")
    stage2 = prune(stage1.model, calib, calib[0][:1], keep=0.5 / 0.75, reconstruct="none")
    both = stage1.plan.then(stage2.plan)
    to_dense = copy.deepcopy(stage2.model)  # refit onto the original dense model: maps compose
    err0 = output_error(dense, to_dense, calib)
    reconstruct(dense, to_dense, calib, plan=both)
    assert output_error(dense, to_dense, calib) < err0
    to_stage1 = copy.deepcopy(stage2.model)  # or onto the previous stage's model
    err0 = output_error(stage1.model, to_stage1, calib)
    reconstruct(stage1.model, to_stage1, calib, plan=stage2.plan)
    assert output_error(stage1.model, to_stage1, calib) < err0


def test_index_maps_argument_equals_plan(resnet_case):
    dense, calib, pruned_result = resnet_case
    maps = index_maps_from_plan(dense, pruned_result.plan, calib[0][:1])
    assert maps["conv1"].kept_in is None and maps["conv1"].kept_out is not None
    assert maps["fc"].kept_out is None  # classes are never pruned
    a, b = copy.deepcopy(pruned_result.model), copy.deepcopy(pruned_result.model)
    reconstruct(dense, a, calib, plan=pruned_result.plan)
    as_tuples = {name: (m.kept_in, m.kept_out) for name, m in maps.items()}
    reconstruct(dense, b, calib, index_maps=as_tuples)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert IndexMap().changed is False
    same = copy.deepcopy(dense)  # equal shapes and no plan: nothing was pruned, nothing to refit
    nothing = reconstruct(dense, same, calib)
    assert nothing.layers == [] and all(torch.equal(v, dense.state_dict()[k]) for k, v in same.state_dict().items())


def test_memory_bound_streams_and_gives_the_same_weights():
    dense = ConcatNet().eval()
    calib = batches(16, 25, (3, 8, 8), seed=3)
    loader = DataLoader(TensorDataset(torch.cat(calib), torch.zeros(400)), batch_size=25)  # (x, y) pairs
    plan = Plan([{"groups": [{"root": "stem.0", "width_before": 8, "width_after": 5, "kept": [0, 2, 3, 5, 7]}]}])
    roomy, tight = apply_plan(dense, plan, calib[0][:1]), apply_plan(dense, plan, calib[0][:1])
    a = reconstruct(dense, roomy, loader, plan=plan)
    b = reconstruct(dense, tight, loader, plan=plan, max_memory_mb=1.2)  # inputs and targets do not fit
    assert a.passes["data_reads"] == 1 and a.passes["dense"] == 1
    assert b.passes["data_reads"] > 1 and b.passes["dense"] > 1 and not b.skipped
    for (name, x), y in zip(roomy.state_dict().items(), tight.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    c = reconstruct(dense, apply_plan(dense, plan, calib[0][:1]), loader, plan=plan, max_memory_mb=0.5)
    assert any(s["name"] == "mix.0" and "Gram matrix" in s["reason"] for s in c.skipped)  # left unchanged
    assert "mix.0" not in [layer.name for layer in c.layers]

    shuffled = DataLoader(TensorDataset(torch.cat(calib)), batch_size=25, shuffle=True)
    with pytest.raises(CalibrationError, match="changed between passes"):
        reconstruct(dense, apply_plan(dense, plan, calib[0][:1]), shuffled, plan=plan, max_memory_mb=1.2)


# ------------------------------------------------------------------------------ bad input

def test_one_shot_iterator_is_refused(resnet_case):
    dense, calib, pruned_result = resnet_case
    with pytest.raises(CalibrationError, match="one-shot iterator.*list"):
        reconstruct(dense, copy.deepcopy(pruned_result.model), (x for x in calib), plan=pruned_result.plan)
    with pytest.raises(CalibrationError, match="empty"):
        reconstruct(dense, copy.deepcopy(pruned_result.model), [], plan=pruned_result.plan)


def test_too_few_samples_for_the_gram_rank():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4)).eval()
    calib = batches(2, 20, (3, 4, 4))
    plan = Plan([{"groups": [{"root": "0", "width_before": 8, "width_after": 6, "kept": [0, 1, 2, 3, 4, 5]}]}])
    pruned = apply_plan(dense, plan, calib[0][:1])
    with pytest.raises(CalibrationError, match=r'too few calibration samples.*"3".*97 unknowns.*at least 97'):
        reconstruct(dense, pruned, calib, plan=plan)
    result = reconstruct(dense, pruned, calib, plan=plan, underdetermined="skip")
    assert result.layers == [] and result.skipped[0]["name"] == "3" and "underdetermined" in result.skipped[0]["reason"]
    with pytest.raises(UsageError, match="underdetermined"):
        reconstruct(dense, pruned, calib, plan=plan, underdetermined="ignore")


def test_nan_activations_name_the_layer(resnet_case):
    dense, calib, pruned_result = resnet_case
    bad = [c.clone() for c in calib]
    bad[1][0, 0, 3, 3] = float("nan")
    with pytest.raises(CalibrationError, match='non-finite.*layer "'):
        reconstruct(dense, copy.deepcopy(pruned_result.model), bad, plan=pruned_result.plan)


def test_mismatched_models_and_bad_settings_are_refused(resnet_case):
    dense, calib, pruned_result = resnet_case
    with pytest.raises(UsageError, match="plan"):
        reconstruct(dense, copy.deepcopy(pruned_result.model), calib)  # shapes differ, no plan
    with pytest.raises(UsageError, match="ridge"):
        reconstruct(dense, copy.deepcopy(pruned_result.model), calib, plan=pruned_result.plan, ridge=-1)
    with pytest.raises(UsageError, match="layers"):
        reconstruct(dense, copy.deepcopy(pruned_result.model), calib, plan=pruned_result.plan, layers="some")
    other = prune(dense, calib, calib[0][:1], keep=0.7, reconstruct="none")
    with pytest.raises(UsageError, match="weight shape"):
        reconstruct(dense, copy.deepcopy(pruned_result.model), calib, plan=other.plan)


# ------------------------------------------------------------------------------ devices

@pytest.mark.gpu
def test_cuda_matches_cpu(resnet_case):
    dense, calib, pruned_result = resnet_case
    on_cpu, on_gpu = copy.deepcopy(pruned_result.model), copy.deepcopy(pruned_result.model).cuda()
    a = reconstruct(dense, on_cpu, calib, plan=pruned_result.plan)
    b = reconstruct(dense, on_gpu, calib, plan=pruned_result.plan)  # dense is copied to the GPU, not moved
    assert not next(dense.parameters()).is_cuda
    assert next(on_gpu.parameters()).is_cuda  # the pruned model stays where it was
    for (name, x), y in zip(on_cpu.state_dict().items(), on_gpu.state_dict().values()):
        torch.testing.assert_close(x, y.cpu(), rtol=1e-2, atol=1e-3, msg=name)  # cuDNN may use TF32 convs
    for la, lb in zip(a.layers, b.layers):
        assert la.name == lb.name and abs(la.error_after - lb.error_after) < 1e-2


# ------------------------------------------------------------------------------ torchrun

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_case(arch: str):
    """ResNet (residual adds) or MobileNetV2-small (depthwise convs, refit per group)."""
    if arch == "mobilenet":
        from pfp_deploy.architectures import mobilenetv2_small
        torch.manual_seed(0)
        dense = mobilenetv2_small(num_classes=10, in_channels=1).eval()
        _randomise_bn(dense)
        return dense, batches(34, 8, (1, 28, 28), seed=4)  # 272 rows: its Linear head has up to 257 unknowns
    return small_resnet(), batches(6, 8, (1, 16, 16), seed=4)


@pytest.mark.slow  # the default suite checks the same weights in test_pipeline.py's torchrun run
@pytest.mark.parametrize("arch", ["resnet", "mobilenet"])
def test_torchrun_two_processes_equal_single_process(tmp_path, arch):
    dense, calib = _torchrun_case(arch)
    result = prune(dense, calib, calib[0][:1], keep=0.5, reconstruct="none")
    (tmp_path / "plan.json").write_text(json.dumps(result.plan.to_dict()))
    single_model = apply_plan(dense, result.plan, calib[0][:1])
    single = reconstruct(dense, single_model, calib, plan=result.plan)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [*TORCHRUN_CMD, "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(Path(__file__).resolve()), str(tmp_path), arch]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    total = sum(len(x) for x in calib)
    assert reports[0]["local_samples"] == reports[1]["local_samples"] == total // 2
    for name, value in single_model.state_dict().items():
        assert torch.equal(states[0][name], states[1][name]), name  # every rank holds one model
        torch.testing.assert_close(states[0][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for one, dist in zip(single.layers, reports[0]["result"]["layers"]):
        assert one.name == dist["name"] and dist["rows"] == one.rows
        # abs: a layer refit exactly (error ~0) reads sqrt(residual / energy) of a cancelling difference of
        # sums, ~1e-7 of rounding that depends on the summation order
        assert dist["error_after"] == pytest.approx(one.error_after, rel=1e-6, abs=1e-6)
    assert reports[0]["result"]["samples"] == single.samples == total
    if arch == "mobilenet":  # the depthwise convs took part: refit from the all-reduced per-group sums
        depthwise = {n for n, m in dense.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
        assert depthwise & {layer.name for layer in single.layers}


def _worker(out_dir: Path, arch: str) -> None:  # run by torchrun: each rank reconstructs from its shard
    from pfp_deploy.distributed import cleanup, init_distributed

    ctx = init_distributed(device="cpu")
    try:
        torch.set_num_threads(1)
        dense, calib = _torchrun_case(arch)
        plan = Plan.from_dict(json.loads((out_dir / "plan.json").read_text()))
        pruned = apply_plan(dense, plan, calib[0][:1])
        shard = calib[ctx.rank::ctx.world_size]
        result = reconstruct(dense, pruned, shard, plan=plan, example_inputs=calib[0][:1])
        torch.save(pruned.state_dict(), out_dir / f"rank{ctx.rank}.pt")
        (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(
            {"result": result.to_dict(), "local_samples": sum(len(x) for x in shard)}))
    finally:
        cleanup()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])


# ------------------------------------------------------------------ held-out per-layer errors

def test_layer_errors_match_an_explicit_computation_and_leave_the_models_alone():
    from pfp_deploy.reconstruction import IndexMap, layer_errors

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5)).eval()
    pruned = copy.deepcopy(dense).train()
    with torch.no_grad():
        pruned[2].weight.add_(0.1 * torch.randn_like(pruned[2].weight))  # only the 1x1 conv differs
    batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    maps = {"0": IndexMap(None, None), "2": IndexMap(None, None), "4": IndexMap(None, None)}
    errors = layer_errors(dense, pruned, batches, maps)
    assert errors["0"] == 0.0 and errors["2"] > 0 and errors["4"] > 0  # upstream error reaches the Linear
    x = torch.cat(batches)
    with torch.no_grad():
        hidden = dense[1](dense[0](x))
        want = (pruned[2](hidden) - dense[2](hidden)).norm() / dense[2](hidden).norm()
    assert errors["2"] == pytest.approx(float(want), rel=1e-5)
    assert pruned.training and not dense.training  # train/eval flags came back
    kept = IndexMap(None, torch.tensor([0, 2]))  # a layer that kept output channels 0 and 2 of 4
    head = dense[:3]  # conv -> relu -> 1x1 conv, the last one pruned to 2 of its 4 outputs below
    small = copy.deepcopy(head)
    small[2] = nn.Conv2d(8, 2, 1)
    with torch.no_grad():
        small[2].weight.copy_(head[2].weight[[0, 2]])
        small[2].bias.copy_(head[2].bias[[0, 2]])
    assert layer_errors(head, small, batches, {"2": kept})["2"] == pytest.approx(0.0, abs=1e-7)
