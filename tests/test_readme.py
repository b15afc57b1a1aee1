"""README "Your own model": every snippet runs as written, on tiny data (paths and sizes overridden)."""
from __future__ import annotations

import re

import pytest
import torch
import yaml
from helpers.tiny_recipes import REPO, one_thread, tiny_recipe, write_recipe  # noqa: F401 (fixture)

from pfp_deploy.errors import PFPDeployError
from pfp_deploy.pipeline import optimize

FAST = ["data.calibration_samples=8", "data.batch_size=4", "finetune.epochs=1", "finetune.max_steps_per_epoch=1",
        "checks.latency.warmup=0", "checks.latency.min_runs=2", "checks.latency.min_time_s=0",
        "export.parity.samples=2"]


def snippet(name: str) -> str:
    """The fenced block right after `<!-- readme-test: name -->` in README.md."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- readme-test: {re.escape(name)} -->\s*```\w+\n(.*?)```", text, re.S)
    assert match, f"README.md has no snippet {name}"
    return match.group(1)


def tiny_imagefolder(root, classes=("cat", "dog"), per_split=(6, 4), size=32):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "val"), per_split):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(size, size, 3, generator=generator) * 128 + 64 * c).byte().numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_own_torchvision_model_with_a_checkpoint_and_an_imagefolder(tmp_path):
    import torchvision

    recipe = yaml.safe_load(snippet("own-torchvision"))
    weights = tmp_path / "my_resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), weights)
    root = tiny_imagefolder(tmp_path / "images")
    result = optimize(recipe, [f"model.weights={weights}", f"data.root={root}", "data.image_size=32",
                               "checks.accuracy.max_drop=null", "checks.targets[0].min_speedup=null", *FAST],
                      output_dir=tmp_path / "runs", progress=False)
    assert result.passed, result.report["message"]
    assert result.report["data"]["num_classes"] == 2 and result.report["model"]["macs_pruned"] > 0
    assert {"dense_onnx", "pruned_onnx", "dense_openvino", "pruned_openvino"} <= set(result.report["export"]["files"])
    assert [t["name"] for t in result.report["targets"]] == ["openvino-cpu"]


def _run_timm_snippet(tmp_path, *overrides):
    timm = pytest.importorskip("timm")
    recipe = yaml.safe_load(snippet("own-timm"))
    weights = tmp_path / "my_mobilenetv3.pth"
    model = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=2)
    torch.save(model.state_dict(), weights)
    root = tiny_imagefolder(tmp_path / "images")
    return optimize(recipe, [f"model.weights={weights}", f"data.root={root}", "data.image_size=32",
                             "model.input_shape=[1, 3, 32, 32]", "checks.accuracy.max_drop=null", *FAST, *overrides],
                    output_dir=tmp_path / "runs", progress=False)


def test_own_timm_model_through_a_factory(tmp_path):
    """The factory, kwargs, weights and input shape of the snippet; its ONNX Runtime target (two
    dynamo exports of a MobileNetV3, ~12 s) runs in the slow test below."""
    result = _run_timm_snippet(tmp_path, "export.formats=[]", "checks.targets=[{name: torch-cpu, runtime: torch}]")
    assert result.passed, result.report["message"]
    assert result.report["model"]["macs_pruned"] < result.report["model"]["macs_dense"]


@pytest.mark.slow
def test_own_timm_model_through_a_factory_as_written(tmp_path):
    result = _run_timm_snippet(tmp_path)
    assert result.passed, result.report["message"]
    assert [t["name"] for t in result.report["targets"]] == ["ort-cpu"]


def test_python_api_pipeline_step(tmp_path):
    namespace: dict = {}
    exec(compile(snippet("own-api"), "README.md (own-api)", "exec"), namespace)
    optimize_step = namespace["optimize_step"]
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(finetune={"epochs": 0}))
    report = optimize_step(str(recipe), str(tmp_path / "runs"))
    assert report["status"] == "passed" and report["exit_code"] == 0
    failing = write_recipe(tmp_path / "gated.yaml", tiny_recipe(
        name="gated", finetune={"epochs": 0},
        checks={"targets": [{"name": "torch-cpu", "runtime": "torch", "batch": 1, "p50_ms": 1e-6}],
                "latency": {"warmup": 0, "min_runs": 2, "min_time_s": 0}}))
    with pytest.raises(PFPDeployError, match="targets"):  # a failed gate fails the pipeline step
        optimize_step(str(failing), str(tmp_path / "runs"))
