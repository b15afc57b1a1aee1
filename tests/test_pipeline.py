"""optimize(): artifacts, exit statuses, usage errors before any work, resume after Ctrl-C, NaN stop,
the shipped resnet50_edge recipe, and torchrun giving the single-process sensitivities and plan."""
from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers.tiny_recipes import REPO, one_thread, tiny_recipe, write_recipe  # noqa: F401 (fixture)

from pfp_deploy.errors import DataError, ModelLoadError, TrainingError, UsageError
from pfp_deploy.models import load_pruned, vgg_small
from pfp_deploy.pipeline import optimize
from pfp_deploy.pruning import Plan, count_cost

ft = importlib.import_module("pfp_deploy.finetune")  # the module (pfp_deploy.finetune is also a function)

ARTIFACTS = ("recipe.resolved.yaml", "state.json", "plan.json", "sensitivity.json", "model.pt", "dense.pt",
             "report.json", "report.md", "env.json")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny synthetic run shared by the tests that only read it."""
    torch.set_num_threads(1)
    return optimize(tiny_recipe(), output_dir=tmp_path_factory.mktemp("runs"), progress=False)


def test_optimize_writes_every_artifact_and_passes(finished):
    run = finished.run_dir
    assert finished.passed and finished.exit_code == 0 and finished.raise_for_status() is finished
    assert all((run / name).is_file() for name in ARTIFACTS), sorted(p.name for p in run.iterdir())
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "passed" and json.loads(finished.to_json())["status"] == "passed"
    assert set(report["times"]) >= {"data", "model", "dense_eval", "calibration", "prune", "finetune", "save",
                                    "benchmark"}
    assert set(report["accuracy"]) == {"dense", "pruned_only", "reconstructed", "distilled", "bn_recalibrated",
                                        "finetuned"}
    layers = report["prune"]["steps"][0]["reconstruction"]["layers"]  # the per-layer certificate
    assert layers and all(layer["error_after"] <= layer["error_before"] + 1e-9 for layer in layers)
    # ... and on held-out validation images the refit never saw (every layer, both sides measured).
    assert report["prune"]["steps"][0]["reconstruction"]["heldout_samples"] > 0
    assert all(layer["heldout_before"] >= 0 and layer["heldout_after"] >= 0 for layer in layers)
    assert "### Reconstruction" in (run / "report.md").read_text() and "Held-out after" in (run / "report.md").read_text()
    # Synthetic data is marked, and its accuracy is never gated.
    assert report["data"]["meaningful_accuracy"] is False
    assert "not meaningful" in (run / "report.md").read_text()
    accuracy_check = next(c for c in report["checks"] if c["name"] == "accuracy")
    assert accuracy_check["status"] == "skipped" and "not meaningful" in accuracy_check["detail"]

    # model.pt rebuilds (architecture from the stored config, no pickles) at about half the MACs.
    pruned, dense = load_pruned(run / "model.pt"), load_pruned(run / "dense.pt")
    x = torch.zeros(1, 3, 16, 16)
    assert count_cost(pruned, x)[0] == pytest.approx(0.5 * count_cost(dense, x)[0], rel=0.02)
    assert report["model"]["macs_pruned"] == count_cost(pruned, x)[0]
    plan = Plan.from_dict(json.loads((run / "plan.json").read_text()))
    assert len(plan.steps) == 1 and plan.groups
    layers = json.loads((run / "sensitivity.json").read_text())["steps"][0]["layers"]
    assert all(isinstance(v, list) and all(0 <= s <= 1 + 1e-6 for s in v) for v in layers.values())


def test_the_refit_model_is_distilled_on_the_calibration_images_and_reported(finished):
    step = finished.report["prune"]["steps"][0]
    distillation = step["reconstruction"]["distillation"]
    assert distillation["epochs"] == 2 and distillation["samples"] == 32  # the tiny recipe's (the default is 20)
    assert distillation["status"] == "kept_refit" or distillation["steps"] == 2 * 2  # 32 images, batches of 16
    assert step["seconds"]["distillation"] > 0 and step["accuracy"]["distilled"]["top1"] is not None
    assert finished.report["accuracy"]["distilled"]["top1"] is not None
    assert "calibration distillation" in (finished.run_dir / "report.md").read_text()


def test_existing_run_directory_needs_overwrite_or_resume(finished):
    output_dir = finished.run_dir.parent
    with pytest.raises(UsageError, match="--overwrite.*--resume"):
        optimize(tiny_recipe(), output_dir=output_dir, progress=False)
    with pytest.raises(UsageError, match="not both"):
        optimize(tiny_recipe(), output_dir=output_dir, resume=True, overwrite=True)
    with pytest.raises(UsageError, match="prune.keep"):  # resuming with another recipe would mix two runs
        optimize(tiny_recipe(prune={"keep": 0.4}), output_dir=output_dir, resume=True)
    # A finished run resumes to the same report without recomputing anything.
    again = optimize(tiny_recipe(), output_dir=output_dir, resume=True, progress=False)
    assert again.passed and again.report["model"] == finished.report["model"]
    assert again.report["resumed_steps"] == ["dense_eval", "prune1", "finetune1", "export", "benchmark"]


def test_output_dir_not_writable_is_a_usage_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made under a file, even as root
    with pytest.raises(UsageError, match="not writable") as info:
        optimize(tiny_recipe(), output_dir=blocker / "runs")
    assert info.value.exit_code == 2


def test_missing_data_root_fails_before_the_run_directory_exists(tmp_path):
    recipe = tiny_recipe(model={"input_shape": [1, 1, 28, 28]},
                         data={"format": "fashion_mnist", "root": str(tmp_path / "nowhere")})
    with pytest.raises(DataError, match="nowhere") as info:
        optimize(recipe, output_dir=tmp_path / "runs")
    assert info.value.exit_code == 2 and not (tmp_path / "runs" / "tiny").exists()


def test_checkpoint_of_another_architecture_is_a_usage_error(tmp_path):
    checkpoint = tmp_path / "vgg.pt"
    torch.save(vgg_small(num_classes=4, image_size=(16, 16)).state_dict(), checkpoint)
    before = checkpoint.read_bytes()
    recipe = tiny_recipe(model={"source": "checkpoint", "name": "resnet20", "path": str(checkpoint),
                                "input_shape": [1, 3, 16, 16]})
    with pytest.raises(ModelLoadError, match="does not fit") as info:
        optimize(recipe, output_dir=tmp_path / "runs")
    assert info.value.exit_code == 2 and checkpoint.read_bytes() == before


def test_pretraining_runs_once_then_comes_from_the_cache(tmp_path):
    recipe = tiny_recipe(model={"pretrain": {"epochs": 1, "max_steps_per_epoch": 2}},
                         finetune={"epochs": 0}, checks={"targets": []})
    first = optimize(recipe, output_dir=tmp_path, progress=False)
    second = optimize({**recipe, "name": "again"}, output_dir=tmp_path, progress=False)
    assert first.report["model"]["pretrain"]["cached"] is False
    assert second.report["model"]["pretrain"]["cached"] is True
    assert second.report["accuracy"]["dense"] == first.report["accuracy"]["dense"]
    assert (tmp_path / "tiny" / "plan.json").read_text() == (tmp_path / "again" / "plan.json").read_text()


def _interrupt_epoch(monkeypatch, epoch: int, exc: BaseException):
    """Raise exc when fine-tuning starts `epoch` (counted over this test's fine-tuning calls)."""
    original, calls = ft._train_one_epoch, []

    def train_one_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(ft, "_train_one_epoch", train_one_epoch)


def test_ctrl_c_during_finetuning_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    recipe = tiny_recipe(finetune={"epochs": 2})
    reference = optimize(recipe, output_dir=tmp_path / "reference", progress=False)

    _interrupt_epoch(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        optimize(recipe, output_dir=tmp_path / "runs", progress=False)
    run = tmp_path / "runs" / "tiny"
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "interrupted" and report["exit_code"] == 130 and "--resume" in report["message"]
    assert torch.load(run / "checkpoints/finetune1/last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()

    resumed = optimize(recipe, output_dir=tmp_path / "runs", resume=True, progress=False)
    assert resumed.passed and resumed.report["resumed_steps"] == ["dense_eval", "prune1"]
    assert (run / "plan.json").read_text() == (reference.run_dir / "plan.json").read_text()
    ours = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    theirs = torch.load(reference.run_dir / "model.pt", weights_only=True)["state_dict"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    history = resumed.report["finetune"]["steps"][0]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    same = ("epoch", "train_loss", "val_top1", "val_loss", "lr")
    assert [[h[k] for k in same] for h in history] == \
        [[h[k] for k in same] for h in reference.report["finetune"]["steps"][0]["history"]]


def test_nan_loss_fails_the_stage_keeps_the_last_good_checkpoint_and_writes_the_report(tmp_path, monkeypatch):
    original, calls = ft._training_loss, []

    def diverging(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) > 2 else loss  # epoch 1 = 2 steps, then NaN

    monkeypatch.setattr(ft, "_training_loss", diverging)
    result = optimize(tiny_recipe(finetune={"epochs": 2}), output_dir=tmp_path, progress=False)
    assert result.exit_code == 3 and result.status == "error" and "diverged" in result.report["message"]
    run = result.run_dir
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "error" and report["exit_code"] == 3 and report["accuracy"]["pruned_only"]
    assert torch.load(run / "checkpoints/finetune1/last.pt", weights_only=True)["epoch"] == 1
    assert "TrainingError" in (run / "error.log").read_text()
    with pytest.raises(TrainingError, match="last good checkpoint"):
        result.raise_for_status()


RESNET50_TINY = [  # the shipped recipe, shrunk: synthetic 32x32 images, random weights, 1 step per epoch
    "data.format=synthetic", "data.root=null", "data.num_workers=0", "model.weights=null",
    "model.input_shape=[1, 3, 32, 32]", "data.synthetic.num_samples=16", "data.batch_size=8",
    "data.calibration_samples=8", "prune.bn_recalibration_samples=8", "finetune.epochs=1",
    "finetune.max_steps_per_epoch=1", "finetune.warmup_epochs=0", "checks.latency.warmup=0",
    "checks.latency.min_runs=1", "checks.latency.min_time_s=0", "checks.targets[0].p90_ms=null",
    "checks.targets[0].min_speedup=null", "checks.targets[1].min_speedup=null", "export.parity.samples=2",
    "prune.allocation=uniform",  # the cascade is under test; cost_aware's ResNet-50 Grams take ~25 s a step
]


@pytest.mark.slow  # 20 s; the default suite's cascade is the tiny two-step one of the torchrun test below
def test_resnet50_edge_recipe_prunes_in_three_steps(tmp_path):
    """The edge recipe's cascade, overrides and finetune settings execute (no export: see the slow test)."""
    overrides = RESNET50_TINY + ["export.formats=[]", "checks.targets=[{name: torch-cpu, runtime: torch}]"]
    result = optimize(REPO / "recipes" / "resnet50_edge.yaml", overrides, output_dir=tmp_path, progress=False)
    assert result.passed, result.report["message"]
    steps = result.report["prune"]["steps"]
    assert [s["keep"] for s in steps] == [0.8, 0.65, 0.5]
    assert [round(s["achieved"], 2) for s in steps] == [0.8, 0.65, 0.5]
    assert all(g["width_after"] % 8 == 0 or g["width_after"] == g["width_before"]
               for g in result.report["prune"]["groups"])
    assert len(result.report["finetune"]["steps"]) == 3


@pytest.mark.slow
def test_resnet50_edge_recipe_end_to_end_with_exports(tmp_path):
    result = optimize(REPO / "recipes" / "resnet50_edge.yaml", RESNET50_TINY, output_dir=tmp_path, progress=False)
    assert result.passed, result.report["message"]
    run = result.run_dir
    assert all((run / f).is_file() for f in ("model.onnx", "dense.onnx", "openvino/model.xml",
                                             "openvino_dense/model.xml"))
    statuses = {t["name"]: t["status"] for t in result.report["targets"]}
    assert statuses["openvino-cpu"] == statuses["ort-cpu"] == "passed"
    assert statuses["ort-cuda"] in ("passed", "skipped") and statuses["torch-cuda"] in ("passed", "skipped")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_score_and_prune_like_one(tmp_path):
    """Sharded calibration + MAX all-reduce gives the single-process sensitivities and plan.

    Only the first cascade step is compared: later steps start from a DDP fine-tune, whose global batch
    is world_size x data.batch_size, so its weights (and the next scores) legitimately differ."""
    # Calibration distillation off: like the fine-tune it averages gradients over the ranks' shards, so its weights
    # differ from one process's (its torchrun test is test_calibration_distill.py); the refit's must not.
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(prune={"schedule": [0.7, 0.5],
                                                                     "reconstruct": {"distill": {"epochs": 0}}}))
    single = optimize(recipe, output_dir=tmp_path / "single", progress=False)
    steps = single.report["prune"]["steps"]  # the default suite's cascade: two steps, each fine-tuned
    assert [s["keep"] for s in steps] == [0.7, 0.5] and len(single.report["finetune"]["steps"]) == 2
    assert all(abs(s["achieved"] - s["keep"]) <= 0.02 for s in steps), [s["achieved"] for s in steps]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "pfp_deploy.cli", "-q",
           "optimize", "--recipe", str(recipe), "--output-dir", str(tmp_path / "multi")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    multi = tmp_path / "multi" / "tiny"
    for name in ("sensitivity.json", "plan.json"):
        ours = json.loads((multi / name).read_text())["steps"][0]
        theirs = json.loads((single.run_dir / name).read_text())["steps"][0]
        assert ours == theirs, name
    # Reconstruction from sharded calibration (Grams all-reduced) gives the single-process weights;
    # BatchNorm buffers are re-estimated per shard and averaged, so only the refit layers are compared.
    ours, theirs = (torch.load(d / "checkpoints" / "prune1.pt", weights_only=True)["state_dict"]
                    for d in (multi, single.run_dir))
    refit = [k for k in theirs if k.endswith("weight") and theirs[k].ndim > 1]  # conv and linear weights
    assert len(refit) > 20
    for name in refit:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    report = json.loads((multi / "report.json").read_text())
    assert report["status"] == "passed" and len(report["finetune"]["steps"]) == 2
    assert report["prune"]["steps"][0]["reconstruction"]["layers"], "no layer was reconstructed"
