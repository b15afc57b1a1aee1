"""GPU checks (run on the lent H100): prune() wall time for ResNet-50 with 200 calibration images,
and torch-CUDA / ONNX Runtime CUDA latency of dense vs PFP-pruned ResNet-50 at batch 1 and 32.

    python -m benchmarks.gpu_checks --out gpu_checks.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision

from pfp_deploy.bench import compare_latency, hardware_fingerprint, make_runner
from pfp_deploy.errors import PFPDeployError
from pfp_deploy.pruning import prune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--calibration", type=int, default=200)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--skip-prune-timing", action="store_true")
    parser.add_argument("--out", default="gpu_checks.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # pick the fastest kernels for each (new) layer shape
    device = "cuda"
    model = torchvision.models.get_model(args.arch, weights=None).to(device).eval()
    example = torch.randn(1, 3, 224, 224, device=device)
    calibration = [torch.randn(50, 3, 224, 224, device=device) for _ in range(args.calibration // 50)]
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = prune(model, calibration, example, keep=args.keep, round_to=args.round_to)
    torch.cuda.synchronize()
    prune_s = time.perf_counter() - started
    rep = result.report
    macs_ratio = rep["macs_before"] / rep["macs_after"]
    out = {"arch": args.arch, "calibration_images": args.calibration, "prune_seconds": prune_s,
           "prune_phases": rep["seconds"], "achieved": rep["achieved"], "macs_ratio": macs_ratio,
           "hardware": hardware_fingerprint(), "latency": []}
    print(json.dumps({k: v for k, v in out.items() if k != "hardware"}), flush=True)
    pruned = result.model.to(device).eval()
    for batch in args.batches:
        x = torch.randn(batch, 3, 224, 224)
        for precision in ("fp32", "fp16"):
            try:
                dense_r = make_runner("torch", model=model, device="cuda", precision=precision)
                pruned_r = make_runner("torch", model=pruned, device="cuda", precision=precision)
                cmp = compare_latency(dense_r, pruned_r, x, rounds=6, warmup=20, min_runs=60, min_time_s=2.0)
                row = {"runtime": "torch", "device": "cuda", "precision": precision, "batch": batch,
                       "dense_p50_ms": cmp.dense.p50_ms, "dense_p90_ms": cmp.dense.p90_ms,
                       "pruned_p50_ms": cmp.pruned.p50_ms, "pruned_p90_ms": cmp.pruned.p90_ms,
                       "speedup": cmp.speedup, "efficiency": cmp.speedup / macs_ratio}
            except PFPDeployError as exc:
                row = {"runtime": "torch", "precision": precision, "batch": batch, "skipped": str(exc)}
            out["latency"].append(row)
            print(json.dumps(row), flush=True)
    import onnxruntime  # the ORT CUDA rows need onnxruntime-gpu on the GPU host

    providers = onnxruntime.get_available_providers()
    out["onnxruntime"] = {"version": onnxruntime.__version__, "providers": providers}
    print(json.dumps(out["onnxruntime"]), flush=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
