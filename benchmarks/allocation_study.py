"""Width allocations compared on the shipped ResNet-20 (Fashion-MNIST), no training.

For each keep ratio and each allocation (prune(allocation=...): paper, uniform, cost_aware,
cost_aware_norefit), with the same PFP sensitivities (one pass, shared), the same channel choice
(PFP, deterministic) and the same repair, it reports top-1 on the full 10k test set pruned only,
+ least-squares reconstruction, + reconstruction + BatchNorm re-estimation (2048 samples), the
MACs and parameters kept, the paper's eps for the target and for the chosen widths, and times.

    OMP_NUM_THREADS=2 python -m benchmarks.allocation_study --keeps 0.5 0.3 --json out.json
    python -m benchmarks.allocation_study --model vgg_small --train-epochs 2   # a briefly trained VGG
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pfp_deploy.data import build_data, calibration_size
from pfp_deploy.finetune import recalibrate_batchnorm
from pfp_deploy.models import resnet20, vgg_small
from pfp_deploy.pfp.sensitivity import sensitivity
from pfp_deploy.pruning import count_cost, prune, reconstruct_layers
from pfp_deploy.recipe import DataConfig, ReconstructConfig

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "resnet20_fashion_mnist.pt"
ALLOCATIONS = ["paper", "uniform", "cost_aware", "cost_aware_norefit"]


@torch.no_grad()
def top1(model, batches) -> float:
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def dense_model(name: str, data, epochs: int):
    if name == "resnet20":
        model = resnet20(num_classes=10, in_channels=1)
        state = torch.load(SHIPPED, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        return model.eval()
    torch.manual_seed(0)
    model = vgg_small(num_classes=10, in_channels=1, image_size=(28, 28))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * len(data.train_loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps, pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        for x, y in data.train_loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"  trained epoch {epoch + 1}/{epochs}", flush=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["resnet20", "vgg_small"], default="resnet20")
    parser.add_argument("--keeps", type=float, nargs="*", default=[0.5, 0.3])
    parser.add_argument("--allocations", nargs="*", default=ALLOCATIONS)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--min-channels", type=int, default=4)
    parser.add_argument("--bn-samples", type=int, default=2048)
    parser.add_argument("--train-epochs", type=int, default=2, help="vgg_small only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    data = build_data(DataConfig(format="fashion_mnist", batch_size=128), [1, 1, 28, 28])
    dense = dense_model(args.model, data, args.train_epochs)
    example = torch.randn(1, 1, 28, 28)
    n_cal = calibration_size("auto", dense, example)
    calibration = [(x, y) for x, y in data.calibration_loader(n_cal)]
    test = [(x, y) for x, y in data.val_loader]
    bn_batches = [(x, y) for x, y in data.calibration_loader(args.bn_samples, seed=1)]
    macs0, params0 = count_cost(dense, example)
    base = top1(dense, test)
    print(f"{args.model}: dense top-1 {base:.2f} %, {macs0} MACs, {params0} params, {n_cal} calibration images",
          flush=True)
    start = time.perf_counter()
    scores = sensitivity(dense, calibration)
    sens_s = time.perf_counter() - start
    rows = []
    for keep in args.keeps:
        for name in args.allocations:
            start = time.perf_counter()
            result = prune(dense, calibration, example, keep=keep, round_to=args.round_to,
                           min_channels=args.min_channels, allocation=name, sensitivities=scores,
                           reconstruct="none")
            prune_s = time.perf_counter() - start
            model = result.model
            row = {"model": args.model, "keep": keep, "allocation": name, "dense_top1": base,
                   "achieved": result.report["achieved"], "params_kept": result.report["params_after"] / params0,
                   "epsilon": result.report["epsilon"], "epsilon_widths": result.report["epsilon_widths"],
                   "widths": [g["width_after"] for g in result.report["groups"]],
                   "groups": [g["name"] for g in result.report["groups"]],
                   "seconds_prune": round(prune_s, 2), "seconds_allocation": result.report["seconds"]["allocation"]}
            row["pruned_only"] = top1(model, test)
            start = time.perf_counter()
            reconstruct_layers(dense, model, calibration, ReconstructConfig(), plan=result.plan, example_inputs=example)
            row["seconds_reconstruct"] = round(time.perf_counter() - start, 2)
            row["reconstructed"] = top1(model, test)
            recalibrate_batchnorm(model, bn_batches, args.bn_samples)
            row["bn_recalibrated"] = top1(model, test)
            rows.append(row)
            print(f"keep {keep} {name:>18}: achieved {row['achieved']:.3f}, params {row['params_kept']:.3f}, "
                  f"top-1 {row['pruned_only']:.2f} / {row['reconstructed']:.2f} / {row['bn_recalibrated']:.2f} %, "
                  f"eps {row['epsilon']:.4g} (widths {row['epsilon_widths']}), prune {prune_s:.1f} s "
                  f"(allocation {row['seconds_allocation']:.1f} s), reconstruct {row['seconds_reconstruct']:.1f} s; "
                  f"widths {row['widths']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"sensitivity_seconds": sens_s, "calibration": n_cal, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
