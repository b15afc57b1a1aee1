"""The host and the installed versions: recorded in every report (env.json) and benchmark, and shown by
`pfp-deploy env`. Package versions come from importlib.metadata, so nothing heavy is imported."""
from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch


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
        import openvino

        info["openvino_devices"] = openvino.Core().available_devices
    except ImportError:
        info["openvino_devices"] = None
    return info
