"""Does PFP keep more accuracy than torch-pruning's criteria? Fashion-MNIST, ResNet-20 and a small VGG.

For every keep ratio (fraction of the dense model's MACs) and method, the dense model is pruned and
measured: top-1 right after pruning, after BatchNorm re-calibration, after a fixed short fine-tune
(same epochs, optimizer and seed for every method), params, MACs, ONNX Runtime CPU p50 latency
(batch 1) and the wall time of the scoring. Methods:

  pfp:deterministic | pfp:randomized | pfp:hybrid     PFP scores + PFP allocation (pfp_deploy.pruning)
  <criterion>:uniform | <criterion>:global            torch-pruning's MetaPruner, same ratio per group /
                                                      one global threshold, pruning_ratio bisected to the
                                                      MAC target
  <criterion>:pfp-alloc                               PFP decides how many channels each group keeps,
                                                      the criterion decides which
  criteria: l1, l2 (group magnitude), bn (BN scale), taylor, fpgm, random

Then the paper's protocol in small: a cascade 0.8 -> 0.65 -> 0.5 -> 0.35 of the dense MACs with
fine-tuning between stages, for PFP and for the best torch-pruning method at the headline ratio.

    python -m benchmarks.compare --quick                  # < 60 s smoke run (tests/test_compare_quick.py)
    python -m benchmarks.compare                          # full run (~1 h on 2 CPU cores)
    python -m benchmarks.compare --models resnet20 --keeps 0.5 --methods pfp:deterministic,l1:global

Dense models are cached in --cache (default .cache/benchmarks/dense); finished cells are appended to
<out>/cells.jsonl, so an interrupted run resumes where it stopped (same settings only);
`--report-only` writes the tables and plots from the cells finished so far.
Outputs: <out>/results.json, <out>/results.md, <out>/accuracy_vs_macs_<model>[_focus].png.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.utils.data import DataLoader, TensorDataset

from pfp_deploy.bench import hardware_fingerprint, make_runner, measure_latency
from pfp_deploy.criteria import get_criterion
from pfp_deploy.criteria._scorer import GroupScorer
from pfp_deploy.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_ROOT,
    FASHION_MNIST_STD,
    count_output_units,
    load_fashion_mnist,
    paper_calibration_size,
    seeded_indices,
)
from pfp_deploy.export import export_onnx
from pfp_deploy.finetune import FinetuneConfig, evaluate, finetune, recalibrate_batchnorm
from pfp_deploy.models import resnet20, vgg_small
from pfp_deploy.report import write_json_atomic

# Benchmark name -> pfp_deploy.criteria name ("bn" predates the registry's "bn_scale"; kept so that
# cells.jsonl rows and the published tables keep their method names).
CRITERIA: dict[str, str] = {"l1": "l1", "l2": "l2", "bn": "bn_scale", "taylor": "taylor", "fpgm": "fpgm",
                            "random": "random"}
PFP_VARIANTS = ("deterministic", "randomized", "hybrid")
ALLOCATIONS = ("uniform", "global", "pfp-alloc")
ALL_METHODS = [f"pfp:{v}" for v in PFP_VARIANTS] + [f"{c}:{a}" for c in CRITERIA for a in ALLOCATIONS]
QUICK_METHODS = ["pfp:deterministic", "pfp:randomized", "l1:uniform", "taylor:global", "bn:pfp-alloc"]
MODELS = {"resnet20": lambda: resnet20(num_classes=10, in_channels=1),
          "vgg_small": lambda: vgg_small(num_classes=10, in_channels=1, image_size=(28, 28))}
CELLS_FORMAT = 1  # bump when a row's meaning changes, so stale cells.jsonl rows are not reused


# ------------------------------------------------------------------------------------------ settings

@dataclass
class Settings:
    out: str = ".cache/benchmarks/compare"
    cache: str = ".cache/benchmarks/dense"
    data_root: str = FASHION_MNIST_ROOT
    models: list[str] = field(default_factory=lambda: list(MODELS))
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    keeps: list[float] = field(default_factory=lambda: [0.7, 0.5, 0.3])
    headline_keep: float = 0.5
    seeds: int = 3  # at the headline keep ratio; the other ratios use seed 0
    train_subset: int = 20000  # dense training images
    test_subset: int = 3000  # every accuracy is on this fixed test subset
    dense_epochs: int = 6
    dense_lr: float = 0.1
    ft_subset: int = 5000  # fine-tune images per cell (a seeded draw, the same for every method)
    ft_epochs: int = 1
    ft_lr: float = 0.01
    batch_size: int = 64
    calib: str = "auto"  # PFP calibration images ("auto": the paper's size); also Taylor's gradient batches
    bn_samples: int = 1024
    mac_tol: float = 0.01  # relative tolerance of the pruning_ratio bisection on MACs
    cascade: bool = True
    cascade_keeps: list[float] = field(default_factory=lambda: [0.8, 0.65, 0.5, 0.35])
    cascade_ft_epochs: int = 1
    cascade_tolerance: float = 0.5  # top-1 points below dense that still count as "no loss"
    latency_threads: int = 1
    latency_min_s: float = 0.5
    onnx_opset: int = 17  # < 18: TorchScript exporter, ~0.2 s instead of ~4 s per file; same ORT graph ops
    threads: int = 2
    report_only: bool = False  # write the outputs from <out>/cells.jsonl, run nothing new
    quick: bool = False

    def cell_key(self) -> str:
        """Hash of everything that changes a cell's numbers (not the list of cells to run)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in ("out", "cache", "models", "methods", "keeps", "headline_keep", "seeds",
                               "cascade", "cascade_keeps", "cascade_ft_epochs", "cascade_tolerance", "quick",
                               "report_only")}
        fields["format"] = CELLS_FORMAT
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


QUICK = dict(out=".cache/benchmarks/compare-quick", models=["resnet20", "vgg_small"], methods=QUICK_METHODS,
             keeps=[0.5], seeds=1, train_subset=512, test_subset=256, dense_epochs=1, ft_subset=256, ft_epochs=1,
             calib="32", bn_samples=256, cascade_keeps=[0.8, 0.5], latency_min_s=0.05)


def parse_args(argv: list[str] | None = None) -> Settings:
    defaults = Settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 60 s); explicit flags still win")
    floats = lambda s: [float(v) for v in s.split(",") if v]  # noqa: E731
    names = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    for f in dataclasses.fields(Settings):
        if f.name == "quick":
            continue
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if f.name == "report_only":
            p.add_argument(flag, action="store_true", default=None, help="tables and plots from "
                           "<out>/cells.jsonl (a run in progress or interrupted); runs no new cell, no cascade")
        elif f.name == "cascade":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(default, list):
            kind = floats if default and isinstance(default[0], float) else names
            p.add_argument(flag, type=kind, default=None, help=f"comma list (default {','.join(map(str, default))})")
        else:
            p.add_argument(flag, type=type(default), default=None, help=f"(default {default})")
    args = p.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "quick"})
    settings = Settings(**values, quick=args.quick)
    for method in settings.methods:
        if method not in ALL_METHODS:
            p.error(f"unknown method {method!r}; valid: {', '.join(ALL_METHODS)}")
    for model in settings.models:
        if model not in MODELS:
            p.error(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
    return settings


# ---------------------------------------------------------------------------------------------- data

@dataclass
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_loader: DataLoader
    example: torch.Tensor  # one real test image, [1, 1, 28, 28]

    def subset(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor(seeded_indices(len(self.train_y), min(n, len(self.train_y)), seed))
        return self.train_x[idx], self.train_y[idx]

    def loader(self, n: int, seed: int, batch_size: int, shuffle: bool) -> DataLoader:
        x, y = self.subset(n, seed)
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator,
                          drop_last=shuffle and len(y) > batch_size)  # no size-1 BatchNorm batch


def load_data(s: Settings) -> Data:
    def prepare(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = load_fashion_mnist(s.data_root, split)
        x = (images.float().div(255).unsqueeze(1) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        return x, labels.long()

    train_x, train_y = prepare("train")
    test_x, test_y = prepare("test")
    keep = torch.tensor(seeded_indices(len(test_y), min(s.test_subset, len(test_y)), 12345))
    test = TensorDataset(test_x[keep], test_y[keep])
    return Data(train_x, train_y, DataLoader(test, batch_size=512), test_x[:1].clone())


def top1(model: nn.Module, data: Data) -> float:
    return 100.0 * evaluate(model, data.test_loader, topk=(1,))["top1"]


# ---------------------------------------------------------------------------------------- dense models

def dense_model(name: str, s: Settings, data: Data, log: Callable[[str], None]) -> tuple[nn.Module, dict]:
    """Train the dense model once and cache it; the cache key holds every setting that changes it."""
    recipe = dict(model=name, train_subset=s.train_subset, epochs=s.dense_epochs, lr=s.dense_lr,
                  batch_size=128, seed=0, data_root=s.data_root, weight_decay=5e-4)
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(s.cache) / f"{name}-{key}.pt"
    torch.manual_seed(0)
    model = MODELS[name]()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        log(f"dense {name}: loaded {path}")
        return model.eval(), {"checkpoint": str(path), "train_seconds": None, "recipe": recipe}
    started = time.perf_counter()
    cfg = FinetuneConfig(epochs=s.dense_epochs, optimizer={"lr": s.dense_lr, "momentum": 0.9, "weight_decay": 5e-4},
                         scheduler="cosine", warmup_epochs=min(1.0, s.dense_epochs / 4), seed=0, amp=False)
    finetune(model, data.loader(s.train_subset, 0, 128, shuffle=True), None, cfg, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    seconds = time.perf_counter() - started
    log(f"dense {name}: trained {s.dense_epochs} epochs on {s.train_subset} images in {seconds:.0f} s -> {path}")
    return model.eval(), {"checkpoint": str(path), "train_seconds": seconds, "recipe": recipe}


def count(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def output_layer(model: nn.Module) -> nn.Module:
    """The classifier (last Linear): its outputs are the classes, never pruned."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


# -------------------------------------------------------------------------------------------- scoring

def make_scorer(criterion: str, model: nn.Module, calibration: list, seed: int, need_vector: bool) -> GroupScorer:
    """The registry's scorer for a benchmark criterion (pfp_deploy.criteria; GroupScorer explains the
    caching, seeding and gradient lending). need_vector=False: None where the criterion has nothing
    to say (BN scale without BatchNorm), which MetaPruner leaves alone; PFP's allocation needs a ranking."""
    scorer = get_criterion(CRITERIA[criterion]).importance(model, calibration, seed)
    scorer.need_vector = need_vector
    return scorer


# -------------------------------------------------------------------------------------------- pruning

def tp_prune(model: nn.Module, example: torch.Tensor, scorer: GroupScorer, keep: float, global_pruning: bool,
             tol: float, max_iter: int = 16) -> tuple[nn.Module, dict]:
    """torch-pruning's MetaPruner with pruning_ratio bisected until MACs are within tol of keep * MACs(model).

    MACs fall with pruning_ratio in steps (whole channels), so the closest ratio found is used when
    no ratio lands inside the tolerance.
    """
    macs_before = count(model, example)[0]
    classifier_name = {m: n for n, m in model.named_modules()}[output_layer(model)]
    lo, hi, best = 0.0, 0.95, None
    for _ in range(max_iter):
        ratio = (lo + hi) / 2
        candidate = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(candidate, example, importance=scorer, global_pruning=global_pruning,
                                      pruning_ratio=ratio, iterative_steps=1,
                                      ignored_layers=[candidate.get_submodule(classifier_name)])
        pruner.step()
        achieved = count(candidate, example)[0] / macs_before
        if best is None or abs(achieved - keep) < abs(best[1] - keep):
            best = (candidate, achieved, ratio)
        if abs(achieved - keep) <= tol * keep:
            break
        lo, hi = (ratio, hi) if achieved > keep else (lo, ratio)
    candidate, achieved, ratio = best
    return candidate, {"pruning_ratio": ratio, "achieved_vs_input": achieved}


def pfp_prune_fn() -> Callable | None:
    """pfp_deploy.pruning.prune, or None while that module does not exist yet."""
    try:
        return importlib.import_module("pfp_deploy.pruning").prune
    except (ImportError, AttributeError):
        return None


def prune(method: str, model: nn.Module, data: Data, calibration: list, keep: float, seed: int, s: Settings,
          shared: dict | None = None) -> tuple[nn.Module, dict]:
    """Prune `model` to keep * its MACs with `method`; returns (new model, info with score_s / prune_s).

    `shared` (one dict per model and calibration set) lets PFP's variants and the pfp-alloc cells
    reuse one sensitivity pass; its time is still counted in their score_s and prune_s, as if
    each had computed it.
    """
    criterion, kind = method.split(":")
    started = time.perf_counter()
    info: dict[str, Any] = {}
    if criterion == "pfp" or kind == "pfp-alloc":
        pfp_prune = pfp_prune_fn()
        if pfp_prune is None:
            raise RuntimeError("pfp_deploy.pruning.prune is not available yet")
        shared = {} if shared is None else shared
        scorer = make_scorer(criterion, model, calibration, seed, need_vector=True) if criterion != "pfp" else None
        # The published §5 tables: the paper's allocation, no reconstruction (to be rerun with the new defaults).
        result = pfp_prune(model, calibration, data.example, keep=keep, metric="macs",
                           variant=kind if criterion == "pfp" else "deterministic", seed=seed, importance=scorer,
                           sensitivities=shared.get("sensitivities"), allocation="paper", reconstruct="none")
        pruned, report = result.model, dict(result.report)
        if "sensitivities" not in shared:
            shared["sensitivities"] = result.sensitivities
            shared["seconds"] = float((report.get("seconds") or {}).get("sensitivity") or 0.0)
            reused = 0.0
        else:
            reused = shared["seconds"]
        info["pfp_report"] = {k: v for k, v in report.items() if k not in ("groups",)}
        info["widths"] = [g["width_after"] for g in report.get("groups", [])]
        info["epsilon"] = report.get("epsilon")
        # PFP's sensitivity pass decides how many channels (allocation); the criterion, which ones.
        info["score_s"] = shared["seconds"] + (scorer.seconds if scorer else 0.0)
    else:
        scorer = make_scorer(criterion, model, calibration, seed, need_vector=False)
        pruned, info = tp_prune(model, data.example, scorer, keep, kind == "global", s.mac_tol)
        info["score_s"] = scorer.seconds
        reused = 0.0
    info["prune_s"] = time.perf_counter() - started + reused
    return pruned.eval(), info


# ---------------------------------------------------------------------------------------- measurement

class LatencyMeter:
    """ORT CPU p50 (batch 1) per architecture; models with the same layer shapes share one ONNX file.

    Each cell is timed when it finishes, but a long run on a shared host drifts, so `sweep` times
    every file again at the end, round-robin, and keeps the median over rounds: numbers that can be
    compared row to row.
    """

    def __init__(self, s: Settings, example: torch.Tensor):
        self.s, self.example, self.dir = s, example, Path(s.out) / "onnx"
        self.cache: dict[str, float] = {}

    def __call__(self, model: nn.Module, tag: str) -> tuple[float, str]:
        """(p50 ms, ONNX file name) for `model`."""
        shapes = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
        name = f"{tag}-{hashlib.sha1(repr((tag, shapes)).encode()).hexdigest()[:12]}.onnx"
        if name not in self.cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # exporter chatter; the file is checked by export_onnx
                export_onnx(model, self.example, self.dir / name, opset=self.s.onnx_opset)
            self.cache[name] = self.time(name, self.s.latency_min_s)
        return self.cache[name], name

    def time(self, name: str, min_time_s: float) -> float:
        runner = make_runner("onnxruntime", onnx_path=self.dir / name, threads=self.s.latency_threads)
        return measure_latency(runner, self.example, warmup=10, min_runs=30, min_time_s=min_time_s).p50_ms

    def sweep(self, names: set[str], rounds: int = 3) -> dict[str, float]:
        """Median over `rounds` round-robin passes of every file's p50."""
        names = sorted(n for n in names if (self.dir / n).is_file())
        samples: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(rounds):
            for n in names:
                samples[n].append(self.time(n, self.s.latency_min_s / 2))
        return {n: statistics.median(v) for n, v in samples.items()}


def finetune_cfg(s: Settings, seed: int, epochs: int) -> FinetuneConfig:
    return FinetuneConfig(epochs=epochs, optimizer={"lr": s.ft_lr, "momentum": 0.9, "weight_decay": 5e-4},
                          scheduler="cosine", seed=seed, amp=False)


def calibration_batches(s: Settings, data: Data, dense: nn.Module, seed: int) -> list:
    n = (paper_calibration_size(count_output_units(dense, data.example)) if s.calib == "auto" else int(s.calib))
    x, y = data.subset(n, 1000 + seed)  # its own draw, different from the fine-tune draw
    return list(zip(x.split(s.batch_size), y.split(s.batch_size)))


def run_cell(model_name: str, method: str, keep: float, seed: int, dense: nn.Module, dense_cost: tuple[int, int],
             data: Data, s: Settings, latency: LatencyMeter, shared: dict | None = None) -> dict:
    """Prune -> top-1 -> BN re-calibration -> top-1 -> fine-tune -> top-1, plus cost and latency."""
    torch.manual_seed(seed)
    calibration = calibration_batches(s, data, dense, seed)
    pruned, info = prune(method, dense, data, calibration, keep, seed, s, shared)
    macs, params = count(pruned, data.example)
    row = {"model": model_name, "method": method, "criterion": method.split(":")[0],
           "allocation": "pfp" if method.startswith("pfp:") else method.split(":")[1],
           "keep_target": keep, "seed": seed, "macs": macs, "params": params,
           "macs_ratio": macs / dense_cost[0], "params_ratio": params / dense_cost[1],
           "calibration_images": sum(len(y) for _, y in calibration), **info}
    row["top1_pruned"] = top1(pruned, data)
    recalibrate_batchnorm(pruned, data.loader(s.bn_samples, 2000 + seed, s.batch_size, shuffle=False),
                          s.bn_samples)
    row["top1_bn"] = top1(pruned, data)
    started = time.perf_counter()
    finetune(pruned, data.loader(s.ft_subset, seed, s.batch_size, shuffle=True), None,
             finetune_cfg(s, seed, s.ft_epochs), progress=False)
    row["finetune_s"] = time.perf_counter() - started
    row["top1_ft"] = top1(pruned.eval(), data)
    row["latency_p50_ms"], row["onnx_file"] = latency(pruned, model_name)
    return row


# -------------------------------------------------------------------------------------------- cascade

def run_cascade(model_name: str, method: str, dense: nn.Module, dense_cost: tuple[int, int], dense_top1: float,
                data: Data, s: Settings, log: Callable[[str], None]) -> dict:
    """The paper's protocol: prune, fine-tune, re-score the pruned net, prune further (seed 0).

    Keep ratios are relative to the dense model: stage i prunes the current model by target_i / current.
    """
    current, stages, seed = copy.deepcopy(dense), [], 0
    for target in s.cascade_keeps:
        ratio_now = count(current, data.example)[0] / dense_cost[0]
        calibration = calibration_batches(s, data, current, seed)
        current, info = prune(method, current, data, calibration, min(1.0, target / ratio_now), seed, s)
        recalibrate_batchnorm(current, data.loader(s.bn_samples, 2000, s.batch_size, shuffle=False), s.bn_samples)
        finetune(current, data.loader(s.ft_subset, seed + len(stages), s.batch_size, shuffle=True), None,
                 finetune_cfg(s, seed, s.cascade_ft_epochs), progress=False)
        macs, params = count(current, data.example)
        stage = {"target": target, "macs": macs, "params": params, "macs_ratio": macs / dense_cost[0],
                 "top1_ft": top1(current.eval(), data), "score_s": info.get("score_s"), "prune_s": info["prune_s"]}
        stages.append(stage)
        log(f"  cascade {model_name} {method}: target {target:.2f} -> MACs {stage['macs_ratio']:.3f}, "
            f"top-1 {stage['top1_ft']:.2f}")
    ok = [st for st in stages if st["top1_ft"] >= dense_top1 - s.cascade_tolerance]
    best = min(ok, key=lambda st: st["macs"]) if ok else None
    return {"model": model_name, "method": method, "stages": stages, "dense_top1": dense_top1,
            "tolerance": s.cascade_tolerance,
            "smallest_macs_within_tolerance": best["macs"] if best else None,
            "smallest_macs_ratio_within_tolerance": best["macs_ratio"] if best else None}


# -------------------------------------------------------------------------------------------- summary

def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread over seeds per (model, method, keep)."""
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault((row["model"], row["method"], row["keep_target"]), []).append(row)
    out = []
    for (model, method, keep), group in cells.items():
        entry = {"model": model, "method": method, "keep_target": keep, "criterion": group[0]["criterion"],
                 "allocation": group[0]["allocation"], "seeds": sorted(r["seed"] for r in group)}
        for metric in ("top1_pruned", "top1_bn", "top1_ft", "macs_ratio", "params_ratio", "macs", "params",
                       "latency_p50_ms", "score_s", "prune_s", "finetune_s"):
            entry[metric] = spread([r.get(metric) for r in group])
        out.append(entry)
    return out


def fmt_acc(stats: dict) -> str:
    if stats["mean"] is None:
        return "—"
    return f"{stats['mean']:.2f}" + (f" ± {stats['std']:.2f}" if stats["n"] > 1 else "")


def fmt(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def fmt_load(load: Any) -> str:
    return "—" if not load else ", ".join(f"{v:.1f}" for v in load)


def markdown(results: dict) -> str:
    env, s = results["environment"], results["settings"]
    lines = ["# PFP vs torch-pruning criteria on Fashion-MNIST", "",
             f"Command: `{results['command']}`  ",
             f"Machine: {env['cpu_model']}, {env['usable_cores']} usable cores, torch {env['torch']} "
             f"({s['threads']} threads), torch-pruning {results['versions']['torch_pruning']}, "
             f"onnxruntime {env['onnxruntime']}, Python {env['python']}; load average at start / end "
             f"{fmt_load(env.get('load_average_start'))} / {fmt_load(env.get('load_average_end'))}  ",
             f"Wall time: {results['wall_seconds'] / 60:.1f} min. Dense training: {s['train_subset']} images x "
             f"{s['dense_epochs']} epochs; every cell: fine-tune {s['ft_epochs']} epoch(s) on {s['ft_subset']} "
             f"images (SGD lr {s['ft_lr']}, cosine, batch {s['batch_size']}); top-1 on a fixed "
             f"{s['test_subset']}-image test subset; ONNX Runtime CPU p50 at batch 1, "
             f"{s['latency_threads']} thread(s). MACs counted by tp.utils.count_ops_and_params.", ""]
    if results.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in results["notes"]] + [""]
    lines += ["## Dense models", "", "| model | top-1 | MACs | params | ORT p50 ms |", "|---|---|---|---|---|"]
    for name, d in results["dense"].items():
        lines.append(f"| {name} | {d['top1']:.2f} | {d['macs'] / 1e6:.2f} M | {d['params'] / 1e3:.1f} K | "
                     f"{fmt(d['latency_p50_ms'], 3)} |")
    summary = results["summary"]
    for model in results["dense"]:
        dense_top1 = results["dense"][model]["top1"]
        for keep in sorted({e["keep_target"] for e in summary if e["model"] == model}, reverse=True):
            entries = sorted([e for e in summary if e["model"] == model and e["keep_target"] == keep],
                             key=lambda e: -(e["top1_ft"]["mean"] or -1))
            seeds = max(len(e["seeds"]) for e in entries)
            lines += ["", f"## {model}, keep {keep:.2f} of MACs"
                      + (f" ({seeds} seeds: mean ± std)" if seeds > 1 else " (seed 0)"),
                      f"Dense top-1 {dense_top1:.2f}. Sorted by top-1 after fine-tuning.", "",
                      "| method | MACs kept | params kept | top-1 pruned | + BN recal | + fine-tune | ORT p50 ms "
                      "| scoring s | prune s |", "|---|---|---|---|---|---|---|---|---|"]
            for e in entries:
                lines.append(f"| {e['method']} | {fmt(e['macs_ratio']['mean'], 3)} | {fmt(e['params_ratio']['mean'], 3)} "
                             f"| {fmt_acc(e['top1_pruned'])} | {fmt_acc(e['top1_bn'])} | {fmt_acc(e['top1_ft'])} "
                             f"| {fmt(e['latency_p50_ms']['mean'], 3)} | {fmt(e['score_s']['mean'], 2)} "
                             f"| {fmt(e['prune_s']['mean'], 1)} |")
            lines += criterion_allocation_table(entries)
    if results.get("cascade"):
        lines += ["", "## Cascade (paper protocol, seed 0)", "",
                  f"Fine-tune {s['cascade_ft_epochs']} epoch(s) between stages; a stage counts when its top-1 "
                  f"is within {s['cascade_tolerance']} points of dense.", "",
                  "| model | method | stages: MACs kept -> top-1 | smallest MACs kept within tolerance |",
                  "|---|---|---|---|"]
        for c in results["cascade"]:
            stages = "; ".join(f"{st['macs_ratio']:.2f} -> {st['top1_ft']:.2f}" for st in c["stages"])
            best = c["smallest_macs_ratio_within_tolerance"]
            lines.append(f"| {c['model']} (dense {c['dense_top1']:.2f}) | {c['method']} | {stages} | "
                         f"{'none' if best is None else f'{best:.3f}'} |")
    if results.get("failures"):
        lines += ["", "## Failed cells", ""] + [f"- {f['model']} {f['method']} keep {f['keep_target']} seed "
                                                f"{f['seed']}: {f['error']}" for f in results["failures"]]
    return "\n".join(lines) + "\n"


def criterion_allocation_table(entries: list[dict]) -> list[str]:
    """Top-1 after fine-tuning: criterion (rows) x allocation (columns), to separate the two effects."""
    by = {(e["criterion"], e["allocation"]): e for e in entries}
    criteria = [c for c in CRITERIA if any((c, a) in by for a in ALLOCATIONS)]
    if not criteria:
        return []
    lines = ["", "Top-1 after fine-tuning, criterion x allocation:", "",
             "| criterion | uniform | global | PFP allocation |", "|---|---|---|---|"]
    for c in criteria:
        lines.append(f"| {c} | " + " | ".join(fmt_acc(by[(c, a)]["top1_ft"]) if (c, a) in by else "—"
                                                for a in ALLOCATIONS) + " |")
    pfp = [e for e in entries if e["criterion"] == "pfp"]
    if pfp:
        lines.append("| pfp (own scores) | — | — | " + ", ".join(f"{e['method'].split(':')[1]} {fmt_acc(e['top1_ft'])}"
                                                           for e in pfp) + " |")
    return lines


def plot(summary: list[dict], dense: dict, out: Path, headline_keep: float) -> list[str]:
    """Top-1 after fine-tuning vs MACs kept, one line per method, one PNG per model; plus a
    `_focus` PNG with PFP's variants against the best torch-pruning method (and its criterion under
    PFP's allocation, and random:uniform as the floor), which stays readable."""
    try:
        from pfp_deploy.report import plot_accuracy_vs_macs
    except ImportError:
        plot_accuracy_vs_macs = plot_fallback
    files = []
    for model, d in dense.items():
        rows = [{"method": e["method"], "macs_ratio": e["macs_ratio"]["mean"], "top1": e["top1_ft"]["mean"]}
                for e in summary if e["model"] == model]
        rows += [{"method": m, "macs_ratio": 1.0, "top1": d["top1"]} for m in {r["method"] for r in rows}]
        best = best_tp_method(summary, model, headline_keep)
        focus = {f"pfp:{v}" for v in PFP_VARIANTS} | {"random:uniform"}
        if best:
            focus |= {best, best.split(":")[0] + ":pfp-alloc"}
        for suffix, chosen in (("", rows), ("_focus", [r for r in rows if r["method"] in focus])):
            path = out / f"accuracy_vs_macs_{model}{suffix}.png"
            plot_accuracy_vs_macs(chosen, path, f"{model} on Fashion-MNIST: top-1 after fine-tuning",
                                  xlabel="MACs kept (fraction of dense)")
            files.append(str(path))
    return files


def plot_fallback(rows: list[dict], path: Path, title: str, xlabel: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["macs_ratio"], r["top1"]) for r in rows if r["method"] == method and r["top1"] is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set(xlabel=xlabel, ylabel="top-1 (%)", title=title)
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main

def cell_plan(s: Settings, pfp_available: bool) -> list[tuple[str, str, float, int]]:
    plan = []
    for model in s.models:
        for keep in s.keeps:
            seeds = range(s.seeds) if math.isclose(keep, s.headline_keep) else range(1)
            for seed in seeds:
                for method in s.methods:
                    needs_pfp = method.startswith("pfp:") or method.endswith(":pfp-alloc")
                    if pfp_available or not needs_pfp:
                        plan.append((model, method, keep, seed))
    return plan


def resweep_latency(rows: list[dict], dense_info: dict, latency: LatencyMeter, notes: list[str],
                    log: Callable[[str], None]) -> None:
    """Replace each cell's latency by the end-of-run round-robin median (the cell's own is kept)."""
    timed = [r for r in rows if r.get("onnx_file")] + list(dense_info.values())
    started = time.perf_counter()
    medians = latency.sweep({r["onnx_file"] for r in timed})
    for r in timed:
        if r["onnx_file"] in medians:
            r["latency_p50_ms_at_cell"] = r.get("latency_p50_ms_at_cell", r["latency_p50_ms"])
            r["latency_p50_ms"] = medians[r["onnx_file"]]
    untimed = len(rows) + len(dense_info) - sum(r["onnx_file"] in medians for r in timed)
    if untimed:
        notes.append(f"{untimed} rows kept the latency measured when their cell ran (no ONNX file to re-time).")
    log(f"latency sweep: {len(medians)} ONNX files x 3 rounds in {time.perf_counter() - started:.0f} s")


def best_tp_method(summary: list[dict], model: str, keep: float) -> str | None:
    """The torch-pruning method (its own pruner: uniform or global) with the best mean top-1 after fine-tuning."""
    candidates = [e for e in summary if e["model"] == model and math.isclose(e["keep_target"], keep)
                  and e["allocation"] in ("uniform", "global") and e["top1_ft"]["mean"] is not None]
    return max(candidates, key=lambda e: e["top1_ft"]["mean"])["method"] if candidates else None


def main(argv: list[str] | None = None) -> dict:
    s = parse_args(argv)
    torch.set_num_threads(s.threads)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    command = " ".join(["python -m benchmarks.compare"] + (sys.argv[1:] if argv is None else list(argv)))
    env = hardware_fingerprint()
    env["load_average_start"] = os.getloadavg()  # other jobs on the host slow every timing down
    tp_version = importlib.metadata.version("torch-pruning")

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    log(f"command: {command}")
    log(f"machine: {env['cpu_model']}, {env['usable_cores']} usable cores; torch {torch.__version__}, "
        f"torch-pruning {tp_version}, onnxruntime {env['onnxruntime']}, load average {env['load_average_start']}")
    notes = []
    pfp_available = pfp_prune_fn() is not None
    if not pfp_available:
        notes.append("pfp_deploy.pruning.prune was not available: PFP methods and pfp-alloc cells were skipped.")
        log("WARNING: " + notes[-1])

    data = load_data(s)
    latency = LatencyMeter(s, data.example)
    dense_models, dense_info = {}, {}
    for name in s.models:
        model, info = dense_model(name, s, data, log)
        macs, params = count(model, data.example)
        dense_models[name] = model
        p50, onnx_file = latency(model, name)
        dense_info[name] = {**info, "top1": top1(model, data), "macs": macs, "params": params,
                            "latency_p50_ms": p50, "onnx_file": onnx_file}
        log(f"dense {name}: top-1 {dense_info[name]['top1']:.2f}, MACs {macs / 1e6:.2f} M, params {params}")

    # Finished cells from an earlier run with the same settings are reused (resume after interruption).
    cells_path, key = out / "cells.jsonl", s.cell_key()
    done = {}
    if cells_path.exists():
        for line in cells_path.read_text().splitlines():
            row = json.loads(line)
            if row.get("settings_key") == key:
                done[(row["model"], row["method"], row["keep_target"], row["seed"])] = row
    rows, failures = [], []
    shared_sensitivities: dict[tuple, dict] = {}  # per (model, seed): the calibration set is the same
    plan = cell_plan(s, pfp_available)
    for i, (model, method, keep, seed) in enumerate(plan, 1):
        if (model, method, keep, seed) in done:
            rows.append(done[(model, method, keep, seed)])
            continue
        if s.report_only:
            continue
        try:
            row = run_cell(model, method, keep, seed, dense_models[model],
                           (dense_info[model]["macs"], dense_info[model]["params"]), data, s, latency,
                           shared_sensitivities.setdefault((model, seed), {}))
        except Exception as exc:  # noqa: BLE001 - one broken cell must not lose an hour of others
            failures.append({"model": model, "method": method, "keep_target": keep, "seed": seed,
                             "error": f"{type(exc).__name__}: {exc}"})
            log(f"[{i}/{len(plan)}] FAILED {model} {method} keep {keep} seed {seed}: {failures[-1]['error']}")
            continue
        row["settings_key"] = key
        rows.append(row)
        with cells_path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        log(f"[{i}/{len(plan)}] {model} {method} keep {keep} seed {seed}: MACs {row['macs_ratio']:.3f}, top-1 "
            f"{row['top1_pruned']:.2f} / bn {row['top1_bn']:.2f} / ft {row['top1_ft']:.2f}, "
            f"p50 {row['latency_p50_ms']:.3f} ms, score {fmt(row['score_s'])} s, prune {row['prune_s']:.1f} s")
    resweep_latency(rows, dense_info, latency, notes, log)
    summary = summarise(rows)

    cascades = []
    if s.report_only:
        notes.append(f"--report-only: {len(rows)} of {len(plan)} cells finished so far; no cascade.")
    elif s.cascade:
        for model in s.models:
            methods = (["pfp:deterministic"] if pfp_available else []) + [best_tp_method(summary, model, s.headline_keep)
                                                                         or "l1:global"]
            for method in methods:
                try:
                    cascades.append(run_cascade(model, method, dense_models[model],
                                                (dense_info[model]["macs"], dense_info[model]["params"]),
                                                dense_info[model]["top1"], data, s, log))
                except Exception as exc:  # noqa: BLE001
                    failures.append({"model": model, "method": f"cascade {method}", "keep_target": None,
                                     "seed": 0, "error": f"{type(exc).__name__}: {exc}"})
                    log(f"FAILED cascade {model} {method}: {failures[-1]['error']}")

    results = {"command": command, "environment": env, "settings": dataclasses.asdict(s),
               "versions": {"torch": torch.__version__, "torch_pruning": tp_version,
                            "onnxruntime": env["onnxruntime"]},
               "dense": dense_info, "rows": rows, "summary": summary, "cascade": cascades,
               "failures": failures, "notes": notes, "wall_seconds": time.perf_counter() - started}
    env["load_average_end"] = os.getloadavg()
    results["plots"] = plot(summary, dense_info, out, s.headline_keep)
    results["wall_seconds"] = time.perf_counter() - started
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text(markdown(results))
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {', '.join(results['plots'])}")
    return results


if __name__ == "__main__":
    main()
