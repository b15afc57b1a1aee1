"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node=2``: a 2-step DDP fine-tune on CPU.

Each rank writes out_dir/rank{R}.pt (initial and final state_dict) and out_dir/rank{R}.json (history,
all_reduce_max result); checkpoints go to out_dir/ckpt_rank{R} so the test can see who wrote them.
"""
from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
from finetune_toys import quadrant_data, tiny_net
from torch.utils.data import DataLoader

from pfp_deploy.distributed import all_reduce_max, barrier, cleanup, init_distributed, wrap_loader_for_distributed
from pfp_deploy.finetune import FinetuneConfig, evaluate, finetune


def main(out_dir: Path) -> None:
    ctx = init_distributed(device="cpu")
    try:
        model = tiny_net(seed=ctx.rank)  # different per rank: DDP must broadcast rank 0's weights
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        train = DataLoader(quadrant_data(64, seed=1), batch_size=8, shuffle=True)
        val = DataLoader(quadrant_data(21, seed=2), batch_size=8)
        cfg = FinetuneConfig(epochs=1, optimizer={"lr": 0.1}, max_steps_per_epoch=2, seed=3)
        result = finetune(model, train, val, cfg, dist=ctx, progress=False,
                          checkpoint_dir=out_dir / f"ckpt_rank{ctx.rank}")
        sharded_val = wrap_loader_for_distributed(val, ctx, shuffle=False, even=False)
        metrics = evaluate(model, sharded_val, "cpu", dist=ctx)
        maxed = all_reduce_max(torch.tensor([float(ctx.rank), 10.0 - ctx.rank]))
        torch.save({"initial": initial, "final": model.state_dict()}, out_dir / f"rank{ctx.rank}.pt")
        (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps({
            "rank": ctx.rank, "world_size": ctx.world_size, "is_main": ctx.is_main,
            "max": maxed.tolist(), "history": result.history,
            "eval": metrics, "shard_size": len(sharded_val.sampler),
        }))
        barrier()
    finally:
        cleanup()


if __name__ == "__main__":
    faulthandler.enable()  # a native crash prints every thread's Python stack into the test's failure
    main(Path(sys.argv[1]))
    # Results are written, every rank passed the barrier and left the process group. Exit now, without
    # the interpreter's teardown: under the full test suite a rank was twice (of about eight runs, never
    # in 22 runs alone) killed by SIGABRT ("terminate called without an active exception") after all of
    # that, from native threads torch's CPU/gloo stack still held at exit. This test is about the
    # fine-tune; the pipeline's own torchrun exit is covered by tests/test_pipeline.py.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
