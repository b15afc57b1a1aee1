"""Plans and physical channel removal: what was kept, and replaying it on a fresh copy of the base model.

A `Plan` lists, per prune step, each group's root layer, its width before and after and the kept
channel indices. `apply_plan` replays the removals through torch-pruning's dependency graph (base
model + plan + state_dict rebuild a pruned model without pickling modules: models.load_pruned).
prune() uses the same removal, checking after each step that the model still runs with the dense
output shapes; groups whose removal breaks it are located one by one and left whole.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .errors import ModelLoadError, PruningError, UsageError, first_line
from .modes import eval_mode, restore_modes, saved_modes
from .pfp.groups import build_graph, search_group
from .pfp.sensitivity import is_dense_layer

PLAN_FORMAT = "pfp-deploy-plan"


@dataclass
class Plan:
    """Per prune step (one per cascade step), per group: root layer name, width before/after and the
    kept channel indices."""

    steps: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": 2, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ModelLoadError("not a pfp-deploy plan (missing format: pfp-deploy-plan)")
        steps = data.get("steps", data.get("stages"))  # version 1 called the steps "stages"
        if not isinstance(steps, list):
            raise ModelLoadError("a pfp-deploy plan without its list of steps")
        return cls(steps=list(steps))

    def then(self, other: Plan) -> Plan:
        """This plan followed by `other` (a cascade: `other` was made on this plan's result)."""
        return Plan(steps=self.steps + other.steps)

    @property
    def groups(self) -> list[dict]:
        return [g for step in self.steps for g in step["groups"]]


# ----------------------------------------------------------------------------- helpers

def forward(model: nn.Module, example_inputs):
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


def private_copy(model: nn.Module) -> nn.Module:
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


def output_shapes(output) -> list:
    """The shape of every tensor in a model's output (nested tuples, lists and dicts), in order."""
    if isinstance(output, torch.Tensor):
        return [tuple(output.shape)]
    if isinstance(output, dict):
        return [(key, shape) for key, value in output.items() for shape in output_shapes(value)]
    if isinstance(output, (list, tuple)):
        return [shape for value in output for shape in output_shapes(value)]
    return []


def run_eval(model: nn.Module, example_inputs):
    """A no-grad forward in eval mode; every module's flag comes back afterwards."""
    with eval_mode(model), torch.no_grad():
        return forward(model, example_inputs)


def _verify(model: nn.Module, example_inputs, reference: list) -> str | None:
    """None when the pruned model runs on `example_inputs` with the dense output shapes, else why not."""
    try:
        shapes = output_shapes(run_eval(model, example_inputs))
    except Exception as exc:  # noqa: BLE001 - any failure means the removal broke the model
        return f"the model no longer runs after removing them ({first_line(exc)})"
    if shapes != reference:
        return f"the model's outputs change shape after removing them ({shapes} instead of {reference})"
    return None


# ----------------------------------------------------------------------------- removal

class BrokenGroups(Exception):
    """Internal: removing these groups (index into the step -> why) breaks the model."""

    def __init__(self, broken: dict[int, str]):
        super().__init__(f"{len(broken)} group(s) break the model")
        self.broken = broken


def _traced_copy(model: nn.Module, example_inputs):
    """A private copy of `model`, its dependency graph and its modules by name."""
    pruned = private_copy(model)
    modes = saved_modes(pruned)
    graph = build_graph(pruned, example_inputs)
    restore_modes(pruned, modes)  # the trace switched every module to eval() and may have filled caches
    return pruned, graph, dict(pruned.named_modules())


def _remove(graph, modules: dict, entry: dict) -> None:
    """Remove the channels of one group that its plan entry does not keep."""
    removed = sorted(set(range(entry["width_before"])) - set(entry["kept"]))
    if removed:
        search_group(graph, modules[entry["root"]], removed).prune()


def apply_step(model: nn.Module, step_groups: list[dict], example_inputs, fold_gamma: bool,
                 reference: list | None = None) -> nn.Module:
    """A pruned copy of `model`: gamma folded into consumers, then each group's channels removed.

    With `reference` (the dense model's output shapes) the result must run on `example_inputs`
    with those shapes; otherwise BrokenGroups names the groups whose removal breaks it.
    """
    pruned, graph, modules = _traced_copy(model, example_inputs)
    for entry in step_groups:
        root = modules.get(entry["root"])
        if root is None:
            raise ModelLoadError(f'the plan names layer "{entry["root"]}", which this model does not have')
        width = graph.get_out_channels(root)
        if width != entry["width_before"]:
            raise ModelLoadError(
                f'plan/model mismatch at "{entry["root"]}": the plan expects {entry["width_before"]} '
                f"channels, the model has {width}: the plan belongs to another model or cascade step"
            )
        if fold_gamma and entry.get("gamma") is not None:
            _fold_gamma(graph, root, width, entry)
    failure = None
    for entry in step_groups:
        try:
            _remove(graph, modules, entry)
        except Exception as exc:  # noqa: BLE001 - torch-pruning failing inside a removal
            failure = (entry["root"], exc)
            break
    if reference is None:  # replaying a plan: it removed these groups once, so a failure is a mismatch
        if failure is not None:
            raise PruningError(
                f'torch-pruning cannot remove the planned channels of "{failure[0]}" ({first_line(failure[1])}): '
                f'the plan belongs to another model, or prune it again with ignored_layers=["{failure[0]}"]'
            ) from failure[1]
        return pruned
    if failure is None and _verify(pruned, example_inputs, reference) is None:
        return pruned
    raise BrokenGroups(_locate_broken(model, step_groups, example_inputs, reference))


def _locate_broken(model: nn.Module, step_groups: list[dict], example_inputs, reference: list) -> dict[int, str]:
    """Which groups break the model: remove them one at a time on a fresh copy, checking after
    each; a group that breaks it is recorded and the copy rebuilt without it (torch-pruning has
    no undo, and a failed removal may leave a layer half-pruned)."""
    broken, done = {}, []
    pruned, graph, modules = _traced_copy(model, example_inputs)
    for index, entry in enumerate(step_groups):
        if len(entry["kept"]) == entry["width_before"]:
            continue
        try:
            _remove(graph, modules, entry)
            problem = _verify(pruned, example_inputs, reference)
        except Exception as exc:  # noqa: BLE001 - torch-pruning failing inside a removal
            problem = f"torch-pruning fails removing its channels ({first_line(exc)})"
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
    for step in plan.steps:
        model = apply_step(model, step["groups"], example_inputs, fold_gamma=False)
    return model
