"""Calibration distillation: after the least-squares refit, a few epochs of gradient steps on the
calibration images alone, so that the pruned model's class probabilities match the dense model's.

The refit (pfp_deploy.reconstruction) matches each layer's outputs one layer at a time, in closed
form; what it cannot see is how the errors it leaves in every layer combine at the logits. This
step minimises that end-to-end gap directly: T^2 KL(softmax(dense / T) || softmax(pruned / T)) over
the calibration images, with Adam at a constant learning rate, every weight of the pruned model
free and BatchNorm in eval mode (its running statistics stay those the refit was matched to, and a
calibration batch of a few images is never normalised by its own statistics). No labels and no
other data are used: the dense model's outputs on the calibration images are the only targets
(computed once and held, [samples, classes]).

Measured (docs/BENCHMARKS.md §5, "Seventh run": 512 calibration images, full test set, 3 seeds, no
fine-tune): at keep 0.5 of the MACs +0.2 points of top-1 on ResNet-20 and MobileNetV2-small, none on
VGG-small; at keep 0.3 +0.8 / +0.9; +0.05 after a one-epoch fine-tune. 20 epochs of a ResNet-20 take
26-32 s on one CPU core (1.5-2x the refit). The distilled weights are kept only when they lower the KL
on the calibration images (a diverging run gives back the refit model); a model whose output is not
[batch, classes] logits, or a refit model that already matches the dense one, is left as it is.

Under torchrun each rank holds its own calibration shard: the gradients are averaged across ranks
before every step (as DDP does), so every rank ends with the same weights; as with the fine-tune,
they differ from a single-process run's (its batches are not the same), where the refit's do not.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from .distributed import all_reduce_max, all_reduce_sum, is_active
from .errors import UsageError
from .finetune import distillation_loss
from .modes import restore_modes, saved_modes
from .reconstruction import _INPUTS_SHARE, DEFAULT_MAX_MEMORY_MB, _agree_on_error, _Calibration, _inference
from .schema import CalibrationDistillConfig

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_EPOCHS", "DEFAULT_LR", "DEFAULT_TEMPERATURE", "CalibrationDistillResult", "distill_on_calibration"]

# The recipe's defaults (schema.CalibrationDistillConfig, where the measurements behind them are noted).
_DEFAULTS = CalibrationDistillConfig()
DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_TEMPERATURE = _DEFAULTS.epochs, _DEFAULTS.lr, _DEFAULTS.temperature
MATCHED_KL = 1e-6  # mean T^2 KL per image below which the refit model counts as the dense model's twin


@dataclass
class CalibrationDistillResult:
    """What the step did: KL to the dense model and top-1 agreement with it, on the calibration images."""

    epochs: int
    steps: int                 # optimizer steps taken
    lr: float
    temperature: float
    samples: int               # calibration images (all ranks)
    kl_before: float | None         # mean T^2 KL per image, after the refit (None: skipped)
    kl_after: float | None          # the same with the weights kept (kept_refit: the refit's)
    agreement_before: float | None  # share of calibration images whose top class is the dense model's
    agreement_after: float | None
    status: str = "distilled"  # distilled | kept_refit (the KL did not fall, or the loss diverged) | skipped
    reason: str | None = None  # why it was skipped (not a classifier's output; nothing left to match)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _check(epochs, lr, temperature) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UsageError(f"epochs must be an integer >= 1 (0 disables the step in a recipe), got {epochs!r}")
    for name, value in (("lr", lr), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
            raise UsageError(f"{name} must be a positive number, got {value!r}")


def _not_logits(output) -> str | None:
    """Why `output` is not a classifier's [batch, classes] float tensor (None when it is)."""
    if isinstance(output, torch.Tensor) and output.ndim == 2 and output.is_floating_point() and output.shape[1] > 1:
        return None
    shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    return f"the model's output is not a [batch, classes] float tensor (got {shape}): left as refit"


def _measure(model: nn.Module, data: _Calibration, targets: list[torch.Tensor], top: list[torch.Tensor],
             temperature: float, device: torch.device) -> tuple[float, float]:
    """(mean KL, top-1 agreement) over every rank's calibration images."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i, x in data:
            out = model(x).float()
            sums[0] += float(distillation_loss(out, targets[i], temperature)) * x.shape[0]
            sums[1] += float((out.argmax(1) == top[i]).sum())
            sums[2] += x.shape[0]
    all_reduce_sum(sums)
    n = max(1.0, float(sums[2]))
    return float(sums[0]) / n, float(sums[1]) / n


def _order(data: _Calibration, steps: int, generator: torch.Generator) -> Iterator[tuple[int, torch.Tensor]]:
    """`steps` batches: a seeded permutation of the held batches, or the batches in their order when
    they are re-read from the source (cycled when another rank has more batches than this one)."""
    if data.held is not None:
        order = torch.randperm(len(data), generator=generator).tolist()
        for k in range(steps):
            i = order[k % len(order)]
            yield i, data.held[i]
        return
    given = 0
    while given < steps:
        for item in data:
            if given == steps:
                return
            yield item
            given += 1


def _average_gradients(params: list[nn.Parameter], world: int) -> None:
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def distill_on_calibration(
    dense: nn.Module,
    pruned: nn.Module,
    calibration: Iterable,
    *,
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = 0,
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> CalibrationDistillResult:
    """Distil `pruned` (modified in place: its weights only) from `dense` on the calibration images.

    `calibration`: a list of batches or a DataLoader (tensors or (inputs, labels) pairs; labels are
    not used), read more than once, held in memory when it fits `max_memory_mb`'s input share (then
    the batches are visited in a seeded random order each epoch; otherwise in their order, and a
    re-read must give the same batches). `dense` is never modified; both models' train/eval flags
    and devices come back as they were. Parameters with requires_grad=False stay as they are.
    """
    start_time = time.perf_counter()
    _check(epochs, lr, temperature)
    if dense is pruned:
        raise UsageError("dense and pruned are the same module: pass the pruned copy (PruneResult.model)")
    if not isinstance(max_memory_mb, (int, float)) or not max_memory_mb > 0:
        raise UsageError(f"max_memory_mb must be a positive number, got {max_memory_mb!r}")
    params = [p for p in pruned.parameters() if p.requires_grad]
    first = next(iter(pruned.parameters()), None)
    home = first.device if first is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else home
    dense_first = next(iter(dense.parameters()), None)
    if dense_first is not None and dense_first.device != device:
        dense = copy.deepcopy(dense).to(device)  # never move the caller's model
    pruned.to(device)
    modes = saved_modes(pruned)
    try:
        data = _Calibration(calibration, device, _INPUTS_SHARE * float(max_memory_mb) * 2**20)
        result = _distill(dense, pruned, data, params, epochs, float(lr), float(temperature), seed, progress, device)
    finally:
        for p in params:
            p.grad = None
        restore_modes(pruned, modes)
        pruned.to(home)
    result.seconds = time.perf_counter() - start_time
    return result


def _distill(dense: nn.Module, pruned: nn.Module, data: _Calibration, params: list[nn.Parameter], epochs: int,
             lr: float, temperature: float, seed: int, progress: bool, device: torch.device
             ) -> CalibrationDistillResult:
    _agree_on_error(None if data.samples else "the calibration data is empty: give at least one batch of inputs",
                    device)
    samples = int(all_reduce_sum(torch.tensor([float(data.samples)], device=device, dtype=torch.float64))[0])
    with _inference(device, dense):
        outputs = [dense(x) for _, x in data]
    reason = next((r for r in map(_not_logits, outputs) if r is not None), None)
    if reason is not None:  # not a classifier (detection heads, dict outputs): nothing this step can match
        logger.warning("calibration distillation skipped: %s", reason)
        return CalibrationDistillResult(epochs=epochs, steps=0, lr=lr, temperature=temperature, samples=samples,
                                        kl_before=None, kl_after=None, agreement_before=None, agreement_after=None,
                                        status="skipped", reason=reason)
    targets = [o.float() for o in outputs]
    top = [o.argmax(1) for o in targets]
    pruned.eval()  # BatchNorm keeps the statistics the refit matched (and dropout is off)
    kl_before, agree_before = _measure(pruned, data, targets, top, temperature, device)
    result = CalibrationDistillResult(epochs=epochs, steps=0, lr=lr, temperature=temperature, samples=samples,
                                      kl_before=kl_before, kl_after=kl_before, agreement_before=agree_before,
                                      agreement_after=agree_before)
    if kl_before <= MATCHED_KL:  # e.g. nothing was pruned: steps could only add noise
        result.status, result.reason = "skipped", (f"the refit model already matches the dense model (KL "
                                                   f"{kl_before:.2g} on the calibration images)")
        return result
    if not params:
        result.status = "kept_refit"
        return result
    saved = {k: v.detach().clone() for k, v in pruned.state_dict().items()}
    steps = int(all_reduce_max(torch.tensor([float(len(data))], device=device))[0])  # the same count on every rank
    world = torch_dist.get_world_size() if is_active() else 1
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs, desc="calibration distillation", unit="epoch")
    diverged = False
    try:
        for _ in range(epochs):
            for i, x in _order(data, steps, generator):
                with torch.autocast(device.type, enabled=False):
                    loss = distillation_loss(pruned(x), targets[i], temperature)  # the fine-tune's KD loss
                bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=device)
                if float(all_reduce_max(bad)[0]):  # every rank stops together
                    diverged = True
                    break
                optimizer.zero_grad(set_to_none=False)
                loss.backward()
                for p in params:
                    if p.grad is None:  # not on the forward path: a zero gradient keeps the ranks in step
                        p.grad = torch.zeros_like(p)
                if world > 1:
                    _average_gradients(params, world)
                optimizer.step()
                result.steps += 1
            if bar is not None:
                bar.update(1)
            if diverged:
                break
    finally:
        if bar is not None:
            bar.close()
    if not diverged:
        kl_after, agree_after = _measure(pruned, data, targets, top, temperature, device)
        if kl_after < kl_before:
            result.kl_after, result.agreement_after = kl_after, agree_after
            return result
    pruned.load_state_dict(saved)
    result.status = "kept_refit"
    return result
