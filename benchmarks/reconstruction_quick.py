"""Least-squares reconstruction on a trained ResNet-20 (Fashion-MNIST), no fine-tuning.

Uses the shipped dense ResNet-20 (weights/resnet20_fashion_mnist.pt, 94.14 % on the 10k test set;
with --cache pointing elsewhere and no file there, trains the builtin resnet20 briefly), PFP-prunes
it to `--keep` of its MACs and compares top-1 on test images for: the pruned model as is, + BN
re-estimation, + reconstruction, + reconstruction + BN re-estimation; then a ridge study and the
"pruned layers only" variant; and the reconstruction time against prune()'s sensitivity pass.

    python -m benchmarks.reconstruction_quick --threads 1
    python -m benchmarks.reconstruction_quick --ridges 1e-5 1e-4 1e-3 1e-2 1e-1 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pfp_deploy
from pfp_deploy.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from pfp_deploy.finetune import recalibrate_batchnorm
from pfp_deploy.models import resnet20
from pfp_deploy.reconstruction import reconstruct

SHIPPED_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "resnet20_fashion_mnist.pt"


def images(split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_fashion_mnist(split=split)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    x = (x[idx].float().div(255).unsqueeze(1) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return x, y[idx].long()


def train(model, x, y, epochs: int, batch: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for s in range(0, len(x), batch):
            i = order[s:s + batch]
            xb = x[i]
            flip = torch.rand(len(i), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(i)
        print(f"  epoch {epoch + 1}/{epochs}: train loss {total / len(x):.4f}", flush=True)
    model.eval()


@torch.no_grad()
def top1(model, x, y, batch: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum()) for s in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--allocation", default="paper", help="prune()'s allocation (paper: the paper's global eps)")
    parser.add_argument("--train", type=int, default=12000, help="training images")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--test", type=int, default=10000, help="test images (10000: the whole test set)")
    parser.add_argument("--ridges", type=float, nargs="*", default=[1e-4, 1e-3, 1e-2, 1e-1])
    parser.add_argument("--variants", nargs="*", default=["deterministic"])
    parser.add_argument("--partial-keep", type=float, default=0.7, help="keep ratio of the stage-3-unpruned plan")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=str(SHIPPED_WEIGHTS), help="trained dense weights (default: the shipped ones)")
    parser.add_argument("--sample-study", type=int, nargs="*", default=[],
                        help="also reconstruct the same plan from this many calibration images each (e.g. 256 1024)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dense = resnet20(num_classes=10, in_channels=1)
    cache = Path(args.cache)
    if cache.is_file():
        dense.load_state_dict(torch.load(cache, weights_only=True))
        print(f"dense weights from {cache}")
    else:
        print(f"training resnet20 on {args.train} Fashion-MNIST images x {args.epochs} epochs")
        x_train, y_train = images("train", args.train, seed=1)
        start = time.perf_counter()
        train(dense, x_train, y_train, args.epochs, 128, 0.1, seed=0)
        print(f"  trained in {time.perf_counter() - start:.0f} s")
        torch.save(dense.state_dict(), cache)
    dense.eval()
    x_test, y_test = images("test", args.test, seed=2)
    x_cal, _ = images("train", args.calibration, seed=3)  # training images, no augmentation
    calibration = [x_cal[s:s + 64] for s in range(0, len(x_cal), 64)]
    bn_loader = calibration

    results = {"dense_top1": top1(dense, x_test, y_test), "keep": args.keep,
               "calibration": args.calibration, "test_images": args.test, "threads": args.threads, "runs": []}
    print(f"dense top-1 {results['dense_top1']:.2f} %")
    for variant in args.variants:
        pruned = pfp_deploy.prune(dense, calibration, x_cal[:1], keep=args.keep, variant=variant, reconstruct="none",
                                  allocation=args.allocation)
        sens_s = pruned.report["seconds"]["sensitivity"]
        base = {"variant": variant, "achieved": pruned.report["achieved"], "sensitivity_s": sens_s}
        print(f"[{variant}] achieved {pruned.report['achieved']:.3f} of the MACs; sensitivity {sens_s:.2f} s")
        row = dict(base, method="pruned", top1=top1(pruned.model, x_test, y_test))
        results["runs"].append(row)
        print(f"  pruned only             {row['top1']:6.2f} %")
        bn = copy.deepcopy(pruned.model)
        recalibrate_batchnorm(bn, bn_loader, args.calibration)
        row = dict(base, method="bn_recalibration", top1=top1(bn, x_test, y_test))
        results["runs"].append(row)
        print(f"  + BN re-estimation      {row['top1']:6.2f} %")
        for mode in ("all", "pruned"):
            for ridge in args.ridges if mode == "all" else [pfp_deploy.reconstruction.DEFAULT_RIDGE]:
                model = copy.deepcopy(pruned.model)
                before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                rec = reconstruct(dense, model, calibration, plan=pruned.plan, ridge=ridge, layers=mode)
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                acc = top1(model, x_test, y_test)
                recalibrate_batchnorm(model, bn_loader, args.calibration)
                acc_bn = top1(model, x_test, y_test)
                last = rec.layers[-1]
                row = dict(base, method="reconstruct", layers=mode, ridge=ridge, top1=acc, top1_then_bn=acc_bn,
                           seconds=rec.seconds, ratio_to_sensitivity=rec.seconds / max(sens_s, 1e-9),
                           passes=rec.passes, refit_layers=len(rec.layers),
                           kept_original=sum(layer.status == "kept_original" for layer in rec.layers),
                           logits_error_before=last.error_before, logits_error_after=last.error_after,
                           maxrss_growth_mb=(peak - before) / 1024)
                results["runs"].append(row)
                print(f"  + reconstruct[{mode:6s} ridge {ridge:g}] {acc:6.2f} %   then BN {acc_bn:6.2f} %   "
                      f"{rec.seconds:.2f} s ({row['ratio_to_sensitivity']:.2f}x sensitivity)  logits err "
                      f"{last.error_before:.3f} -> {last.error_after:.3f}  passes {rec.passes}", flush=True)
    # Timing on a shared machine is noisy: the minimum of a few back-to-back repeats of both passes.
    if args.timing_repeats:
        plan_run = pfp_deploy.prune(dense, calibration, x_cal[:1], keep=args.keep, reconstruct="none",
                                    allocation=args.allocation)
        sens_times, rec_times = [], []
        for _ in range(args.timing_repeats):
            start = time.perf_counter()
            pfp_deploy.sensitivity(dense, calibration)
            sens_times.append(time.perf_counter() - start)
            model = copy.deepcopy(plan_run.model)
            rec_times.append(reconstruct(dense, model, calibration, plan=plan_run.plan).seconds)
        results["timing"] = {"sensitivity_s": sens_times, "reconstruct_s": rec_times,
                             "ratio_of_minima": min(rec_times) / min(sens_times)}
        print(f"timing (min of {args.timing_repeats}): sensitivity {min(sens_times):.2f} s, reconstruct "
              f"{min(rec_times):.2f} s: {min(rec_times) / min(sens_times):.2f}x")

    # More calibration images for the refit than for scoring: same plan, same criterion, N images.
    if args.sample_study:
        plan_run = pfp_deploy.prune(dense, calibration, x_cal[:1], keep=args.keep, reconstruct="none",
                                    allocation=args.allocation)
        results["samples"] = []
        for n in args.sample_study:
            x_more, _ = images("train", n, seed=3)
            more = [x_more[s:s + 64] for s in range(0, len(x_more), 64)]
            model = copy.deepcopy(plan_run.model)
            rec = reconstruct(dense, model, more, plan=plan_run.plan)
            row = {"samples": n, "top1": top1(model, x_test, y_test), "seconds": rec.seconds}
            results["samples"].append(row)
            print(f"[refit on {n} images] top-1 {row['top1']:6.2f} %  ({rec.seconds:.2f} s)", flush=True)

    # A plan that leaves stage 3 at full width: its layers only see changed inputs. layers="all" refits
    # them too (absorbing the upstream error), layers="pruned" leaves them as they are.
    partial = pfp_deploy.prune(dense, calibration, x_cal[:1], keep=args.partial_keep,
                               overrides={"re:layer3\\..*": {"skip": True}}, reconstruct="none", allocation=args.allocation)
    sens_s = partial.report["seconds"]["sensitivity"]
    top = top1(partial.model, x_test, y_test)
    results["partial"] = {"keep": args.partial_keep, "achieved": partial.report["achieved"], "pruned_top1": top}
    print(f"[stage 3 unpruned] achieved {partial.report['achieved']:.3f} of the MACs: pruned only {top:6.2f} %")
    for mode in ("all", "pruned"):
        model = copy.deepcopy(partial.model)
        try:
            rec = reconstruct(dense, model, calibration, plan=partial.plan, layers=mode)
        except pfp_deploy.CalibrationError as exc:  # e.g. the full-width fc needs > 64 samples
            results["partial"][mode] = {"error": str(exc)}
            print(f"  + reconstruct[{mode:6s}] refused: {exc}")
            continue
        acc = top1(model, x_test, y_test)
        results["partial"][mode] = {"top1": acc, "refit_layers": len(rec.layers), "seconds": rec.seconds,
                                    "ratio_to_sensitivity": rec.seconds / max(sens_s, 1e-9)}
        print(f"  + reconstruct[{mode:6s}] {acc:6.2f} %  ({len(rec.layers)} layers refit, {rec.seconds:.2f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
