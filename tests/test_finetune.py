"""Fine-tuning loop, schedule, losses, checkpoints/resume, evaluation and BN re-calibration."""
from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.finetune_toys import quadrant_data, tiny_net
from helpers.tiny_recipes import one_thread  # noqa: E402,F401 (autouse fixture: one intra-op thread)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pfp_deploy.errors import TrainingError, UsageError
from pfp_deploy.finetune import (
    FinetuneConfig,
    _set_rng_state,  # private: checked directly for the RNG round trip
    build_optimizer,
    build_scheduler,
    distillation_loss,
    evaluate,
    finetune,
    lr_factor,
    recalibrate_batchnorm,
)
from pfp_deploy.recipe import validate_section


def loaders(n_train=128, n_val=64, batch=16, generator=True):
    train = DataLoader(quadrant_data(n_train, seed=1), batch_size=batch, shuffle=True,
                       generator=torch.Generator() if generator else None)
    val = DataLoader(quadrant_data(n_val, seed=2), batch_size=batch)
    return train, val


OPTIMIZER_KEYS = ("lr", "momentum", "weight_decay", "nesterov")


def config(**overrides) -> FinetuneConfig:
    """The recipe's FinetuneConfig from short names: lr=..., optimizer="adamw", distill_alpha=..."""
    settings = dict(epochs=1, lr=0.1, weight_decay=0.0, momentum=0.0, scheduler="none") | overrides
    optimizer = {key: settings.pop(key) for key in OPTIMIZER_KEYS if key in settings}
    if "optimizer" in settings:
        optimizer["name"] = settings.pop("optimizer")
    distill = {key: settings.pop(f"distill_{key}") for key in ("alpha", "temperature") if f"distill_{key}" in settings}
    if distill:
        distill["enabled"] = distill.get("alpha", 0.5) > 0
    return FinetuneConfig(optimizer=optimizer, distill=distill, **settings)


def run(model, cfg, train=None, val=None, **kwargs):
    if train is None:
        train, val = loaders()
    return finetune(model, train, val, cfg, progress=False, **kwargs)


class ConstantLogits(nn.Module):
    """Ignores the input and returns a learnable logit vector for every sample."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


# ------------------------------------------------------------------------------------------- config
def test_config_from_dict_and_validation():
    cfg = validate_section(FinetuneConfig, {"epochs": "3", "optimizer": {"name": "adamw", "lr": "1e-3"},
                                            "grad_clip": 1}, "finetune")
    assert (cfg.epochs, cfg.optimizer.lr, cfg.optimizer.name, cfg.grad_clip) == (3, 1e-3, "adamw", 1.0)
    with pytest.raises(UsageError, match='finetune.label_smoothin: .*Did you mean "label_smoothing"'):
        validate_section(FinetuneConfig, {"label_smoothin": 0.1}, "finetune")
    for bad in ({"optimizer": {"name": "adam"}}, {"scheduler": "step"}, {"optimizer": {"lr": -1}},
                {"distill": {"alpha": 1.5}}, {"amp": "sometimes"}, {"epochs": 2.5},
                {"optimizer": {"nesterov": True, "momentum": 0.0}}, {"warmup_epochs": 5, "epochs": 2},
                {"early_stop_patience": 0}):
        with pytest.raises(UsageError, match="finetune"):
            validate_section(FinetuneConfig, bad, "finetune")
    with pytest.raises(UsageError, match="finetune.epochs"):  # finetune() validates a dict the same way
        run(tiny_net(), {"epochs": -1})


def test_eval_every_evaluates_every_nth_and_the_last_epoch():
    result = run(tiny_net(), config(epochs=5, eval_every=2))
    assert [h["val_top1"] is not None for h in result.history] == [False, True, False, True, True]


def test_usage_errors_at_start():
    with pytest.raises(UsageError, match="only supported on CUDA"):
        run(tiny_net(), config(amp=True))
    with pytest.raises(UsageError, match="no teacher"):
        run(tiny_net(), config(distill_alpha=0.5))


# ------------------------------------------------------------------------------------------ training
def test_loss_decreases_on_easy_task():
    train, val = loaders(n_train=256)
    result = run(tiny_net(), config(epochs=4, momentum=0.9, scheduler="cosine"), train, val)
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]
    assert result.final["val_top1"] > 0.9
    assert result.best_epoch is not None and result.best_top1 == max(r["val_top1"] for r in result.history)


def test_distillation_from_identical_teacher_has_zero_loss():
    student = tiny_net(batchnorm=False)  # no BN/dropout: train and eval mode give the same logits
    frozen = config(lr=0.0, distill_alpha=1.0, distill_temperature=3.0)
    result = run(student, frozen, teacher=copy.deepcopy(student))
    assert result.history[0]["train_loss"] < 1e-6
    other = run(tiny_net(batchnorm=False), frozen, teacher=tiny_net(seed=7, batchnorm=False))
    assert other.history[0]["train_loss"] > 1e-3


def test_distillation_auto_follows_the_teacher():
    """distill.enabled "auto" (the default) distils exactly when a teacher is given; false ignores one."""
    student = tiny_net(batchnorm=False)
    assert FinetuneConfig().distill.enabled == "auto"

    def first_loss(enabled, teacher):
        cfg = FinetuneConfig(epochs=1, optimizer={"lr": 0.0}, scheduler="none",
                             distill={"enabled": enabled, "alpha": 1.0, "temperature": 3.0})
        return run(copy.deepcopy(student), cfg, teacher=teacher).history[0]["train_loss"]

    labels_only = first_loss("auto", None)
    assert labels_only > 1e-3  # cross-entropy of an untrained net
    assert first_loss("auto", copy.deepcopy(student)) < 1e-6  # pure KD against itself
    assert first_loss(False, copy.deepcopy(student)) == pytest.approx(labels_only)


def test_the_teacher_is_a_folded_copy_and_both_models_come_back_as_given():
    """Distillation runs a frozen copy of the teacher (BN folded into the conv, channels_last on CPU):
    its logits are the teacher's, and the caller's teacher keeps its modes and weights; the student
    trains in channels_last and is returned in the default layout."""
    from pfp_deploy.finetune import inference_teacher

    teacher = tiny_net(seed=3).train()  # BN in train mode: the copy must still run it in eval mode
    with torch.no_grad():
        teacher.bn.running_mean.uniform_(-1, 1)
        teacher.bn.running_var.uniform_(0.5, 2)
    before = copy.deepcopy(teacher.state_dict())
    frozen = inference_teacher(teacher, torch.device("cpu"), channels_last=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())  # folded
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        expected = copy.deepcopy(teacher).eval()(x)
        assert torch.allclose(frozen(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)
    student = tiny_net()
    run(student, config(epochs=1, distill_alpha=0.5), teacher=teacher)
    assert teacher.training and all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert student.conv.weight.is_contiguous()  # back in the default layout
    assert FinetuneConfig().channels_last == "auto"


def test_distillation_mix_and_formula():
    student, teacher = tiny_net(batchnorm=False), tiny_net(seed=3, batchnorm=False)
    teacher.train()
    train, val = loaders(n_train=64, batch=16)
    mixed = run(student, config(lr=0.0, distill_alpha=0.5, distill_temperature=2.0), train, val,
                teacher=teacher)
    # Recompute by hand over the same (fixed) data: 0.5 * CE + 0.5 * T^2 * KL(p_t || p_s).
    x, y = train.dataset.tensors
    s, t = student(x), teacher(x)
    p_t = F.softmax(t / 2.0, dim=1)
    kl = (p_t * (F.log_softmax(t / 2.0, dim=1) - F.log_softmax(s / 2.0, dim=1))).sum(1).mean() * 4.0
    expected = 0.5 * F.cross_entropy(s, y) + 0.5 * kl
    assert mixed.history[0]["train_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(s, t, 2.0).item() == pytest.approx(kl.item(), rel=1e-5)
    assert teacher.training  # the teacher's mode is restored afterwards


def test_label_smoothing_applied():
    logits = [2.0, 0.0, -1.0, 0.5]
    train, val = loaders(n_train=64, batch=16)
    targets = train.dataset.tensors[1]
    log_p = F.log_softmax(torch.tensor(logits), dim=0)
    eps = 0.2
    expected = ((1 - eps) * -log_p[targets] - eps * log_p.mean()).mean().item()
    smoothed = run(ConstantLogits(logits), config(lr=0.0, label_smoothing=eps), train, val)
    plain = run(ConstantLogits(logits), config(lr=0.0), train, val)
    assert smoothed.history[0]["train_loss"] == pytest.approx(expected, rel=1e-5)
    assert plain.history[0]["train_loss"] == pytest.approx((-log_p[targets]).mean().item(), rel=1e-5)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_grad_clip_bounds_the_update(clip):
    model = tiny_net(batchnorm=False)
    x, y = quadrant_data(32, seed=4).tensors
    train = DataLoader(TensorDataset(x * 50, y), batch_size=32)  # large inputs -> large gradients
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    run(model, config(lr=1.0, grad_clip=clip, max_steps_per_epoch=1), train, None)
    step = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()
    if clip is None:
        assert step > 1.0
    else:  # SGD without momentum, lr 1: the update is the clipped gradient itself
        assert step == pytest.approx(clip, rel=1e-4)


# ------------------------------------------------------------------------------------------ schedule
def test_lr_factor_known_values():
    assert lr_factor(0, 100, 20) == pytest.approx(1 / 20)
    assert lr_factor(9, 100, 20) == pytest.approx(10 / 20)
    assert lr_factor(20, 100, 20) == pytest.approx(1.0)
    assert lr_factor(60, 100, 20) == pytest.approx(0.5)  # halfway through the cosine part
    assert lr_factor(40, 100, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(100, 100, 20) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(70, 100, 20, "none") == 1.0 and lr_factor(3, 100, 20, "none") == pytest.approx(4 / 20)
    assert lr_factor(0, 10, 0) == 1.0


def test_scheduler_steps_per_batch():
    model = tiny_net()
    cfg = config(epochs=4, lr=0.2, scheduler="cosine", warmup_epochs=1)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=5)  # 20 steps, 5 of warm-up
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(0.2 / 5) and seen[4] == pytest.approx(0.2)
    assert seen[5] == pytest.approx(0.2)
    assert seen[12] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert optimizer.param_groups[0]["lr"] == optimizer.param_groups[1]["lr"]  # decay and no-decay groups
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.optimizer.weight_decay, 0.0]


def test_history_lr_is_last_step_of_epoch():
    train, val = loaders(n_train=80, batch=16)  # 5 steps per epoch
    result = run(tiny_net(), config(epochs=3, lr=0.1, scheduler="cosine", warmup_epochs=1), train, val)
    lrs = [r["lr"] for r in result.history]
    assert lrs[0] == pytest.approx(0.1)  # step 4: end of warm-up
    assert lrs[1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 4 / 10)))  # step 9
    assert lrs[2] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))  # step 14


def test_early_stopping():
    # lr 0: val top-1 never improves after epoch 1, so patience 2 stops after epoch 3.
    result = run(tiny_net(), config(epochs=10, lr=0.0, early_stop_patience=2))
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1


# --------------------------------------------------------------------------------- checkpoints/resume
def test_checkpoints_load_with_weights_only(tmp_path):
    model = tiny_net()
    result = run(model, config(epochs=2, momentum=0.9), checkpoint_dir=tmp_path)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and len(last["history"]) == 2
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config"} <= set(last)
    assert {"torch", "numpy", "python"} <= set(last["rng"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(last["model"][name], tensor)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == result.best_epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temp files left


@pytest.mark.parametrize("optimizer,generator", [("sgd", True), ("adamw", False)])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, optimizer, generator):
    cfg = config(epochs=3, optimizer=optimizer, lr=0.05, momentum=0.9 if optimizer == "sgd" else 0.0,
                 weight_decay=1e-3, scheduler="cosine", warmup_epochs=1, label_smoothing=0.1, seed=5)
    model_dropout = dict(dropout=0.3)  # dropout + shuffling: both RNG streams must be replayed

    straight = tiny_net(**model_dropout)
    run(straight, cfg, *loaders(generator=generator), checkpoint_dir=tmp_path / "a")

    def interrupt(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny_net(**model_dropout), cfg, *loaders(generator=generator), checkpoint_dir=tmp_path / "b",
            on_epoch_end=interrupt)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    torch.rand(1000)  # the caller's RNG moves on in between, as in a new process

    resumed_model = tiny_net(**model_dropout)
    resumed = run(resumed_model, cfg, *loaders(generator=generator), checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_from == 1 and [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], tensor), name


def test_resume_false_starts_over(tmp_path):
    run(tiny_net(), config(epochs=1), checkpoint_dir=tmp_path)
    again = run(tiny_net(), config(epochs=1), checkpoint_dir=tmp_path, resume=False)
    assert again.resumed_from is None and len(again.history) == 1


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path):
    model = tiny_net()
    good = {}

    def poison(epoch, record):
        if epoch == 1:
            good.update({k: v.clone() for k, v in model.state_dict().items()})
            with torch.no_grad():
                model.fc.weight[0, 0] = float("inf")

    with pytest.raises(TrainingError, match=r"epoch 2, step 1/8.*last good checkpoint .*last\.pt"):
        run(model, config(epochs=3), checkpoint_dir=tmp_path, on_epoch_end=poison)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 1
    for name, tensor in good.items():
        assert torch.equal(last["model"][name], tensor), name
    assert all(torch.isfinite(t).all() for t in last["model"].values())


# ------------------------------------------------------------------------------------- evaluation
class LookupModel(nn.Module):
    """Returns row i of a fixed logit table for input value i."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", torch.tensor(table))
        self.sub = nn.Linear(1, 1)

    def forward(self, x):
        return self.table[x.long()]


def test_evaluate_top1_top5_on_known_toy():
    table = [
        [6.0, 5, 4, 3, 2, 1],  # target 0: rank 1
        [6.0, 5, 4, 3, 2, 1],  # target 2: rank 3
        [6.0, 5, 4, 3, 2, 1],  # target 5: rank 6 (miss)
        [1.0, 6, 2, 3, 4, 5],  # target 1: rank 1
        [1.0, 6, 2, 3, 4, 5],  # target 4: rank 3
    ]
    targets = torch.tensor([0, 2, 5, 1, 4])
    loader = DataLoader(TensorDataset(torch.arange(5), targets), batch_size=2)
    model = LookupModel(table)
    model.train()
    model.sub.eval()
    metrics = evaluate(model, loader, "cpu")
    assert metrics["top1"] == pytest.approx(2 / 5) and metrics["top5"] == pytest.approx(4 / 5)
    assert metrics["n"] == 5
    assert metrics["loss"] == pytest.approx(F.cross_entropy(torch.tensor(table), targets).item())
    assert model.training and not model.sub.training  # per-module modes restored

    three = LookupModel([[1.0, 2, 3], [3.0, 2, 1]])
    small = evaluate(three, DataLoader(TensorDataset(torch.arange(2), torch.tensor([2, 1])), batch_size=2))
    assert small["top1"] == pytest.approx(0.5) and small["top5"] is None


# ------------------------------------------------------------------------------- BN re-calibration
def test_recalibrate_batchnorm_matches_data_statistics():
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, momentum=0.3))
    model.eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(256, 2, 4, 4, generator=g) * 0.5 + torch.tensor([3.0, -2.0])[None, :, None, None]
    loader = DataLoader(TensorDataset(images, torch.zeros(256, dtype=torch.long)), batch_size=32)

    used = recalibrate_batchnorm(model, loader, num_samples=100, device="cpu")
    assert used == 100
    bn = model[0]
    # momentum=None: the running mean is the plain average of the 4 batch means (32, 32, 32, 4 images).
    batches = [images[0:32], images[32:64], images[64:96], images[96:100]]
    expected = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected)
    assert torch.allclose(bn.running_mean, torch.tensor([3.0, -2.0]), atol=0.1)
    assert torch.allclose(bn.running_var, torch.tensor([0.25, 0.25]), atol=0.05)
    assert bn.num_batches_tracked.item() == 4
    assert bn.momentum == 0.1 and model[2].momentum == 0.3 and not model.training

    assert recalibrate_batchnorm(nn.Sequential(nn.Conv2d(2, 2, 1)), loader, 10, "cpu") == 0


def test_checkpoint_rng_state_round_trips(tmp_path):
    run(tiny_net(), config(epochs=1), checkpoint_dir=tmp_path)
    # Nothing draws random numbers after last.pt is written, so its RNG state is the current one.
    draws = (torch.rand(3), np.random.rand(3), random.random())
    _set_rng_state(torch.load(tmp_path / "last.pt", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_on_cuda_trains_and_checkpoints_the_scaler(tmp_path):
    model = tiny_net()
    train, val = loaders(n_train=256)
    result = run(model, config(epochs=3, momentum=0.9, distill_alpha=0.3), train, val, device="cuda",
                 teacher=tiny_net(seed=2), checkpoint_dir=tmp_path)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert next(model.parameters()).device.type == "cuda" and model.fc.weight.dtype == torch.float32
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["scaler"]["scale"] > 0  # amp="auto" turned the GradScaler on
