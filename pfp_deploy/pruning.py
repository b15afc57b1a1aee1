"""prune(): score -> allocate -> select -> remove channels physically, and plans that replay.

The result is an ordinary, smaller nn.Module (no masks). A `Plan` lists, per stage, each group's
root layer and the channels it kept; base model + plan + state_dict rebuild a pruned model
without pickling modules (`save_pruned` / `load_pruned`).
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from .errors import ModelLoadError, PruningError, TargetUnattainableError, UsageError, did_you_mean
from .fileio import torch_save_atomic
from .modes import eval_mode, restore_modes, saved_modes
from .pfp import allocation as pfp_allocation  # the module; `allocation` is prune()'s argument
from .pfp import cost_aware
from .pfp.groups import (
    ChannelGroup,
    build_graph,
    channel_scores,
    collect_groups,
    consumer_scores,
    output_layers,
    resolve_names,
    search_group,
)
from .pfp.selection import VARIANTS, Selection, select
from .pfp.sensitivity import sensitivity as compute_sensitivity
from .recipe import ReconstructConfig, validate_section

METRICS = ("macs", "params")
OVERRIDE_KEYS = ("min_channels", "max_prune_ratio", "round_to", "skip")
PLAN_FORMAT = "pfp-deploy-plan"


# ----------------------------------------------------------------------------- plans

@dataclass
class Plan:
    """Per stage, per group: root layer name, width before/after and the kept channel indices."""

    stages: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": 1, "stages": self.stages}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ModelLoadError("not a pfp-deploy plan (missing format: pfp-deploy-plan)")
        return cls(stages=list(data["stages"]))

    def then(self, other: Plan) -> Plan:
        """This plan followed by `other` (a cascade: `other` was made on this plan's result)."""
        return Plan(stages=self.stages + other.stages)

    @property
    def groups(self) -> list[dict]:
        return [g for stage in self.stages for g in stage["groups"]]


@dataclass
class PruneResult:
    model: nn.Module
    plan: Plan
    report: dict
    sensitivities: dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- cost

def count_cost(model: nn.Module, example_inputs) -> tuple[int, int]:
    """(MACs, params) by torch-pruning's op counter, for the given example inputs."""
    try:
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    except RuntimeError:
        # The counter deep-copies the model first, which fails on a tensor cached attached to an
        # autograd graph (a module whose train() does not drop it): count on a detached copy.
        macs, params = tp.utils.count_ops_and_params(_private_copy(model), example_inputs)
    return int(macs), int(params)


def _positions(model: nn.Module, example_inputs) -> dict[nn.Module, float]:
    """Output positions per layer (spatial size x batch, or leading dims for Linear)."""
    found, handles = {}, []

    def hook(module, inputs, output):
        channels = output.shape[-1] if isinstance(module, nn.Linear) else output.shape[1]
        found[module] = found.get(module, 0) + output.numel() / max(1, channels)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            handles.append(m.register_forward_hook(hook))
    try:  # eval: a train-mode forward would update BatchNorm running statistics
        with eval_mode(model), torch.no_grad():
            _forward(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return found


def _build_cost_model(positions: dict, groups: list[ChannelGroup], metric: str, dense_cost: float):
    layers = list(positions)
    index = {m: i for i, m in enumerate(layers)}
    n, g = len(layers), len(groups)
    out0, in0 = np.zeros(n), np.zeros(n)
    a_out, a_in = np.zeros((n, g)), np.zeros((n, g))
    bilinear, linear, volume = np.zeros(n), np.zeros(n), np.zeros(n)
    for gi, group in enumerate(groups):
        for module, per_root in group.out_items:
            if module in index:
                a_out[index[module], gi] += per_root
        for module, per_root in group.in_items:
            if module in index:
                a_in[index[module], gi] += per_root
    for i, m in enumerate(layers):
        p = positions[m]
        volume[i] = p
        macs = metric == "macs"
        if isinstance(m, nn.Conv2d):
            kk = m.kernel_size[0] * m.kernel_size[1]
            out0[i], in0[i] = m.out_channels, m.in_channels
            bias = 1.0 if m.bias is not None else 0.0
            if m.groups > 1 and m.groups == m.in_channels:  # depthwise: in, out and groups move together
                a_out[i] = np.maximum(a_out[i], a_in[i])
                linear[i] = kk * p if macs else kk + bias
            else:
                bilinear[i] = kk * (p if macs else 1.0) / m.groups
                linear[i] = 0.0 if macs else bias
        elif isinstance(m, nn.Linear):
            out0[i], in0[i] = m.out_features, m.in_features
            bias = 1.0 if m.bias is not None else 0.0
            bilinear[i] = p if macs else 1.0
            linear[i] = bias
        else:  # batch norm: 2 ops per element (affine) or 2 parameters per channel
            out0[i] = in0[i] = m.num_features
            affine = 2.0 if m.affine else 1.0
            linear[i] = affine * p if macs else (2.0 if m.affine else 0.0)
    widths = [grp.width for grp in groups]
    return pfp_allocation.CostModel(out0, in0, a_out, a_in, bilinear, linear, widths, dense_cost, volume)


# ----------------------------------------------------------------------------- helpers

def _forward(model: nn.Module, example_inputs):
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _graph_tensors(value, depth: int = 0):
    """Tensors attached to an autograd graph in a module attribute (or a dict/list/tuple of them)."""
    if isinstance(value, torch.Tensor):
        if value.grad_fn is not None:
            yield value
    elif depth < 3 and isinstance(value, dict):
        for item in value.values():
            yield from _graph_tensors(item, depth + 1)
    elif depth < 3 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _graph_tensors(item, depth + 1)


def _private_copy(model: nn.Module) -> nn.Module:
    """A deep copy to work on, so that the model given stays unchanged in every way.

    A tensor a module caches outside its parameters and buffers may be attached to an autograd
    graph (an eval-mode forward with gradients on), which deepcopy refuses: the copy gets it
    detached (through deepcopy's memo, the model given is not touched).
    """
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            for tensor in _graph_tensors(value):
                memo[id(tensor)] = tensor.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001 - any failure means the model cannot be copied
        raise UsageError(
            f"cannot copy {type(model).__name__} with copy.deepcopy ({type(exc).__name__}: {exc}); pfp-deploy "
            "prunes a private copy so that the model given stays unchanged: make the model deep-copyable"
        ) from exc


def _output_shapes(output) -> list:
    """The shape of every tensor in a model's output (nested tuples, lists and dicts), in order."""
    if isinstance(output, torch.Tensor):
        return [tuple(output.shape)]
    if isinstance(output, dict):
        return [(key, shape) for key, value in output.items() for shape in _output_shapes(value)]
    if isinstance(output, (list, tuple)):
        return [shape for value in output for shape in _output_shapes(value)]
    return []


def _run_eval(model: nn.Module, example_inputs):
    """A no-grad forward in eval mode; every module's flag comes back afterwards."""
    with eval_mode(model), torch.no_grad():
        return _forward(model, example_inputs)


def _check_example_inputs(model: nn.Module, example_inputs) -> list:
    """The dense model's output shapes on `example_inputs` (the reference removal must keep)."""
    try:
        return _output_shapes(_run_eval(model, example_inputs))
    except Exception as exc:  # noqa: BLE001 - any failure means the inputs do not fit
        shape = tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else type(example_inputs).__name__
        raise UsageError(
            f"example_inputs of shape {shape} do not fit the model ({type(exc).__name__}: {exc}); "
            "pass a batch shaped like the real inputs, e.g. torch.randn(1, 3, 224, 224)"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _verify(model: nn.Module, example_inputs, reference: list) -> str | None:
    """None when the pruned model runs on `example_inputs` with the dense output shapes, else why not."""
    try:
        shapes = _output_shapes(_run_eval(model, example_inputs))
    except Exception as exc:  # noqa: BLE001 - any failure means the removal broke the model
        return f"the model no longer runs after removing them ({_first_line(exc)})"
    if shapes != reference:
        return f"the model's outputs change shape after removing them ({shapes} instead of {reference})"
    return None


def _validate(keep, metric, variant, min_channels, round_to, max_prune_ratio):
    if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0 < keep <= 1:
        raise UsageError(f"keep must be a ratio in (0, 1], got {keep!r} (0.5 keeps half the {metric})")
    if metric not in METRICS:
        raise UsageError(f"metric must be one of {METRICS}, got {metric!r}.{did_you_mean(metric, METRICS)}")
    if variant not in VARIANTS:
        raise UsageError(f"variant must be one of {VARIANTS}, got {variant!r}.{did_you_mean(variant, VARIANTS)}")
    if not isinstance(min_channels, int) or min_channels < 1:
        raise UsageError(f"min_channels must be an integer >= 1, got {min_channels!r}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise UsageError(f"round_to must be an integer >= 1 or None, got {round_to!r}")
    if max_prune_ratio is not None and not 0 <= max_prune_ratio <= 1:
        raise UsageError(f"max_prune_ratio must be in [0, 1], got {max_prune_ratio!r}")


def _match_overrides(model: nn.Module, groups: list[ChannelGroup], overrides: dict | None) -> list[dict]:
    """Per group, the override settings whose key names one of its layers (or matches 're:')."""
    names = {m: n for n, m in model.named_modules()}
    per_group = [{} for _ in groups]
    for key, settings in (overrides or {}).items():
        if not isinstance(settings, dict):
            raise UsageError(f'overrides["{key}"] must be a mapping of {OVERRIDE_KEYS}, got {settings!r}')
        for name in settings:
            if name not in OVERRIDE_KEYS:
                raise UsageError(f'overrides["{key}"]: unknown setting "{name}".{did_you_mean(name, OVERRIDE_KEYS)}')
        matched = {names[m] for m in resolve_names(model, [key], "overrides")}
        for gi, group in enumerate(groups):
            if matched.intersection(group.members):
                per_group[gi].update(settings)
    return per_group


def _consumer_info(groups, sensitivities, model, positions, batch: int, delta: float, c: float):
    """Per dense consumer: (alpha_l, S_l), S_l summed over every input channel it reads."""
    modules = dict(model.named_modules())
    mapped_sum, covered = {}, {}
    for group in groups:
        for name, mapped in consumer_scores(group, sensitivities).items():
            # float64: a float32 S_l can be 1e-7 short of sum(p) and ceil() would then keep an extra channel
            mapped_sum[name] = mapped_sum.get(name, 0.0) + float(mapped.double().sum())
        for consumer in group.consumers:
            covered.setdefault(consumer.name, set()).update(consumer.in_idxs.tolist())
    info = {}
    for name, total in mapped_sum.items():
        s = sensitivities[name]
        uncovered = torch.ones(s.numel(), dtype=torch.bool)
        uncovered[list(covered[name])] = False
        total += float(s[uncovered].double().sum())
        m = modules[name]
        kernel = m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else 1
        per_point = positions.get(m, batch) / batch  # positions were counted over the example batch
        info[name] = (pfp_allocation.alpha(int(round(per_point)), kernel, delta, c), total)
    return info


# ----------------------------------------------------------------------------- prune

def prune(
    model: nn.Module,
    calibration: Iterable,
    example_inputs,
    *,
    keep: float = 0.5,
    metric: str = "macs",
    variant: str = "deterministic",
    round_to: int | None = None,
    min_channels: int = 1,
    max_prune_ratio: float | None = None,
    ignored_layers: Iterable[str] | None = None,
    overrides: dict | None = None,
    seed: int = 0,
    tolerance: float = 0.01,
    delta: float = pfp_allocation.DELTA,
    c: float = pfp_allocation.C_CONST,
    K: float = pfp_allocation.K_CONST,
    reconstruct: str | Mapping | ReconstructConfig = "least_squares",
    allocation: str = cost_aware.DEFAULT_ALLOCATION,
    sensitivities: dict[str, torch.Tensor] | None = None,
    importance: Callable | None = None,
    method: str = "pfp",
    progress: bool = False,
) -> PruneResult:
    """Prune `model` with PFP so that its MACs (or params) are `keep` x the model given.

    `calibration` is an iterable of input batches (tensors or (inputs, labels) pairs).
    `importance(tp_group) -> Tensor[width]` replaces PFP's channel scores for choosing channels
    (PFP still decides how many each group keeps). `method` names a registered criterion
    (pfp_deploy.criteria: "pfp", the default, is PFP's own scores; "l1", "l2", "taylor", "fpgm",
    "bn_scale", "random", ...) that builds that callable; give `method` or `importance`, not both.
    delta, c and K are the constants of the paper's
    sample complexity (PFP.md §3).

    The model given is never modified in any way (weights, train/eval flags, caches): scoring,
    tracing and removal all run on a private deep copy. The pruned model has the same per-module
    train/eval flags as the model given.

    Tolerance: the achieved fraction a = cost(pruned) / cost(model) must satisfy
    |a - keep| <= tolerance * min(1, keep / 0.1). From keep = 10 % up the tolerance is absolute,
    a fraction of the dense cost (keep=0.5, tolerance=0.01: a in [0.49, 0.51]); below, where 1 %
    of the dense cost would exceed the whole target, it shrinks with keep, i.e. a fixed relative
    error of tolerance / 0.1 (10 % by default: keep=0.005 accepts [0.0045, 0.0055]). A keep below
    the reachable floor (each group at its min_channels / max_prune_ratio / round_to, ignored and
    skipped groups at full width) raises TargetUnattainableError naming that floor.

    `reconstruct` repairs the pruned model without training (pfp_deploy.reconstruction): by default
    ("least_squares") every pruned Conv2d/Linear, and every one downstream, is refit by ridge least
    squares so that its outputs on `calibration` match the dense model's (report["reconstruction"]:
    per layer, the relative error before and after). "none" is the paper's method, prune only. A
    dict / ReconstructConfig sets ridge, layers, max_memory_mb, underdetermined (recipe
    prune.reconstruct). `calibration` is then read again: pass a list or a DataLoader.

    `allocation` decides how many channels each group keeps (pfp_deploy.pfp.cost_aware):
    "cost_aware" (default) spends the budget where the least-squares output error its consumers
    would keep after reconstruction, measured from calibration Gram matrices (one extra dense
    pass, no new forward per width), grows least per unit of cost saved; "cost_aware_norefit" the
    same with the error before any refit; "uniform" one keep ratio for every group; "paper" the
    paper's global eps (PFP.md §3). Which channels a group keeps is the criterion's choice in
    every case. report["epsilon"] is always the paper's eps for the same target (the paper
    allocation is run too), report["epsilon_widths"] the smallest eps whose §3 widths fit within
    the chosen ones (None when no eps does), report["allocation"] the name.

    Every removal is verified: the pruned model must run on `example_inputs` and give outputs
    shaped like the dense model's. A group torch-pruning cannot remove correctly (found when the
    groups are built, or by that check) is left unpruned, the budget is re-allocated over the
    others, and the group is listed in report["skipped_groups"] with the reason; naming its root
    layer in `ignored_layers` skips it without the note.
    """
    _validate(keep, metric, variant, min_channels, round_to, max_prune_ratio)
    criterion = _check_method(method, importance, variant)
    cost_aware.check_allocation(allocation)
    repair = validate_section(ReconstructConfig, {"method": reconstruct} if isinstance(reconstruct, str)
                              else reconstruct, "reconstruct")
    if not (0 < delta < 1 and c > 0 and K > 0):
        raise UsageError(f"need 0 < delta < 1, c > 0 and K > 0; got delta={delta}, c={c}, K={K}")
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance > 0:
        raise UsageError(f"tolerance must be a number > 0 (0.01: within 1 % of the dense cost), got {tolerance!r}")
    timings = {}
    t0 = time.perf_counter()
    work = _private_copy(model)  # everything below runs on this copy: the model given stays as it is
    modes = saved_modes(work)
    reference = _check_example_inputs(work, example_inputs)

    start = time.perf_counter()
    if sensitivities is None:
        sensitivities = compute_sensitivity(work, calibration, progress=progress)
    timings["sensitivity"] = time.perf_counter() - start

    if importance is None and criterion.name != "pfp":
        start = time.perf_counter()
        importance = criterion.importance(work, calibration, seed)
        timings["criterion"] = time.perf_counter() - start

    start = time.perf_counter()
    graph = build_graph(work, example_inputs)
    restore_modes(work, modes)  # torch-pruning's trace left every module in eval() and may have filled caches
    ignored = output_layers(graph) + resolve_names(work, ignored_layers, "ignored_layers")
    groups, unscored, skipped = collect_groups(work, graph, ignored)
    if not groups:
        raise PruningError(
            "no prunable channel group: every group feeds the model output, is ignored, or has no "
            f"dense Conv2d/Linear consumer to score it{_skipped_note(skipped)}"
        )
    settings = _match_overrides(work, groups, overrides)
    positions = _positions(work, example_inputs)
    batch = example_inputs.shape[0] if isinstance(example_inputs, torch.Tensor) else 1
    info = _consumer_info(groups, sensitivities, work, positions, batch, delta, c)
    defaults = {"min_channels": min_channels, "max_prune_ratio": max_prune_ratio, "round_to": round_to}
    budgets = [_budget(g, sensitivities, info, {**defaults, **extra}, K) for g, extra in zip(groups, settings)]
    choice_scores = [b.scores if importance is None else _importance_scores(importance, g)
                     for g, b in zip(groups, budgets)]
    macs0, params0 = count_cost(work, example_inputs)
    dense = float(macs0 if metric == "macs" else params0)
    cost = _build_cost_model(positions, groups, metric, dense)
    target = keep * dense
    allowed = accepted_deviation(keep, tolerance) * dense
    curves = None
    if allocation in cost_aware.GRAM_ALLOCATIONS:
        stats = cost_aware.gram_statistics(work, calibration, sorted({c.name for g in groups for c in g.consumers}))
        orders = [cost_aware.removal_order(sc, g.ch_groups) for g, sc in zip(groups, choice_scores)]
        curves = cost_aware.group_curves(groups, stats, orders, repair.ridge,
                                         refit=allocation == "cost_aware")
        del stats
    timings["allocation"] = timings["removal"] = 0.0
    measured_passes = 0
    while True:  # re-allocate with the measured residual (4 passes at most) or without broken groups
        try:
            widths, eps = pfp_allocation.allocate(budgets, cost, target, tolerance=0.5 * allowed)
        except TargetUnattainableError as exc:
            raise TargetUnattainableError(f"{exc}{_skipped_note(skipped)}") from None
        if allocation == "uniform":
            widths = cost_aware.allocate_uniform(budgets, cost, target, tolerance=0.5 * allowed)
        elif curves is not None:
            widths = cost_aware.allocate_by_error(budgets, cost, target, 0.5 * allowed, curves)
        timings["allocation"] += time.perf_counter() - start
        start = time.perf_counter()
        rng = np.random.default_rng(seed)
        stage_groups = [_group_plan(g, w, sc, variant if importance is None else "deterministic", rng)
                        for g, w, sc in zip(groups, widths, choice_scores)]
        try:
            pruned = _apply_stage(work, stage_groups, example_inputs, fold_gamma=True, reference=reference)
        except _BrokenGroups as exc:
            # Each group breaks at most once (it is then frozen at full width), so this ends.
            for index, reason in exc.broken.items():
                budgets[index].fixed = True
                skipped.append({"name": groups[index].root_name, "reason": (
                    f"{reason}; left unpruned (ignored_layers=[\"{groups[index].root_name}\"] skips it "
                    "without this note)")})
            if keep < 1 and all(b.fixed for b in budgets):
                raise PruningError("no channel group can be pruned without breaking the model"
                                   f"{_skipped_note(skipped)}") from None
            timings["removal"] += time.perf_counter() - start
            start = time.perf_counter()
            continue
        macs1, params1 = count_cost(pruned, example_inputs)
        measured = float(macs1 if metric == "macs" else params1)
        timings["removal"] += time.perf_counter() - start
        start = time.perf_counter()
        measured_passes += 1
        if abs(measured - target) <= allowed or measured_passes == 4:
            break
        cost.correct(cost(widths), measured)
    if abs(measured - target) > allowed:
        floor = _measured_floor(work, groups, budgets, choice_scores, example_inputs, metric, cost)
        below = floor > target + allowed
        raise TargetUnattainableError(
            f"could not reach {keep:.4g} of the dense {metric} within ±{allowed / dense:.2g}: achieved "
            f"{measured / dense:.4g}. The smallest reachable is {floor / dense:.4g} of the dense {metric} "
            "(every group at its min_channels / max_prune_ratio / round_to; ignored and skipped groups at "
            "full width): " + ("raise keep or relax those settings" if below else
                               "raise tolerance or lower round_to") + _skipped_note(skipped)
        )
    eps_widths = eps if allocation == "paper" else cost_aware.certified_epsilon(budgets, widths)
    stage = {"keep": keep, "metric": metric, "variant": variant, "epsilon": eps, "seed": seed,
             "allocation": allocation, "epsilon_widths": eps_widths,
             "importance": None if importance is None else getattr(importance, "__name__", type(importance).__name__),
             "groups": stage_groups}
    repaired = None
    if repair.method != "none":
        start = time.perf_counter()
        repaired = reconstruct_layers(work, pruned, calibration, repair, plan=Plan([stage]),
                                      example_inputs=example_inputs, progress=progress)
        timings["reconstruction"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - t0
    report = {
        "keep": keep, "metric": metric, "variant": variant, "epsilon": eps,
        "method": criterion.name if importance is None or criterion.name != "pfp" else "importance",
        "allocation": allocation, "epsilon_widths": eps_widths,
        "macs_before": macs0, "macs_after": macs1, "params_before": params0, "params_after": params1,
        "target": keep, "achieved": measured / dense, "allowed_deviation": allowed / dense,
        "seconds": {k: round(v, 4) for k, v in timings.items()},
        "groups": [{"name": g["root"], "width_before": g["width_before"], "width_after": g["width_after"]}
                   for g in stage_groups],
        "unscored_groups": unscored,
        "skipped_groups": skipped,
        "calibration_layers": len(sensitivities),
        "reconstruction": repaired.to_dict() if repaired is not None else {"method": "none"},
    }
    return PruneResult(model=pruned, plan=Plan([stage]), report=report, sensitivities=sensitivities)


def reconstruct_layers(dense: nn.Module, pruned: nn.Module, calibration: Iterable, config: ReconstructConfig,
                       **kwargs):
    """pfp_deploy.reconstruction.reconstruct with a recipe's prune.reconstruct settings (in place)."""
    from .reconstruction import reconstruct  # lazy: the module is large and prune(reconstruct="none") skips it

    return reconstruct(dense, pruned, calibration, ridge=config.ridge, layers=config.layers,
                       max_memory_mb=config.max_memory_mb, underdetermined=config.underdetermined, **kwargs)


# Below this keep an absolute tolerance is meaningless (1 % of the dense cost is twice the whole
# target at keep = 0.005), so there the accepted deviation shrinks with keep.
RELATIVE_TOLERANCE_BELOW = 0.1


def accepted_deviation(keep: float, tolerance: float) -> float:
    """The largest |achieved - keep| prune() accepts, both as fractions of the dense cost."""
    return tolerance * min(1.0, keep / RELATIVE_TOLERANCE_BELOW)


def _skipped_note(skipped: list[dict]) -> str:
    if not skipped:
        return ""
    shown = "; ".join(f'"{s["name"]}": {s["reason"]}' for s in skipped[:3])
    more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
    return f". Groups left unpruned: {shown}{more}"


def _measured_floor(model, groups, budgets, choice_scores, example_inputs, metric: str, cost) -> float:
    """The cost of the smallest model the constraints allow (every group at its floor): measured,
    or the cost model's estimate where that smallest model cannot be built."""
    rng = np.random.default_rng(0)
    widths = [pfp_allocation.constrain(b.min_keep, b) for b in budgets]
    floor = [_group_plan(g, w, sc, "deterministic", rng) for g, w, sc in zip(groups, widths, choice_scores)]
    try:
        macs, params = count_cost(_apply_stage(model, floor, example_inputs, fold_gamma=False), example_inputs)
    except Exception:  # noqa: BLE001 - only an estimate for the error message: never mask the real error
        return cost(widths)
    return float(macs if metric == "macs" else params)


def _budget(group: ChannelGroup, sensitivities, info, settings: dict, k: float) -> pfp_allocation.GroupBudget:
    """The allocation's view of a group: PFP scores, consumer terms and the user's constraints."""
    per_consumer = consumer_scores(group, sensitivities)
    floor = max(int(settings.get("min_channels") or 1), 1)
    if settings.get("max_prune_ratio") is not None:
        floor = max(floor, math.ceil((1.0 - settings["max_prune_ratio"]) * group.width - 1e-9))
    return pfp_allocation.GroupBudget(
        width=group.width,
        scores=channel_scores(per_consumer, group.width).double().numpy(),
        terms=pfp_allocation.consumer_terms(per_consumer, info, k),
        min_keep=min(floor, group.width),
        round_to=math.lcm(int(settings.get("round_to") or 1), group.ch_groups),
        fixed=bool(settings.get("skip", False)),
    )


def _check_method(method: str, importance: Callable | None, variant: str):
    """The registered criterion `method` names; UsageError for an unknown name or a clash with importance=."""
    from .criteria import get_criterion  # the registry loads its files on first use

    criterion = get_criterion(method)  # UsageError with a did-you-mean
    if importance is not None and criterion.name != "pfp":
        raise UsageError(f"give method= or importance=, not both (got method={method!r} and an importance "
                         "callable): method names a registered criterion that builds the importance")
    if criterion.name != "pfp" and variant != "deterministic":
        raise UsageError(f"variant {variant!r} samples channels by PFP's sensitivities; with method "
                         f"{criterion.name!r} the criterion's scores choose them: use variant='deterministic'")
    return criterion


def _importance_scores(importance: Callable, group: ChannelGroup) -> np.ndarray:
    """Scores from another criterion (e.g. a torch-pruning importance) for choosing channels."""
    scores = torch.as_tensor(importance(group.tp_group), dtype=torch.float64).flatten().cpu()
    if scores.numel() != group.width:
        raise PruningError(f"importance returned {scores.numel()} scores for group {group.root_name} "
                           f"of width {group.width}")
    return scores.numpy()


def _group_plan(group: ChannelGroup, width: int, scores: np.ndarray, variant: str, rng) -> dict:
    chosen = _select_channels(group, scores, width, variant, rng)
    return {"root": group.root_name, "width_before": group.width, "width_after": int(width),
            "kept": chosen.kept.tolist(),
            "gamma": None if chosen.gamma is None else [float(x) for x in chosen.gamma],
            "members": group.members}


def _select_channels(group: ChannelGroup, scores: np.ndarray, width: int, variant: str, rng) -> Selection:
    """PFP.md §4 selection; grouped convs keep the same positions in every conv group."""
    if group.ch_groups == 1:
        return select(scores, width, variant, rng)
    per_group = group.width // group.ch_groups
    tied = scores.reshape(group.ch_groups, per_group).max(axis=0)  # max over the tied channels
    chosen = select(tied, width // group.ch_groups, "deterministic", rng).kept
    kept = np.sort(np.concatenate([chosen + k * per_group for k in range(group.ch_groups)]))
    return Selection(kept, None)


# ----------------------------------------------------------------------------- removal

class _BrokenGroups(Exception):
    """Internal: removing these groups (index into the stage -> why) breaks the model."""

    def __init__(self, broken: dict[int, str]):
        super().__init__(f"{len(broken)} group(s) break the model")
        self.broken = broken


def _traced_copy(model: nn.Module, example_inputs):
    """A private copy of `model`, its dependency graph and its modules by name."""
    pruned = _private_copy(model)
    modes = saved_modes(pruned)
    graph = build_graph(pruned, example_inputs)
    restore_modes(pruned, modes)  # the trace switched every module to eval() and may have filled caches
    return pruned, graph, dict(pruned.named_modules())


def _remove(graph, modules: dict, entry: dict) -> None:
    """Remove the channels of one group that its plan entry does not keep."""
    removed = sorted(set(range(entry["width_before"])) - set(entry["kept"]))
    if removed:
        search_group(graph, modules[entry["root"]], removed).prune()


def _apply_stage(model: nn.Module, stage_groups: list[dict], example_inputs, fold_gamma: bool,
                 reference: list | None = None) -> nn.Module:
    """A pruned copy of `model`: gamma folded into consumers, then each group's channels removed.

    With `reference` (the dense model's output shapes) the result must run on `example_inputs`
    with those shapes; otherwise _BrokenGroups names the groups whose removal breaks it.
    """
    pruned, graph, modules = _traced_copy(model, example_inputs)
    for entry in stage_groups:
        root = modules.get(entry["root"])
        if root is None:
            raise ModelLoadError(f'the plan names layer "{entry["root"]}", which this model does not have')
        width = graph.get_out_channels(root)
        if width != entry["width_before"]:
            raise ModelLoadError(
                f'plan/model mismatch at "{entry["root"]}": the plan expects {entry["width_before"]} '
                f"channels, the model has {width}: the plan belongs to another model or stage"
            )
        if fold_gamma and entry.get("gamma") is not None:
            _fold_gamma(graph, root, width, entry)
    failure = None
    for entry in stage_groups:
        try:
            _remove(graph, modules, entry)
        except Exception as exc:  # noqa: BLE001 - torch-pruning failing inside a removal
            failure = (entry["root"], exc)
            break
    if reference is None:  # replaying a plan: it removed these groups once, so a failure is a mismatch
        if failure is not None:
            raise PruningError(
                f'torch-pruning cannot remove the planned channels of "{failure[0]}" ({_first_line(failure[1])}): '
                f'the plan belongs to another model, or prune it again with ignored_layers=["{failure[0]}"]'
            ) from failure[1]
        return pruned
    if failure is None and _verify(pruned, example_inputs, reference) is None:
        return pruned
    raise _BrokenGroups(_locate_broken(model, stage_groups, example_inputs, reference))


def _locate_broken(model: nn.Module, stage_groups: list[dict], example_inputs, reference: list) -> dict[int, str]:
    """Which groups break the model: remove them one at a time on a fresh copy, checking after
    each; a group that breaks it is recorded and the copy rebuilt without it (torch-pruning has
    no undo, and a failed removal may leave a layer half-pruned)."""
    broken, done = {}, []
    pruned, graph, modules = _traced_copy(model, example_inputs)
    for index, entry in enumerate(stage_groups):
        if len(entry["kept"]) == entry["width_before"]:
            continue
        try:
            _remove(graph, modules, entry)
            problem = _verify(pruned, example_inputs, reference)
        except Exception as exc:  # noqa: BLE001 - torch-pruning failing inside a removal
            problem = f"torch-pruning fails removing its channels ({_first_line(exc)})"
        if problem is None:
            done.append(entry)
            continue
        broken[index] = problem
        pruned, graph, modules = _traced_copy(model, example_inputs)
        for good in done:
            _remove(graph, modules, good)
    if not broken:
        raise PruningError("the pruned model fails its check, yet no single group breaks it; please report "
                           "this model (prune(..., ignored_layers=[...]) narrows it down)")
    return broken


def _fold_gamma(graph, root, width, entry) -> None:
    """Scale every dense consumer's input weights of a kept channel c by gamma_c (exact)."""
    from .pfp.sensitivity import is_dense_layer

    gamma = torch.ones(width)
    gamma[torch.as_tensor(entry["kept"], dtype=torch.long)] = torch.as_tensor(entry["gamma"], dtype=torch.float32)
    full = search_group(graph, root, range(width))
    with torch.no_grad():
        for item in full:
            module = item.dep.target.module
            if graph.is_in_channel_pruning_fn(item.dep.handler) and isinstance(module, nn.Module) and is_dense_layer(module):
                idx = torch.as_tensor(item.idxs, dtype=torch.long)
                scale = gamma[torch.as_tensor(item.root_idxs, dtype=torch.long)].to(module.weight)
                shape = (1, -1) + (1,) * (module.weight.dim() - 2)
                module.weight[:, idx] *= scale.view(shape)


def apply_plan(base_model: nn.Module, plan: Plan, example_inputs) -> nn.Module:
    """Replay a plan's removals on a copy of `base_model` (weights are loaded separately)."""
    model = base_model
    for stage in plan.stages:
        model = _apply_stage(model, stage["groups"], example_inputs, fold_gamma=False)
    return model


def save_pruned(path, model: nn.Module, plan: Plan, base: dict | None = None, example_shape=None) -> Path:
    """Write {plan, state_dict, base model config} atomically; loads with weights_only=True."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": "pfp-deploy-pruned", "version": 1, "plan": plan.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "base": base or {}, "example_shape": list(example_shape) if example_shape else None}
    return torch_save_atomic(payload, path)


def load_pruned(path, base_model: nn.Module | None = None, example_inputs=None) -> nn.Module:
    """Rebuild a pruned model from base model + plan + state_dict (no pickled modules).

    Without `base_model` the architecture recorded in the file is built, which may only be a builtin
    or torchvision model: a file never makes pfp-deploy import or call code (pass base_model= for a
    model of your own)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"pruned model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot read pruned model {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != "pfp-deploy-pruned":
        raise ModelLoadError(f"{path} is not a pfp-deploy pruned model (save it with save_pruned)")
    if base_model is None:  # the file's architecture record: a builtin/torchvision name, never code
        from .models import architecture_from_file, build_model

        base_model = build_model(architecture_from_file(payload.get("base"), path))
    if example_inputs is None:
        shape = payload.get("example_shape")
        if not shape:
            raise ModelLoadError(f"{path} stores no input shape: pass example_inputs=")
        example_inputs = torch.randn(*shape)
    model = apply_plan(base_model, Plan.from_dict(payload["plan"]), example_inputs)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ModelLoadError(f"weights in {path} do not match the rebuilt model: {exc}") from exc
    return model
