"""ONNX Runtime: runs the ONNX export with one execution provider (CPU by default, or CUDA, TensorRT, ...).

The provider picks the hardware; `device` (CPU, CUDA) is a shorthand for its default provider.
onnxruntime is imported only when a runner is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pfp_deploy.bench import Runner
from pfp_deploy.errors import ExportError, RuntimeUnavailableError, UsageError, did_you_mean
from pfp_deploy.runtimes import Runtime, choose, register_runtime

DEFAULT_PROVIDER = {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider", "GPU": "CUDAExecutionProvider"}
# Common providers, for suggestions; any name ending in ExecutionProvider passes the recipe check and
# is looked up in onnxruntime itself when the runner is built.
KNOWN_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
                   "OpenVINOExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider",
                   "ROCMExecutionProvider")


@dataclass
class OrtRunner(Runner):
    session: Any = field(default=None, repr=False)

    def prepare(self, x):
        return {self.session.get_inputs()[0].name: x.detach().cpu().float().numpy()}

    def run(self, prepared):
        return self.session.run(None, prepared)


@register_runtime
class OnnxRuntime(Runtime):
    name = "onnxruntime"
    export_format = "onnx"
    package = "onnxruntime"
    devices = ("CPU", "CUDA", "GPU")
    default_device = None  # the provider decides
    precisions = ("fp32",)  # it runs the exported fp32 graph

    def parse_device(self, device: str) -> str:
        base, sep, _ = device.replace(".", ":").partition(":")
        if sep:
            raise ValueError(f"onnxruntime device {device!r}: pick the GPU with the provider, not a device index")
        return choose("onnxruntime device", base, self.devices)

    def check_provider(self, provider: str | None, device: str | None) -> str:
        if provider is None:
            return DEFAULT_PROVIDER[device] if device else "CPUExecutionProvider"
        if not str(provider).endswith("ExecutionProvider"):
            raise ValueError(f"unknown onnxruntime provider {provider!r}.{did_you_mean(provider, KNOWN_PROVIDERS)}"
                             f" Known: {', '.join(KNOWN_PROVIDERS)}")
        return provider

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
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=[provider])
        except Exception as exc:  # ORT raises its own exception types for corrupt or invalid graphs
            raise ExportError(f"ONNX Runtime cannot load {path}: {str(exc).strip().splitlines()[0]}") from exc
        # ORT silently falls back to CPU when a provider fails to initialise: treat that as unavailable.
        if session.get_providers()[0] != provider:
            raise RuntimeUnavailableError(f"{provider} failed to initialise on this host "
                                          f"(session fell back to {session.get_providers()[0]})")
        batch = session.get_inputs()[0].shape[0]
        return OrtRunner(runtime=self.name, device=device, provider=provider, threads=threads, precision=precision,
                         source=str(path), fixed_batch=batch if isinstance(batch, int) else None, session=session)
