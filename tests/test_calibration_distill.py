"""distill_on_calibration(): gradient steps on the calibration images after the least-squares refit.

Also the worker of the 2-process torchrun test: `torchrun ... tests/test_calibration_distill.py OUT_DIR`.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_reconstruction import _randomise_bn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pfp_deploy.calibration_distill import distill_on_calibration
from pfp_deploy.errors import CalibrationError, UsageError
from pfp_deploy.models import resnet20
from pfp_deploy.pruning import prune

TORCHRUN = Path(sys.executable).with_name("torchrun")
TORCHRUN_CMD = [str(TORCHRUN)] if TORCHRUN.exists() else [sys.executable, "-m", "torch.distributed.run"]


@functools.lru_cache(maxsize=2)
def _built(calib_batches: int, batch: int):
    """A small ResNet with non-trivial BatchNorm and peaked outputs, pruned to half its MACs and refit
    (the product's path), built once per shape."""
    torch.manual_seed(0)
    dense = resnet20(num_classes=10, in_channels=1, widths=(8, 16, 32))
    _randomise_bn(dense)
    dense.fc.weight.data.mul_(20.0)  # a random net's logits are nearly uniform: make them a classifier's
    dense.eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(batch, 1, 16, 16, generator=gen) for _ in range(calib_batches)]
    result = prune(dense, calib, calib[0][:1], keep=0.5, reconstruct={"distill": {"epochs": 0}})
    return dense, calib, result.model


def _case(calib_batches: int = 4, batch: int = 16):
    """Fresh copies of _built's models (tests modify them)."""
    return copy.deepcopy(_built(calib_batches, batch))


def _kl(dense: nn.Module, model: nn.Module, batches, temperature: float = 4.0) -> float:
    """Mean T^2 KL(dense || model) per image, written out independently of the module under test."""
    total, n = 0.0, 0
    with torch.no_grad():
        for x in batches:
            p = F.softmax(dense(x).double() / temperature, 1)
            q = F.softmax(model(x).double() / temperature, 1)
            total += float((p * (p.log() - q.log())).sum()) * temperature ** 2
            n += x.shape[0]
    return total / n


def test_distillation_lowers_the_kl_to_the_dense_model_and_reports_it():
    dense, calib, pruned = _case()
    before = _kl(dense, pruned.eval(), calib)
    result = distill_on_calibration(dense, pruned, calib, epochs=10)
    after = _kl(dense, pruned.eval(), calib)
    assert result.status == "distilled" and result.steps == 10 * len(calib) and result.samples == 64
    assert after < 0.5 * before
    assert result.kl_before == pytest.approx(before, rel=1e-4) and result.kl_after == pytest.approx(after, rel=1e-4)
    assert 0.0 <= result.agreement_before <= result.agreement_after <= 1.0


def test_the_dense_model_and_both_models_modes_are_left_alone():
    dense, calib, pruned = _case()
    dense.train()
    dense.layer1.eval()  # a deliberately mixed set of flags must come back as it was
    pruned.train()
    pruned.fc.eval()
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    modes = [(m.training) for m in dense.modules()], [(m.training) for m in pruned.modules()]
    buffers = {k: v.clone() for k, v in pruned.state_dict().items() if "running" in k}
    distill_on_calibration(dense, pruned, calib, epochs=2)
    assert all(torch.equal(dense_state[k], v) for k, v in dense.state_dict().items())
    assert ([m.training for m in dense.modules()], [m.training for m in pruned.modules()]) == modes
    # BatchNorm was frozen: its running statistics are the refit's, only the weights moved
    assert all(torch.equal(buffers[k], v) for k, v in pruned.state_dict().items() if "running" in k)
    assert all(p.grad is None for p in pruned.parameters())


def test_frozen_parameters_stay_and_a_worse_result_is_not_kept():
    dense, calib, pruned = _case()
    pruned.conv1.weight.requires_grad_(False)
    stem = pruned.conv1.weight.detach().clone()
    distill_on_calibration(dense, pruned, calib, epochs=2)
    assert torch.equal(pruned.conv1.weight, stem)
    # An absurd learning rate drives the KL up (or to NaN): the refit weights come back untouched.
    dense, calib, pruned = _case()
    state = {k: v.clone() for k, v in pruned.state_dict().items()}
    result = distill_on_calibration(dense, pruned, calib, epochs=3, lr=10.0)
    assert result.status == "kept_refit" and result.kl_after == result.kl_before
    assert all(torch.equal(state[k], v) for k, v in pruned.state_dict().items())


def test_labelled_batches_and_a_dataloader_give_the_same_weights_as_a_list():
    dense, calib, pruned = _case()
    _, _, again = _case()
    labelled = [(x, torch.zeros(len(x), dtype=torch.long)) for x in calib]
    distill_on_calibration(dense, pruned, labelled, epochs=2, seed=3)
    loader = DataLoader(TensorDataset(torch.cat(calib)), batch_size=16, shuffle=False)
    distill_on_calibration(dense, again, loader, epochs=2, seed=3)
    for (name, a), b in zip(pruned.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_input_gets_a_clear_error():
    dense, calib, pruned = _case()
    with pytest.raises(CalibrationError, match="one-shot iterator"):
        distill_on_calibration(dense, pruned, iter(calib), epochs=1)
    with pytest.raises(CalibrationError, match="empty"):
        distill_on_calibration(dense, pruned, [], epochs=1)
    with pytest.raises(UsageError, match="same module"):
        distill_on_calibration(dense, dense, calib, epochs=1)
    for bad in ({"epochs": 0}, {"epochs": 1.5}, {"lr": -1.0}, {"temperature": 0}):
        with pytest.raises(UsageError, match=next(iter(bad))):
            distill_on_calibration(dense, pruned, calib, **{"epochs": 1, **bad})

    class Features(nn.Module):  # not a classifier: [batch, channels, h, w] out
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.conv(x)

    features = Features()
    state = {k: v.clone() for k, v in features.state_dict().items()}
    skipped = distill_on_calibration(Features(), features, calib, epochs=1)  # skipped and said why, not an error
    assert skipped.status == "skipped" and "[batch, classes]" in skipped.reason and skipped.steps == 0
    assert all(torch.equal(state[k], v) for k, v in features.state_dict().items())


def test_prune_runs_it_by_default_and_reports_it():
    dense, calib, _ = _case()
    result = prune(dense, calib, calib[0][:1], keep=0.5)
    report = result.report["reconstruction"]["distillation"]
    assert report["status"] == "distilled" and report["epochs"] == 20 and report["kl_after"] < report["kl_before"]
    assert result.report["seconds"]["distillation"] > 0
    assert "distillation" not in prune(dense, calib, calib[0][:1], keep=0.5,
                                       reconstruct={"distill": {"epochs": 0}}).report["reconstruction"]
    assert "distillation" not in prune(dense, calib, calib[0][:1], keep=0.5, reconstruct="none").report["reconstruction"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 19 s (two interpreters importing torch); the pipeline's torchrun test runs the same path
def test_torchrun_ranks_end_with_one_model(tmp_path):
    """Each rank distils on its own shard; the averaged gradients keep every rank's weights equal."""
    dense, calib, pruned = _case(calib_batches=4, batch=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [*TORCHRUN_CMD, "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name
    assert reports[0] == {**reports[1], "seconds": reports[0]["seconds"]}
    assert reports[0]["samples"] == 32 and reports[0]["status"] == "distilled"
    assert reports[0]["kl_before"] == pytest.approx(_kl(dense, pruned, calib), rel=1e-4)  # global, not one shard's


def _worker(out_dir: Path) -> None:  # run by torchrun: each rank distils on its shard
    from pfp_deploy.distributed import cleanup, init_distributed

    torch.set_num_threads(1)
    dense, calib, pruned = _case(calib_batches=4, batch=8)  # before the process group: the test's own model
    ctx = init_distributed(device="cpu")
    try:
        result = distill_on_calibration(dense, pruned, calib[ctx.rank::ctx.world_size], epochs=10)
        torch.save(pruned.state_dict(), out_dir / f"rank{ctx.rank}.pt")
        (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(result.to_dict()))
    finally:
        cleanup()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
