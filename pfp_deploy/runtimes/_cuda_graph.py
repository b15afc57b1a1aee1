"""CUDA-graph capture for the torch runner: one captured graph per input shape, with static buffers.

A CUDA graph replays a fixed sequence of kernels on fixed memory, so a graph is captured per input
shape (batch size), dtype and memory layout, into a static input buffer whose address the kernels
read. `GraphCache.prepare(x)` (untimed) captures on first sight of a shape: warm-up calls on a side
stream (cuDNN autotuning and lazy allocations happen there, never inside the capture), then the
capture itself. `GraphCache.run(prepared)` (the timed call) only copies the input into the static
buffer when a different prepared input was loaded last, then replays.

Everything torch.cuda-specific sits behind `CudaGraphBackend`, so the shape/static-buffer handling is
exercised on CPU with a fake backend (tests/test_gpu_targets.py); the real backend needs a CUDA device.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pfp_deploy.errors import UsageError


class CudaGraphBackend:
    """The torch.cuda calls graph capture needs (a fake one stands in for it on CPU)."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)

    def warmup(self, fn: Callable[[], Any], iterations: int) -> None:
        """Run `fn` on a side stream, as capture requires (the default stream must not be capturing)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(iterations):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        """(graph, static output) of one captured call of `fn`."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        torch.cuda.synchronize(self.device)
        return graph, out

    def replay(self, graph: Any) -> None:
        graph.replay()


@dataclass
class CapturedGraph:
    """One captured graph: its static input buffer, its static output (overwritten by every replay)."""

    key: tuple
    static_input: torch.Tensor
    static_output: Any
    graph: Any
    loaded: Any = None  # the GraphInput whose data is in static_input now


@dataclass(eq=False)
class GraphInput:
    """What GraphCache.prepare returns: the input tensor and the graph captured for its shape."""

    tensor: torch.Tensor
    entry: CapturedGraph


@dataclass
class GraphCache:
    """Graphs of `forward` captured per input (shape, dtype, strides); at most `max_graphs` of them."""

    forward: Callable[[torch.Tensor], Any]
    backend: Any  # CudaGraphBackend or a fake with warmup / capture / replay
    warmup_iterations: int = 3
    max_graphs: int = 8
    graphs: dict[tuple, CapturedGraph] = field(default_factory=dict)
    captures: int = 0  # how many graphs were captured (for tests and reports)

    @staticmethod
    def key(x: torch.Tensor) -> tuple:
        return tuple(x.shape), x.dtype, tuple(x.stride()), str(x.device)

    def prepare(self, x: torch.Tensor) -> GraphInput:
        """Capture a graph for x's shape unless one exists (untimed), and load x into its static input."""
        key = self.key(x)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                raise UsageError(f"CUDA graphs: already {self.max_graphs} input shapes captured on this runner; "
                                 "a graph runner is for a few fixed batch sizes (set graph: false otherwise)")
            entry = self._capture(key, x)
        prepared = GraphInput(x, entry)
        self._load(prepared)
        return prepared

    def _capture(self, key: tuple, x: torch.Tensor) -> CapturedGraph:
        static_input = torch.empty_like(x)  # same shape, dtype, strides (memory format) and device
        static_input.copy_(x)

        def call():
            with torch.no_grad():
                return self.forward(static_input)

        try:
            self.backend.warmup(call, self.warmup_iterations)
            graph, static_output = self.backend.capture(call)
        except Exception as exc:  # e.g. a model that syncs with the host: not capturable
            raise UsageError(f"CUDA graph capture failed for input {tuple(x.shape)}: {type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}; "
                             "set graph: false on this target") from exc
        entry = CapturedGraph(key, static_input, static_output, graph)
        self.graphs[key] = entry
        self.captures += 1
        return entry

    def _load(self, prepared: GraphInput) -> None:
        entry = prepared.entry
        if entry.loaded is not prepared:
            if prepared.tensor.data_ptr() != entry.static_input.data_ptr():
                entry.static_input.copy_(prepared.tensor)
            entry.loaded = prepared

    def run(self, prepared: GraphInput) -> Any:
        """Replay the graph of `prepared` (loading its data first only if another input was loaded
        since); returns the static output, valid until the next replay of that graph."""
        if not isinstance(prepared, GraphInput):
            raise UsageError("a CUDA-graph runner runs what its prepare() returned")
        self._load(prepared)
        self.backend.replay(prepared.entry.graph)
        return prepared.entry.static_output
