"""PyTorch: runs the torch model itself (no export), on cpu, cuda[:N], mps or xpu[:N].

fp16/bf16 cast the model and its input (`model.to(dtype)`, not autocast: every layer, BatchNorm
included, runs in that precision; outputs are read back as fp32). On CUDA the model can be captured
in CUDA graphs (`graph`, one graph per batch size, captured in prepare(), outside the timed calls) and
laid out channels_last (`memory_format`). The CUDA defaults (`graph: auto` = on, `memory_format: auto`
= channels_last for fp16/bf16) follow NVIDIA's and PyTorch's guidance; they are not yet measured here
(docs/BENCHMARKS.md §3). CPU runs exactly as before: eager, contiguous.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from pfp_deploy.bench import Runner, flatten_outputs
from pfp_deploy.errors import RuntimeUnavailableError
from pfp_deploy.runtimes import PRECISIONS, Runtime, choose, register_runtime
from pfp_deploy.runtimes._cuda_graph import CudaGraphBackend, GraphCache

_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
_GRAPH_WORDS = {"auto": "auto", "true": True, "on": True, "yes": True, "false": False, "off": False, "no": False}


def resolve_graph(graph: bool | str | None, device: str) -> bool:
    """`graph` (True, False, "auto"/None) for `device`: auto means on for CUDA, off elsewhere; True off
    CUDA is a ValueError (CUDA graphs exist only on CUDA)."""
    value = graph if isinstance(graph, bool) else _GRAPH_WORDS.get(str("auto" if graph is None else graph).lower())
    if value is None:
        raise ValueError(f"graph is true, false or auto, got {graph!r}")
    cuda = torch.device(device).type == "cuda"
    if value == "auto":
        return cuda
    if value and not cuda:
        raise ValueError(f"CUDA graphs (graph: true) need device cuda, got device {device}; set graph: false "
                         "or device: cuda")
    return value


def resolve_memory_format(memory_format: str | None, device: str, precision: str) -> str:
    """auto (or None): channels_last on CUDA in fp16/bf16 (tensor-core convolutions want NHWC),
    contiguous otherwise; an explicit value is kept on any device."""
    value = choose("memory_format", "auto" if memory_format is None else memory_format, MEMORY_FORMATS)
    if value != "auto":
        return value
    return "channels_last" if torch.device(device).type == "cuda" and precision != "fp32" else "contiguous"


@dataclass
class TorchRunner(Runner):
    model: torch.nn.Module | None = field(default=None, repr=False)
    graph: bool = False  # CUDA graphs: replay a captured graph instead of launching eager kernels
    memory_format: str = "contiguous"
    graphs: GraphCache | None = field(default=None, repr=False)

    def prepare(self, x):
        x = x.to(self.device, _DTYPE[self.precision])
        if self.memory_format == "channels_last" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.graph:
            if self.graphs is None:
                self.graphs = GraphCache(self._forward, CudaGraphBackend(self.device))
            return self.graphs.prepare(x)  # captures on a new shape: here, outside the timed calls
        return x

    def _forward(self, x):
        return self.model(x)

    def run(self, prepared):
        # torch threads are process-global: set them only when they differ (resizing the pool is costly).
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        if self.graph:
            out = self.graphs.run(prepared)
        else:
            with torch.inference_mode():
                out = self.model(prepared)
        if self.device != "cpu":  # kernels run asynchronously on accelerators: wait for them
            getattr(torch, torch.device(self.device).type).synchronize()
        return out

    def to_numpy(self, outputs):
        return [t.detach().float().cpu().numpy() for t in flatten_outputs(outputs)]

    def describe(self) -> dict:
        return {**super().describe(), "graph": self.graph, "memory_format": self.memory_format}


def _device_name(device: str) -> str:
    """'cuda:0 NVIDIA H200' for a CUDA device (what actually runs), the device itself otherwise."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"


@register_runtime
class TorchRuntime(Runtime):
    name = "torch"
    export_format = None
    devices = ("cpu", "cuda", "mps", "xpu")  # each may take an index: cuda:1; "gpu" means cuda
    default_device = "cpu"
    precisions = PRECISIONS
    options = ("graph", "memory_format")

    def parse_device(self, device: str) -> str:
        match = re.fullmatch(r"([A-Za-z]+)(:.*)?", device)
        base, index = (match.group(1), match.group(2) or "") if match else (device, "")
        base = "cuda" if base.lower() == "gpu" else choose("torch device", base, self.devices)
        if index and not re.fullmatch(r":\d+", index):
            raise ValueError(f"torch device {device!r}: the index is a number, write e.g. cuda:0")
        if index and base == "cpu":
            raise ValueError(f"torch device {device!r}: cpu takes no index, write cpu")
        return base + index

    def check_option(self, name: str, value: Any, settings: dict[str, Any]) -> Any:
        device = settings.get("device") or self.default_device
        if name == "graph":
            return resolve_graph(value, device)
        return resolve_memory_format(value, device, settings.get("precision") or "fp32")

    def make_runner(self, source, *, device, provider, threads, precision, hint, graph=False,
                    memory_format="contiguous") -> TorchRunner:
        if not isinstance(source, torch.nn.Module):
            raise TypeError(f"runtime torch runs a torch.nn.Module, got {type(source).__name__}")
        kind = torch.device(device).type
        backend = getattr(torch, kind, None) if kind != "cpu" else None
        if kind != "cpu" and not (backend is not None and backend.is_available()):
            raise RuntimeUnavailableError(
                f"torch device {device} requested but torch.{kind}.is_available() is False on this host")
        index = torch.device(device).index
        if index is not None and index >= backend.device_count():
            raise RuntimeUnavailableError(
                f"torch device {device} not present: this host has {backend.device_count()} {kind} device(s)")
        # A private eval copy: benchmarking must not move, cast or switch the caller's model.
        model = copy.deepcopy(source).eval().to(device, _DTYPE[precision])
        if memory_format == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        return TorchRunner(runtime=self.name, device=device, provider=None, threads=threads or torch.get_num_threads(),
                           precision=precision, hint=None, executed_on=_device_name(device), model=model,
                           graph=bool(graph), memory_format=memory_format)
