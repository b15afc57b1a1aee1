"""The runner interface and latency measurement, independent of any runtime.

`Runner` is what each runtime builds (pfp_deploy/runtimes/, one file per runtime, made by
runtimes.make_runner); `measure_latency` and `compare_latency` time any Runner. No runtime package is
imported here; the host is recorded by pfp_deploy.environment.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pfp_deploy.environment import hardware_fingerprint, package_version  # noqa: F401 (benchmarks import them here)
from pfp_deploy.errors import ExportError, UsageError

# ----------------------------------------------------------------------------- runners


@dataclass
class Runner:
    """A ready-to-run model on one runtime/device; `prepare` once, then `run` in the timed loop."""

    runtime: str
    device: str
    provider: str | None = None
    threads: int | None = None
    precision: str = "fp32"
    hint: str | None = None
    source: str | None = None  # file the runner loaded, for messages
    fixed_batch: int | None = None  # set when the model was exported with a static batch
    executed_on: str | None = None  # what actually runs (ORT's first session provider, the GPU's name)

    def prepare(self, x: torch.Tensor) -> Any:
        """Convert a torch input to this runtime's native input (done outside timing)."""
        raise NotImplementedError

    def run(self, prepared: Any) -> Any:
        """One synchronous inference on a prepared input; returns native outputs."""
        raise NotImplementedError

    def to_numpy(self, outputs: Any) -> list[np.ndarray]:
        """The outputs as float32 arrays; this default fits runtimes that return a list of arrays."""
        return [np.asarray(o, dtype=np.float32) for o in outputs]

    def outputs(self, x: torch.Tensor) -> list[np.ndarray]:
        """Convenience: prepare, run and convert in one call."""
        return self.to_numpy(self.run(self.prepare(x)))

    def describe(self) -> dict:
        """Settings that identify this runner in a report."""
        keys = ("runtime", "device", "provider", "threads", "precision", "hint", "executed_on")
        return {k: getattr(self, k, None) for k in keys}


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """A model's output (tensor, tuple, list or dict, nested) as a flat list of tensors."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in flatten_outputs(item)]
    raise ExportError(f"model output of type {type(out).__name__} is not a tensor, tuple, list or dict")


# ----------------------------------------------------------------------------- latency


@dataclass
class LatencyStats:
    """Latency of one runner on one input: milliseconds per call, throughput in images/s."""

    runtime: str
    device: str
    provider: str | None
    hint: str | None
    precision: str
    threads: int | None
    batch: int
    runs: int
    first_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    throughput_ips: float
    executed_on: str | None = None  # Runner.executed_on: what actually ran (None: not recorded)
    graph: bool | None = None  # torch: replayed a CUDA graph
    memory_format: str | None = None  # torch: contiguous or channels_last

    @classmethod
    def from_samples(cls, runner: Runner, samples_ms: list[float], first_ms: float, batch: int) -> LatencyStats:
        """Summarise timed samples of `runner` into stats."""
        if not samples_ms:
            raise UsageError("no latency samples were collected (min_runs and min_time_s both zero?)")
        ms = np.asarray(samples_ms, dtype=np.float64)
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        info = runner.describe()
        return cls(runtime=info["runtime"], device=info["device"], provider=info["provider"], hint=info["hint"],
                   precision=info["precision"], threads=info["threads"], batch=batch, runs=len(ms),
                   first_ms=float(first_ms), p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99),
                   mean_ms=float(ms.mean()), std_ms=float(ms.std()), min_ms=float(ms.min()), max_ms=float(ms.max()),
                   throughput_ips=float(batch * 1000.0 / ms.mean()), executed_on=info.get("executed_on"),
                   graph=info.get("graph"), memory_format=info.get("memory_format"))

    def to_dict(self) -> dict:
        return asdict(self)


def _time_call(runner: Runner, prepared: Any) -> float:
    start = time.perf_counter()
    runner.run(prepared)
    return (time.perf_counter() - start) * 1000.0


def _timed_block(runner: Runner, prepared: Any, min_runs: int, min_time_s: float) -> list[float]:
    """Run until both min_runs calls and min_time_s seconds are reached."""
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_runs or time.perf_counter() - start < min_time_s:
        samples.append(_time_call(runner, prepared))
    return samples


def _warmup(runner: Runner, prepared: Any, warmup: int) -> float:
    """Warm the runner up; return the first call's latency (includes lazy initialisation)."""
    first_ms = _time_call(runner, prepared)
    for _ in range(max(warmup - 1, 0)):
        runner.run(prepared)
    return first_ms


def measure_latency(runner: Runner, input: torch.Tensor, *, warmup: int = 10, min_runs: int = 50,
                    min_time_s: float = 2.0) -> LatencyStats:
    """Time `runner` on `input`: warm up, then at least min_runs calls and min_time_s seconds."""
    prepared = runner.prepare(input)
    first_ms = _warmup(runner, prepared, warmup)
    samples = _timed_block(runner, prepared, min_runs, min_time_s)
    return LatencyStats.from_samples(runner, samples, first_ms, input.shape[0])


@dataclass
class LatencyComparison:
    """Dense vs pruned latency measured alternately; speedup = median of per-round p50 ratios."""

    dense: LatencyStats
    pruned: LatencyStats
    rounds: int
    round_speedups: list[float]
    speedup: float  # median over rounds of dense_p50 / pruned_p50: robust to drift on a shared host
    p50_ratio: float  # dense.p50_ms / pruned.p50_ms over all pooled samples

    def to_dict(self) -> dict:
        return {"dense": self.dense.to_dict(), "pruned": self.pruned.to_dict(), "rounds": self.rounds,
                "round_speedups": list(self.round_speedups), "speedup": self.speedup, "p50_ratio": self.p50_ratio}


def compare_latency(dense_runner: Runner, pruned_runner: Runner, input: torch.Tensor, *, rounds: int = 5,
                    warmup: int = 10, min_runs: int = 50, min_time_s: float = 2.0) -> LatencyComparison:
    """Measure dense and pruned in interleaved blocks (`rounds` each, order alternating) on the same input.

    min_runs and min_time_s are per runner over all rounds, as in measure_latency."""
    if rounds < 1:
        raise UsageError(f"rounds must be >= 1 (got {rounds})")
    runners = {"dense": dense_runner, "pruned": pruned_runner}
    prepared = {k: r.prepare(input) for k, r in runners.items()}
    first = {k: _warmup(r, prepared[k], warmup) for k, r in runners.items()}
    block_runs, block_time = math.ceil(min_runs / rounds), min_time_s / rounds
    samples: dict[str, list[float]] = {"dense": [], "pruned": []}
    ratios = []
    for i in range(rounds):
        # Alternate who goes first so slow drift (thermal, neighbours) hits both equally.
        order = ("dense", "pruned") if i % 2 == 0 else ("pruned", "dense")
        block = {k: _timed_block(runners[k], prepared[k], block_runs, block_time) for k in order}
        for k in order:
            samples[k].extend(block[k])
        ratios.append(float(np.median(block["dense"]) / np.median(block["pruned"])))
    batch = input.shape[0]
    dense = LatencyStats.from_samples(dense_runner, samples["dense"], first["dense"], batch)
    pruned = LatencyStats.from_samples(pruned_runner, samples["pruned"], first["pruned"], batch)
    return LatencyComparison(dense=dense, pruned=pruned, rounds=rounds, round_speedups=ratios,
                             speedup=float(np.median(ratios)), p50_ratio=dense.p50_ms / pruned.p50_ms)
