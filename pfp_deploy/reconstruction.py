"""Least-squares reconstruction of pruned layers: the repair step right after channel removal.

Removing channels changes what every consumer of those channels computes. For each dense consumer
(Conv2d with groups == 1, Linear) of the pruned model, in forward order, `reconstruct` refits its
kept weights (and bias, when it has one) by ridge least squares so that its outputs match the
dense model's outputs at the kept output channels (pre-activation, before BatchNorm) over the
calibration data, taking its inputs from the pruned model whose earlier layers are already refit:
error made upstream is absorbed downstream. It generalises the γ reweighting of PFP's randomized
variant (a diagonal rescaling of the kept input channels) to a full linear refit, so it applies
after every variant.

For one layer, with X the rows of its input patches (one row per output position, channels
major: r = c*kh*kw + k, 1x1 convs and Linear without unfold) and Y the dense targets,

    W = argmin ||X W + 1 b - Y||^2 + lambda ||W||^2,     lambda = ridge * trace(X^T X) / (n R)

so the ridge is relative to the mean input energy (scale-aware; the bias is not penalised). The
Gram matrices X^T X, X^T Y, X^T 1, 1^T Y, ||Y||^2 are accumulated in float64 over the calibration
batches, chunked so that reconstruction's own buffers stay within `max_memory_mb`; under torchrun
they are all-reduced (summed) before the solve, so every rank solves the same system as a single
process does over all the data. The solve is a Cholesky factorisation, falling back to an
eigen-decomposition pseudo-inverse when the system is singular (ridge=0 on rank-deficient data).

Per layer the relative output error on the calibration data, sqrt(||X W + b - Y||^2 / ||Y||^2),
is reported with the layer's pruned weights ("before") and refit weights ("after") on the same
inputs (those the layer receives from the already-refit upstream model). The refit weights are
kept only when they lower that error, so reconstruction never increases a consumer's calibration
error. error_after is also the reconstructed model's end-to-end error at that layer.

Grouped and depthwise convs (groups > 1) are refit per group: group g's outputs depend only on its
own input channels, so its normal equations are a small block of their own (a depthwise 3x3 conv:
one 9-unknown system per channel). Their inputs come from refit layers whose outputs already match
the dense model, so what is left to fix is small: measured on MobileNetV2-small (docs/BENCHMARKS.md
§5, no training) 0 to +0.16 points of top-1 (mean +0.08) for 1.5-1.9x the reconstruction time.
Which channels a pruned layer kept is derived from the pruning `Plan` (module names are the
dense model's): the plan is replayed on a float64 copy of the dense model whose weights encode
their own (output, input) indices, so every index mapping torch-pruning applies (residual adds,
concatenations, flatten -> Linear, cascades of several steps) is read back exactly.

Cost: the dense targets of as many layers as the memory budget allows are computed in one dense
pass and cached; each level of mutually independent layers then takes one pass of the pruned model
over the calibration data, stopped right after the level's last layer has run.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .distributed import all_reduce_max, all_reduce_sum
from .errors import CalibrationError, PruningError, UsageError
from .pfp.sensitivity import _first_tensor, _patches, is_dense_layer
from .plan import Plan, apply_plan, private_copy

__all__ = ["DEFAULT_MAX_MEMORY_MB", "DEFAULT_RIDGE", "IndexMap", "LayerReconstruction", "ReconstructionResult",
           "index_maps_from_plan", "reconstruct"]

logger = logging.getLogger(__name__)

# Relative ridge: lambda = ridge * mean diagonal of the normalised Gram. Measured on a trained ResNet-20
# (Fashion-MNIST, 50 % MACs, benchmarks/reconstruction_quick.py): top-1 is flat from 0 to 1e-2 with
# 256 calibration images (81.6-81.7 %) and falls at 1e-1 (77.4 %); with 64 images 0 gives 81.6 %,
# 1e-3 82.05 %. 1e-3 keeps every solve well conditioned at no cost in accuracy.
DEFAULT_RIDGE = 1e-3
LAYER_MODES = ("all", "pruned")
UNDERDETERMINED = ("error", "skip")

# How max_memory_mb is shared between reconstruction's own buffers (the shares sum to 1).
_INPUTS_SHARE = 0.15   # calibration inputs held in memory (else the iterable is re-read per pass)
_TARGETS_SHARE = 0.25  # cached dense targets
_GRAM_SHARE = 0.5      # normal equations of the layers solved together, with the solve's temporaries
_CHUNK_SHARE = 0.1     # patch rows converted to float64 at a time
DEFAULT_MAX_MEMORY_MB = 1024  # fits ResNet-50's widest 3x3 conv (4608 inputs) with its solve

_TAG_SCALE = 2.0 ** -60  # index tags t * 2^-60 stay exact in float64 and tiny in the tracing forward


# ----------------------------------------------------------------------------- index maps

@dataclass(frozen=True)
class IndexMap:
    """Which dense input/output indices a pruned layer kept (None: all of them, unchanged).

    Input indices are in the layer's own input space (input channels of a conv, features of a
    Linear: flatten -> Linear maps one channel onto many features)."""

    kept_in: torch.Tensor | None = None
    kept_out: torch.Tensor | None = None

    @property
    def changed(self) -> bool:
        return self.kept_in is not None or self.kept_out is not None


def _to_index(value, size: int, what: str) -> torch.Tensor | None:
    if value is None:
        return None
    idx = torch.as_tensor(value, dtype=torch.long).flatten().cpu()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise UsageError(f"index map: {what} indices must lie in 0..{size - 1}, got {idx.min()}..{idx.max()}")
    if idx.numel() != idx.unique().numel():
        raise UsageError(f"index map: {what} indices contain duplicates")
    if idx.numel() == size and torch.equal(idx, torch.arange(size)):
        return None
    return idx


def _tag_weights(model: nn.Module) -> dict[str, int]:
    """Overwrite every Conv2d/Linear weight w[o, i, ...] with (o * inner + i + 1) * 2^-60."""
    inner = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                out, width = w.shape[0], w.shape[1]
                tag = (torch.arange(out, dtype=torch.float64)[:, None] * width
                       + torch.arange(width, dtype=torch.float64)[None, :] + 1) * _TAG_SCALE
                w.copy_(tag.view(out, width, *([1] * (w.dim() - 2))).expand_as(w))
                inner[name] = width
    return inner


def _read_tags(weight: torch.Tensor, width: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    tags = torch.round(weight.detach().double().reshape(weight.shape[0], weight.shape[1], -1)[:, :, 0]
                       / _TAG_SCALE).long() - 1
    kept_out = torch.div(tags[:, 0], width, rounding_mode="floor")
    kept_in = tags[0] % width
    if not torch.equal(tags, kept_out[:, None] * width + kept_in[None, :]):
        raise PruningError(f'cannot read the kept channels of "{name}" back from the plan replay '
                           "(its weights were not a plain row/column selection)")
    return kept_in, kept_out


def _as_double(inputs):
    if isinstance(inputs, torch.Tensor):
        return inputs.detach().cpu().double() if inputs.is_floating_point() else inputs.cpu()
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_as_double(v) for v in inputs)
    if isinstance(inputs, dict):
        return {k: _as_double(v) for k, v in inputs.items()}
    return inputs


def index_maps_from_plan(dense: nn.Module, plan, example_inputs) -> dict[str, IndexMap]:
    """Per dense layer name, the indices of the dense model's inputs/outputs it keeps after `plan`;
    per grouped/depthwise conv its kept outputs only (kept_in None: its input indices are group-local,
    and its per-group refit reads its inputs from the pruned model).

    `plan` is a pruning.Plan (or its to_dict(), or a PruneResult) made on `dense`: all its steps
    are replayed, so a cascade's maps compose. `dense` is not modified (a float64 copy is tagged).
    """
    if hasattr(plan, "plan") and not isinstance(plan, Plan):
        plan = plan.plan  # a PruneResult
    if isinstance(plan, Mapping):
        plan = Plan.from_dict(dict(plan))
    if not isinstance(plan, Plan):
        raise UsageError(f"plan must be a pfp_deploy Plan (PruneResult.plan) or its to_dict(), "
                         f"got {type(plan).__name__}")
    tagged = private_copy(dense).cpu().double()  # deep-copies models caching graph tensors too
    widths = _tag_weights(tagged)
    replay = apply_plan(tagged, plan, _as_double(example_inputs))
    maps = {}
    dense_mods = dict(dense.named_modules())
    for name, m in replay.named_modules():
        if name not in widths or not (is_dense_layer(m) or _is_grouped_conv(m)):
            continue
        full_out = dense_mods[name].weight.shape[0]
        if _is_grouped_conv(m):  # every tag of row o lies in [o * width, (o + 1) * width)
            tags = torch.round(m.weight.detach().double().flatten(1)[:, 0] / _TAG_SCALE).long() - 1
            kept_out = torch.div(tags, widths[name], rounding_mode="floor")
            maps[name] = IndexMap(None, _to_index(kept_out, full_out, f"{name} output"))
            continue
        kept_in, kept_out = _read_tags(m.weight, widths[name], name)
        maps[name] = IndexMap(_to_index(kept_in, widths[name], f"{name} input"),
                              _to_index(kept_out, full_out, f"{name} output"))
    return maps


def _is_grouped_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1


def _normalise_maps(index_maps: Mapping, dense_mods: dict, grouped_mods: dict) -> dict[str, IndexMap]:
    maps = {}
    for name, value in index_maps.items():
        grouped = _is_grouped_conv(grouped_mods.get(name))
        if name not in dense_mods and not grouped:
            raise UsageError(f'index_maps names "{name}", which is not a Conv2d/Linear of the dense model')
        if isinstance(value, IndexMap):
            kept_in, kept_out = value.kept_in, value.kept_out
        elif isinstance(value, Mapping):
            kept_in, kept_out = value.get("kept_in"), value.get("kept_out")
        else:
            kept_in, kept_out = value
        w = grouped_mods[name].weight if grouped else dense_mods[name].weight
        if grouped and kept_in is not None:
            raise UsageError(f'index_maps["{name}"]: a grouped conv takes kept_out only (its inputs are '
                             "group-local; index_maps_from_plan gives None)")
        maps[name] = IndexMap(None if grouped else _to_index(kept_in, w.shape[1], f"{name} input"),
                              _to_index(kept_out, w.shape[0], f"{name} output"))
    return maps


# ----------------------------------------------------------------------------- results

@dataclass
class LayerReconstruction:
    """One refit layer: relative calibration error before/after, the ridge used, kept sizes."""

    name: str
    error_before: float
    error_after: float
    ridge_used: float      # lambda added to the normalised Gram's diagonal (absolute)
    kept_in: int           # input channels (conv) or features (Linear) of the pruned layer
    kept_out: int          # its output channels / features
    in_before: int         # the same for the dense layer
    out_before: int
    rows: int              # calibration rows (samples x output positions) the fit used
    status: str = "refit"  # "refit" or "kept_original" (the refit would not lower the error)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReconstructionResult:
    layers: list[LayerReconstruction] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {name, reason}: dense layers left unchanged
    # pruned layers with the dense model's inputs whose weights are the dense kept rows: exact already
    exact: list[str] = field(default_factory=list)
    ridge: float = DEFAULT_RIDGE
    samples: int = 0
    passes: dict = field(default_factory=dict)
    seconds: float = 0.0
    max_memory_mb: float = 0.0

    def to_dict(self) -> dict:
        return {"ridge": self.ridge, "samples": self.samples, "seconds": round(self.seconds, 4),
                "passes": dict(self.passes), "max_memory_mb": self.max_memory_mb,
                "layers": [layer.to_dict() for layer in self.layers], "skipped": list(self.skipped),
                "exact": list(self.exact)}


# ----------------------------------------------------------------------------- calibration

class _Calibration:
    """Calibration inputs, read once and held in memory when they fit, else re-read per pass.

    A re-read must give the same batches (checked by a fingerprint of every batch), otherwise
    the cached dense targets would not belong to the pruned model's inputs."""

    def __init__(self, calibration: Iterable, device: torch.device, budget_bytes: float):
        _check_reiterable(calibration)
        self.source, self.device = calibration, device
        self.held: list[torch.Tensor] | None = []
        self.fingerprints: list[tuple] = []
        self.samples, self.max_batch, self.first = 0, 0, None
        held_bytes = 0
        for batch in calibration:
            x = _first_tensor(batch)
            if x.shape[0] == 0:
                continue
            self.fingerprints.append(_fingerprint(x))
            self.samples += x.shape[0]
            self.max_batch = max(self.max_batch, x.shape[0])
            if self.first is None:
                self.first = x[:1].to(device)
            if self.held is not None:
                held_bytes += x.numel() * x.element_size()
                if held_bytes <= budget_bytes:
                    self.held.append(x.to(device))
                else:
                    self.held = None
        self.passes = 1

    def __len__(self) -> int:
        return len(self.fingerprints)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self.held is not None:
            yield from enumerate(self.held)
            return
        self.passes += 1
        index = 0
        for batch in self.source:
            x = _first_tensor(batch)
            if x.shape[0] == 0:
                continue
            if index >= len(self.fingerprints) or _fingerprint(x) != self.fingerprints[index]:
                raise CalibrationError(
                    f"the calibration data changed between passes (batch {index} differs): reconstruction "
                    "reads it several times, so it must yield the same batches each time. Use "
                    "shuffle=False and evaluation transforms (no random augmentation), or raise "
                    "max_memory_mb so that the inputs are held in memory")
            yield index, x.to(self.device)
            index += 1
        if index != len(self.fingerprints):
            raise CalibrationError(f"the calibration data gave {index} batches on a later pass, "
                                   f"{len(self.fingerprints)} on the first: it must yield the same batches each time")


def _fingerprint(x: torch.Tensor) -> tuple:
    flat = x.detach().flatten().double()
    return tuple(x.shape), float(flat.sum()), float((flat * flat).sum())


def _check_reiterable(calibration) -> None:
    try:
        iterator = iter(calibration)
    except TypeError:
        raise CalibrationError(f"calibration must be a list of batches or a DataLoader, got "
                               f"{type(calibration).__name__}") from None
    if iterator is calibration:
        raise CalibrationError(
            f"calibration is a one-shot iterator ({type(calibration).__name__}): reconstruction reads the "
            "calibration data several times (and prune() reads it before). Pass a list of batches "
            "(e.g. list(batches)) or a DataLoader instead")


# ----------------------------------------------------------------------------- forward control

class _Stop(Exception):
    """Raised by a hook once every layer a pass needs has run: the rest of the forward is skipped."""


def _run(model: nn.Module, x: torch.Tensor) -> None:
    try:
        model(x)
    except _Stop:
        pass


@contextlib.contextmanager
def _hooks(modules_and_hooks: Iterable[tuple[nn.Module, Any]]):
    handles = [m.register_forward_hook(h) for m, h in modules_and_hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _inference(device: torch.device, *models: nn.Module):
    """eval() + no_grad + no autocast; every module's train/eval flag comes back, even on error."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            yield
    finally:
        for m, training in modes:
            m.training = training


# ----------------------------------------------------------------------------- per-layer state

class _Layer:
    """One dense consumer to refit: index maps, shapes and its float64 normal equations."""

    def __init__(self, name: str, dense_mod: nn.Module, pruned_mod: nn.Module, imap: IndexMap):
        self.name, self.dense_mod, self.module = name, dense_mod, pruned_mod
        self.linear = isinstance(pruned_mod, nn.Linear)
        w = pruned_mod.weight
        self.out = w.shape[0]
        self.inputs = w[0].numel()  # R: input channels x kernel positions
        self.has_bias = pruned_mod.bias is not None
        self.unknowns = self.inputs + int(self.has_bias)
        self.kept_out = None if imap.kept_out is None else imap.kept_out.to(w.device)
        self.in_before = dense_mod.weight.shape[1]
        self.out_before = dense_mod.weight.shape[0]
        self.groups, self.group_out = 1, self.out  # _GroupedLayer: conv groups, outputs per group
        self.calls = 0         # calls per forward (the probe counts them)
        self.rows_per_sample = 0
        self.order = 0

    def gram_bytes(self) -> float:
        """Accumulators, their all-reduce copy and the solve's matrices: about 3 Gram-sized arrays."""
        k = self.unknowns + 1
        return 8.0 * (3 * k * k + 2 * k * (self.out + 1))

    def target_bytes_per_sample(self) -> float:
        return 4.0 * self.rows_per_sample * self.out

    def reset(self, device: torch.device) -> None:
        r, f = self.inputs, self.out
        opts = {"dtype": torch.float64, "device": device}
        self.xx, self.xs = torch.zeros(r, r, **opts), torch.zeros(r, **opts)
        self.xy, self.ys = torch.zeros(r, f, **opts), torch.zeros(f, **opts)
        self.yy, self.n = torch.zeros((), **opts), torch.zeros((), **opts)

    def release(self) -> None:
        for attr in ("xx", "xs", "xy", "ys", "yy", "n"):
            self.__dict__.pop(attr, None)

    def target(self, output: torch.Tensor) -> torch.Tensor:
        """The dense output at the kept output channels, float32."""
        if self.kept_out is not None:
            output = output.index_select(-1 if self.linear else 1, self.kept_out)
        return output.float()

    def rows(self, a: torch.Tensor) -> torch.Tensor:
        """Input rows [n, R], float32, in the same order as target_rows."""
        if self.linear:
            return a.reshape(-1, self.inputs)
        u, _ = _patches(self.module, a)  # [B, R, P]; 1x1 convs without unfold
        return u.transpose(1, 2).reshape(-1, self.inputs)

    def target_rows(self, y: torch.Tensor) -> torch.Tensor:
        if self.linear:
            return y.reshape(-1, self.out)
        return y.flatten(2).transpose(1, 2).reshape(-1, self.out)

    def accumulate(self, a: torch.Tensor, y: torch.Tensor, chunk_bytes: float) -> None:
        a = a.detach().float()
        batch = a.shape[0]
        per_sample = (max(1, self.rows_per_sample // max(1, self.calls)) * self.groups
                      * (self.inputs + self.group_out) * 24)
        step = max(1, int(chunk_bytes // per_sample))
        for s in range(0, batch, step):
            x = self.rows(a[s:s + step]).double()
            t = self.target_rows(y[s:s + step]).double()
            if x.shape[-2] != t.shape[-2]:
                raise PruningError(f'layer "{self.name}": {x.shape[-2]} input rows but {t.shape[-2]} dense '
                                   "target rows; the pruned and dense layers do not compute the same positions")
            self._add(x, t)

    def _add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        self.xx.addmm_(x.t(), x)
        self.xy.addmm_(x.t(), t)
        self.xs += x.sum(0)
        self.ys += t.sum(0)
        self.yy += (t * t).sum()
        self.n += x.shape[0]

    def packed(self) -> torch.Tensor:
        return torch.cat([self.xx.flatten(), self.xs, self.xy.flatten(), self.ys, self.yy.view(1), self.n.view(1)])

    def packed_size(self) -> int:
        r, f = self.inputs, self.out
        return r * r + r + r * f + f + 2

    def unpack(self, flat: torch.Tensor) -> None:
        r, f = self.inputs, self.out
        sizes = [r * r, r, r * f, f, 1, 1]
        xx, xs, xy, ys, yy, n = torch.split(flat, sizes)
        self.xx, self.xs, self.xy, self.ys = xx.view(r, r), xs, xy.view(r, f), ys
        self.yy, self.n = yy[0], n[0]

    # -- solve

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.module.weight.detach().reshape(self.out, -1).t().double()
        b = (self.module.bias.detach().double() if self.has_bias
             else torch.zeros(self.out, dtype=torch.float64, device=w.device))
        return w, b

    def residual(self, w: torch.Tensor, b: torch.Tensor) -> float:
        """||X w + b - Y||^2 from the accumulated sums."""
        quad = (w * (self.xx @ w)).sum() + 2.0 * (b * (self.xs @ w)).sum() + self.n * (b * b).sum()
        cross = (w * self.xy).sum() + (b * self.ys).sum()
        return float(quad - 2.0 * cross + self.yy)

    def error(self, w: torch.Tensor, b: torch.Tensor) -> float:
        """sqrt(||X w + b - Y||^2 / ||Y||^2) from the accumulated sums."""
        residual, energy = self.residual(w, b), float(self.yy.sum())
        if energy <= 0.0:
            return 0.0 if residual <= 0 else math.inf
        return math.sqrt(max(residual, 0.0) / energy)

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        n, r = float(self.n), self.inputs
        xx = self.xx / n
        lam = ridge * float(torch.diagonal(xx).sum()) / max(r, 1)
        if self.has_bias:
            a = torch.empty(r + 1, r + 1, dtype=torch.float64, device=xx.device)
            a[:r, :r] = xx
            a[:r, r] = a[r, :r] = self.xs / n
            a[r, r] = 1.0
            rhs = torch.cat([self.xy, self.ys.view(1, -1)]) / n
        else:
            a, rhs = xx.clone(), self.xy / n
        a[:r, :r].diagonal().add_(lam)
        factor, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            sol = torch.cholesky_solve(rhs, factor)
        else:  # singular (ridge 0 on rank-deficient inputs): minimum-norm solution
            evals, evecs = torch.linalg.eigh(a)
            keep = evals > evals.abs().max() * a.shape[0] * torch.finfo(torch.float64).eps
            inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
            sol = evecs @ (inv[:, None] * (evecs.t() @ rhs))
        w = sol[:r]
        b = sol[r] if self.has_bias else torch.zeros(self.out, dtype=torch.float64, device=w.device)
        return w, b, lam

    def refit(self, ridge: float) -> tuple[float, float, float, bool]:
        """Solve and write the refit when it lowers the calibration error: (error before, error after,
        absolute ridge, whether the weights were replaced)."""
        w0, b0 = self.current()
        before = self.error(w0, b0)
        w, b, lam = self.solve(ridge)
        after = self.error(w, b) if bool(torch.isfinite(w).all() and torch.isfinite(b).all()) else math.inf
        if after <= before:
            self.write(w, b)
            return before, after, lam, True
        return before, before, lam, False

    def write(self, w: torch.Tensor, b: torch.Tensor) -> None:
        weight = self.module.weight
        with torch.no_grad():
            weight.copy_(w.t().reshape(weight.shape).to(weight.dtype))
            if self.has_bias:
                self.module.bias.copy_(b.to(self.module.bias.dtype))


class _GroupedLayer(_Layer):
    """A grouped or depthwise conv: one block of normal equations per group (its outputs read only
    its own input channels), solved as a batch. Each group keeps its refit only where it lowers
    that group's calibration error; the layer's error is over all groups together."""

    def __init__(self, name: str, dense_mod: nn.Module, pruned_mod: nn.Module, imap: IndexMap):
        super().__init__(name, dense_mod, pruned_mod, imap)
        self.groups = pruned_mod.groups
        self.group_out = self.out // self.groups  # self.inputs (R) is already per group: in/groups x kh x kw
        self.in_before = dense_mod.in_channels

    def gram_bytes(self) -> float:
        k = self.unknowns + 1
        return 8.0 * self.groups * (3 * k * k + 2 * k * (self.group_out + 1))

    def reset(self, device: torch.device) -> None:
        g, r, f = self.groups, self.inputs, self.group_out
        opts = {"dtype": torch.float64, "device": device}
        self.xx, self.xs = torch.zeros(g, r, r, **opts), torch.zeros(g, r, **opts)
        self.xy, self.ys = torch.zeros(g, r, f, **opts), torch.zeros(g, f, **opts)
        self.yy, self.n = torch.zeros(g, **opts), torch.zeros((), **opts)

    def rows(self, a: torch.Tensor) -> torch.Tensor:
        """Input rows [G, n, R] (group-major channels, as Conv2d splits them)."""
        u, _ = _patches(self.module, a)  # [B, G*R, P]
        batch, positions = u.shape[0], u.shape[2]
        return u.view(batch, self.groups, self.inputs, positions).permute(1, 0, 3, 2).reshape(self.groups, -1,
                                                                                             self.inputs)

    def target_rows(self, y: torch.Tensor) -> torch.Tensor:
        batch = y.shape[0]
        return y.reshape(batch, self.groups, self.group_out, -1).permute(1, 0, 3, 2).reshape(self.groups, -1,
                                                                                              self.group_out)

    def _add(self, x: torch.Tensor, t: torch.Tensor) -> None:  # x [G, n, R], t [G, n, F/G]
        self.xx.baddbmm_(x.transpose(1, 2), x)
        self.xy.baddbmm_(x.transpose(1, 2), t)
        self.xs += x.sum(1)
        self.ys += t.sum(1)
        self.yy += (t * t).sum((1, 2))
        self.n += x.shape[1]

    def packed(self) -> torch.Tensor:
        return torch.cat([self.xx.flatten(), self.xs.flatten(), self.xy.flatten(), self.ys.flatten(), self.yy,
                          self.n.view(1)])

    def packed_size(self) -> int:
        g, r, f = self.groups, self.inputs, self.group_out
        return g * (r * r + r + r * f + f + 1) + 1

    def unpack(self, flat: torch.Tensor) -> None:
        g, r, f = self.groups, self.inputs, self.group_out
        xx, xs, xy, ys, yy, n = torch.split(flat, [g * r * r, g * r, g * r * f, g * f, g, 1])
        self.xx, self.xs, self.xy = xx.view(g, r, r), xs.view(g, r), xy.view(g, r, f)
        self.ys, self.yy, self.n = ys.view(g, f), yy, n[0]

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.module.weight.detach().double().reshape(self.groups, self.group_out, -1).transpose(1, 2)
        b = (self.module.bias.detach().double() if self.has_bias
             else torch.zeros(self.out, dtype=torch.float64, device=w.device))
        return w, b.view(self.groups, self.group_out)

    def residuals(self, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per group ||X_g w_g + b_g - Y_g||^2 from the accumulated sums."""
        quad = ((w * (self.xx @ w)).sum((1, 2)) + 2.0 * (b * (self.xs[:, None, :] @ w)[:, 0]).sum(1)
                + self.n * (b * b).sum(1))
        cross = (w * self.xy).sum((1, 2)) + (b * self.ys).sum(1)
        return (quad - 2.0 * cross + self.yy).clamp_min(0.0)

    def residual(self, w: torch.Tensor, b: torch.Tensor) -> float:
        return float(self.residuals(w, b).sum())

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Every group's ridge system at once; the ridge is relative to each group's own mean input
        energy (a depthwise channel's scale is its own). Returns the mean absolute ridge."""
        n, g, r = float(self.n), self.groups, self.inputs
        xx = self.xx / n
        energy = torch.diagonal(xx, dim1=1, dim2=2).sum(1) / max(r, 1)  # [G] mean input energy per group
        # A dead group (all-zero inputs) would get no ridge and a singular system; a floor from the layer's
        # mean keeps it solvable (w = 0, b = the target mean) and its solution independent of summation order.
        lam = ridge * torch.maximum(energy, 1e-6 * energy.mean())
        k = r + int(self.has_bias)
        a = torch.zeros(g, k, k, dtype=torch.float64, device=xx.device)
        a[:, :r, :r] = xx
        rhs = torch.zeros(g, k, self.group_out, dtype=torch.float64, device=xx.device)
        rhs[:, :r] = self.xy / n
        if self.has_bias:
            a[:, :r, r] = a[:, r, :r] = self.xs / n
            a[:, r, r] = 1.0
            rhs[:, r] = self.ys / n
        a[:, range(r), range(r)] += lam[:, None]
        factor, info = torch.linalg.cholesky_ex(a)
        sol = torch.cholesky_solve(rhs, factor)
        singular = info != 0
        if bool(singular.any()):  # ridge 0 on rank-deficient inputs (e.g. a dead channel): minimum norm
            sol[singular] = torch.linalg.pinv(a[singular], hermitian=True) @ rhs[singular]
        w = sol[:, :r]
        b = sol[:, r] if self.has_bias else torch.zeros(g, self.group_out, dtype=torch.float64, device=w.device)
        return w, b, float(lam.mean())

    def refit(self, ridge: float) -> tuple[float, float, float, bool]:
        """Solve, keep each group's refit only where it lowers that group's residual, write."""
        w0, b0 = self.current()
        before = self.residuals(w0, b0)
        w, b, lam = self.solve(ridge)
        after = self.residuals(w, b)
        better = torch.isfinite(w).flatten(1).all(1) & torch.isfinite(b).all(1) & (after <= before)
        w = torch.where(better[:, None, None], w, w0)
        b = torch.where(better[:, None], b, b0)
        refit = bool(better.any())
        if refit:
            self.write(w, b)
        return self.error(w0, b0), self.error(w, b), lam, refit

    def write(self, w: torch.Tensor, b: torch.Tensor) -> None:
        weight = self.module.weight
        with torch.no_grad():
            weight.copy_(w.transpose(1, 2).reshape(weight.shape).to(weight.dtype))
            if self.has_bias:
                self.module.bias.copy_(b.reshape(-1).to(self.module.bias.dtype))


# ----------------------------------------------------------------------------- collectives

def _agree_on_error(message: str | None, device: torch.device) -> None:
    """Raise the same CalibrationError on every rank when any rank hit one (no rank hangs)."""
    flag = all_reduce_max(torch.tensor([0.0 if message is None else 1.0], device=device))
    if float(flag[0]) > 0:
        raise CalibrationError(message or "another rank found bad calibration data (see its error)")


# ----------------------------------------------------------------------------- probe

def _probe(pruned: nn.Module, dense: nn.Module, layers: dict[str, _Layer], x1: torch.Tensor,
           max_rows: int, device: torch.device) -> torch.Tensor:
    """Call order, calls per forward and positions of every layer, and which layers depend on which.

    Dependencies come from one batched forward of the pruned model: row j + 1 is the first sample
    with noise added to layer j's output, so layer k depends on layer j exactly when its input in
    row j + 1 differs from row 0 (eval mode keeps batch rows independent; a model that mixes them
    only makes layers look dependent, which costs passes, never correctness)."""
    names = list(layers)
    order: list[str] = []

    def recorder(name):
        def hook(module, inputs, output):
            layer = layers[name]
            if layer.calls == 0:
                order.append(name)
            layer.calls += 1
            layer.rows_per_sample += output.numel() // output.shape[0] // layer.out
        return hook

    with _hooks((layers[n].module, recorder(n)) for n in names):
        pruned(x1)
    dense_calls = {n: 0 for n in names}

    def dense_counter(name):
        def hook(module, inputs, output):
            dense_calls[name] += 1
        return hook

    with _hooks((layers[n].dense_mod, dense_counter(n)) for n in names):
        dense(x1)
    for name in names:
        if dense_calls[name] != layers[name].calls:
            raise UsageError(f'layer "{name}" runs {dense_calls[name]} time(s) per forward in the dense model but '
                             f"{layers[name].calls} in the pruned one: these are not the same architecture")
    for rank, name in enumerate(order):
        layers[name].order = rank

    col = {n: i for i, n in enumerate(names)}
    depends = torch.zeros(len(names), len(names), device=device)  # depends[k, j]: k reads j's output
    per_forward = max(1, max_rows - 1)
    for start in range(0, len(order), per_forward):
        sources = order[start:start + per_forward]
        batch = x1.expand(len(sources) + 1, *x1.shape[1:]).contiguous()
        seen: dict[str, list] = {n: [] for n in order}
        hooks = [(layers[n].module, _watch(seen[n])) for n in order]
        hooks += [(layers[n].module, _perturb(i + 1, start + i)) for i, n in enumerate(sources)]
        with _hooks(hooks):
            pruned(batch)
        for k_name in order:
            for a in seen.get(k_name, []):
                ref = a[0]
                tol = 1e-4 * (float(ref.abs().max()) + 1e-30)
                diff = (a[1:] - ref).flatten(1).abs().amax(dim=1)  # one value per perturbed source
                for i, j_name in enumerate(sources):
                    if j_name != k_name and float(diff[i]) > tol:
                        depends[col[k_name], col[j_name]] = 1.0
    return depends


def _perturb(row: int, seed: int):
    """A forward hook adding seeded noise (of the output's scale) to batch row `row` of the output."""
    def hook(module, inputs, output):
        gen = torch.Generator(device=output.device).manual_seed(seed)
        noise = torch.randn(output[row:row + 1].shape, device=output.device, generator=gen)
        out = output.clone()
        out[row:row + 1] += noise.to(out.dtype) * (output[0].abs().mean() + 1.0)
        return out
    return hook


def _watch(found: list):
    def hook(module, inputs, output):
        found.append(inputs[0].detach())
    return hook


# ----------------------------------------------------------------------------- main entry

def reconstruct(
    dense: nn.Module,
    pruned: nn.Module,
    calibration: Iterable,
    *,
    plan=None,
    index_maps: Mapping | None = None,
    example_inputs=None,
    ridge: float = DEFAULT_RIDGE,
    layers: str = "all",
    max_memory_mb: float = DEFAULT_MAX_MEMORY_MB,
    underdetermined: str = "error",
    progress: bool = False,
    device: str | torch.device | None = None,
) -> ReconstructionResult:
    """Refit the pruned model's dense consumers by ridge least squares onto the dense model's outputs.

    `pruned` is modified in place (its weights and biases only); `dense` is never modified and both
    models' train/eval flags come back as they were. Which channels each layer kept comes from
    `plan` (PruneResult.plan; all its steps, replayed with `example_inputs`, by default one
    calibration sample), or from `index_maps` ({layer name: (kept_in, kept_out)} or IndexMap, None
    meaning all), or, when neither is given, the two models must have equal layer shapes.

    `calibration`: a list of batches or a DataLoader (tensors or (inputs, labels) pairs); it is
    read several times, so a one-shot iterator is refused, and it must yield the same batches each
    time unless it fits in memory. Under torchrun pass each rank its own shard: the Gram matrices
    are summed across ranks, so every rank ends with the weights of a single-process run over all.

    `layers`: "all" refits every dense consumer that pruning changed or that reads (directly or
    not) from a changed layer, absorbing upstream error; "pruned" only the changed ones (channels
    removed, or weights that differ from the dense model's kept rows). A changed layer whose inputs
    are the dense model's and whose weights are the dense kept rows is exact already (listed in
    `exact`, not refit). `ridge` is relative to the mean diagonal of each layer's Gram matrix. `max_memory_mb`
    bounds reconstruction's own buffers (Gram matrices, cached targets, held inputs, patch chunks);
    the model's forward activations depend on the calibration batch size (and one sample's patches
    are the smallest chunk). A layer whose normal equations alone exceed half the bound is left
    unchanged and reported in `skipped`.

    A layer with fewer calibration rows (samples x output positions) than unknowns per output
    (inputs + bias) is underdetermined: the refit would interpolate the calibration data. That is
    a CalibrationError naming the samples needed, or with `underdetermined="skip"` the layer is
    left unchanged and reported (e.g. a flatten -> Linear with thousands of features and the
    paper's ~200 calibration samples).
    """
    start_time = time.perf_counter()
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or not ridge >= 0 or math.isinf(ridge):
        raise UsageError(f"ridge must be a number >= 0 (relative to the Gram matrix's mean diagonal), got {ridge!r}")
    if layers not in LAYER_MODES:
        raise UsageError(f"layers must be one of {LAYER_MODES}, got {layers!r}")
    if underdetermined not in UNDERDETERMINED:
        raise UsageError(f"underdetermined must be one of {UNDERDETERMINED}, got {underdetermined!r}")
    if not isinstance(max_memory_mb, (int, float)) or not max_memory_mb > 0:
        raise UsageError(f"max_memory_mb must be a positive number, got {max_memory_mb!r}")
    if dense is pruned:
        raise UsageError("dense and pruned are the same module: pass the pruned copy (PruneResult.model)")
    budget = float(max_memory_mb) * 2**20

    params = list(pruned.parameters())
    home = params[0].device if params else torch.device("cpu")
    device = torch.device(device) if device is not None else home
    pruned.to(device)
    try:
        dense_params = list(dense.parameters())
        if dense_params and dense_params[0].device != device:
            dense = copy.deepcopy(dense).to(device)  # never move the caller's model
        with _inference(device, dense, pruned):
            result = _reconstruct(dense, pruned, calibration, plan, index_maps, example_inputs, float(ridge),
                                  layers, budget, underdetermined, progress, device)
    finally:
        pruned.to(home)
    result.max_memory_mb = float(max_memory_mb)
    result.seconds = time.perf_counter() - start_time
    return result


def _reconstruct(dense, pruned, calibration, plan, index_maps, example_inputs, ridge, mode, budget,
                 underdetermined, progress, device) -> ReconstructionResult:
    data = _Calibration(calibration, device, _INPUTS_SHARE * budget)
    error = None if data.samples else "the calibration data is empty: give at least one batch of inputs"
    _agree_on_error(error, device)
    total_samples = int(all_reduce_sum(torch.tensor([float(data.samples)], device=device, dtype=torch.float64))[0])

    dense_mods = {n: m for n, m in dense.named_modules() if is_dense_layer(m)}
    dense_grouped = {n: m for n, m in dense.named_modules() if _is_grouped_conv(m)}
    pruned_mods = dict(pruned.named_modules())
    skipped = []
    missing = [n for n in dense_mods if not is_dense_layer(pruned_mods.get(n, nn.Identity()))]
    if missing:
        raise UsageError(f"the pruned model lacks dense layers of the dense model ({missing[:3]}): module names "
                         "must be the same (pass PruneResult.model, pruned from this dense model)")

    if index_maps is not None:
        maps = _normalise_maps(index_maps, dense_mods, dense_grouped)
    elif plan is not None:
        example = example_inputs if example_inputs is not None else data.first
        maps = index_maps_from_plan(dense, plan, example)
    else:
        maps = {}
    grouped_mods = {}
    for name, dm in dense_grouped.items():  # refit per group where the kept outputs are known
        pm = pruned_mods.get(name)
        if not _is_grouped_conv(pm):
            continue
        imap = maps.get(name, IndexMap())
        kept = dm.out_channels if imap.kept_out is None else imap.kept_out.numel()
        if pm.out_channels != kept or dm.kernel_size != pm.kernel_size or dm.stride != pm.stride:
            skipped.append({"name": name, "reason": f"grouped conv (groups={pm.groups}) whose kept channels are "
                                                    "not known (pass plan=): left unchanged"})
            continue
        grouped_mods[name] = dm
        maps[name] = imap
    for name, dm in dense_mods.items():
        imap = maps.setdefault(name, IndexMap())
        pw, dw = pruned_mods[name].weight, dm.weight
        expect = list(dw.shape)
        if imap.kept_out is not None:
            expect[0] = imap.kept_out.numel()
        if imap.kept_in is not None:
            expect[1] = imap.kept_in.numel()
        if list(pw.shape) != expect:
            how = ("the plan/index maps give" if (plan is not None or index_maps is not None)
                   else "without plan= or index_maps= the dense shape is expected:")
            raise UsageError(f'layer "{name}" has weight shape {tuple(pw.shape)} in the pruned model but {how} '
                             f"{tuple(expect)}; pass the plan that made this pruned model (PruneResult.plan)")

    all_layers = {n: _Layer(n, dense_mods[n], pruned_mods[n], maps[n]) for n in dense_mods}
    all_layers.update({n: _GroupedLayer(n, m, pruned_mods[n], maps[n]) for n, m in grouped_mods.items()})
    depends = _probe(pruned, dense, all_layers, data.first, max(2, data.max_batch), device)
    depends = all_reduce_max(depends)
    names = list(all_layers)
    never = [n for n in names if all_layers[n].calls == 0]
    for n in never:
        skipped.append({"name": n, "reason": "never runs in the forward pass of the calibration data"})
    ran = sorted((n for n in names if all_layers[n].calls), key=lambda n: all_layers[n].order)
    col = {n: i for i, n in enumerate(names)}

    # Changed: channels removed, or weights that are not the dense kept rows (e.g. gamma folded in).
    changed = {n for n in ran if maps[n].changed or not _is_row_selection(all_layers[n])}
    reach = changed.copy()
    if mode == "all":
        for n in ran:  # forward order: a layer reading any reached layer is reached
            if any(depends[col[n], col[m]] > 0 for m in reach):
                reach.add(n)

    def exact(n: str) -> bool:
        """Inputs as in the dense model and weights a plain selection of its rows: nothing to fix."""
        if maps[n].kept_in is not None or any(depends[col[n], col[m]] > 0 for m in reach if m != n):
            return False
        return _is_row_selection(all_layers[n])

    targets, exact_layers = [], []
    for n in ran:
        if n not in reach:
            continue
        if exact(n):
            exact_layers.append(n)
        else:
            targets.append(n)

    result = ReconstructionResult(ridge=ridge, samples=total_samples)
    todo = []
    for n in targets:
        layer = all_layers[n]
        if layer.gram_bytes() > _GRAM_SHARE * budget:
            logger.warning("reconstruction leaves %s unchanged: its normal equations need %.0f MB (max_memory_mb=%.0f)",
                           n, layer.gram_bytes() / 2**20, budget / 2**20)
            skipped.append({"name": n, "reason": f"its Gram matrix and solve ({layer.gram_bytes() / 2**20:.0f} MB) "
                                                 f"exceed {_GRAM_SHARE:.0%} of max_memory_mb: left unchanged "
                                                 "(raise max_memory_mb)"})
            continue
        rows = total_samples * layer.rows_per_sample
        if rows < layer.unknowns:
            per = max(1, layer.rows_per_sample)
            need = math.ceil(layer.unknowns / per)
            if underdetermined == "skip":
                logger.warning("reconstruction leaves %s unchanged: %d calibration rows for %d unknowns", n, rows,
                               layer.unknowns)
                skipped.append({"name": n, "reason": f"underdetermined: {rows} calibration rows for {layer.unknowns} "
                                                     f"unknowns per output (needs at least {need} samples)"})
                continue
            raise CalibrationError(
                f'too few calibration samples to refit layer "{n}": it has {layer.unknowns} unknowns per output '
                f"({layer.inputs} inputs{' + bias' if layer.has_bias else ''}) but {total_samples} samples give "
                f"only {rows} rows ({per} per sample), so the least-squares problem is underdetermined. Give at "
                f"least {need} calibration samples, pass underdetermined=\"skip\" to leave such layers "
                "unchanged, or skip reconstruction")
        todo.append(layer)

    levels = _levels(todo, depends, col, _GRAM_SHARE * budget)
    cache = _TargetCache(dense, data, levels, _TARGETS_SHARE * budget)
    chunk_bytes = _CHUNK_SHARE * budget
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="reconstruct", unit="layer")
    pruned_passes = 0
    try:
        for li, level in enumerate(levels):
            for layer in level:
                layer.reset(device)
            message = None
            try:
                cache.prepare(li)
                _accumulate_level(pruned, data, level, li, cache, chunk_bytes)
                pruned_passes += 1
            except CalibrationError as exc:
                message = str(exc)
            _agree_on_error(message, device)
            flat = all_reduce_sum(torch.cat([layer.packed() for layer in level]))
            offset = 0
            for layer in level:
                size = layer.packed_size()
                layer.unpack(flat[offset:offset + size])
                offset += size
            for layer in level:
                result.layers.append(_refit(layer, ridge))
                layer.release()
                if bar is not None:
                    bar.update(1)
            cache.drop(li)
    finally:
        if bar is not None:
            bar.close()
    result.skipped = skipped
    result.exact = exact_layers
    result.passes = {"pruned": pruned_passes, "dense": cache.passes, "data_reads": data.passes}
    return result


def layer_errors(dense: nn.Module, pruned: nn.Module, batches: Iterable, index_maps: Mapping,
                 device: str | torch.device | None = None) -> dict[str, float]:
    """Per dense layer named in `index_maps` ({name: IndexMap}, e.g. index_maps_from_plan): the
    relative output error ||y_pruned - y_dense[kept]|| / ||y_dense[kept]|| over `batches`, both models
    run in full (so a layer's error includes what reaches it from upstream). Used on held-out images
    for the report's certificate; neither model is modified (train/eval flags come back)."""
    device = torch.device(device) if device is not None else next(pruned.parameters()).device
    dense_mods, pruned_mods = dict(dense.named_modules()), dict(pruned.named_modules())
    names = [n for n in index_maps if n in dense_mods and n in pruned_mods and is_dense_layer(pruned_mods[n])]
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    diff = dict.fromkeys(names, 0.0)
    ref = dict.fromkeys(names, 0.0)

    def keep(name):
        def hook(module, args, output):
            outputs[name].append(output.detach())
        return hook

    def compare(name):
        imap = index_maps[name]
        dim = -1 if isinstance(pruned_mods[name], nn.Linear) else 1

        def hook(module, args, output):
            target = outputs[name].pop(0)
            if imap.kept_out is not None:
                target = target.index_select(dim, imap.kept_out.to(target.device))
            diff[name] += float((output.double() - target.double()).pow(2).sum())
            ref[name] += float(target.double().pow(2).sum())
        return hook

    with _inference(device, dense, pruned), \
            _hooks([(dense_mods[n], keep(n)) for n in names] + [(pruned_mods[n], compare(n)) for n in names]):
        for batch in batches:
            x = _first_tensor(batch).to(device)
            dense(x)
            pruned(x)
    return {n: math.sqrt(diff[n] / ref[n]) if ref[n] > 0 else 0.0 for n in names}


def _is_row_selection(layer: _Layer) -> bool:
    dense_w, dense_b = layer.dense_mod.weight, layer.dense_mod.bias
    if layer.kept_out is not None:
        dense_w = dense_w.index_select(0, layer.kept_out.to(dense_w.device))
        dense_b = None if dense_b is None else dense_b.index_select(0, layer.kept_out.to(dense_b.device))
    bias = layer.module.bias
    same_bias = (bias is None) == (dense_b is None) and (bias is None or torch.equal(bias, dense_b))
    return same_bias and dense_w.shape == layer.module.weight.shape and torch.equal(dense_w, layer.module.weight)


def _refit(layer: _Layer, ridge: float) -> LayerReconstruction:
    before, after, lam, replaced = layer.refit(ridge)
    status = "refit" if replaced else "kept_original"
    return LayerReconstruction(
        name=layer.name, error_before=before, error_after=after, ridge_used=lam,
        kept_in=layer.module.weight.shape[1] * layer.groups, kept_out=layer.out, in_before=layer.in_before,
        out_before=layer.out_before, rows=int(layer.n), status=status)


def _levels(todo: list[_Layer], depends: torch.Tensor, col: dict, gram_budget: float) -> list[list[_Layer]]:
    """Consecutive layers (forward order) that read none of each other share one pass."""
    levels: list[list[_Layer]] = []
    current: list[_Layer] = []
    used = 0.0
    for layer in todo:
        independent = all(depends[col[layer.name], col[m.name]] == 0 for m in current)
        if current and independent and used + layer.gram_bytes() <= gram_budget:
            current.append(layer)
            used += layer.gram_bytes()
            continue
        if current:
            levels.append(current)
        current, used = [layer], layer.gram_bytes()
    if current:
        levels.append(current)
    return levels


def _accumulate_level(pruned, data: _Calibration, level: list[_Layer], li: int, cache: _TargetCache,
                      chunk_bytes: float) -> None:
    for bi, x in data:
        step = _LevelStep(level, cache.get(li, bi, x), chunk_bytes)
        with _hooks((layer.module, step.hook(layer)) for layer in level):
            _run(pruned, x)


class _LevelStep:
    """The hooks of one batch of a level's pass: accumulate each call's inputs with its targets."""

    def __init__(self, level: list[_Layer], targets: dict[str, list], chunk_bytes: float):
        self.targets, self.chunk_bytes = targets, chunk_bytes
        self.calls = {layer.name: 0 for layer in level}
        self.remaining = sum(layer.calls for layer in level)

    def hook(self, layer: _Layer):
        def hook(module, inputs, output):
            call = self.calls[layer.name]
            self.calls[layer.name] += 1
            if call >= layer.calls:
                return
            a = inputs[0]
            if not torch.isfinite(a).all():
                raise CalibrationError(f'non-finite (NaN/inf) activations enter layer "{layer.name}" of the '
                                       "pruned model: check its weights and the calibration data")
            layer.accumulate(a, self.targets[layer.name][call], self.chunk_bytes)
            self.remaining -= 1
            if self.remaining == 0:
                raise _Stop
        return hook


class _TargetCache:
    """Dense targets (kept output channels) of a window of levels, computed in one dense pass.

    A window holds as many consecutive levels as fit in the budget; a level that does not fit on
    its own is computed batch by batch right before the pruned forward (no cache)."""

    def __init__(self, dense: nn.Module, data: _Calibration, levels: list[list[_Layer]], budget: float):
        self.dense, self.data, self.levels, self.budget = dense, data, levels, budget
        self.store: dict[int, dict[int, dict[str, list]]] = {}  # level -> batch -> layer -> calls
        self.streaming: set[int] = set()
        self.passes = 0

    def _bytes(self, level: list[_Layer]) -> float:
        return sum(layer.target_bytes_per_sample() for layer in level) * self.data.samples

    def prepare(self, li: int) -> None:
        if li in self.store or li in self.streaming:
            return
        window, used = [], 0.0
        for lj in range(li, len(self.levels)):
            size = self._bytes(self.levels[lj])
            if used + size > self.budget:
                break
            window.append(lj)
            used += size
        if not window:
            self.streaming.add(li)
            self.passes += 1  # one dense pass, interleaved with the pruned one
            return
        layers = [layer for lj in window for layer in self.levels[lj]]
        level_of = {layer.name: lj for lj in window for layer in self.levels[lj]}
        for lj in window:
            self.store[lj] = {}
        for bi, x in self.data:
            found = self._dense_forward(layers, x)
            for name, outs in found.items():
                self.store[level_of[name]].setdefault(bi, {})[name] = outs
        self.passes += 1

    def _dense_forward(self, layers: list[_Layer], x: torch.Tensor) -> dict[str, list]:
        found = {layer.name: [] for layer in layers}
        remaining = [sum(layer.calls for layer in layers)]

        def make_hook(layer: _Layer):
            def hook(module, inputs, output):
                if len(found[layer.name]) >= layer.calls:
                    return
                if not torch.isfinite(output).all():
                    raise CalibrationError(f'non-finite (NaN/inf) outputs of layer "{layer.name}" in the dense '
                                           "model: check its weights and the calibration data normalisation")
                found[layer.name].append(layer.target(output.detach()))
                remaining[0] -= 1
                if remaining[0] == 0:
                    raise _Stop
            return hook

        with _hooks((layer.dense_mod, make_hook(layer)) for layer in layers):
            _run(self.dense, x)
        return found

    def get(self, li: int, bi: int, x: torch.Tensor) -> dict[str, list]:
        if li in self.streaming:
            return self._dense_forward(self.levels[li], x)
        return self.store[li][bi]

    def drop(self, li: int) -> None:
        self.store.pop(li, None)
