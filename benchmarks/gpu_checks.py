"""GPU checks, one device call: does GPU latency follow the MACs? ResNet-50 dense vs PFP-pruned.

ResNet-50 (random init: latency does not depend on the weights), 224 px, pruned with PFP to --keep
of its MACs once per --round-to (sensitivities computed once; the first prune is timed, as in
docs/BENCHMARKS.md §2). Then, per cell of the matrix, dense and pruned are timed in interleaved blocks
(pfp_deploy.bench.compare_latency: speed-up = median of per-round dense/pruned p50 ratios, paired):

    torch cuda  x  batch 1/32/128  x  fp32/fp16  x  eager / CUDA graph      (memory_format auto)
    onnxruntime CUDAExecutionProvider (fp32), TensorrtExecutionProvider (fp32, fp16), if installed

Each row: dense / pruned p50 and p90 (ms), speed-up, MACs ratio, efficiency = speed-up / MACs ratio
(1.0: latency falls as the MACs do), and what actually ran (GPU name, ORT's session provider).

Sized for ONE 10-minute device call: --budget-s (default 420) drops the lowest-priority cells from the
plan (estimated cost), and a cell that would overrun the budget at run time is recorded as skipped.
Results are rewritten to --out/gpu_checks.json and gpu_checks.md after every cell, so a killed run
keeps what it measured. Without a CUDA device it writes a "skipped" JSON and exits 0 at once.

    python -m benchmarks.gpu_checks --out gpu_out                 # on the GPU machine
    python -m benchmarks.gpu_checks --out gpu_out --dry-run       # the planned matrix, anywhere
    python -m benchmarks.gpu_checks --out gpu_out --budget-s 200 --batches 1 32   # a shorter run
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

PRIORITY = ("torch", "ort-cuda", "torch-round", "ort-trt")  # plan order: what the budget keeps first
# Rough cost per step (seconds) for the budget: measured pace of an H100 run (docs/BENCHMARKS.md §2-3)
# plus margin; the run-time check uses the real clock.
FIXED_S = {"start": 20, "prune_first": 15, "prune_more": 6, "export": 15}
CELL_S = {"torch": 4.0, "ort-cuda": 6.0, "ort-trt": 45.0}  # plus 2 * min_time_s (dense and pruned)
TENSORRT = "TensorrtExecutionProvider"


@dataclass
class Cell:
    """One dense-vs-pruned comparison."""

    group: str  # one of PRIORITY
    runtime: str  # torch | onnxruntime
    round_to: int
    batch: int
    precision: str
    mode: str  # eager | graph (torch), or the ORT provider
    estimate_s: float
    status: str = "planned"  # planned | measured | skipped | unavailable | error
    reason: str = ""
    result: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.runtime}/{self.mode} round_to={self.round_to} batch={self.batch} {self.precision}"


def ort_providers() -> tuple[str | None, list[str]]:
    """(onnxruntime version, its available providers); (None, []) when it is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, []
    return ort.__version__, list(ort.get_available_providers())


def plan(args: argparse.Namespace, providers: list[str]) -> tuple[list[Cell], list[Cell], float]:
    """(kept cells in run order, cells not run: dropped by the budget or provider absent, estimated
    fixed seconds). An ONNX Runtime cell whose provider is not in `providers` costs nothing."""
    timing = 2 * args.min_time_s
    cells: list[Cell] = []
    first, *others = args.round_to
    for group, rounds in (("torch", [first]), ("ort-cuda", [first]), ("torch-round", others), ("ort-trt", [first])):
        for round_to in rounds:
            for batch in args.batches:
                if group.startswith("torch"):
                    for precision in args.precisions:
                        for mode in args.modes:
                            cells.append(Cell(group, "torch", round_to, batch, precision, mode,
                                              CELL_S["torch"] + timing * (1.5 if batch >= 128 else 1.0)))
                elif not args.no_ort:
                    trt = group == "ort-trt"
                    for provider in [p for p in args.ort_providers if (p == TENSORRT) == trt]:
                        for precision in (args.precisions if trt else ("fp32",)):
                            if precision == "bf16":
                                continue  # TensorRT through ORT: fp32 or fp16 engines
                            cells.append(Cell(group, "onnxruntime", round_to, batch, precision, provider,
                                              CELL_S[group] + timing))
    fixed = FIXED_S["start"] + FIXED_S["prune_first"] + FIXED_S["prune_more"] * len(others)
    if any(c.runtime == "onnxruntime" and c.mode in providers for c in cells):
        fixed += 2 * FIXED_S["export"]  # dense and pruned of round_to[0]
    kept, dropped, total = [], [], fixed
    for cell in cells:  # in priority order: the first cells that fit are kept
        if cell.runtime == "onnxruntime" and cell.mode not in providers:
            cell.status, cell.reason = "unavailable", f"{cell.mode} not in onnxruntime's providers here " \
                                                      f"({', '.join(providers) or 'onnxruntime not installed'})"
            cell.estimate_s = 0.0
            dropped.append(cell)
        elif total + cell.estimate_s <= args.budget_s:
            kept.append(cell)
            total += cell.estimate_s
        else:
            cell.status, cell.reason = "skipped", f"budget: estimated {cell.estimate_s:.0f} s over --budget-s"
            dropped.append(cell)
    return kept, dropped, fixed


def print_plan(kept: list[Cell], dropped: list[Cell], fixed: float, args: argparse.Namespace) -> None:
    total = fixed + sum(c.estimate_s for c in kept)
    print(f"gpu_checks plan: {args.arch} keep={args.keep} round_to={args.round_to} batches={args.batches} "
          f"precisions={args.precisions} modes={args.modes}; budget {args.budget_s:.0f} s, estimated "
          f"{total:.0f} s ({fixed:.0f} s set-up + {len(kept)} cells)")
    for i, cell in enumerate(kept, 1):
        print(f"  {i:3d}. {cell.label:<62} ~{cell.estimate_s:4.0f} s")
    for cell in dropped:
        print(f"   --  {cell.label:<62} not run: {cell.status}: {cell.reason}")


def markdown(out: dict) -> str:
    lines = [f"# GPU checks: {out['arch']} dense vs PFP keep={out['keep']}", "",
             f"status: {out['status']}" + (f" ({out['reason']})" if out.get("reason") else ""), ""]
    if out.get("gpu"):
        lines += [f"GPU: {out['gpu']}; torch {out['torch']}; onnxruntime {out.get('onnxruntime') or 'not installed'} "
                  f"(providers: {', '.join(out.get('ort_providers') or []) or '-'})", ""]
    for rt, info in (out.get("models") or {}).items():
        lines.append(f"- round_to {rt}: achieved {info['achieved']:.1%} of the MACs, MACs ratio {info['macs_ratio']:.3f}"
                     + (f", prune() {info['prune_seconds']:.2f} s" if info.get("prune_seconds") else ""))
    lines += ["", "| runtime / mode | round_to | batch | precision | memory | dense p50 / p90 (ms) | "
              "pruned p50 / p90 (ms) | speed-up | efficiency | ran on | status |",
              "|---|---:|---:|---|---|---:|---:|---:|---:|---|---|"]
    for cell in out.get("cells", []):
        r = cell.get("result") or {}
        if cell["status"] == "measured":
            lines.append(f"| {cell['runtime']} / {cell['mode']} | {cell['round_to']} | {cell['batch']} | "
                         f"{cell['precision']} | {r.get('memory_format') or '-'} | {r['dense_p50_ms']:.3f} / "
                         f"{r['dense_p90_ms']:.3f} | {r['pruned_p50_ms']:.3f} / {r['pruned_p90_ms']:.3f} | "
                         f"{r['speedup']:.3f} | {r['efficiency']:.3f} | {r.get('executed_on') or '-'} | measured |")
        else:
            lines.append(f"| {cell['runtime']} / {cell['mode']} | {cell['round_to']} | {cell['batch']} | "
                         f"{cell['precision']} | - | - | - | - | - | - | {cell['status']}: {cell['reason']} |")
    lines += ["", "speed-up: median over rounds of dense p50 / pruned p50, measured alternately (paired); "
              "efficiency = speed-up / MACs ratio."]
    return "\n".join(lines) + "\n"


def write(out_dir: Path, out: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_checks.json").write_text(json.dumps(out, indent=1, default=str))
    (out_dir / "gpu_checks.md").write_text(markdown(out))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".cache/benchmarks/gpu_checks",
                        help="output directory for gpu_checks.json and gpu_checks.md (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds the whole run may take (default 420: one 10-minute device call with margin)")
    parser.add_argument("--dry-run", action="store_true", help="print the planned matrix and exit (no GPU needed)")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--calibration", type=int, default=200, help="calibration images (random normal)")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--allocation", default=None, help="prune(allocation=...) (default: the library's)")
    parser.add_argument("--round-to", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph"])
    parser.add_argument("--memory-format", default="auto", choices=["auto", "contiguous", "channels_last"])
    parser.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime rows (and the exports)")
    parser.add_argument("--ort-providers", nargs="+", default=["CUDAExecutionProvider", TENSORRT],
                        help="ONNX Runtime rows to try (each only if installed); TensorRT also runs fp16")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke test of this script's plumbing (eager only, tiny settings); not a result")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--min-runs", type=int, default=60)
    parser.add_argument("--min-time-s", type=float, default=1.5, help="per model and cell")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.device != "cuda" and "graph" in args.modes:
        args.modes = [m for m in args.modes if m != "graph"] or ["eager"]  # CUDA graphs exist only on CUDA
    version, providers = (None, []) if args.no_ort else ort_providers()
    kept, dropped, fixed = plan(args, providers)
    if args.dry_run:
        print_plan(kept, dropped, fixed, args)
        return 0
    out_dir = Path(args.out)
    out: dict[str, Any] = {"arch": args.arch, "keep": args.keep, "status": "running", "args": vars(args),
                           "torch": torch.__version__, "onnxruntime": version, "ort_providers": providers}
    if args.device == "cuda" and not torch.cuda.is_available():
        out.update(status="skipped", reason="no CUDA device (torch.cuda.is_available() is False)")
        write(out_dir, out)
        print(f"no CUDA device: skipped (torch {torch.__version__}, torch.cuda.is_available() is False); "
              f"wrote {out_dir / 'gpu_checks.json'}")
        return 0
    print_plan(kept, dropped, fixed, args)
    try:
        measure(args, kept, dropped, out, out_dir, started)
    except KeyboardInterrupt:
        out.update(status="interrupted")
        write(out_dir, out)
        raise
    print(f"wrote {out_dir / 'gpu_checks.json'} and gpu_checks.md ({time.perf_counter() - started:.0f} s)")
    return 0


def measure(args, kept: list[Cell], dropped: list[Cell], out: dict, out_dir: Path, started: float) -> None:
    import torchvision

    from pfp_deploy.bench import compare_latency, hardware_fingerprint
    from pfp_deploy.errors import RuntimeUnavailableError
    from pfp_deploy.pruning import prune
    from pfp_deploy.runtimes import make_runner

    device = args.device

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    out.update(gpu=torch.cuda.get_device_name(0) if device == "cuda" else None, device=device,
               hardware=hardware_fingerprint(), models={},
               # fp32 convolutions use TF32 tensor cores when this is on (torch's default for cuDNN)
               tf32={"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
               cells=[asdict(c) for c in kept + dropped])
    write(out_dir, out)

    def elapsed() -> float:
        return time.perf_counter() - started

    torch.manual_seed(0)
    shape = (1, 3, args.size, args.size)
    dense = torchvision.models.get_model(args.arch, weights=None).to(device).eval()
    example = torch.randn(*shape, device=device)
    calibration = [torch.randn(min(50, args.calibration - i), *shape[1:], device=device)
                   for i in range(0, args.calibration, 50)]
    models: dict[Any, torch.nn.Module] = {"dense": dense}
    sensitivities = None
    for round_to in args.round_to:
        if round_to != args.round_to[0] and not any(c.round_to == round_to for c in kept):
            continue  # the budget dropped every cell of this model
        sync()
        t0 = time.perf_counter()
        kwargs = {"sensitivities": sensitivities, "reconstruct": "none"} if sensitivities is not None else {}
        if args.allocation:
            kwargs["allocation"] = args.allocation
        result = prune(dense, calibration if sensitivities is None else [], example, keep=args.keep,
                       round_to=round_to, **kwargs)
        sync()
        seconds = time.perf_counter() - t0
        sensitivities = sensitivities if sensitivities is not None else result.sensitivities
        rep = result.report
        models[round_to] = result.model.to(device).eval()
        out["models"][str(round_to)] = {
            "achieved": rep["achieved"], "macs_before": rep["macs_before"], "macs_after": rep["macs_after"],
            "macs_ratio": rep["macs_before"] / rep["macs_after"],
            # the first prune() is the whole call (sensitivities + allocation + removal + reconstruction)
            "prune_seconds": seconds if round_to == args.round_to[0] else None, "prune_phases": rep.get("seconds")}
        print(json.dumps({"round_to": round_to, **out["models"][str(round_to)]}, default=str), flush=True)
        write(out_dir, out)
    del calibration
    if device == "cuda":
        torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = device == "cuda"  # after pruning (autotuning every pruned shape slows prune())

    onnx_files: dict[Any, Path] = {}

    def onnx_of(key) -> Path:
        from pfp_deploy.export import export_onnx

        if key not in onnx_files:
            path = out_dir / "onnx" / f"{key}.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's notes; a failure still raises
                onnx_files[key] = export_onnx(copy.deepcopy(models[key]).cpu().float(), torch.randn(*shape), path)
        return onnx_files[key]

    runners: dict[tuple, Any] = {}
    last_use: dict[tuple, int] = {}
    keys_of = []
    for i, cell in enumerate(kept):
        keys = [(m, cell.runtime, cell.mode, cell.precision) for m in ("dense", cell.round_to)]
        keys_of.append(keys)
        for key in keys:
            last_use[key] = i

    def runner(key):
        model_key, runtime, mode, precision = key
        if key not in runners:
            if runtime == "torch":
                runners[key] = make_runner("torch", model=models[model_key], device=device, precision=precision,
                                           graph=mode == "graph", memory_format=args.memory_format)
            else:
                if mode not in out["ort_providers"]:  # before exporting anything
                    raise RuntimeUnavailableError(f"{mode} not in onnxruntime {out['onnxruntime']}'s providers "
                                                  f"({', '.join(out['ort_providers']) or 'onnxruntime not installed'})")
                runners[key] = make_runner("onnxruntime", onnx_path=onnx_of(model_key), provider=mode,
                                           precision=precision)
        return runners[key]

    for i, cell in enumerate(kept):
        if elapsed() + cell.estimate_s > args.budget_s:
            cell.status, cell.reason = "skipped", f"budget: {elapsed():.0f} s used of --budget-s {args.budget_s:.0f}"
        else:
            try:
                dense_r, pruned_r = (runner(k) for k in keys_of[i])
                x = torch.randn(cell.batch, *shape[1:], generator=torch.Generator().manual_seed(0))
                cmp = compare_latency(dense_r, pruned_r, x, rounds=args.rounds, warmup=args.warmup,
                                      min_runs=args.min_runs, min_time_s=args.min_time_s)
                ratio = out["models"][str(cell.round_to)]["macs_ratio"]
                cell.status = "measured"
                cell.result = {"dense_p50_ms": cmp.dense.p50_ms, "dense_p90_ms": cmp.dense.p90_ms,
                               "pruned_p50_ms": cmp.pruned.p50_ms, "pruned_p90_ms": cmp.pruned.p90_ms,
                               "speedup": cmp.speedup, "round_speedups": cmp.round_speedups, "macs_ratio": ratio,
                               "efficiency": cmp.speedup / ratio, "executed_on": cmp.dense.executed_on,
                               "pruned_executed_on": cmp.pruned.executed_on, "graph": cmp.dense.graph,
                               "memory_format": cmp.dense.memory_format, "dense": cmp.dense.to_dict(),
                               "pruned": cmp.pruned.to_dict()}
            except RuntimeUnavailableError as exc:
                cell.status, cell.reason = "unavailable", str(exc)
            except Exception as exc:  # one failing cell (a capture, an engine build) must not stop the others
                cell.status, cell.reason = "error", f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        print(json.dumps({"cell": cell.label, "status": cell.status, "reason": cell.reason,
                          **{k: v for k, v in cell.result.items() if not isinstance(v, (dict, list))}}), flush=True)
        for key in [k for k in runners if last_use.get(k, -1) <= i]:
            del runners[key]  # frees its captured graphs / session
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        out["cells"] = [asdict(c) for c in kept + dropped]
        out["seconds"] = elapsed()
        write(out_dir, out)
    out["status"] = "finished"
    write(out_dir, out)


if __name__ == "__main__":
    sys.exit(main())
