"""prune(): score -> allocate -> select -> remove channels physically, and plans that replay.

The result is an ordinary, smaller nn.Module (no masks). A `Plan` lists, per stage, each group's
root layer and the channels it kept; base model + plan + state_dict rebuild a pruned model
without pickling modules (`save_pruned` / `load_pruned`).
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from .errors import ModelLoadError, PruningError, TargetUnattainableError, UsageError, did_you_mean
from .pfp import allocation
from .pfp.groups import (ChannelGroup, build_graph, channel_scores, collect_groups, consumer_scores,
                         output_layers, resolve_names)
from .pfp.selection import VARIANTS, Selection, select
from .pfp.sensitivity import sensitivity as compute_sensitivity

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
    def from_dict(cls, data: dict) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ModelLoadError("not a pfp-deploy plan (missing format: pfp-deploy-plan)")
        return cls(stages=list(data["stages"]))

    def then(self, other: "Plan") -> "Plan":
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
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
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
    try:
        with torch.no_grad():
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
    return allocation.CostModel(out0, in0, a_out, a_in, bilinear, linear, widths, dense_cost, volume)


# ----------------------------------------------------------------------------- helpers

def _forward(model: nn.Module, example_inputs):
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _check_example_inputs(model: nn.Module, example_inputs) -> None:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            _forward(model, example_inputs)
    except Exception as exc:  # noqa: BLE001 - any failure means the inputs do not fit
        shape = tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else type(example_inputs).__name__
        raise UsageError(
            f"example_inputs of shape {shape} do not fit the model ({type(exc).__name__}: {exc}); "
            "pass a batch shaped like the real inputs, e.g. torch.randn(1, 3, 224, 224)"
        ) from exc
    finally:
        for m, training in modes:
            m.training = training


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
            mapped_sum[name] = mapped_sum.get(name, 0.0) + float(mapped.sum())
        for consumer in group.consumers:
            covered.setdefault(consumer.name, set()).update(consumer.in_idxs.tolist())
    info = {}
    for name, total in mapped_sum.items():
        s = sensitivities[name]
        uncovered = torch.ones(s.numel(), dtype=torch.bool)
        uncovered[list(covered[name])] = False
        total += float(s[uncovered].sum())
        m = modules[name]
        kernel = m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else 1
        per_point = positions.get(m, batch) / batch  # positions were counted over the example batch
        info[name] = (allocation.alpha(int(round(per_point)), kernel, delta, c), total)
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
    delta: float = allocation.DELTA,
    c: float = allocation.C_CONST,
    K: float = allocation.K_CONST,
    sensitivities: dict[str, torch.Tensor] | None = None,
    importance: Callable | None = None,
    progress: bool = False,
) -> PruneResult:
    """Prune `model` with PFP so that its MACs (or params) are `keep` x the model given.

    `calibration` is an iterable of input batches (tensors or (inputs, labels) pairs); the
    caller's model is never modified. `importance(tp_group) -> Tensor[width]` replaces PFP's
    channel scores for choosing channels (PFP still decides how many each group keeps).
    delta, c and K are the constants of the paper's sample complexity (PFP.md §3).
    """
    _validate(keep, metric, variant, min_channels, round_to, max_prune_ratio)
    if not (0 < delta < 1 and c > 0 and K > 0):
        raise UsageError(f"need 0 < delta < 1, c > 0 and K > 0; got delta={delta}, c={c}, K={K}")
    timings = {}
    t0 = time.perf_counter()
    _check_example_inputs(model, example_inputs)

    start = time.perf_counter()
    if sensitivities is None:
        sensitivities = compute_sensitivity(model, calibration, progress=progress)
    timings["sensitivity"] = time.perf_counter() - start

    start = time.perf_counter()
    graph = build_graph(model, example_inputs)
    ignored = output_layers(graph) + resolve_names(model, ignored_layers, "ignored_layers")
    groups, unscored = collect_groups(model, graph, ignored)
    if not groups:
        raise PruningError(
            "no prunable channel group: every group feeds the model output, is ignored, or has no "
            "dense Conv2d/Linear consumer to score it"
        )
    settings = _match_overrides(model, groups, overrides)
    positions = _positions(model, example_inputs)
    batch = example_inputs.shape[0] if isinstance(example_inputs, torch.Tensor) else 1
    info = _consumer_info(groups, sensitivities, model, positions, batch, delta, c)
    defaults = {"min_channels": min_channels, "max_prune_ratio": max_prune_ratio, "round_to": round_to}
    budgets = [_budget(g, sensitivities, info, {**defaults, **extra}, K) for g, extra in zip(groups, settings)]
    choice_scores = [b.scores if importance is None else _importance_scores(importance, g)
                     for g, b in zip(groups, budgets)]
    macs0, params0 = count_cost(model, example_inputs)
    dense = float(macs0 if metric == "macs" else params0)
    cost = _build_cost_model(positions, groups, metric, dense)
    target = keep * dense
    timings["allocation"] = timings["removal"] = 0.0
    for _ in range(4):  # re-allocate with the measured residual until within tolerance
        widths, eps = allocation.allocate(budgets, cost, target, tolerance=0.5 * tolerance * dense)
        timings["allocation"] += time.perf_counter() - start
        start = time.perf_counter()
        rng = np.random.default_rng(seed)
        stage_groups = [_group_plan(g, w, sc, variant if importance is None else "deterministic", rng)
                        for g, w, sc in zip(groups, widths, choice_scores)]
        pruned = _apply_stage(model, stage_groups, example_inputs, fold_gamma=True)
        macs1, params1 = count_cost(pruned, example_inputs)
        measured = float(macs1 if metric == "macs" else params1)
        timings["removal"] += time.perf_counter() - start
        start = time.perf_counter()
        if abs(measured - target) <= tolerance * dense:
            break
        cost.correct(cost(widths), measured)
    if abs(measured - target) > tolerance * dense:
        raise TargetUnattainableError(
            f"could not reach {keep:.1%} of the dense {metric} within {tolerance:.1%}: achieved "
            f"{measured / dense:.1%} with these constraints (round_to / min_channels / overrides)"
        )
    timings["total"] = time.perf_counter() - t0
    stage = {"keep": keep, "metric": metric, "variant": variant, "epsilon": eps, "seed": seed,
             "importance": None if importance is None else getattr(importance, "__name__", type(importance).__name__),
             "groups": stage_groups}
    report = {
        "keep": keep, "metric": metric, "variant": variant, "epsilon": eps,
        "macs_before": macs0, "macs_after": macs1, "params_before": params0, "params_after": params1,
        "target": keep, "achieved": measured / dense,
        "seconds": {k: round(v, 4) for k, v in timings.items()},
        "groups": [{"name": g["root"], "width_before": g["width_before"], "width_after": g["width_after"]}
                   for g in stage_groups],
        "unscored_groups": unscored,
        "calibration_layers": len(sensitivities),
    }
    return PruneResult(model=pruned, plan=Plan([stage]), report=report, sensitivities=sensitivities)


def _budget(group: ChannelGroup, sensitivities, info, settings: dict, k: float) -> allocation.GroupBudget:
    """The allocation's view of a group: PFP scores, consumer terms and the user's constraints."""
    per_consumer = consumer_scores(group, sensitivities)
    floor = max(int(settings.get("min_channels") or 1), 1)
    if settings.get("max_prune_ratio") is not None:
        floor = max(floor, math.ceil((1.0 - settings["max_prune_ratio"]) * group.width - 1e-9))
    return allocation.GroupBudget(
        width=group.width,
        scores=channel_scores(per_consumer, group.width).double().numpy(),
        terms=allocation.consumer_terms(per_consumer, info, k),
        min_keep=min(floor, group.width),
        round_to=math.lcm(int(settings.get("round_to") or 1), group.ch_groups),
        fixed=bool(settings.get("skip", False)),
    )


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

def _apply_stage(model: nn.Module, stage_groups: list[dict], example_inputs, fold_gamma: bool) -> nn.Module:
    """A pruned copy of `model`: gamma folded into consumers, then each group's channels removed."""
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    graph = build_graph(pruned, example_inputs)
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
    for entry in stage_groups:
        root = modules[entry["root"]]
        removed = sorted(set(range(entry["width_before"])) - set(entry["kept"]))
        if removed:
            pruner = graph.get_pruner_of_module(root)
            graph.get_pruning_group(root, pruner.prune_out_channels, removed).prune()
    return pruned


def _fold_gamma(graph, root, width, entry) -> None:
    """Scale every dense consumer's input weights of a kept channel c by gamma_c (exact)."""
    from .pfp.sensitivity import is_dense_layer

    gamma = torch.ones(width)
    gamma[torch.as_tensor(entry["kept"], dtype=torch.long)] = torch.as_tensor(entry["gamma"], dtype=torch.float32)
    pruner = graph.get_pruner_of_module(root)
    full = graph.get_pruning_group(root, pruner.prune_out_channels, list(range(width)))
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_pruned(path, base_model: nn.Module | None = None, example_inputs=None) -> nn.Module:
    """Rebuild a pruned model from base model + plan + state_dict (no pickled modules)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"pruned model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot read pruned model {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != "pfp-deploy-pruned":
        raise ModelLoadError(f"{path} is not a pfp-deploy pruned model (save it with save_pruned)")
    if base_model is None:
        if not payload.get("base"):
            raise ModelLoadError(f"{path} stores no base model config: pass base_model=")
        from .models import build_model
        from .recipe import ModelConfig

        base_model = build_model(ModelConfig.model_validate(payload["base"]))
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
