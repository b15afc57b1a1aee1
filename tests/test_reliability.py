"""Benchmarks only measure exports that belong to the run's model.pt (hashes recorded at export)."""
from __future__ import annotations

import json
import shutil

import pytest
from helpers.tiny_recipes import one_thread, tiny_recipe, write_recipe  # noqa: F401 (fixture)

from pfp_deploy.cli import main
from pfp_deploy.models import load_pruned, save_pruned
from pfp_deploy.pipeline import artifact_sha256
from pfp_deploy.pruning import Plan

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

# VGG-small exports to ONNX in about a second (ResNet-20 takes several); real ONNX Runtime timings.
ONNX_RUN = dict(
    name="hashed",
    model={"source": "builtin", "name": "vgg_small", "input_shape": [1, 3, 16, 16]},
    finetune={"epochs": 0},
    export={"formats": ["onnx", "openvino"], "parity": {"samples": 2}},
    checks={"targets": [{"name": "ort-cpu", "runtime": "onnxruntime", "threads": 1}],
            "latency": {"warmup": 1, "min_runs": 3, "min_time_s": 0}},
)


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reliability")
    recipe = write_recipe(root / "hashed.yaml", tiny_recipe(**ONNX_RUN))
    assert main(["-q", "optimize", "--recipe", str(recipe), "--output-dir", str(root / "runs")]) == 0
    return root / "runs" / "hashed"


def test_export_records_the_hash_of_model_pt_and_of_every_exported_file(onnx_run):
    export = json.loads((onnx_run / "report.json").read_text())["export"]
    assert set(export["sha256"]) == {"model.pt", "dense.pt", "model.onnx", "dense.onnx", "openvino/model.xml",
                                     "openvino/model.bin", "openvino_dense/model.xml", "openvino_dense/model.bin"}
    assert all(export["sha256"][name] == artifact_sha256(onnx_run / name) for name in export["sha256"])
    assert len(export["sha256"]["model.onnx"]) == 64


def test_benchmark_refuses_an_export_that_does_not_belong_to_model_pt(onnx_run, tmp_path, capsys):
    edge = shutil.copytree(onnx_run, tmp_path / "edge")
    assert main(["-q", "benchmark", "--run-dir", str(edge)]) == 0
    assert main(["check", "--report", str(edge / "report.json")]) == 0  # the re-benchmarked report passes
    capsys.readouterr()

    before = (edge / "report.json").read_text()
    shutil.copyfile(edge / "dense.onnx", edge / "model.onnx")  # the mix-up that measured 1.00x and PASSED
    assert main(["-q", "benchmark", "--run-dir", str(edge)]) == 2
    err = capsys.readouterr().err
    assert str(edge / "model.onnx") in err and f"pfp-deploy export --run-dir {edge}" in err
    assert (edge / "report.json").read_text() == before  # nothing was measured or rewritten

    assert main(["-q", "export", "--run-dir", str(edge)]) == 0  # the fix the message gives
    assert main(["-q", "benchmark", "--run-dir", str(edge)]) == 0


def test_benchmark_refuses_exports_once_model_pt_changed(onnx_run, tmp_path, capsys):
    edge = shutil.copytree(onnx_run, tmp_path / "edge")
    shutil.copyfile(edge / "dense.pt", edge / "model.pt")  # e.g. a new model.pt without a new export
    assert main(["-q", "benchmark", "--run-dir", str(edge)]) == 2
    err = capsys.readouterr().err
    assert f"{edge / 'model.pt'} changed after the export" in err and "pfp-deploy export --run-dir" in err
    (edge / "model.onnx").unlink()
    shutil.copyfile(onnx_run / "model.pt", edge / "model.pt")
    assert main(["-q", "benchmark", "--run-dir", str(edge)]) == 2
    assert f"{edge / 'model.onnx'} is missing" in capsys.readouterr().err


def test_the_same_weights_saved_again_keep_their_hash(onnx_run, tmp_path):
    """A resumed run rewrites model.pt (save stage) but not the exports: that must not look like a mismatch."""
    import torch

    payload = torch.load(onnx_run / "model.pt", weights_only=True)
    plan = Plan.from_dict(payload["plan"])
    model = load_pruned(onnx_run / "model.pt")
    save_pruned(tmp_path / "model.pt", model, plan, base=payload["base"], example_shape=payload["example_shape"])
    assert artifact_sha256(tmp_path / "model.pt") == artifact_sha256(onnx_run / "model.pt")

    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_pruned(tmp_path / "changed.pt", model, plan, base=payload["base"], example_shape=payload["example_shape"])
    assert artifact_sha256(tmp_path / "changed.pt") != artifact_sha256(onnx_run / "model.pt")


def test_benchmark_refuses_openvino_weights_from_another_model(onnx_run, tmp_path, capsys):
    edge = shutil.copytree(onnx_run, tmp_path / "edge")
    shutil.copyfile(edge / "openvino_dense" / "model.bin", edge / "openvino" / "model.bin")
    assert main(["-q", "benchmark", "--run-dir", str(edge)]) == 2
    err = capsys.readouterr().err
    assert f"{edge / 'openvino' / 'model.bin'} is not the file the export wrote" in err


def test_a_run_resumed_after_its_export_still_benchmarks(onnx_run, tmp_path):
    """--resume re-runs the save stage (model.pt written again) but keeps the export: the hashes still hold."""
    run = shutil.copytree(onnx_run, tmp_path / "runs" / "hashed")
    state = json.loads((run / "state.json").read_text())
    del state["steps"]["benchmark"]  # as if interrupted while benchmarking
    (run / "state.json").write_text(json.dumps(state))
    model_pt = (run / "model.pt").read_bytes()
    recipe = onnx_run.parent.parent / "hashed.yaml"
    assert main(["-q", "optimize", "--recipe", str(recipe), "--output-dir", str(tmp_path / "runs"), "--resume"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert "export" in report["resumed_steps"] and "benchmark" not in report["resumed_steps"]
    assert (run / "model.pt").read_bytes() != model_pt  # rewritten, same weights
