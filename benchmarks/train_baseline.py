"""Train the quickstart's dense ResNet-20 on the full Fashion-MNIST training set and ship it.

    python -m benchmarks.train_baseline                 # `make baseline`: writes weights/ (state_dict + card)

Seeded and deterministic on one machine (the fine-tuning loop reseeds every epoch). Uses only
pfp-deploy's own data and training code: the same loaders, augmentation (pad-2 random crop +
horizontal flip) and loop a recipe's `model.pretrain` uses. The card (weights/<name>.json) records
the command, the settings, the full 10k test-set accuracy, the wall time and the file's sha256,
which the quickstart's loader checks.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from pfp_deploy.data import build_data
from pfp_deploy.fileio import file_sha256, torch_save_atomic, write_text_atomic
from pfp_deploy.finetune import evaluate, finetune
from pfp_deploy.models import resnet20
from pfp_deploy.recipe import DataConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "weights" / "resnet20_fashion_mnist.pt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    data_cfg = DataConfig(format="fashion_mnist", batch_size=args.batch_size, augment=True, seed=args.seed)
    data = build_data(data_cfg, [1, 1, 28, 28])
    model = resnet20(num_classes=10, in_channels=1)
    train_cfg = TrainConfig(epochs=args.epochs, optimizer={"name": "sgd", "lr": args.lr, "momentum": 0.9,
                                                           "weight_decay": 5e-4, "nesterov": True},
                            scheduler="cosine", warmup_epochs=1, label_smoothing=0.0, eval_every=args.epochs,
                            seed=args.seed, amp=False)
    started = time.perf_counter()
    checkpoints = args.out.parent / f".{args.out.stem}.checkpoints"  # resumable if interrupted
    result = finetune(model, data.train_loader, None, train_cfg, checkpoint_dir=checkpoints, progress=True)
    train_seconds = time.perf_counter() - started
    metrics = evaluate(model, data.val_loader, "cpu")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch_save_atomic(state, args.out)
    card = {
        "file": args.out.name, "sha256": file_sha256(args.out), "architecture": "pfp_deploy.models.resnet20",
        "num_classes": 10, "in_channels": 1, "input_shape": [1, 1, 28, 28],
        "data": "Fashion-MNIST, all 60000 training images (Debian dataset-fashion-mnist)",
        "test_top1": round(100 * metrics["top1"], 2), "test_top5": round(100 * metrics["top5"], 2),
        "test_images": len(data.val_loader.dataset),
        "command": "python -m benchmarks.train_baseline " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"data": data_cfg.model_dump(mode="json"), "train": train_cfg.model_dump(mode="json")},
        "train_seconds": round(train_seconds), "train_loss_last_epoch": result.history[-1]["train_loss"],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(card, indent=2) + "\n")
    print(json.dumps({k: card[k] for k in ("file", "sha256", "test_top1", "train_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
