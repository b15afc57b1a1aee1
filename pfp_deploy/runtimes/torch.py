"""PyTorch eager: runs the torch model itself (no export), on cpu, cuda[:N], mps or xpu[:N]."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch

from pfp_deploy.bench import Runner, flatten_outputs
from pfp_deploy.errors import RuntimeUnavailableError
from pfp_deploy.runtimes import PRECISIONS, Runtime, choose, register_runtime

_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TorchRunner(Runner):
    model: torch.nn.Module | None = field(default=None, repr=False)

    def prepare(self, x):
        return x.to(self.device, _DTYPE[self.precision])

    def run(self, prepared):
        # torch threads are process-global: set them only when they differ (resizing the pool is costly).
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.model(prepared)
        if self.device != "cpu":  # kernels run asynchronously on accelerators: wait for them
            getattr(torch, torch.device(self.device).type).synchronize()
        return out

    def to_numpy(self, outputs):
        return [t.detach().float().cpu().numpy() for t in flatten_outputs(outputs)]


@register_runtime
class TorchRuntime(Runtime):
    name = "torch"
    export_format = None
    devices = ("cpu", "cuda", "mps", "xpu")  # each may take an index: cuda:1; "gpu" means cuda
    default_device = "cpu"
    precisions = PRECISIONS

    def parse_device(self, device: str) -> str:
        match = re.fullmatch(r"([A-Za-z]+)(:.*)?", device)
        base, index = (match.group(1), match.group(2) or "") if match else (device, "")
        base = "cuda" if base.lower() == "gpu" else choose("torch device", base, self.devices)
        if index and not re.fullmatch(r":\d+", index):
            raise ValueError(f"torch device {device!r}: the index is a number, write e.g. cuda:0")
        if index and base == "cpu":
            raise ValueError(f"torch device {device!r}: cpu takes no index, write cpu")
        return base + index

    def make_runner(self, source, *, device, provider, threads, precision, hint) -> TorchRunner:
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
        return TorchRunner(runtime=self.name, device=device, provider=None, threads=threads or torch.get_num_threads(),
                           precision=precision, hint=None, model=model)
