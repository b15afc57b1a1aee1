"""Does pruning to X % of the MACs make the exported model X % as slow? Dense vs PFP-pruned latency.

A torchvision model (random init: latency does not depend on the weights) is pruned with PFP to
--keep of its MACs once per --round-to value (1 = no rounding, the recipe default), using the same
sensitivities (computed once on a few random-normal calibration images). The dense model and every
pruned one are exported to ONNX (opset 18, one file, dynamic batch like the recipe default) and to
OpenVINO IR (FP32). Then, on ONNX Runtime CPU and OpenVINO CPU at batch 1 (--threads intra-op
threads; OpenVINO INFERENCE_NUM_THREADS and PERFORMANCE_HINT=LATENCY), each pruned model is timed
against the dense one in interleaved blocks (pfp_deploy.bench.compare_latency), which keeps a shared,
noisy host fair to both. Reported per runtime and round_to:

    dense / pruned p50 and p90 (ms)       pooled over all rounds
    speed-up                              median over rounds of dense_p50 / pruned_p50 (paired)
    MACs ratio                            dense MACs / pruned MACs (torch-pruning's counter)
    efficiency = speed-up / MACs ratio    1.0: latency falls exactly as the MACs do

--passes N repeats the whole sweep N times (variant order rotated each pass) and reports the median
over passes plus the per-pass values, to show the spread.

    python -m benchmarks.latency --arch resnet50 --size 224 --threads 2 --keep 0.5 \\
        --round-to 1 8 16 32 --out .cache/benchmarks/latency.json
    python -m benchmarks.latency --arch resnet18 --size 64 --round-to 8 --rounds 3 --min-time-s 1   # quick

Exported files go to --work-dir (default: next to --out); --reuse skips pruning/export when the files
for the same settings are already there (e.g. to repeat only the measurement).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

from pfp_deploy.bench import compare_latency
from pfp_deploy.environment import hardware_fingerprint, package_version
from pfp_deploy.export import export_onnx, export_openvino
from pfp_deploy.pruning import count_cost, prune
from pfp_deploy.runtimes import make_runner

RUNTIME_LABEL = {"onnxruntime": "ORT CPU", "openvino": "OpenVINO CPU"}
GOAL_EFFICIENCY = 0.9


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _versions() -> dict:
    names = ("torch", "torchvision", "onnx", "onnxruntime", "openvino", "torch-pruning", "numpy", "pfp-deploy")
    return {name: package_version(name) for name in names}


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _variant_name(round_to: int) -> str:
    return f"round_to={round_to}"


def _width_stats(widths: list[int]) -> dict:
    n = len(widths)
    return {f"multiple_of_{m}": sum(w % m == 0 for w in widths) / n for m in (8, 16, 32)} | {"groups": n}


def _settings_key(args, round_to) -> str:
    key = json.dumps({"arch": args.arch, "size": args.size, "keep": args.keep, "seed": args.seed,
                      "calib": args.calib_images, "round_to": round_to, "opset": args.opset,
                      "dynamic_batch": not args.static_batch, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _export(model: torch.nn.Module, example: torch.Tensor, stem: Path, args) -> dict:
    onnx_path = stem.with_suffix(".onnx")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter; failures still raise
        export_onnx(model, example, onnx_path, opset=args.opset, dynamic_batch=not args.static_batch)
    t1 = time.perf_counter()
    xml = export_openvino(onnx_path, None, stem.parent / f"{stem.name}_openvino", fp16=False)
    t2 = time.perf_counter()
    return {"onnx": str(onnx_path), "openvino_xml": str(xml), "onnx_mb": round(onnx_path.stat().st_size / 2**20, 2),
            "export_s": {"onnx": round(t1 - t0, 1), "openvino": round(t2 - t1, 1)}}


def build_models(args, work: Path) -> dict:
    """Prune (once per round_to) and export; returns {variant: info} with 'dense' first."""
    torch.manual_seed(args.seed)
    model = torchvision.models.get_model(args.arch, weights=None).eval()
    example = torch.randn(1, 3, args.size, args.size)
    meta_path = work / "models.json"
    cached = json.loads(meta_path.read_text()) if args.reuse and meta_path.is_file() else {}

    def usable(entry: dict | None, key: str) -> bool:
        return bool(entry) and entry.get("key") == key and Path(entry["onnx"]).is_file() \
            and Path(entry["openvino_xml"]).is_file()

    models: dict[str, dict] = {}
    key = _settings_key(args, "dense")
    if usable(cached.get("dense"), key):
        models["dense"] = cached["dense"]
        log("dense: reusing exported files")
    else:
        macs, params = count_cost(model, example)
        log(f"dense: {macs / 1e9:.3f} GMACs, {params / 1e6:.2f} M params; exporting")
        models["dense"] = {"key": key, "round_to": None, "macs": macs, "params": params,
                           **_export(model, example, work / "dense", args)}
    sens = None
    for round_to in args.round_to:
        name = _variant_name(round_to)
        key = _settings_key(args, round_to)
        if usable(cached.get(name), key):
            models[name] = cached[name]
            log(f"{name}: reusing exported files")
            continue
        if sens is None:
            torch.manual_seed(args.seed + 1)
            calib = torch.randn(args.calib_images, 3, args.size, args.size)
            batches = [calib[i:i + args.calib_batch] for i in range(0, args.calib_images, args.calib_batch)]
            log(f"sensitivities on {args.calib_images} random-normal images (computed once for all round_to)")
            t0 = time.perf_counter()
            result = prune(model, batches, example, keep=args.keep, metric="macs", round_to=round_to, seed=args.seed)
            sens = result.sensitivities
            log(f"sensitivities + first prune: {time.perf_counter() - t0:.0f} s")
        else:
            result = prune(model, [], example, keep=args.keep, metric="macs", round_to=round_to, seed=args.seed,
                           sensitivities=sens)
        rep = result.report
        widths = [g["width_after"] for g in rep["groups"]]
        log(f"{name}: achieved {rep['achieved']:.4f} of MACs "
            f"({rep['macs_after'] / 1e9:.3f} GMACs, {rep['params_after'] / 1e6:.2f} M params); exporting")
        models[name] = {"key": key, "round_to": round_to, "macs": rep["macs_after"], "params": rep["params_after"],
                        "achieved": rep["achieved"], "prune_seconds": rep["seconds"], "widths": widths,
                        "width_stats": _width_stats(widths),
                        **_export(result.model, example, work / f"pruned_rt{round_to}", args)}
        # quick sanity: the exported file computes what the pruned torch model computes
        with torch.inference_mode():
            ref = result.model.eval()(example).numpy()
        ort_out = make_runner("onnxruntime", onnx_path=models[name]["onnx"], threads=args.threads).outputs(example)[0]
        models[name]["onnx_max_abs_diff"] = float(np.abs(ort_out - ref).max())
        meta_path.write_text(json.dumps(models | {k: v for k, v in cached.items() if k not in models}, indent=1))
    for name, info in models.items():
        if name != "dense":
            info["macs_ratio"] = models["dense"]["macs"] / info["macs"]
        if "ort_conv_kernels" not in info:
            try:
                info["ort_conv_kernels"] = ort_conv_kernels(info["onnx"], args.threads)
            except Exception as exc:  # diagnostic only: never fail the benchmark on it
                info["ort_conv_kernels"] = {"error": f"{type(exc).__name__}: {exc}"}
    # keep cached variants this run did not ask for, so a later --reuse run still finds them
    meta_path.write_text(json.dumps(models | {k: v for k, v in cached.items() if k not in models}, indent=1))
    return models


def ort_conv_kernels(onnx_path: str, threads: int) -> dict:
    """Conv nodes of the graph ONNX Runtime actually runs (after its CPU optimisations), by kernel.

    ORT's NCHWc transformer puts Convs on MLAS's blocked-layout kernels only when their channel counts
    fit its block size; the rest stay plain (Fused)Conv with layout reorders around them."""
    import tempfile
    from collections import Counter

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(onnx_path, sess_options=options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    ops = Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in graph.node)
    return {"nchwc_conv": ops.get("com.microsoft.nchwc:Conv", 0),
            "plain_conv": sum(v for k, v in ops.items() if k.split(":")[-1] in ("Conv", "FusedConv")
                              and not k.startswith("com.microsoft.nchwc")),
            "reorders": sum(v for k, v in ops.items() if "Reorder" in k), "ops": dict(ops)}


def make_runners(runtime: str, models: dict, threads: int) -> dict:
    runners = {}
    for name, info in models.items():
        if runtime == "onnxruntime":
            runners[name] = make_runner("onnxruntime", onnx_path=info["onnx"], device="CPU", threads=threads)
        else:
            runners[name] = make_runner("openvino", openvino_xml=info["openvino_xml"], device="CPU",
                                        threads=threads, hint="LATENCY")
    return runners


def measure(args, models: dict) -> list[dict]:
    """One row per (runtime, variant, pass)."""
    x = torch.randn(1, 3, args.size, args.size)
    variants = [n for n in models if n != "dense"]
    rows = []
    for runtime in args.runtimes:
        log(f"{runtime}: loading {len(models)} models")
        runners = make_runners(runtime, models, args.threads)
        for p in range(args.passes):
            shift = p % len(variants)
            for name in variants[shift:] + variants[:shift]:  # rotate the order each pass
                t0 = time.perf_counter()
                cmp = compare_latency(runners["dense"], runners[name], x, rounds=args.rounds, warmup=args.warmup,
                                      min_runs=args.min_runs, min_time_s=args.min_time_s)
                ratio = models[name]["macs_ratio"]
                row = {"runtime": runtime, "variant": name, "round_to": models[name]["round_to"], "pass": p,
                       "macs_ratio": ratio, "speedup": cmp.speedup, "efficiency": cmp.speedup / ratio,
                       "dense_p50_ms": cmp.dense.p50_ms, "dense_p90_ms": cmp.dense.p90_ms,
                       "pruned_p50_ms": cmp.pruned.p50_ms, "pruned_p90_ms": cmp.pruned.p90_ms,
                       "p50_ratio": cmp.p50_ratio, "round_speedups": cmp.round_speedups,
                       "comparison": cmp.to_dict(), "seconds": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                log(f"{RUNTIME_LABEL[runtime]:12s} pass {p} {name:12s} dense p50 {cmp.dense.p50_ms:7.2f} ms  "
                    f"pruned p50 {cmp.pruned.p50_ms:7.2f} ms  speed-up {cmp.speedup:.3f} "
                    f"(rounds {min(cmp.round_speedups):.2f}-{max(cmp.round_speedups):.2f})  "
                    f"efficiency {cmp.speedup / ratio:.3f}")
        del runners
    return rows


def summarise(rows: list[dict], models: dict) -> list[dict]:
    """Median over passes per (runtime, variant); keeps the per-pass values and per-round range."""
    out = []
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        for name in [n for n in models if n != "dense"]:
            rs = [r for r in rows if r["runtime"] == runtime and r["variant"] == name]
            if not rs:
                continue
            med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
            rounds = [s for r in rs for s in r["round_speedups"]]
            out.append({
                "runtime": runtime, "variant": name, "round_to": models[name]["round_to"],
                "achieved": models[name]["achieved"], "macs_ratio": models[name]["macs_ratio"],
                "dense_p50_ms": med("dense_p50_ms"), "dense_p90_ms": med("dense_p90_ms"),
                "pruned_p50_ms": med("pruned_p50_ms"), "pruned_p90_ms": med("pruned_p90_ms"),
                "speedup": med("speedup"), "efficiency": med("efficiency"),
                "pass_speedups": [r["speedup"] for r in rs],
                "round_speedup_min": min(rounds), "round_speedup_max": max(rounds),
                "round_speedup_iqr": [float(np.percentile(rounds, 25)), float(np.percentile(rounds, 75))],
                "meets_goal": med("efficiency") >= GOAL_EFFICIENCY,
            })
    return out


def markdown(summary: list[dict], models: dict, passes: int) -> str:
    lines = [
        "| runtime | round_to | MACs kept | MACs ratio | dense p50 / p90 (ms) | pruned p50 / p90 (ms) "
        f"| speed-up (paired) | round range | efficiency | ≥ {GOAL_EFFICIENCY} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for s in summary:
        extra = "" if passes == 1 else " (" + ", ".join(f"{v:.2f}" for v in s["pass_speedups"]) + ")"
        lines.append(
            f"| {RUNTIME_LABEL[s['runtime']]} | {s['round_to']} | {s['achieved']:.1%} | {s['macs_ratio']:.3f} "
            f"| {s['dense_p50_ms']:.1f} / {s['dense_p90_ms']:.1f} | {s['pruned_p50_ms']:.1f} / {s['pruned_p90_ms']:.1f} "
            f"| {s['speedup']:.3f}{extra} | {s['round_speedup_min']:.2f}–{s['round_speedup_max']:.2f} "
            f"| **{s['efficiency']:.3f}** | {'yes' if s['meets_goal'] else 'no'} |")
    lines += ["", "| model | GMACs | M params | ONNX MB | group widths ÷8 / ÷16 / ÷32 "
              "| ORT convs on NCHWc kernels (reorders) |", "|---|---:|---:|---:|---:|---:|"]
    for name, info in models.items():
        ws = info.get("width_stats")
        frac = "–" if ws is None else (f"{ws['multiple_of_8']:.0%} / {ws['multiple_of_16']:.0%} / "
                                       f"{ws['multiple_of_32']:.0%} of {ws['groups']}")
        k = info.get("ort_conv_kernels") or {}
        convs = ("–" if "nchwc_conv" not in k else
                 f"{k['nchwc_conv']} / {k['nchwc_conv'] + k['plain_conv']} ({k['reorders']})")
        lines.append(f"| {name} | {info['macs'] / 1e9:.3f} | {info['params'] / 1e6:.2f} | {info['onnx_mb']} | {frac} "
                     f"| {convs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", help="torchvision model name")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (torch, ORT, OpenVINO)")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of the dense MACs to keep")
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 8, 16, 32],
                        help="round_to values to prune with (1 = no rounding; always added)")
    parser.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino"], choices=list(RUNTIME_LABEL))
    parser.add_argument("--calib-images", type=int, default=8)
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--static-batch", action="store_true", help="export a static batch of 1 (default: dynamic)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved dense/pruned blocks per comparison")
    parser.add_argument("--min-time-s", type=float, default=6.0, help="timed seconds per model per comparison")
    parser.add_argument("--min-runs", type=int, default=30, help="timed calls per model per comparison (at least)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--passes", type=int, default=1, help="repeat the whole measurement sweep")
    parser.add_argument("--out", default=".cache/benchmarks/latency.json")
    parser.add_argument("--work-dir", default=None, help="exported models (default: <out dir>/latency_models/...)")
    parser.add_argument("--reuse", action="store_true", help="reuse exported models of identical settings")
    args = parser.parse_args(argv)
    args.round_to = sorted(set([1] + args.round_to))
    if args.keep <= 0 or args.keep > 1 or min(args.round_to) < 1 or args.passes < 1:
        parser.error("--keep must be in (0, 1], --round-to values >= 1, --passes >= 1")

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    tag = f"{args.arch}_{args.size}px_keep{args.keep:g}{'_static' if args.static_batch else ''}"
    work = Path(args.work_dir) if args.work_dir else out.parent / "latency_models" / tag
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    args_given = argv if argv is not None else sys.argv[1:]
    command = "python -m benchmarks.latency " + " ".join(shlex.quote(a) for a in args_given)

    load_start = _loadavg()
    models = build_models(args, work)
    t_built = time.perf_counter()
    rows = measure(args, models)
    summary = summarise(rows, models)
    table = markdown(summary, models, args.passes)

    result = {
        "benchmark": "latency", "command": command, "arguments": vars(args),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hardware": hardware_fingerprint(), "versions": _versions(),
        "load_average": {"start": load_start, "end": _loadavg()},
        "goal": {"efficiency_at_least": GOAL_EFFICIENCY,
                 "met_per_round_to": {str(rt): all(s["meets_goal"] for s in summary if s["round_to"] == rt)
                                      for rt in args.round_to}},
        "models": models, "summary": summary, "measurements": rows, "table_markdown": table,
        "seconds": {"prune_export": round(t_built - t_start, 1), "measure": round(time.perf_counter() - t_built, 1)},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out)

    hw = result["hardware"]
    print(f"\n{args.arch} @ {args.size}px, batch 1, {args.threads} threads, keep {args.keep:g} of MACs; "
          f"{hw['cpu_model']} ({hw['usable_cores']} usable cores); torch {hw['torch']}, "
          f"onnxruntime {hw['onnxruntime']}, openvino {hw['openvino']}\n")
    print(table)
    print(f"\ngoal efficiency >= {GOAL_EFFICIENCY} on every runtime: "
          + ", ".join(f"round_to={k}: {'met' if v else 'not met'}" for k, v in result["goal"]["met_per_round_to"].items()))
    print(f"wrote {out}  (prune+export {result['seconds']['prune_export']:.0f} s, "
          f"measure {result['seconds']['measure']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
