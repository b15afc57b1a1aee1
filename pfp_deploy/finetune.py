"""Fine-tuning after pruning: training loop, evaluation, BatchNorm re-calibration, resumable checkpoints.

The loop is deliberately plain: SGD/AdamW, linear warm-up + cosine decay stepped per batch, optional
label smoothing, knowledge distillation from the unpruned teacher, AMP on CUDA, gradient clipping and
early stopping. Checkpoints hold only tensors and plain containers, so they load with
``torch.load(..., weights_only=True)``, and a resumed run ends with the same weights as an
uninterrupted one: every epoch reseeds the RNGs and the shuffle order from (seed, epoch, rank).
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, RandomSampler
from tqdm import tqdm

from .distributed import (
    DistContext,
    ShardSampler,
    all_reduce_max,
    all_reduce_sum,
    average_buffers,
    wrap_loader_for_distributed,
)
from .errors import DataError, ModelLoadError, TrainingError, UsageError
from .fileio import torch_save_atomic
from .modes import restore_modes, saved_modes
from .recipe import validate_section
from .schema import FinetuneConfig, TrainConfig

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "build_optimizer",
    "build_scheduler",
    "distillation_loss",
    "evaluate",
    "finetune",
    "lr_factor",
    "recalibrate_batchnorm",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


@dataclass
class FinetuneResult:
    """What ``finetune`` did. ``history`` has one record per epoch (also those of a resumed-from run):
    epoch, train_loss, val_top1, val_top5, val_loss, lr (of the epoch's last step), seconds.
    Accuracies are fractions in [0, 1]; ``final`` is the last epoch's record."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_top1: float | None = None
    final: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None  # epoch of the last.pt this call continued from
    stopped_early: bool = False


# ------------------------------------------------------------------------------ optimizer / schedule
def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters; biases and norm weights get no weight decay."""
    opt = cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("The model has no trainable parameters to fine-tune.")
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": opt.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov)
    return torch.optim.AdamW(groups, lr=opt.lr)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine") -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    Warm-up rises linearly to 1 at ``warmup_steps``: (step + 1) / warmup_steps. Then cosine decays
    from 1 towards 0 at ``total_steps``, or "none" stays at 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "none":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR following ``lr_factor``; call ``.step()`` after every optimizer step."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    # A closure, not a callable object: LambdaLR then keeps nothing of it in its state_dict.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg.scheduler))


# ------------------------------------------------------------------------------------------- losses
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1),
                    F.log_softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def _training_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                   cfg: TrainConfig) -> torch.Tensor:
    ce = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None:
        return ce
    alpha = cfg.distill.alpha
    return (1 - alpha) * ce + alpha * distillation_loss(logits, teacher_logits, cfg.distill.temperature)


def distills(cfg: TrainConfig, teacher_given: bool = True) -> bool:
    """Whether `cfg` trains against a teacher: fine-tuning with distill.enabled true, or "auto" when a
    teacher is given (pre-training never; alpha 0 never)."""
    distill = getattr(cfg, "distill", None)
    if distill is None or distill.enabled is False or distill.alpha == 0:
        return False
    return distill.enabled is True or teacher_given


# ---------------------------------------------------------------------------------- small helpers
def _split_batch(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise DataError(f"Expected loader batches of (inputs, targets), got {type(batch).__name__}.")
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


def _inputs_of(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _resolve_amp(amp: str | bool, device: torch.device) -> bool:
    if amp == "auto":
        return device.type == "cuda"
    if amp and device.type != "cuda":
        raise UsageError(f"finetune.amp is true but the device is {device}; AMP is only supported on CUDA. "
                         'Use amp: "auto" or false.')
    return bool(amp)


def _resolve_channels_last(setting: str | bool, device: torch.device, model: nn.Module) -> bool:
    """channels_last for conv nets: auto = on for CPU, where it was measured faster (schema)."""
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if setting == "auto":
        return has_conv and device.type == "cpu"
    return bool(setting) and has_conv


def inference_teacher(teacher: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """A frozen copy of the teacher for distillation: eval mode, on `device`, each Conv2d -> BatchNorm2d
    pair folded into one conv (exact in eval mode) when torch.fx can trace the model, and in
    channels_last if asked. The caller's teacher is left as it was (device, modes, weights)."""
    from torch.fx.experimental.optimization import fuse

    from .plan import private_copy

    frozen = private_copy(teacher).eval()
    try:
        frozen = fuse(frozen)  # symbolic tracing: a model with data-dependent control flow stays unfused
    except Exception as exc:  # noqa: BLE001 (any tracing failure: the unfused copy is still exact)
        logger.debug("distillation teacher not fused (%s); using it as is", exc)
    frozen.requires_grad_(False).to(device)
    return frozen.to(memory_format=torch.channels_last) if channels_last else frozen


def _steps_per_epoch(loader: Iterable, cfg: TrainConfig) -> int:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        if cfg.max_steps_per_epoch is None:
            raise UsageError("The training loader has no length; set finetune.max_steps_per_epoch.") from None
        return cfg.max_steps_per_epoch
    if n == 0:
        raise DataError("The training loader yields no batches (empty dataset, or drop_last with too few samples).")
    return min(n, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else n


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _seed_epoch(loader: Iterable, seed: int, epoch: int, rank: int) -> None:
    """Make the epoch a pure function of (seed, epoch, rank): what lets a resumed run replay exactly."""
    s = _epoch_seed(seed, epoch, rank)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # also seeds every CUDA device
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    generators = {id(g): g for g in (getattr(loader, "generator", None), getattr(sampler, "generator", None))
                  if isinstance(g, torch.Generator)}
    for generator in generators.values():
        generator.manual_seed(seed + epoch)


def _rng_state() -> dict[str, Any]:
    # Tensors, ints and lists only, so weights_only loading accepts them.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"Cannot read the fine-tuning checkpoint {path}: {exc}. "
                             "Delete it, or start over (--overwrite on the command line, resume=False "
                             "when calling finetune()).") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ModelLoadError(f"{path} is not a pfp-deploy fine-tuning checkpoint (format "
                             f"{CHECKPOINT_FORMAT}). Delete it, or start over (--overwrite on the command line, "
                             "resume=False when calling finetune()).")
    return state


def _global_mean(value: torch.Tensor, dist: DistContext) -> float:
    # Every rank sees the same number, so a NaN on one rank stops all of them together (no hang).
    if not dist.active:
        return float(value.item())
    value = value.detach().float().clone()
    all_reduce_sum(value)
    return float(value.item()) / dist.world_size


# --------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
             topk: tuple[int, ...] = (1, 5), *, dist: DistContext | None = None) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of ``model`` (already on ``device``) in eval mode.

    Returns {"top1", "top5", ..., "loss", "n"}; accuracies are fractions, and ``top{k}`` is None when
    the model has fewer than k classes. With an active ``dist`` the sums are all-reduced, so pass a
    loader that shards the data (each rank's own part) and every rank gets the global numbers.
    """
    device = torch.device(device)
    modes = saved_modes(model)
    model.eval()
    correct = torch.zeros(len(topk), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    num_classes = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for batch in loader:
            inputs, targets = _split_batch(batch, device)
            logits = model(inputs).float()
            classes = logits.shape[1]
            num_classes.fill_(classes)
            loss_sum += F.cross_entropy(logits, targets, reduction="sum")
            top = logits.topk(min(max(topk), classes), dim=1).indices
            hits = top.eq(targets[:, None])
            for i, k in enumerate(topk):
                correct[i] += hits[:, :k].any(dim=1).sum()
            count += targets.numel()
    finally:
        restore_modes(model, modes)
    if dist is not None and dist.active:
        sums = torch.cat([correct, loss_sum[None], count[None]])
        all_reduce_sum(sums)
        correct, loss_sum, count = sums[:-2], sums[-2], sums[-1]
        all_reduce_max(num_classes)  # a rank with an empty shard learns it from the others
    n = int(count.item())
    if n == 0:
        raise DataError("The evaluation loader yielded no samples.")
    classes = int(num_classes.item())
    metrics: dict[str, Any] = {f"top{k}": (correct[i].item() / n if k <= classes else None)
                               for i, k in enumerate(topk)}
    metrics.update(loss=loss_sum.item() / n, n=n)
    return metrics


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Iterable, num_samples: int,
                          device: str | torch.device = "cpu") -> int:
    """Re-estimate BatchNorm running statistics (model already on ``device``) from up to ``num_samples`` inputs.

    Statistics are reset and re-accumulated as an equal-weight average over batches (momentum=None),
    since pruning leaves the old running stats describing channels that no longer exist. Momentum and
    train/eval modes are restored. Returns the number of samples used (0 when there is no BatchNorm).
    """
    device = torch.device(device)
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or num_samples <= 0:
        return 0
    modes = saved_modes(model)
    momenta = [m.momentum for m in norms]
    seen = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for batch in loader:
            inputs = _inputs_of(batch).to(device, non_blocking=True)
            take = min(inputs.shape[0], num_samples - seen)
            if take < 2 and seen > 0:
                break  # a one-sample tail adds nothing reliable (and BatchNorm1d rejects it)
            model(inputs[:take])
            seen += take
            if seen >= num_samples:
                break
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        restore_modes(model, modes)
    if seen == 0:
        raise DataError("BatchNorm re-calibration got no samples: the loader is empty.")
    return seen


# ------------------------------------------------------------------------------------------ training
def finetune(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None,
    cfg: TrainConfig | Mapping[str, Any],
    *,
    teacher: nn.Module | None = None,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    dist: DistContext | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place (moved to ``device``, as is ``teacher``) and return its history.

    Writes ``checkpoint_dir/last.pt`` after every epoch and ``best.pt`` on a new best val top-1; with
    ``resume`` an existing last.pt is continued from its next epoch. ``on_epoch_end(epoch, record)``
    runs after the epoch's checkpoint is written. Raises TrainingError on a NaN/inf loss.

    Under torchrun pass ``dist=init_distributed()``: the model is wrapped in DDP on ``dist.device``
    (``device`` is then ignored), the loaders are re-created with distributed samplers, metrics are
    global and only rank 0 writes files or shows progress.
    """
    if isinstance(cfg, Mapping):  # the recipe's `finetune` section as a dict
        cfg = validate_section(FinetuneConfig, cfg, "finetune")
    if not isinstance(cfg, TrainConfig):
        raise UsageError(f"finetune() takes a pfp_deploy.FinetuneConfig (the recipe's finetune section) or a "
                         f"dict of it, got {type(cfg).__name__}")
    if dist is None:
        dist = DistContext(device=torch.device(device))
    device = dist.device
    use_amp = _resolve_amp(cfg.amp, device)
    distilling = distills(cfg, teacher_given=teacher is not None)
    if distilling and teacher is None:
        raise UsageError(f"finetune.distill.enabled is true (alpha {cfg.distill.alpha}) but no teacher model was "
                         "given; pass teacher=... or set distill.enabled: auto or false.")
    teacher = teacher if distilling else None  # skip the teacher's forward when unused
    channels_last = _resolve_channels_last(cfg.channels_last, device, model)

    model.to(device)
    if channels_last:  # before the optimizer: its momentum buffers take the parameters' layout
        model.to(memory_format=torch.channels_last)
    if dist.active:
        train_loader, val_loader = _shard_loaders(train_loader, val_loader, dist, cfg.seed)
    steps = _steps_per_epoch(train_loader, cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    last_path = ckpt_dir / "last.pt" if ckpt_dir else None
    if ckpt_dir and dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    history: list[dict[str, Any]] = []
    resumed_from = None
    if resume and last_path is not None and last_path.exists():
        history = _resume(last_path, model, optimizer, scheduler, scaler)
        resumed_from = len(history)
        if dist.is_main:
            logger.info("Resuming fine-tuning from %s (epoch %d done).", last_path, resumed_from)

    best_epoch, best_top1 = None, None
    for record in history:
        if record["val_top1"] is not None and (best_top1 is None or record["val_top1"] > best_top1):
            best_epoch, best_top1 = record["epoch"], record["val_top1"]

    if teacher is not None:
        teacher = inference_teacher(teacher, device, channels_last)
    train_model: nn.Module = model
    if dist.active:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    stopped_early = False
    try:
        for epoch in range((resumed_from or 0) + 1, cfg.epochs + 1):
            patience = cfg.early_stop_patience  # counted in evaluations (every eval_every epochs)
            if patience is not None and best_epoch is not None and \
                    epoch - 1 - best_epoch >= patience * cfg.eval_every:
                stopped_early = True
                if dist.is_main:
                    logger.info("Early stop: val top-1 has not improved for %d evaluations.", patience)
                break
            started = time.perf_counter()
            _seed_epoch(train_loader, cfg.seed, epoch, dist.rank)
            train_loss, lr = _train_one_epoch(
                train_model, train_loader, optimizer, scheduler, scaler, teacher, cfg, device, use_amp,
                dist, epoch, steps, progress and dist.is_main, last_path, channels_last)
            if dist.active:
                average_buffers(model)  # BN stats drift apart per rank; evaluate and save one model
            due = epoch % cfg.eval_every == 0 or epoch == cfg.epochs  # the last epoch is always evaluated
            val = evaluate(model, val_loader, device, dist=dist) if val_loader is not None and due else None
            record = {
                "epoch": epoch, "train_loss": train_loss,
                "val_top1": val["top1"] if val else None, "val_top5": val["top5"] if val else None,
                "val_loss": val["loss"] if val else None,
                "lr": lr, "seconds": time.perf_counter() - started,
            }
            history.append(record)
            improved = val is not None and (best_top1 is None or val["top1"] > best_top1)
            if improved:
                best_epoch, best_top1 = epoch, val["top1"]
            if ckpt_dir is not None and dist.is_main:
                # best.pt first: an interrupt between the two writes then only repeats this epoch.
                if improved:
                    torch_save_atomic({"format": CHECKPOINT_FORMAT, "epoch": epoch, "model": model.state_dict(),
                                  "metrics": record}, ckpt_dir / "best.pt")
                torch_save_atomic({
                    "format": CHECKPOINT_FORMAT, "epoch": epoch, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "history": history, "rng": _rng_state(),
                    "config": cfg.model_dump(mode="json"),
                }, last_path)
            if dist.is_main:
                logger.info("epoch %d/%d: train_loss %.4f, val top-1 %s, lr %.3g, %.1fs", epoch, cfg.epochs,
                            train_loss, "n/a" if val is None else f"{val['top1']:.4f}", lr, record["seconds"])
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)  # the caller's layout again

    return FinetuneResult(history=history, best_epoch=best_epoch, best_top1=best_top1,
                          final=dict(history[-1]) if history else {}, resumed_from=resumed_from,
                          stopped_early=stopped_early)


def _shard_loaders(train_loader: Iterable, val_loader: Iterable | None, dist: DistContext,
                   seed: int) -> tuple[Iterable, Iterable | None]:
    """Give each rank its part of the data; loaders that already shard are used as given."""
    sharding = (DistributedSampler, ShardSampler)
    train_sampler = getattr(train_loader, "sampler", None)
    if not isinstance(train_sampler, sharding):
        train_loader = wrap_loader_for_distributed(
            train_loader, dist, shuffle=isinstance(train_sampler, RandomSampler), seed=seed)
    if val_loader is not None and not isinstance(getattr(val_loader, "sampler", None), sharding):
        val_loader = wrap_loader_for_distributed(val_loader, dist, shuffle=False, even=False)
    return train_loader, val_loader


def _resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler) -> list[dict[str, Any]]:
    """Load last.pt into the training objects and RNGs; returns the history so far."""
    state = _load_checkpoint(path)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path} does not match this model or optimizer ({exc}). It was probably "
                             "written by another run: delete it, or start over (--overwrite on the command "
                             "line, resume=False when calling finetune()).") from exc
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return list(state["history"])


def _train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                     teacher: nn.Module | None, cfg: TrainConfig, device: torch.device, use_amp: bool,
                     dist: DistContext, epoch: int, steps: int, show_progress: bool,
                     last_path: Path | None, channels_last: bool = False) -> tuple[float, float]:
    """One pass over ``steps`` batches; returns (mean train loss, lr of the last step)."""
    model.train()
    loss_total, done, lr = 0.0, 0, optimizer.param_groups[0]["lr"]
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", disable=not show_progress, leave=False)
    try:
        for step, batch in enumerate(itertools.islice(loader, steps), start=1):
            inputs, targets = _split_batch(batch, device)
            if channels_last and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                logits = model(inputs)
                teacher_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(inputs)
            loss = _training_loss(logits, targets, teacher_logits, cfg)
            loss_value = _global_mean(loss.detach(), dist)
            if not math.isfinite(loss_value):
                raise TrainingError(_divergence_message(loss_value, epoch, step, steps, last_path, cfg))

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            loss_total += loss_value
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}")
    finally:
        bar.close()
    return loss_total / max(done, 1), lr


def _divergence_message(loss: float, epoch: int, step: int, steps: int, last_path: Path | None,
                        cfg: TrainConfig) -> str:
    if last_path is None:
        kept = "No checkpoint_dir was given, so no checkpoint was saved."
    elif last_path.exists():
        kept = f"The last good checkpoint {last_path} (end of epoch {epoch - 1}) is kept."
    else:
        kept = f"No epoch had finished yet, so {last_path} was not written."
    return (f"Fine-tuning diverged: the training loss is {loss} at epoch {epoch}, step {step}/{steps}. {kept} "
            f"The in-memory model may hold non-finite weights. Try a lower lr (now {cfg.optimizer.lr}), set grad_clip, "
            "or turn amp off.")
