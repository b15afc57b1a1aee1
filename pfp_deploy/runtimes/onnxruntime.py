"""ONNX Runtime: runs the ONNX export with one execution provider (CPU by default, or CUDA, TensorRT, ...).

The provider picks the hardware; `device` (CPU, CUDA) is a shorthand for its default provider.
onnxruntime is imported only when a runner is built. What ran is the session's first provider
(`executed_on`): ORT falls back to CPU silently when a provider fails to initialise, and that is
reported as unavailable, never measured under the GPU's name. On a GPU provider the input and outputs
are bound on the device (IO binding), so the timed call is the inference, not PCIe copies.
precision fp16 is TensorRT's (trt_fp16_enable: it builds an fp16 engine from the fp32 export); the
other providers run the exported fp32 graph only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pfp_deploy.bench import Runner
from pfp_deploy.errors import ExportError, RuntimeUnavailableError, UsageError, did_you_mean
from pfp_deploy.runtimes import PRECISIONS, Runtime, choose, register_runtime

DEFAULT_PROVIDER = {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider", "GPU": "CUDAExecutionProvider"}
# Common providers, for suggestions; any name ending in ExecutionProvider passes the recipe check and
# is looked up in onnxruntime itself when the runner is built.
KNOWN_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
                   "OpenVINOExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider",
                   "ROCMExecutionProvider")


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
TENSORRT = "TensorrtExecutionProvider"


@dataclass
class BoundInput:
    """A prepared input bound on the provider's device (IO binding); `value` keeps the memory alive."""

    binding: Any
    value: Any


@dataclass
class OrtRunner(Runner):
    session: Any = field(default=None, repr=False)
    io_device: str | None = None  # "cuda": inputs/outputs bound on the GPU; None: numpy in, numpy out

    def prepare(self, x):
        name, array = self.session.get_inputs()[0].name, x.detach().cpu().float().numpy()
        if self.io_device is None:
            return {name: array}
        import onnxruntime as ort  # installed: a session exists

        binding = self.session.io_binding()
        value = ort.OrtValue.ortvalue_from_numpy(array, self.io_device, 0)  # copied to the device here, untimed
        binding.bind_ortvalue_input(name, value)
        for output in self.session.get_outputs():
            binding.bind_output(output.name, self.io_device)
        return BoundInput(binding, value)

    def run(self, prepared):
        if isinstance(prepared, BoundInput):
            self.session.run_with_iobinding(prepared.binding)  # ORT synchronises the device before returning
            return prepared.binding
        return self.session.run(None, prepared)

    def to_numpy(self, outputs):
        if isinstance(outputs, list):
            return super().to_numpy(outputs)
        return [np.asarray(o, dtype=np.float32) for o in outputs.copy_outputs_to_cpu()]


@register_runtime
class OnnxRuntime(Runtime):
    name = "onnxruntime"
    export_format = "onnx"
    package = "onnxruntime"
    devices = ("CPU", "CUDA", "GPU")
    default_device = None  # the provider decides
    precisions = ("fp32", "fp16")  # the exported fp32 graph; fp16 only as a TensorRT engine (check_precision)

    def parse_device(self, device: str) -> str:
        base, sep, _ = device.replace(".", ":").partition(":")
        if sep:
            raise ValueError(f"onnxruntime device {device!r}: pick the GPU with the provider, not a device index")
        return choose("onnxruntime device", base, self.devices)

    def check_provider(self, provider: str | None, device: str | None) -> str:
        if provider is None:
            return DEFAULT_PROVIDER[device] if device else "CPUExecutionProvider"
        provider = str(provider).strip()
        known = {p.lower(): p for p in KNOWN_PROVIDERS}
        provider = known.get(provider.lower(), provider)  # TensorRTExecutionProvider -> TensorrtExecutionProvider
        if not provider.endswith("ExecutionProvider"):  # "TensorRT" suggests TensorrtExecutionProvider
            hint = did_you_mean(provider, KNOWN_PROVIDERS) or did_you_mean(provider + "ExecutionProvider", KNOWN_PROVIDERS)
            raise ValueError(f"unknown onnxruntime provider {provider!r}.{hint} Known: {', '.join(KNOWN_PROVIDERS)}")
        # A device that contradicts the provider would label one hardware's numbers with another's name.
        if (device == "CPU" and provider in GPU_PROVIDERS) or (device in ("CUDA", "GPU") and
                                                               provider == "CPUExecutionProvider"):
            raise ValueError(f"provider {provider} contradicts device {device}; set one of them "
                             f"(device CUDA means CUDAExecutionProvider)")
        return provider

    def check_precision(self, precision: str, settings: dict[str, Any]) -> str:
        value = choose("precision", precision, PRECISIONS).lower()
        provider = settings.get("provider")
        if value == "fp16" and provider == TENSORRT:
            return value
        if value != "fp32":
            raise ValueError(f"onnxruntime runs precision fp32, not {value}: the export is an fp32 graph "
                             f"(fp16 only with provider {TENSORRT}, which builds an fp16 engine from it)")
        return value

    def make_runner(self, source, *, device, provider, threads, precision, hint) -> OrtRunner:
        ort = self.import_package()
        device = device or provider.removesuffix("ExecutionProvider").upper()  # e.g. TENSORRT
        known = ort.get_all_providers()
        if provider not in known:
            raise UsageError(f'unknown ONNX Runtime provider "{provider}".{did_you_mean(provider, known)}')
        available = ort.get_available_providers()
        if provider not in available:
            raise RuntimeUnavailableError(
                f"{provider} not available on this host (onnxruntime {ort.__version__} has: {', '.join(available)})")
        path = self.existing_file(source)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; ORT warnings would flood the CLI
        if threads:
            options.intra_op_num_threads = threads
        providers: list[Any] = [provider]
        if provider == TENSORRT:  # nodes TensorRT cannot take go to CUDA, not to the CPU
            providers = [(TENSORRT, {"trt_fp16_enable": precision == "fp16"})]
            providers += ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for corrupt or invalid graphs
            raise ExportError(f"ONNX Runtime cannot load {path}: {str(exc).strip().splitlines()[0]}") from exc
        # ORT silently falls back to CPU when a provider fails to initialise: treat that as unavailable.
        if session.get_providers()[0] != provider:
            raise RuntimeUnavailableError(f"{provider} failed to initialise on this host "
                                          f"(session fell back to {session.get_providers()[0]})")
        batch = session.get_inputs()[0].shape[0]
        return OrtRunner(runtime=self.name, device=device, provider=provider, threads=threads, precision=precision,
                         source=str(path), fixed_batch=batch if isinstance(batch, int) else None, session=session,
                         executed_on=session.get_providers()[0],
                         io_device="cuda" if provider in GPU_PROVIDERS else None)
