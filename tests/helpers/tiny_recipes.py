"""Tiny synthetic recipes for the pipeline and CLI tests (seconds per run on one CPU thread)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]

TINY = {
    "version": 1,
    "name": "tiny",
    "model": {"source": "builtin", "name": "resnet20", "input_shape": [1, 3, 16, 16]},
    "data": {"format": "synthetic", "batch_size": 16, "calibration_samples": 32,
             "synthetic": {"num_samples": 64, "num_classes": 4}},
    # 2 distillation epochs, not 20: every pipeline test runs the step, none needs it to converge
    "prune": {"keep": 0.5, "bn_recalibration_samples": 32, "reconstruct": {"distill": {"epochs": 2}}},
    "finetune": {"epochs": 1, "max_steps_per_epoch": 2, "distill": {"enabled": True}},
    "export": {"formats": []},
    "checks": {"targets": [{"name": "torch-cpu", "runtime": "torch", "batch": 1}],
               "latency": {"warmup": 1, "min_runs": 3, "min_time_s": 0}},
}


def tiny_recipe(**sections) -> dict:
    """TINY with whole sections (or top-level keys) merged in, e.g. tiny_recipe(finetune={"epochs": 2})."""
    recipe = copy.deepcopy(TINY)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key].update(value)
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core box, two threads make small convolutions ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
