"""From layers to dependency groups (PFP.md §2): torch-pruning's graph, dense consumers, scores.

A group is a set of channels that must be removed together; its channel space is the output of
its root layer. Each dense consumer (Conv2d with groups == 1, or Linear) reads some of those
channels through an index mapping (identity, concat/split slices, flatten -> many features); a
channel's score is the max over its consumers of their sensitivity at the mapped input indices.
"""
from __future__ import annotations

import math
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


# torch-pruning finds a group by walking dependency edges from its root, and walks a node again
# whenever it arrives with another index set. On partial residuals (ReXNet's
# cat([y[:, :c] + x, y[:, c:]], 1)) the walks multiply with every block: 4 blocks take a minute and
# rexnet_100 never returns. Healthy networks need far fewer edge checks per group (resnet50 80,
# densenet201 1.6 k), so a search past this many is abandoned and its layers stay unpruned.
GROUP_SEARCH_LIMIT = 10_000


class GroupSearchLimit(Exception):
    """A torch-pruning group search passed GROUP_SEARCH_LIMIT edge checks (internal)."""

    def __init__(self, coupled: list):
        super().__init__(f"dependency search passed {GROUP_SEARCH_LIMIT} edge checks")
        self.coupled = coupled  # layers whose outputs the search had reached: all coupled to the root


class _SearchCounter:
    """Counts the edge checks of one group search and stops it past the limit.

    torch-pruning offers no hook for this, so each edge's `is_triggered_by` is wrapped on the
    instance (one check per edge visit); torch-pruning's code and classes stay untouched. Only
    searches started by `search_group` count (`armed`); other callers see the plain check.
    """

    def __init__(self, graph: tp.DependencyGraph):
        self.graph, self.armed = graph, False
        self.reset()
        for node in graph.module2node.values():
            for dep in node.dependencies:
                dep.is_triggered_by = self._counted(dep, dep.is_triggered_by)

    def _counted(self, dep, check):
        def is_triggered_by(fn):
            if not self.armed:
                return check(fn)
            self.count += 1
            if self.count > self.limit:
                raise GroupSearchLimit([d.target.module for d in self.reached
                                        if self.graph.is_out_channel_pruning_fn(d.handler)])
            hit = check(fn)
            if hit:
                self.reached.append(dep)
            return hit
        return is_triggered_by

    def reset(self) -> None:
        self.count, self.limit, self.reached = 0, GROUP_SEARCH_LIMIT, []


def search_group(graph: tp.DependencyGraph, root: nn.Module, idxs) -> tp.dependency.Group:
    """torch-pruning's group for removing output channels `idxs` of `root`, with a bounded search.

    Raises GroupSearchLimit when the search passes GROUP_SEARCH_LIMIT edge checks.
    """
    counter = getattr(graph, "_pfp_search_counter", None)
    if counter is None:
        counter = graph._pfp_search_counter = _SearchCounter(graph)
    counter.reset()
    pruner = graph.get_pruner_of_module(root)
    counter.armed = True
    try:
        return graph.get_pruning_group(root, pruner.prune_out_channels, list(idxs))
    finally:
        counter.armed = False


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
) -> tuple[list[ChannelGroup], list[str], list[dict]]:
    """Prunable groups with their dense consumers, the names of groups PFP cannot score, and the
    groups left unpruned because torch-pruning cannot remove their channels ({name, reason}).

    The roots are those of torch-pruning's get_all_groups (every Conv2d/Linear, in graph order,
    skipping layers already in an earlier group), enumerated here so that a group whose search
    runs away or whose index mapping is wrong is skipped and reported instead of hanging the
    enumeration or surfacing later as an IndexError.
    """
    names = {m: n for n, m in model.named_modules()}
    not_roots = set(ignored) | set(graph.IGNORED_LAYERS_IN_TRACING)
    groups, unscored, skipped, visited = [], [], [], set()
    for root in list(graph.module2node):
        if not isinstance(root, (nn.Conv2d, nn.Linear)) or root in not_roots or root in visited:
            continue
        pruner = graph.get_pruner_of_module(root)
        width = None if pruner is None else pruner.get_out_channels(root)
        if not width or root not in names:
            continue
        name = names[root]
        try:
            tp_group = search_group(graph, root, range(width))
        except GroupSearchLimit as exc:
            coupled = sorted({names[m] for m in exc.coupled if isinstance(m, nn.Module) and m in names} - {name})
            visited.update(exc.coupled)
            shown = ", ".join(coupled[:4]) + (f" and {len(coupled) - 4} more" if len(coupled) > 4 else "")
            skipped.append({"name": name, "reason": (
                f"torch-pruning's dependency search for this group passed {GROUP_SEARCH_LIMIT} steps (a "
                "partial residual such as cat([y[:, :c] + x, y[:, c:]], 1) multiplies its paths); left "
                f"unpruned{' with the layers coupled to it: ' + shown if coupled else ''}")})
            continue
        except Exception as exc:  # noqa: BLE001 - torch-pruning failing on one group must not end the rest
            visited.add(root)
            skipped.append({"name": name, "reason": f"torch-pruning cannot build its group "
                                                    f"({type(exc).__name__}: {exc}); left unpruned"})
            continue
        outputs = [item.dep.target.module for item in tp_group if graph.is_out_channel_pruning_fn(item.dep.handler)]
        visited.update(outputs)
        if any(m in not_roots for m in outputs):
            continue  # it removes channels of an ignored layer (or the model's output)
        try:
            group = _channel_group(graph, names, tp_group, root, width)
        except _Unsupported as exc:
            skipped.append({"name": name, "reason": f"{exc}; left unpruned (ignored_layers=[\"{name}\"] "
                                                    "skips it without this note)"})
            continue
        except Exception as exc:  # noqa: BLE001 - torch-pruning failing on one group must not end the rest
            skipped.append({"name": name, "reason": f"torch-pruning cannot size its group "
                                                    f"({type(exc).__name__}: {exc}); left unpruned"})
            continue
        if group.consumers:
            groups.append(group)
        else:
            unscored.append(group.root_name)
    return groups, unscored, skipped


class _Unsupported(Exception):
    """A group torch-pruning would remove incorrectly (internal; the message says why)."""


def _channel_group(graph, names, tp_group, root, width) -> ChannelGroup:
    """A ChannelGroup from torch-pruning's group, after checking that its removal is valid."""
    group = ChannelGroup(root_name=names[root], root=root, width=width, members=[], consumers=[],
                         tp_group=tp_group)
    for item in tp_group:
        module, handler = item.dep.target.module, item.dep.handler
        if not isinstance(module, nn.Module) or module not in names:
            continue  # functional ops (add, cat, flatten) carry channels but have no weights
        member = names[module]
        if member not in group.members:
            group.members.append(member)
        out_side = graph.is_out_channel_pruning_fn(handler)
        in_side = not out_side and graph.is_in_channel_pruning_fn(handler)
        idxs = torch.as_tensor(item.idxs, dtype=torch.long)
        root_idxs = torch.as_tensor(item.root_idxs, dtype=torch.long)
        _check_mapping(graph, module, member, out_side, in_side, idxs, root_idxs, width)
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            group.ch_groups = math.lcm(group.ch_groups, _grouped_conv_tie(module, member, in_side, idxs, root_idxs))
        per_root = len(item.idxs) / width
        if out_side:
            group.out_items.append((module, per_root))
        elif in_side:
            group.in_items.append((module, per_root))
            if is_dense_layer(module):
                group.consumers.append(Consumer(member, module, idxs, root_idxs))
    if width % group.ch_groups:
        raise _Unsupported(f"its {width} channels cannot be tied across the {group.ch_groups} groups of "
                           "its grouped convs")
    return group


def _check_mapping(graph, module, member, out_side, in_side, idxs, root_idxs, width) -> None:
    """torch-pruning's index mapping must land inside the layer (it cannot follow every split,
    chunk or reshape with fixed sizes; a wrong mapping would index past a consumer's inputs)."""
    if not (out_side or in_side) or idxs.numel() == 0:
        return
    size = graph.get_out_channels(module) if out_side else graph.get_in_channels(module)
    side = "output" if out_side else "input"
    if size is not None and int(idxs.max()) >= size:
        raise _Unsupported(f'torch-pruning maps its channels onto {side} channel {int(idxs.max())} of "{member}", '
                           f"which has {size}: it cannot follow an op between them (a split, chunk or "
                           "view with fixed sizes)")
    if int(root_idxs.max()) >= width or int(idxs.min()) < 0:
        raise _Unsupported(f'torch-pruning maps its channels onto {side} channels of "{member}" outside the '
                           f"group's {width}")


def _grouped_conv_tie(conv: nn.Conv2d, member: str, in_side: bool, idxs, root_idxs) -> int:
    """How many conv groups the group's channels must stay aligned across (1: none)."""
    depthwise = conv.groups == conv.out_channels  # torch-pruning's depthwise pruner: in, out, groups move together
    shape = f"{conv.in_channels} inputs, {conv.out_channels} outputs, groups={conv.groups}"
    if depthwise:
        if conv.in_channels != conv.out_channels:
            raise _Unsupported(f'"{member}" is a grouped conv ({shape}) that torch-pruning treats as '
                               "depthwise (inputs = outputs), so removing its channels breaks it")
        return 1
    if in_side and conv.in_channels == conv.groups:
        raise _Unsupported(
            f'"{member}" is a depthwise conv with channel multiplier {conv.out_channels // conv.in_channels} '
            f"({shape}): an input channel can only be removed with its whole conv group, which "
            "torch-pruning cannot do")
    if not torch.equal(idxs, root_idxs):
        raise _Unsupported(f'the group reaches grouped conv "{member}" ({shape}) through a channel remapping '
                           "(concat/split), so its conv groups cannot be kept aligned")
    return conv.groups


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
