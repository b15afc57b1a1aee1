"""Sensitivity throughput: pfp-deploy's vectorised kernel vs a per-filter Python loop.

The per-filter loop has the structure of the paper's reference code: one Python iteration per
output filter, vectorised over patches. Both see the same images and must give the same values.

    python -m benchmarks.sensitivity_speed --arch resnet18 --images 8 --threads 2

Before/after a change to the kernel, in one run (alternating rounds, so machine load hits both):

    git show HEAD:pfp_deploy/pfp/sensitivity.py > /tmp/sensitivity_before.py
    python -m benchmarks.sensitivity_speed --arch resnet18 --size 64 --images 3 --batch 3 \
        --baseline /tmp/sensitivity_before.py --rounds 12 --loop-images 0
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import time

import torch
import torch.nn as nn
import torchvision

from pfp_deploy.pfp import sensitivity
from pfp_deploy.pfp.sensitivity import EPS32, _patches, dense_layers, split_signed


def per_filter_loop(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference structure: for each filter, g = |W[f]| U / |Z[f]| over all patches, max over p."""
    layers = dense_layers(model)
    result = {name: torch.zeros(getattr(m, "in_channels", getattr(m, "in_features", 0)), device=m.weight.device)
              for name, m in layers.items()}

    def make_hook(name, layer):
        def hook(module, inputs, output):
            a = split_signed(inputs[0].detach().float())
            u, kk = _patches(layer, a)  # [B, R, P]
            w = layer.weight.detach().float().reshape(layer.weight.shape[0], -1)
            for f in range(w.shape[0]):  # one Python iteration per output filter
                wf = w[f]
                z_pos = (wf.clamp_min(0)[None, :, None] * u).sum(1).abs()  # [B, P]
                z_neg = (wf.clamp_max(0)[None, :, None] * u).sum(1).abs()
                z = torch.where((wf > 0)[None, :, None], z_pos[:, None, :], z_neg[:, None, :])
                g = wf.abs()[None, :, None] * u / z
                g = torch.where(z > EPS32, g, torch.zeros((), device=g.device))
                per_row = g.amax(dim=(0, 2))
                result[name] = torch.maximum(result[name], per_row.view(-1, kk).amax(1))
        return hook

    handles = [m.register_forward_hook(make_hook(n, m)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            model.eval()
            model(images)
    finally:
        for h in handles:
            h.remove()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--loop-images", type=int, default=2,
                        help="images for the (slow) per-filter loop; 0 skips the loop table (e.g. with --baseline)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline", help="another sensitivity.py to time against this one in the same run")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds for --baseline")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.arch, weights=None).to(args.device).eval()
    images = torch.randn(args.images, 3, args.size, args.size, device=args.device)
    batches = [images[i:i + args.batch] for i in range(0, args.images, args.batch)]

    sensitivity(model, [images[:1]])  # warm-up
    if args.baseline:
        print(json.dumps(compare_with_baseline(model, batches, args), indent=1))
    if args.loop_images <= 0:
        return
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    sensitivity(model, batches)
    if args.device == "cuda":
        torch.cuda.synchronize()
    fast_s = time.perf_counter() - t0
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    loop_images = images[:args.loop_images]
    t0 = time.perf_counter()
    slow = per_filter_loop(model, loop_images)
    if args.device == "cuda":
        torch.cuda.synchronize()
    loop_s = time.perf_counter() - t0
    same = sensitivity(model, [loop_images])
    rel = max(float(((same[n] - slow[n].cpu()).abs() / slow[n].cpu().abs().clamp_min(1e-30)).max()) for n in slow)

    fast_ips = args.images / fast_s
    loop_ips = args.loop_images / loop_s
    print(json.dumps({
        "arch": args.arch, "size": args.size, "device": args.device, "threads": args.threads,
        "images_fast": args.images, "images_loop": args.loop_images,
        "fast_images_per_s": round(fast_ips, 3), "loop_images_per_s": round(loop_ips, 4),
        "speedup": round(fast_ips / loop_ips, 1), "max_rel_diff": rel, "peak_memory_mb": round(peak_mb),
        "torch": torch.__version__,
    }, indent=1))


def compare_with_baseline(model: nn.Module, batches: list[torch.Tensor], args) -> dict:
    """Median wall and CPU time of this kernel vs a baseline copy, rounds alternating in order."""
    spec = importlib.util.spec_from_file_location("pfp_deploy.pfp._baseline_sensitivity", args.baseline)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    kernels = {"baseline": baseline.sensitivity, "current": sensitivity}
    kernels["baseline"](model, [batches[0][:1]])  # warm-up
    wall = {k: [] for k in kernels}
    cpu = {k: [] for k in kernels}
    result = {}
    for i in range(args.rounds):
        for name in (["baseline", "current"] if i % 2 == 0 else ["current", "baseline"]):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            result[name] = kernels[name](model, batches)
            if args.device == "cuda":
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    rel = max(float(((result["current"][n] - result["baseline"][n]).abs()
                     / result["baseline"][n].abs().clamp_min(1e-30)).max()) for n in result["current"])
    return {
        "arch": args.arch, "size": args.size, "images": args.images, "rounds": args.rounds,
        "baseline": args.baseline, "median_wall_s": med, "median_cpu_s": med_cpu,
        "wall_current_over_baseline": round(med["current"] / med["baseline"], 3),
        "cpu_current_over_baseline": round(med_cpu["current"] / med_cpu["baseline"], 3),
        "max_rel_diff_current_vs_baseline": rel,
    }


if __name__ == "__main__":
    main()
