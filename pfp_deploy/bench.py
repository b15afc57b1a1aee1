"""One runner interface over PyTorch, ONNX Runtime and OpenVINO, plus latency measurement.

onnxruntime and openvino are imported inside the functions that need them, so importing
pfp_deploy stays cheap and works without the deploy extras.
"""
from __future__ import annotations

import copy
import importlib.metadata
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfp_deploy.errors import ExportError, RuntimeUnavailableError, UsageError, did_you_mean

RUNTIMES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "fp16", "bf16")
OV_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
# Device names each runtime understands. torch also takes "cuda:N", OpenVINO "GPU.N" and "AUTO:GPU,CPU".
DEVICES = {
    "torch": ("cpu", "cuda", "gpu", "mps", "xpu"),
    "onnxruntime": ("CPU", "CUDA", "GPU"),
    "openvino": ("CPU", "GPU", "NPU", "AUTO", "HETERO", "MULTI"),
}
ORT_DEFAULT_PROVIDER = {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider", "GPU": "CUDAExecutionProvider"}
_OV_PRECISION = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}
_TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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

    def prepare(self, x: torch.Tensor) -> Any:
        """Convert a torch input to this runtime's native input (done outside timing)."""
        raise NotImplementedError

    def run(self, prepared: Any) -> Any:
        """One synchronous inference on a prepared input; returns native outputs."""
        raise NotImplementedError

    def to_numpy(self, outputs: Any) -> list[np.ndarray]:
        """Native outputs as a flat list of float32 numpy arrays."""
        raise NotImplementedError

    def outputs(self, x: torch.Tensor) -> list[np.ndarray]:
        """Convenience: prepare, run and convert in one call."""
        return self.to_numpy(self.run(self.prepare(x)))

    def describe(self) -> dict:
        """Settings that identify this runner in a report."""
        return {k: getattr(self, k) for k in ("runtime", "device", "provider", "threads", "precision", "hint")}


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """A model's output (tensor, tuple, list or dict, nested) as a flat list of tensors."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in flatten_outputs(item)]
    raise ExportError(f"model output of type {type(out).__name__} is not a tensor, tuple, list or dict")


@dataclass
class TorchRunner(Runner):
    model: torch.nn.Module | None = field(default=None, repr=False)

    def prepare(self, x):
        return x.to(self.device, _TORCH_DTYPE[self.precision])

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


@dataclass
class OrtRunner(Runner):
    session: Any = field(default=None, repr=False)

    def prepare(self, x):
        return {self.session.get_inputs()[0].name: x.detach().cpu().float().numpy()}

    def run(self, prepared):
        return self.session.run(None, prepared)

    def to_numpy(self, outputs):
        return [np.asarray(o, dtype=np.float32) for o in outputs]


@dataclass
class OpenVinoRunner(Runner):
    request: Any = field(default=None, repr=False)

    def prepare(self, x):
        return [x.detach().cpu().float().numpy()]

    def run(self, prepared):
        return list(self.request.infer(prepared).to_tuple())

    def to_numpy(self, outputs):
        return [np.asarray(o, dtype=np.float32) for o in outputs]


def _choose(kind: str, value: str, valid: tuple[str, ...]) -> str:
    """Case-insensitive choice from `valid`; UsageError with a suggestion otherwise."""
    upper = {v.upper(): v for v in valid}
    if str(value).upper() in upper:
        return upper[str(value).upper()]
    raise UsageError(f'unknown {kind} "{value}"; valid: {", ".join(valid)}.{did_you_mean(value, valid)}')


def _parse_device(runtime: str, device: str) -> str:
    """Validate `device` for `runtime` and spell it the runtime's way ("cuda:0", "GPU.1")."""
    match = re.fullmatch(r"([A-Za-z]+)([:.].+)?", str(device).strip())
    base, suffix = (match.group(1), match.group(2) or "") if match else (str(device), "")
    base = _choose(f"{runtime} device", base, DEVICES[runtime])
    if runtime == "torch":
        if suffix and not re.fullmatch(r":\d+", suffix):
            raise UsageError(f'torch device "{device}": write e.g. cuda:0')
        return ("cuda" if base == "gpu" else base) + suffix
    if runtime == "onnxruntime" and suffix:
        raise UsageError(f'onnxruntime device "{device}": pick the GPU with the provider, not a device index')
    return base + suffix.upper()


def _existing_file(path: str | os.PathLike | None, what: str, runtime: str) -> Path:
    if path is None:
        raise UsageError(f"runtime {runtime} needs {what}; pass it to make_runner")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{what} {path} does not exist; export the model first")
    return path


def make_runner(
    runtime: str,
    *,
    model: torch.nn.Module | None = None,
    onnx_path: str | os.PathLike | None = None,
    openvino_xml: str | os.PathLike | None = None,
    device: str | None = None,
    provider: str | None = None,
    threads: int | None = None,
    precision: str = "fp32",
    hint: str = "LATENCY",
) -> Runner:
    """Build a Runner for `runtime` in {"torch","onnxruntime","openvino"} on `device` (default: CPU).

    Unknown names raise UsageError; a runtime, provider or device missing on this host raises
    RuntimeUnavailableError; a missing or unreadable model file raises ExportError naming it."""
    runtime = str(runtime).lower()
    if runtime not in RUNTIMES:
        raise UsageError(f'unknown runtime "{runtime}"; valid: {", ".join(RUNTIMES)}.{did_you_mean(runtime, RUNTIMES)}')
    if device is None:  # onnxruntime: the provider decides; others: CPU
        device = "CPU" if runtime != "onnxruntime" or provider in (None, "CPUExecutionProvider") else None
    device = _parse_device(runtime, device) if device is not None else None
    precision = _choose("precision", precision, PRECISIONS).lower()
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be >= 1 (got {threads})")
    if runtime == "torch":
        return _make_torch(model, device, threads, precision)
    if runtime == "onnxruntime":
        return _make_ort(onnx_path, device, provider, threads, precision)
    return _make_openvino(openvino_xml, device, threads, precision, _choose("OpenVINO hint", hint, OV_HINTS))


def _make_torch(model, device, threads, precision) -> TorchRunner:
    if model is None:
        raise UsageError("runtime torch needs model=...")
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
    bench_model = copy.deepcopy(model).eval().to(device, _TORCH_DTYPE[precision])
    return TorchRunner(runtime="torch", device=device, provider=None, threads=threads or torch.get_num_threads(),
                       precision=precision, hint=None, model=bench_model)


def _make_ort(onnx_path, device, provider, threads, precision) -> OrtRunner:
    if precision != "fp32":
        raise UsageError(f"onnxruntime runs the exported fp32 graph; precision {precision} is not supported")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RuntimeUnavailableError(f"onnxruntime is not installed ({exc}); install pfp-deploy[deploy]") from exc
    provider = provider or ORT_DEFAULT_PROVIDER[device]
    device = device or provider.removesuffix("ExecutionProvider").upper()  # e.g. TENSORRT
    known = ort.get_all_providers()
    if provider not in known:
        raise UsageError(f'unknown ONNX Runtime provider "{provider}".{did_you_mean(provider, known)}')
    available = ort.get_available_providers()
    if provider not in available:
        raise RuntimeUnavailableError(
            f"{provider} not available on this host (onnxruntime {ort.__version__} has: {', '.join(available)})")
    path = _existing_file(onnx_path, "ONNX file", "onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; ORT warnings would flood the CLI
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=[provider])
    except Exception as exc:  # ORT raises its own exception types for corrupt or invalid graphs
        raise ExportError(f"ONNX Runtime cannot load {path}: {str(exc).strip().splitlines()[0]}") from exc
    # ORT silently falls back to CPU when a provider fails to initialise: treat that as unavailable.
    if session.get_providers()[0] != provider:
        raise RuntimeUnavailableError(f"{provider} failed to initialise on this host "
                                      f"(session fell back to {session.get_providers()[0]})")
    batch = session.get_inputs()[0].shape[0]
    return OrtRunner(runtime="onnxruntime", device=device, provider=provider, threads=threads, precision=precision,
                     source=str(path), fixed_batch=batch if isinstance(batch, int) else None, session=session)


def _make_openvino(xml_path, device, threads, precision, hint) -> OpenVinoRunner:
    try:
        import openvino as ov
    except ImportError as exc:
        raise RuntimeUnavailableError(f"openvino is not installed ({exc}); install pfp-deploy[deploy]") from exc
    core = ov.Core()
    available = core.available_devices  # e.g. ["CPU", "GPU.0", "GPU.1"]
    virtual = device.split(":")[0] in ("AUTO", "HETERO", "MULTI")  # these pick among real devices themselves
    if not virtual and not any(d == device or d.split(".")[0] == device for d in available):
        raise RuntimeUnavailableError(
            f"OpenVINO device {device} not present on this host (available: {', '.join(available)})")
    path = _existing_file(xml_path, "OpenVINO IR", "openvino")
    config: dict[str, Any] = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": _OV_PRECISION[precision]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = core.compile_model(core.read_model(str(path)), device, config)
    except Exception as exc:
        raise ExportError(f"OpenVINO cannot load {path} on {device}: {str(exc).strip().splitlines()[0]}") from exc
    first_dim = compiled.inputs[0].get_partial_shape()[0]
    return OpenVinoRunner(runtime="openvino", device=device, threads=threads, precision=precision, hint=hint,
                          source=str(path), fixed_batch=first_dim.get_length() if first_dim.is_static else None,
                          request=compiled.create_infer_request())


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
                   throughput_ips=float(batch * 1000.0 / ms.mean()))

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


# ----------------------------------------------------------------------------- host


def _package_version(name: str) -> str | None:
    # importlib.metadata reads the installed version without importing the (heavy) package.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_fingerprint() -> dict:
    """The host a benchmark ran on: CPU model, cores, OS, runtime versions and GPU name if any."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": _package_version("onnxruntime") or _package_version("onnxruntime-gpu"),
        "openvino": _package_version("openvino"),
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info
