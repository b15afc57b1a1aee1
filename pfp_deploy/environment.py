"""The host and the installed versions: recorded in every report (env.json) and benchmark, and shown by
`pfp-deploy env`. Package versions come from importlib.metadata, so nothing heavy is imported."""
from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch


def import_openvino():
    """`import openvino` with OpenVINO's telemetry off for this process.

    openvino sends a usage event on import and on every conversion unless the user opted out
    (`opt_in_out --opt_out`): each event forks a helper process that tries to reach Google
    Analytics. A deployment tool must not phone home on its users' behalf, and offline (CI, air-gapped
    hosts) the forked helper lingers with copies of the parent's open files (a run directory's lock
    among them). Its consent check skips CI jobs (CI=true), so the first import, which creates the
    per-process telemetry object, runs with that set; the environment is restored at once, so
    child processes and the user's own later imports see nothing changed."""
    import sys

    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    saved = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        import openvino
    finally:
        if saved is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = saved
    return openvino


def package_version(name: str) -> str | None:
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
        "onnxruntime": package_version("onnxruntime") or package_version("onnxruntime-gpu"),
        "openvino": package_version("openvino"),
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def environment() -> dict:
    """Host and versions for env.json and `pfp-deploy env`: CPU, GPU, packages, ORT providers, OV devices."""
    info = hardware_fingerprint()
    info["versions"] = {name: package_version(name) for name in
                        ("pfp-deploy", "torchvision", "torch-pruning", "numpy", "onnx", "matplotlib")}
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = None
    try:
        info["openvino_devices"] = import_openvino().Core().available_devices
    except ImportError:
        info["openvino_devices"] = None
    return info
