"""Distributed helpers single-process, and a real 2-process torchrun (gloo, CPU) DDP fine-tune."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.finetune_toys import quadrant_data, tiny_net
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pfp_deploy.distributed import (
    DistContext,
    all_reduce_max,
    barrier,
    cleanup,
    init_distributed,
    shard_indices,
    wrap_loader_for_distributed,
)
from pfp_deploy.errors import UsageError
from pfp_deploy.finetune import evaluate

HELPERS = Path(__file__).parent / "helpers"
TORCHRUN = Path(sys.executable).with_name("torchrun")
TORCHRUN_CMD = [str(TORCHRUN)] if TORCHRUN.exists() else [sys.executable, "-m", "torch.distributed.run"]


def test_single_process_context_is_a_no_op(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (0, 1, 0, True)
    assert ctx.device == torch.device("cpu") and not ctx.active
    t = torch.tensor([1.0, -2.0])
    assert all_reduce_max(t) is t and t.tolist() == [1.0, -2.0]
    barrier()
    cleanup()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UsageError, match="WORLD_SIZE"):
        init_distributed()


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (0, 2), (7, 1)])
def test_shard_indices_partition(n, world):
    shards = [shard_indices(n, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(UsageError):
        shard_indices(n, world, world)


def test_wrap_loader_for_distributed():
    data = TensorDataset(torch.arange(10).float(), torch.arange(10))
    loader = DataLoader(data, batch_size=2, shuffle=True)
    assert wrap_loader_for_distributed(loader, DistContext(), shuffle=True) is loader

    def indices(wrapped):
        return [int(i) for _, y in wrapped for i in y]

    ranks = [DistContext(r, 3, r, r == 0) for r in range(3)]
    train = [wrap_loader_for_distributed(loader, ctx, shuffle=True, seed=1) for ctx in ranks]
    assert all(isinstance(w.sampler, DistributedSampler) and w.batch_size == 2 for w in train)
    seen = [indices(w) for w in train]
    assert all(len(s) == 4 for s in seen) and set().union(*seen) == set(range(10))  # 2 padded
    assert indices(wrap_loader_for_distributed(loader, ranks[0], shuffle=True, seed=1)) == seen[0]
    train[0].sampler.set_epoch(1)
    assert indices(train[0]) != seen[0]  # a new epoch reshuffles

    evals = [indices(wrap_loader_for_distributed(loader, ctx, shuffle=False, even=False)) for ctx in ranks]
    assert sorted(sum(evals, [])) == list(range(10))  # no duplicates for evaluation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_process_ddp_finetune(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the worker finds finetune_toys next to itself
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [*TORCHRUN_CMD, "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(HELPERS / "ddp_finetune_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["is_main"] for r in reports] == [True, False] and reports[1]["world_size"] == 2
    assert reports[0]["max"] == reports[1]["max"] == [1.0, 10.0]

    # Only rank 0 writes checkpoints; they hold the trained model.
    assert sorted(p.name for p in (tmp_path / "ckpt_rank0").iterdir()) == ["best.pt", "last.pt"]
    assert not (tmp_path / "ckpt_rank1").exists() or not any((tmp_path / "ckpt_rank1").iterdir())
    last = torch.load(tmp_path / "ckpt_rank0" / "last.pt", weights_only=True)
    assert last["epoch"] == 1

    # Ranks started from different weights, trained in lockstep and end identical (buffers too).
    final0, final1 = states[0]["final"], states[1]["final"]
    assert not torch.equal(states[0]["initial"]["fc.weight"], states[1]["initial"]["fc.weight"])
    assert not torch.equal(final0["fc.weight"], states[0]["initial"]["fc.weight"])
    for name in final0:
        assert torch.equal(final0[name], final1[name]), name
        assert torch.equal(last["model"][name], final0[name]), name

    # Metrics are global: same on both ranks, over all 21 validation samples, and equal to a
    # single-process evaluation of the final model.
    for a, b in zip(reports[0]["history"], reports[1]["history"], strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert [r["shard_size"] for r in reports] == [11, 10]
    assert reports[0]["eval"]["n"] == reports[1]["eval"]["n"] == 21
    model = tiny_net()
    model.load_state_dict(final0)
    single = evaluate(model, DataLoader(quadrant_data(21, seed=2), batch_size=8))
    assert reports[0]["history"][-1]["val_top1"] == pytest.approx(single["top1"])
    assert reports[1]["eval"]["loss"] == pytest.approx(single["loss"], rel=1e-5)
