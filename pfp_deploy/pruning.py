"""prune(): score -> allocate -> select -> remove channels physically -> reconstruct.

The result is an ordinary, smaller nn.Module (no masks) and the `Plan` (plan.py) that replays it:
base model + plan + state_dict rebuild a pruned model without pickling modules (models.save_pruned /
models.load_pruned).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from .calibration_distill import distill_on_calibration
from .criteria import get_criterion
from .errors import PruningError, TargetUnattainableError, UsageError
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
)
from .pfp.selection import Selection, select
from .pfp.sensitivity import sensitivity as compute_sensitivity
from .plan import (
    BrokenGroups,
    Plan,
    apply_plan,  # noqa: F401 (re-exported: pruning.apply_plan is documented)
    apply_step,
    forward,
    output_shapes,
    private_copy,
    run_eval,
)
from .recipe import validate_section
from .reconstruction import reconstruct
from .schema import PruneConfig, ReconstructConfig

log = logging.getLogger(__name__)


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
        macs, params = tp.utils.count_ops_and_params(private_copy(model), example_inputs)
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
            forward(model, example_inputs)
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

def _check_example_inputs(model: nn.Module, example_inputs) -> list:
    """The dense model's output shapes on `example_inputs` (the reference removal must keep)."""
    try:
        return output_shapes(run_eval(model, example_inputs))
    except Exception as exc:  # noqa: BLE001 - any failure means the inputs do not fit
        shape = tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else type(example_inputs).__name__
        raise UsageError(
            f"example_inputs of shape {shape} do not fit the model ({type(exc).__name__}: {exc}); "
            "pass a batch shaped like the real inputs, e.g. torch.randn(1, 3, 224, 224)"
        ) from exc


def _match_overrides(model: nn.Module, groups: list[ChannelGroup], overrides: dict | None) -> list[dict]:
    """Per group, the override settings whose key names one of its layers (or matches 're:')."""
    names = {m: n for n, m in model.named_modules()}
    per_group = [{} for _ in groups]
    for key, settings in (overrides or {}).items():  # settings: LayerOverride fields, validated
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
    method: str | None = None,
    progress: bool = False,
) -> PruneResult:
    """Prune `model` so that its MACs (or params) are `keep` x the model given.

    `calibration` is an iterable of input batches (tensors or (inputs, labels) pairs).
    `method` names a registered criterion that chooses which channels each group keeps
    (pfp_deploy.criteria): "lsq" by default (greedy least-squares selection from the calibration
    Gram matrices; with the default allocation and reconstruction the best measured criterion before
    training on ResNet-20 and, by margins of 0.1-0.2 that change sign with the dense model, about level
    with l1 and fpgm on VGG-small and MobileNetV2-small, docs/BENCHMARKS.md §5),
    "pfp" for PFP's own sensitivity scores (the default when `variant` is "randomized" or "hybrid",
    which sample by them), "l1", "l2", "taylor", "fpgm", "bn_scale", "random", ... The paper's exact
    method: method="pfp",
    allocation="paper", reconstruct="none". `importance(tp_group) -> Tensor[width]` is a callable of
    your own that replaces the criterion's scores (give it or `method`, not both).
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
    prune.reconstruct). After the refit, `reconstruct.distill` (20 epochs by default; {"distill":
    {"epochs": 0}} for the refit alone) distils the pruned model from the dense one on `calibration`'s
    images only (pfp_deploy.calibration_distill; report["reconstruction"]["distillation"]).
    `calibration` is then read again: pass a list or a DataLoader.

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
    # The keyword arguments are the recipe's prune section: one schema validates both (RecipeError
    # naming the argument, with a suggestion for a misspelt name).
    cfg = validate_section(PruneConfig, {
        "keep": keep, "metric": metric, "variant": variant, "round_to": 1 if round_to is None else round_to,
        "min_channels": min_channels, "max_prune_ratio": 1.0 if max_prune_ratio is None else max_prune_ratio,
        "ignored_layers": list(ignored_layers or []), "overrides": overrides or {}, "seed": seed,
        "tolerance": tolerance, "delta": delta, "c": c, "K": K, "reconstruct": reconstruct,
        "allocation": allocation,
        # method: the schema's default (l1; pfp for the sampling variants), or PFP's allocation for importance=
        # method: the schema's default (l1; pfp for the sampling variants), or PFP's allocation for importance=
        **({"method": method} if method is not None else {"method": "pfp"} if importance is not None else {})},
        "prune()")
    keep, metric, variant, round_to, min_channels = cfg.keep, cfg.metric, cfg.variant, cfg.round_to, cfg.min_channels
    max_prune_ratio, ignored_layers, seed, tolerance = cfg.max_prune_ratio, cfg.ignored_layers, cfg.seed, cfg.tolerance
    delta, c, K, allocation, repair = cfg.delta, cfg.c, cfg.K, cfg.allocation, cfg.reconstruct
    overrides = {name: o.model_dump(exclude_none=True) for name, o in cfg.overrides.items()}
    criterion = _check_method(cfg.method, importance)
    timings = {}
    t0 = time.perf_counter()
    work = private_copy(model)  # everything below runs on this copy: the model given stays as it is
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
    curves, criterion_fallback, selection_ridge = None, [], None
    if allocation in cost_aware.GRAM_ALLOCATIONS or criterion.needs_gram:
        stats = cost_aware.gram_statistics(work, calibration, sorted({c.name for g in groups for c in g.consumers}))
        if criterion.needs_gram:
            start_greedy = time.perf_counter()
            selection_ridge = repair.ridge if criterion.selection_ridge is None else criterion.selection_ridge
            choice_scores, criterion_fallback = cost_aware.greedy_scores(groups, stats, choice_scores, selection_ridge)
            greedy_s = time.perf_counter() - start_greedy
            timings["criterion"] = timings.get("criterion", 0.0) + greedy_s
            start += greedy_s  # the allocation's timer runs over this: count the selection once
        if allocation in cost_aware.GRAM_ALLOCATIONS:
            orders = [cost_aware.removal_order(sc, g.ch_groups) for g, sc in zip(groups, choice_scores)]
            # cost_aware assumes the least-squares repair that optimize() runs after prune(reconstruct="none")
            # (stages.prune_step), so `reconstruct` does not change it; cost_aware_norefit does not refit.
            curves = cost_aware.group_curves(groups, stats, orders, repair.ridge, refit=allocation == "cost_aware")
        del stats
    timings["allocation"] = timings["removal"] = 0.0
    measured_passes = 0
    # The allocations' searches are greedy over rounded widths: one may miss a coarse target another
    # hits. After 4 measured passes the next is tried (reported as allocation_used), then the error.
    spends = [allocation] + [a for a in ("uniform", "paper") if a != allocation]
    spend = spends.pop(0)
    while True:  # re-allocate with the measured residual (4 passes at most) or without broken groups
        try:
            widths, eps = pfp_allocation.allocate(budgets, cost, target, tolerance=0.5 * allowed)
        except TargetUnattainableError as exc:
            raise TargetUnattainableError(f"{exc}{_skipped_note(skipped)}") from None
        if spend == "uniform":
            widths = cost_aware.allocate_uniform(budgets, cost, target, tolerance=0.5 * allowed)
        elif spend in cost_aware.GRAM_ALLOCATIONS:
            widths = cost_aware.allocate_by_error(budgets, cost, target, 0.5 * allowed, curves)
        timings["allocation"] += time.perf_counter() - start
        start = time.perf_counter()
        rng = np.random.default_rng(seed)
        step_groups = [_group_plan(g, w, sc, variant if importance is None else "deterministic", rng)
                        for g, w, sc in zip(groups, widths, choice_scores)]
        try:
            pruned = apply_step(work, step_groups, example_inputs, fold_gamma=True, reference=reference)
        except BrokenGroups as exc:
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
        if abs(measured - target) <= allowed:
            break
        if measured_passes == 4:
            if not spends:
                break
            log.warning("allocation %s reached %.4g of the dense %s, not %.4g within ±%.2g: trying %s", spend,
                        measured / dense, metric, keep, allowed / dense, spends[0])
            spend, measured_passes = spends.pop(0), 0
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
    eps_widths = eps if spend == "paper" else cost_aware.certified_epsilon(budgets, widths)
    step = {"keep": keep, "metric": metric, "variant": variant, "epsilon": eps, "seed": seed,
             "allocation": spend, "epsilon_widths": eps_widths,
             "importance": None if importance is None else getattr(importance, "__name__", type(importance).__name__),
             "groups": step_groups}
    repaired = distilled = None
    if repair.method != "none":
        start = time.perf_counter()
        repaired = reconstruct_layers(work, pruned, calibration, repair, plan=Plan([step]),
                                      example_inputs=example_inputs, progress=progress)
        timings["reconstruction"] = time.perf_counter() - start
        if repair.distill.epochs:
            start = time.perf_counter()
            distilled = distill_pruned(work, pruned, calibration, repair, seed=seed, progress=progress)
            timings["distillation"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - t0
    report = {
        "keep": keep, "metric": metric, "variant": variant, "epsilon": eps,
        "method": criterion.name if importance is None or criterion.name != "pfp" else "importance",
        "allocation": allocation, "allocation_used": spend, "epsilon_widths": eps_widths,
        "macs_before": macs0, "macs_after": macs1, "params_before": params0, "params_after": params1,
        "target": keep, "achieved": measured / dense, "allowed_deviation": allowed / dense,
        "seconds": {k: round(v, 4) for k, v in timings.items()},
        "groups": [{"name": g["root"], "width_before": g["width_before"], "width_after": g["width_after"]}
                   for g in step_groups],
        "unscored_groups": unscored,
        "criterion_fallback": criterion_fallback,  # groups the criterion could not rank (L1 ranked them)
        "selection_ridge": selection_ridge,  # the greedy ranking's ridge (lsq); None: no Gram ranking ran
        "skipped_groups": skipped,
        "calibration_layers": len(sensitivities),
        "reconstruction": repaired.to_dict() if repaired is not None else {"method": "none"},
    }
    if distilled is not None:
        report["reconstruction"]["distillation"] = distilled.to_dict()
    return PruneResult(model=pruned, plan=Plan([step]), report=report, sensitivities=sensitivities)


def reconstruct_layers(dense: nn.Module, pruned: nn.Module, calibration: Iterable, config: ReconstructConfig,
                       **kwargs):
    """pfp_deploy.reconstruction.reconstruct with a recipe's prune.reconstruct settings (in place)."""
    return reconstruct(dense, pruned, calibration, ridge=config.ridge, layers=config.layers,
                       max_memory_mb=config.max_memory_mb, underdetermined=config.underdetermined, **kwargs)


def distill_pruned(dense: nn.Module, pruned: nn.Module, calibration: Iterable, config: ReconstructConfig, **kwargs):
    """pfp_deploy.calibration_distill.distill_on_calibration with a recipe's prune.reconstruct settings (in place)."""
    return distill_on_calibration(dense, pruned, calibration, epochs=config.distill.epochs, lr=config.distill.lr,
                                  temperature=config.distill.temperature, max_memory_mb=config.max_memory_mb, **kwargs)


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
        macs, params = count_cost(apply_step(model, floor, example_inputs, fold_gamma=False), example_inputs)
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


def _check_method(method: str, importance: Callable | None):
    """The registered criterion `method` names (validated); UsageError when importance= is given too."""
    criterion = get_criterion(method)
    if importance is not None and criterion.name != "pfp":
        raise UsageError(f"give method= or importance=, not both (got method={method!r} and an importance "
                         "callable): method names a registered criterion that builds the importance")
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


