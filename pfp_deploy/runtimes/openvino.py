"""OpenVINO: runs the OpenVINO IR export on CPU, GPU[.N], NPU or a virtual device (AUTO, HETERO:..., MULTI:...).

precision sets INFERENCE_PRECISION_HINT, hint sets PERFORMANCE_HINT. openvino is imported only
when a runner is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pfp_deploy.bench import Runner
from pfp_deploy.errors import ExportError, RuntimeUnavailableError, did_you_mean
from pfp_deploy.runtimes import PRECISIONS, Runtime, register_runtime

_PRECISION = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}
_REAL = ("CPU", "GPU", "NPU")  # GPU and NPU take an index: GPU.1
_VIRTUAL = ("AUTO", "HETERO", "MULTI")  # pick among real devices: AUTO:GPU,CPU (AUTO alone: all)


@dataclass
class OpenVinoRunner(Runner):
    request: Any = field(default=None, repr=False)

    def prepare(self, x):
        return [x.detach().cpu().float().numpy()]

    def run(self, prepared):
        return list(self.request.infer(prepared).to_tuple())


@register_runtime
class OpenVinoRuntime(Runtime):
    name = "openvino"
    export_format = "openvino"
    package = "openvino"
    devices = ("CPU", "GPU", "GPU.N", "NPU", "AUTO", "AUTO:<devices>", "HETERO:<devices>", "MULTI:<devices>")
    default_device = "CPU"
    precisions = PRECISIONS
    hints = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")

    def _import(self):
        from pfp_deploy.environment import import_openvino

        return import_openvino()  # with its telemetry off

    def parse_device(self, device: str) -> str:
        base, sep, rest = device.partition(":")
        if base.upper() in _VIRTUAL:
            if not sep and base.upper() != "AUTO":
                raise ValueError(f"OpenVINO device {device!r} needs the devices it spreads over, e.g. "
                                 f"{base.upper()}:GPU,CPU")
            parts = [self._real(part.strip(), device, _REAL) for part in rest.split(",")] if sep else []
            return base.upper() + (":" + ",".join(parts) if sep else "")
        if sep:
            raise ValueError(f"OpenVINO device {device!r}: only AUTO, HETERO and MULTI take a device list")
        return self._real(device, device, _REAL + _VIRTUAL)

    def _real(self, name: str, whole: str, valid: tuple[str, ...]) -> str:
        """One real device (CPU, GPU, GPU.N, NPU, NPU.N) of `whole`, upper case."""
        base, dot, index = name.partition(".")
        if base.upper() not in valid:
            raise ValueError(f"unknown OpenVINO device {whole!r}; valid: {', '.join(self.devices)}."
                             f"{did_you_mean(base.upper(), valid)}")
        if dot and (base.upper() not in ("GPU", "NPU") or not index.isdigit()):
            raise ValueError(f"OpenVINO device {whole!r}: only GPU and NPU take an index, a number (GPU.1)")
        return base.upper() + (f".{index}" if dot else "")

    def make_runner(self, source, *, device, provider, threads, precision, hint) -> OpenVinoRunner:
        ov = self.import_package()
        core = ov.Core()
        available = core.available_devices  # e.g. ["CPU", "GPU.0", "GPU.1"]
        virtual = device.split(":")[0] in _VIRTUAL  # these pick among real devices themselves
        if not virtual and not any(d == device or d.split(".")[0] == device for d in available):
            raise RuntimeUnavailableError(
                f"OpenVINO device {device} not present on this host (available: {', '.join(available)})")
        path = self.existing_file(source)
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": _PRECISION[precision]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            compiled = core.compile_model(core.read_model(str(path)), device, config)
        except Exception as exc:
            raise ExportError(f"OpenVINO cannot load {path} on {device}: {str(exc).strip().splitlines()[0]}") from exc
        first_dim = compiled.inputs[0].get_partial_shape()[0]
        return OpenVinoRunner(runtime=self.name, device=device, threads=threads, precision=precision, hint=hint,
                              source=str(path), fixed_batch=first_dim.get_length() if first_dim.is_static else None,
                              executed_on=_execution_devices(compiled, device), request=compiled.create_infer_request())


def _execution_devices(compiled: Any, device: str) -> str:
    """The devices OpenVINO compiled for ("GPU.0"; AUTO picks one), or `device` when it cannot say."""
    try:
        return ",".join(compiled.get_property("EXECUTION_DEVICES")) or device
    except Exception:  # an older OpenVINO or a plugin without the property
        return device
