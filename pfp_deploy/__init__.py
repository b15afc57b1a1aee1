"""pfp-deploy: prune PyTorch CNNs with Provable Filter Pruning and prove they got faster.

Public API (heavy or optional parts load on first use, so `import pfp_deploy` stays light and
never imports onnxruntime or openvino):

    pfp_deploy.prune(model, calibration, example_inputs, keep=0.5)   -> PruneResult
    pfp_deploy.sensitivity(model, batches)                          -> {layer: Tensor}
    pfp_deploy.optimize("recipes/fashion_mnist_quickstart.yaml")     -> Result
    pfp_deploy.finetune.finetune / export_onnx / export_openvino / check_parity / benchmark helpers
"""
from __future__ import annotations

import importlib

from .errors import (
    CalibrationError,
    ChecksFailedError,
    DataError,
    ExportError,
    ModelLoadError,
    PFPDeployError,
    PruningError,
    RecipeError,
    RuntimeUnavailableError,
    ShapeMismatchError,
    StageError,
    TargetUnattainableError,
    TrackingError,
    TrainingError,
    UnsupportedModelError,
    UsageError,
)

__version__ = "0.1.0"

_LAZY = {
    "prune": "pruning", "PruneResult": "pruning", "Plan": "plan", "apply_plan": "plan",
    "save_pruned": "models", "load_pruned": "models", "count_cost": "pruning",
    "sensitivity": "pfp.sensitivity", "calibration_size": "data", "paper_calibration_size": "data",
    "optimize": "pipeline", "Result": "pipeline",
    "Recipe": "recipe", "load_recipe": "recipe",
    "FinetuneConfig": "recipe", "evaluate": "finetune",
    "recalibrate_batchnorm": "finetune",
    "export_onnx": "export", "export_openvino": "export", "check_parity": "export",
    "make_runner": "runtimes", "measure_latency": "bench", "compare_latency": "bench",
    "run_targets": "checks", "evaluate_report": "checks",
    "export_run": "pipeline", "benchmark_run": "pipeline",
    "MlflowConfig": "tracking", "log_run": "tracking",
}
# Stage modules, importable as attributes too (pfp_deploy.finetune.finetune(...), ...).
_SUBMODULES = {"finetune", "export", "bench", "checks", "report", "data", "models", "architectures", "recipe",
               "pipeline", "stages", "run_dir", "pruning", "reconstruction", "criteria", "runtimes", "distributed",
               "environment", "pfp"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pfp_deploy' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = sorted(list(_LAZY) + [
    "PFPDeployError", "UsageError", "RecipeError", "DataError", "ModelLoadError", "UnsupportedModelError",
    "PruningError", "CalibrationError", "TargetUnattainableError", "ExportError", "ShapeMismatchError",
    "RuntimeUnavailableError", "TrainingError", "ChecksFailedError", "StageError", "TrackingError",
])
