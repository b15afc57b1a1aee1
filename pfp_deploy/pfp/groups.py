"""From layers to dependency groups (PFP.md §2): torch-pruning's graph, dense consumers, scores.

A group is a set of channels that must be removed together; its channel space is the output of
its root layer. Each dense consumer (Conv2d with groups == 1, or Linear) reads some of those
channels through an index mapping (identity, concat/split slices, flatten -> many features); a
channel's score is the max over its consumers of their sensitivity at the mapped input indices.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import UnsupportedModelError, UsageError
from .sensitivity import is_dense_layer


@dataclass
class Consumer:
    """A dense layer reading a group's channels: input index i comes from root channel root[i]."""

    name: str
    module: nn.Module
    in_idxs: torch.Tensor
    root_idxs: torch.Tensor


@dataclass
class ChannelGroup:
    """One prunable group: its channel space is the root layer's output channels."""

    root_name: str
    root: nn.Module
    width: int
    members: list[str]
    consumers: list[Consumer]
    # (module, channels of that module per root channel) for the cost model
    out_items: list[tuple[nn.Module, float]] = field(default_factory=list)
    in_items: list[tuple[nn.Module, float]] = field(default_factory=list)
    tp_group: object = None  # torch-pruning's Group with full indices (for other importances)
    # Grouped convs (ResNeXt, RegNet) need the same channels removed in every conv group, so
    # channel i is tied to i + k * width / ch_groups for every k.
    ch_groups: int = 1


def build_graph(model: nn.Module, example_inputs) -> tp.DependencyGraph:
    """torch-pruning's dependency graph, with tracing failures turned into a clear error."""
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported with its cause
        raise UnsupportedModelError(
            f"torch-pruning cannot trace {type(model).__name__}{_failing_node(exc)}: "
            f"{type(exc).__name__}: {exc}. Replace that op, or prune a model without it."
        ) from exc


def _failing_node(exc: BaseException) -> str:
    """' at op X' for the graph node torch-pruning was processing when it failed, if known."""
    tb, node = exc.__traceback__, None
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node", node)
        tb = tb.tb_next
    if node is None:
        return ""
    module = getattr(node, "module", None)
    kind = type(module).__name__.lstrip("_").replace("Op", "")
    hint = " (a reshape/view that mixes channels, e.g. a channel shuffle)" if "Reshape" in kind else ""
    return f" at op {getattr(node, 'name', kind)}{hint}"


def output_layers(graph: tp.DependencyGraph) -> list[nn.Module]:
    """Conv/Linear layers whose outputs reach the model output without another conv/linear.

    Their output channels are the network's outputs (classes), which are never pruned.
    """
    found, seen = [], set()
    stack = [node for node in graph.module2node.values() if not node.outputs]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.module, (nn.Conv2d, nn.Linear, nn.Conv1d, nn.Conv3d)):
            found.append(node.module)
            continue
        stack.extend(node.inputs)
    return found


def resolve_names(model: nn.Module, names, what: str) -> list[nn.Module]:
    """Module names (or 're:<regex>' patterns) -> modules; a miss is an error with a suggestion."""
    import re

    from ..errors import did_you_mean

    modules = dict(model.named_modules())
    found = []
    for name in names or []:
        if name.startswith("re:"):
            try:
                pattern = re.compile(name[3:])
            except re.error as exc:
                raise UsageError(f'{what}: invalid regular expression "{name}": {exc}') from exc
            matched = [m for n, m in modules.items() if n and pattern.fullmatch(n)]
            if not matched:
                raise UsageError(f'{what}: "{name}" matches no module name of the model')
            found.extend(matched)
        elif name in modules:
            found.append(modules[name])
        else:
            raise UsageError(f'{what}: the model has no module "{name}".{did_you_mean(name, modules)}')
    return found


def collect_groups(
    model: nn.Module, graph: tp.DependencyGraph, ignored: list[nn.Module]
) -> tuple[list[ChannelGroup], list[str]]:
    """Prunable groups with their dense consumers, and the names of groups PFP cannot score."""
    names = {m: n for n, m in model.named_modules()}
    groups, unscored = [], []
    for tp_group in graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
        root = tp_group[0].dep.target.module
        width = len(tp_group[0].idxs)
        group = ChannelGroup(root_name=names[root], root=root, width=width, members=[], consumers=[],
                             tp_group=tp_group)
        for item in tp_group:
            module, handler = item.dep.target.module, item.dep.handler
            if not isinstance(module, nn.Module) or module not in names:
                continue  # functional ops (add, cat, flatten) carry channels but have no weights
            if names[module] not in group.members:
                group.members.append(names[module])
            per_root = len(item.idxs) / width
            if isinstance(module, nn.Conv2d) and 1 < module.groups < module.in_channels:
                group.ch_groups = max(group.ch_groups, module.groups)
            if graph.is_out_channel_pruning_fn(handler):
                group.out_items.append((module, per_root))
            elif graph.is_in_channel_pruning_fn(handler):
                group.in_items.append((module, per_root))
                if is_dense_layer(module):
                    group.consumers.append(Consumer(
                        names[module], module, torch.as_tensor(item.idxs, dtype=torch.long),
                        torch.as_tensor(item.root_idxs, dtype=torch.long)))
        if group.consumers:
            groups.append(group)
        else:
            unscored.append(group.root_name)
    return groups, unscored


def consumer_scores(group: ChannelGroup, sensitivities: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per consumer, its sensitivity mapped onto the group's channels (max over mapped features)."""
    scores = {}
    for consumer in group.consumers:
        s = sensitivities.get(consumer.name)
        if s is None:
            continue  # never reached by the calibration data
        mapped = torch.zeros(group.width).scatter_reduce(
            0, consumer.root_idxs, s[consumer.in_idxs].float(), reduce="amax", include_self=True)
        scores[consumer.name] = torch.maximum(scores.get(consumer.name, mapped), mapped)
    return scores


def channel_scores(per_consumer: dict[str, torch.Tensor], width: int) -> torch.Tensor:
    """A channel's score: the max over the group's dense consumers."""
    if not per_consumer:
        return torch.zeros(width)
    return torch.stack(list(per_consumer.values())).amax(dim=0)
