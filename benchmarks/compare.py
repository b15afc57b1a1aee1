"""Criterion x allocation x reconstruction on Fashion-MNIST: ResNet-20, a small VGG, a small MobileNetV2.

Every cell prunes a dense model to a fraction of its MACs with pfp_deploy.pruning.prune() and measures
the three stages separately:

  top-1 pruned-only    the same plan's channels removed, nothing repaired (no refit)
  top-1 + refit        the same channels, then least-squares refit on the calibration set (closed form)
  top-1 + recon        the refit model after prune()'s calibration distillation (--distill-epochs passes
                       over the same calibration images, KL to the dense model; no other data): the
                       product's whole repair, and what the fine-tune starts from
  top-1 + fine-tune    the +recon model (or the pruned-only one, for the cells marked so) after one
                       fixed short fine-tune: the same epochs, images, optimizer and seed for every method

plus params, MACs and the wall time of each stage (scoring + allocation + removal, reconstruction,
fine-tune). A cell is (model, criterion, allocation, keep, seed):

  criteria     pfp (PFP's sensitivities) and torch-pruning's l1, l2, fpgm, bn_scale, taylor, random
  allocations  paper (PFP's global eps), uniform (one keep ratio per group), cost_aware (the default)

Which cells are fine-tuned: every (criterion, allocation) with reconstruction at the headline keep,
plus pfp/paper/none (the paper's configuration) and l1/uniform/none (torch-pruning's usual one),
at every keep. Seeds vary the calibration sample and the fine-tune order (--seeds, at the headline keep).

    python -m benchmarks.compare --quick            # < 60 s smoke run (tests/test_compare_quick.py)
    python -m benchmarks.compare --dense-only       # train / load the dense models, then stop
    python -m benchmarks.compare                    # the full run of docs/BENCHMARKS.md §5

ResNet-20 is the shipped weights/resnet20_fashion_mnist.pt. The other dense models are trained on all
60k training images with augmentation and cached in --cache (default .cache/benchmarks/dense) with a
JSON card. Finished cells are appended to <out>/cells.jsonl, so an interrupted run resumes where it
stopped (same settings only); `--report-only` writes the tables and plots from the cells so far.
Outputs: <out>/results.json, <out>/results.md, <out>/accuracy_vs_macs_<model>.png.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import platform
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

from pfp_deploy.architectures import BUILTIN_MODELS
from pfp_deploy.bench import hardware_fingerprint
from pfp_deploy.calibration_distill import DEFAULT_EPOCHS as DEFAULT_DISTILL_EPOCHS
from pfp_deploy.calibration_distill import distill_on_calibration
from pfp_deploy.criteria import get_criterion
from pfp_deploy.criteria._scorer import GroupScorer
from pfp_deploy.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_ROOT,
    FASHION_MNIST_STD,
    TensorImages,
    build_data,
    count_output_units,
    load_fashion_mnist,
    paper_calibration_size,
    seeded_indices,
)
from pfp_deploy.finetune import FinetuneConfig, evaluate, finetune
from pfp_deploy.plan import apply_plan
from pfp_deploy.pruning import count_cost
from pfp_deploy.pruning import prune as pfp_prune
from pfp_deploy.recipe import DataConfig, TrainConfig
from pfp_deploy.report import write_json_atomic
from pfp_deploy.schema import DEFAULT_CALIBRATION_SAMPLES

REPO = Path(__file__).resolve().parents[1]
SHIPPED_RESNET20 = REPO / "weights" / "resnet20_fashion_mnist.pt"
CRITERIA = ("pfp", "lsq", "l1", "l2", "fpgm", "bn_scale", "taylor", "random")
ALLOCATIONS = ("paper", "uniform", "cost_aware", "cost_aware_norefit")
MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet20": lambda: BUILTIN_MODELS["resnet20"](num_classes=10, in_channels=1),
    "vgg_small": lambda: BUILTIN_MODELS["vgg_small"](num_classes=10, in_channels=1, image_size=(28, 28)),
    "mobilenetv2_small": lambda: BUILTIN_MODELS["mobilenetv2_small"](num_classes=10, in_channels=1),
}
# Outside the full grid (other seeds, other keeps) only these (criterion, allocation) cells run, plus the
# fine-tuned ones: every criterion under the default allocation, the allocation study on pfp and l2, and
# torch-pruning's usual l1/uniform.
CORE_CELLS = ([(c, a) for a in ("cost_aware", "cost_aware_norefit") for c in CRITERIA]
              + [("pfp", "paper"), ("pfp", "uniform"), ("l2", "paper"), ("l2", "uniform"), ("l1", "uniform"),
                 ("lsq", "uniform")])
# the paper's configuration, torch-pruning's usual one, prune()'s default
REFERENCE_FT = [("pfp", "paper", "none"), ("l1", "uniform", "none"), ("pfp", "cost_aware", "least_squares")]
CELLS_FORMAT = 4  # bump when a row's meaning changes, so stale cells.jsonl rows are not reused


# ------------------------------------------------------------------------------------------ settings

@dataclass
class Settings:
    out: str = ".cache/benchmarks/compare"
    cache: str = ".cache/benchmarks/dense"
    data_root: str = FASHION_MNIST_ROOT
    models: list[str] = field(default_factory=lambda: list(MODELS))
    criteria: list[str] = field(default_factory=lambda: list(CRITERIA))
    allocations: list[str] = field(default_factory=lambda: list(ALLOCATIONS))
    keeps: list[float] = field(default_factory=lambda: [0.7, 0.5, 0.3])
    headline_keep: float = 0.5
    seeds: int = 3  # at the headline keep ratio; the other ratios use seed 0
    full_grid: list[float] = field(default_factory=lambda: [0.5, 0.3])  # keeps whose seed 0 runs every cell
    finetune_cells: str = "answer"  # "answer": the cells listed in the docstring; "all"; "none"
    test_subset: int = 3000  # every accuracy is on this fixed test subset (10000: the whole test set)
    dense_epochs: int = 8  # vgg_small / mobilenetv2_small training (resnet20: the shipped weights)
    dense_lr: float = 0.1
    dense_train_subset: int = 0  # 0: all 60000 training images
    ft_subset: int = 5000  # fine-tune images per cell (a seeded draw, the same for every method)
    ft_epochs: int = 1
    ft_lr: float = 0.01
    ft_distill: bool = False  # distil from the dense model (T 4, alpha 0.5: the quickstart's) while fine-tuning
    ft_augment: bool = False  # fine-tune on augmented images (the product's pad-2 crop + flip; its default is off)
    batch_size: int = 64
    # calibration images per seed, pfp-deploy's default ("auto": the paper's size); also the refit's and Taylor's data
    calib: str = str(DEFAULT_CALIBRATION_SAMPLES)
    distill_epochs: int = DEFAULT_DISTILL_EPOCHS  # calibration distillation after the refit (0: the refit alone)
    tolerance: float = 0.01  # prune(): |achieved - keep| on MACs
    threads: int = 1
    deadline: str = ""  # "HH:MM" (UTC): start no new cell after it; the rest is listed as not run
    dense_only: bool = False  # train / load the dense models, write their cards, stop
    report_only: bool = False  # write the outputs from <out>/cells.jsonl, run nothing new
    quick: bool = False

    def cell_key(self) -> str:
        """Hash of everything that changes a cell's numbers (not the list of cells to run)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in ("out", "cache", "models", "criteria", "allocations", "keeps", "headline_keep",
                               "seeds", "finetune_cells", "full_grid", "quick", "report_only", "dense_only", "threads",
                               "deadline")}
        fields["format"] = CELLS_FORMAT
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


QUICK = dict(out=".cache/benchmarks/compare-quick", cache=".cache/benchmarks/dense-quick",
             models=["resnet20", "mobilenetv2_small"], criteria=["pfp", "l1", "taylor"],
             allocations=["paper", "cost_aware"], keeps=[0.5], full_grid=[0.5], seeds=1, test_subset=256, dense_epochs=0,
             dense_train_subset=512, ft_subset=128, calib="32")


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
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=None)
        elif isinstance(default, list):
            kind = floats if default and isinstance(default[0], float) else names
            p.add_argument(flag, type=kind, default=None, help=f"comma list (default {','.join(map(str, default))})")
        else:
            p.add_argument(flag, type=type(default), default=None, help=f"(default {default})")
    args = p.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "quick"})
    settings = Settings(**values, quick=args.quick)
    for name, valid in (("models", MODELS), ("criteria", CRITERIA), ("allocations", ALLOCATIONS)):
        for value in getattr(settings, name):
            if value not in valid:
                p.error(f"unknown {name[:-1] if name != 'criteria' else 'criterion'} {value!r}; "
                        f"valid: {', '.join(valid)}")
    if settings.finetune_cells not in ("answer", "all", "none"):
        p.error("--finetune-cells: answer, all or none")
    return settings


# ---------------------------------------------------------------------------------------------- data

@dataclass
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_loader: DataLoader
    example: torch.Tensor  # one real test image, [1, 1, 28, 28]
    train_images: torch.Tensor  # the raw uint8 training images [N, 28, 28], for the augmenting dataset

    def indices(self, n: int, seed: int) -> torch.Tensor:
        return torch.tensor(seeded_indices(len(self.train_y), min(n, len(self.train_y)), seed))

    def subset(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(n, seed)
        return self.train_x[idx], self.train_y[idx]

    def loader(self, n: int, seed: int, batch_size: int, shuffle: bool, augment: bool = False) -> DataLoader:
        """A seeded draw of n training images; augment: through the product's own augmenting dataset."""
        idx = self.indices(n, seed)
        y = self.train_y[idx]
        if augment:
            dataset = TensorImages(self.train_images[idx], y, 1, tuple(self.train_x.shape[-2:]), FASHION_MNIST_MEAN,
                                   FASHION_MNIST_STD, augment=True)
        else:
            dataset = TensorDataset(self.train_x[idx], y)
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          drop_last=shuffle and len(y) > batch_size)  # no size-1 BatchNorm batch


def load_data(s: Settings) -> Data:
    def prepare(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = load_fashion_mnist(s.data_root, split)
        x = (images.float().div(255).unsqueeze(1) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        return x, labels.long(), images

    train_x, train_y, train_images = prepare("train")
    test_x, test_y, _ = prepare("test")
    if s.test_subset < len(test_y):
        keep = torch.tensor(seeded_indices(len(test_y), s.test_subset, 12345))
        test_x, test_y = test_x[keep], test_y[keep]
    return Data(train_x, train_y, DataLoader(TensorDataset(test_x, test_y), batch_size=500), test_x[:1].clone(),
                train_images)


def top1(model: nn.Module, data: Data) -> float:
    return 100.0 * evaluate(model.eval(), data.test_loader, topk=(1,))["top1"]


def count(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    return count_cost(model, example)


# ---------------------------------------------------------------------------------------- dense models

def dense_recipe(name: str, s: Settings) -> dict:
    return dict(model=name, epochs=s.dense_epochs, lr=s.dense_lr, batch_size=128, seed=0, weight_decay=5e-4,
                train_subset=s.dense_train_subset or None, augment=True, data_root=s.data_root)


def dense_model(name: str, s: Settings, log: Callable[[str], None]) -> tuple[nn.Module, dict]:
    """ResNet-20: the shipped weights (outside --quick). Others: trained once with the same recipe as
    benchmarks/train_baseline.py (pad-2 crop + flip, SGD nesterov, cosine, 1 warm-up epoch), cached
    with a card next to the checkpoint."""
    torch.manual_seed(0)
    model = MODELS[name]()
    if name == "resnet20" and not s.quick:
        model.load_state_dict(torch.load(SHIPPED_RESNET20, weights_only=True))
        card = json.loads(SHIPPED_RESNET20.with_suffix(".json").read_text())
        log(f"dense {name}: shipped {SHIPPED_RESNET20.relative_to(REPO)}")
        return model.eval(), {"checkpoint": str(SHIPPED_RESNET20.relative_to(REPO)), "card": card}
    recipe = dense_recipe(name, s)
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(s.cache) / f"{name}-{key}.pt"
    card_path = path.with_suffix(".json")
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        log(f"dense {name}: loaded {path}")
        return model.eval(), {"checkpoint": str(path), "card": card}
    started = time.perf_counter()
    history, metrics, train_images, test_images = [], None, 0, 0
    if s.dense_epochs > 0:  # 0 (--quick): the untrained model, cached as it is
        data_cfg = DataConfig(format="fashion_mnist", root=s.data_root, batch_size=128, augment=True, seed=0,
                              train_subset=recipe["train_subset"])
        bundle = build_data(data_cfg, [1, 1, 28, 28])
        cfg = TrainConfig(epochs=s.dense_epochs, optimizer={"name": "sgd", "lr": s.dense_lr, "momentum": 0.9,
                                                            "weight_decay": 5e-4, "nesterov": True},
                          scheduler="cosine", warmup_epochs=1, label_smoothing=0.0, eval_every=s.dense_epochs,
                          seed=0, amp=False)
        result = finetune(model, bundle.train_loader, None, cfg, checkpoint_dir=path.parent / f".{path.stem}.ckpt",
                          progress=False, on_epoch_end=lambda e, rec: log(f"dense {name}: epoch {e} {rec}"))
        history = result.history
        metrics = evaluate(model.eval(), bundle.val_loader, "cpu")
        train_images, test_images = len(bundle.train_loader.dataset), len(bundle.val_loader.dataset)
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    card = {"file": path.name, "architecture": f"pfp_deploy.architectures.{name}", "num_classes": 10,
            "in_channels": 1, "input_shape": [1, 1, 28, 28], "recipe": recipe,
            "data": f"Fashion-MNIST, {train_images} training images, augmented (pad-2 crop + flip)",
            "test_top1": round(100 * metrics["top1"], 2) if metrics else None, "test_images": test_images,
            "train_seconds": round(seconds), "history": history,
            "command": "python -m benchmarks.compare " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"}
    card_path.write_text(json.dumps(card, indent=2, default=str) + "\n")
    log(f"dense {name}: trained {s.dense_epochs} epochs in {seconds:.0f} s, 10k-test top-1 {card['test_top1']} "
        f"-> {path}")
    return model.eval(), {"checkpoint": str(path), "card": card}


# ---------------------------------------------------------------------------- torch-pruning helpers
# Not used by the matrix below (every cell goes through pfp_deploy.pruning.prune, so groups, allocation,
# removal and reconstruction are the same code for every criterion); kept for the scorer tests and for
# checking a criterion against torch-pruning's own MetaPruner by hand.

def output_layer(model: nn.Module) -> nn.Module:
    """The classifier (last Linear): its outputs are the classes, never pruned."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def make_scorer(criterion: str, model: nn.Module, calibration: list, seed: int, need_vector: bool) -> GroupScorer:
    """The registry's scorer (pfp_deploy.criteria) for a criterion name ("bn" is accepted for "bn_scale")."""
    scorer = get_criterion("bn_scale" if criterion == "bn" else criterion).importance(model, calibration, seed)
    scorer.need_vector = need_vector
    return scorer


def tp_prune(model: nn.Module, example: torch.Tensor, scorer: GroupScorer, keep: float, global_pruning: bool,
             tol: float, max_iter: int = 16) -> tuple[nn.Module, dict]:
    """torch-pruning's MetaPruner with pruning_ratio bisected until MACs are within tol of keep * MACs(model)."""
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


# ------------------------------------------------------------------------------------------- one cell

def calibration_batches(s: Settings, data: Data, dense: nn.Module, seed: int) -> list:
    n = (paper_calibration_size(count_output_units(dense, data.example)) if s.calib == "auto" else int(s.calib))
    x, y = data.subset(n, 1000 + seed)  # its own draw, different from the fine-tune draw
    return list(zip(x.split(s.batch_size), y.split(s.batch_size)))


def run_cell(model_name: str, criterion: str, allocation: str, keep: float, seed: int, dense: nn.Module,
             dense_cost: tuple[int, int], calibration: list, data: Data, s: Settings, shared: dict
             ) -> tuple[dict, tuple[nn.Module, nn.Module]]:
    """prune() with its default least-squares reconstruction -> top-1; the same plan applied to the
    dense model without the refit -> top-1 pruned-only. (Pruning with reconstruct="none" instead would
    change the cost-aware allocation, whose error model assumes the refit the pipeline runs.) `shared`
    holds the (model, seed) sensitivity pass, computed by the first cell and lent to the others (its
    time is reported once per (model, seed) as sensitivity_s, not in every cell)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pfp_prune(dense, calibration, data.example, keep=keep, metric="macs", method=criterion,
                           allocation=allocation, seed=seed, tolerance=s.tolerance,
                           sensitivities=shared.get("sensitivities"), reconstruct={"distill": {"epochs": 0}})
    seconds = dict(result.report.get("seconds") or {})
    if "sensitivities" not in shared:
        shared["sensitivities"] = result.sensitivities
        shared["sensitivity_s"] = float(seconds.get("sensitivity") or 0.0)
    repaired = result.model.eval()
    pruned = pruned_only(dense, result.plan, data.example)
    macs, params = count(repaired, data.example)
    reconstruction = result.report.get("reconstruction") or {}
    row = {"kind": "cell", "model": model_name, "criterion": criterion, "allocation": allocation, "keep_target": keep,
           "seed": seed, "macs": macs, "params": params, "macs_ratio": macs / dense_cost[0],
           "params_ratio": params / dense_cost[1], "calibration_images": sum(len(y) for _, y in calibration),
           "widths": [g["width_after"] for g in result.report.get("groups", [])],
           "skipped_groups": result.report.get("skipped_groups", []),
           "epsilon": result.report.get("epsilon"), "epsilon_widths": result.report.get("epsilon_widths"),
           "criterion_s": float(seconds.get("criterion") or 0.0), "allocation_s": float(seconds.get("allocation") or 0.0),
           "removal_s": float(seconds.get("removal") or 0.0), "sensitivity_s": shared["sensitivity_s"],
           "reconstruction_s": float(seconds.get("reconstruction") or 0.0),
           "refit_layers": len(reconstruction.get("layers") or []),
           "refit_skipped": [d.get("name") for d in reconstruction.get("skipped") or []]}
    row["prune_s"] = row["criterion_s"] + row["allocation_s"] + row["removal_s"]
    row["top1_pruned"] = top1(pruned, data)
    row["top1_refit"] = top1(repaired, data)
    row["distillation_s"] = 0.0
    if s.distill_epochs:  # what prune() does by default, run apart so that the refit alone is measured too
        started = time.perf_counter()
        distill_on_calibration(dense, repaired, calibration, epochs=s.distill_epochs, seed=seed)
        row["distillation_s"] = time.perf_counter() - started
        repaired.eval()
    row["top1_recon"] = top1(repaired, data) if s.distill_epochs else row["top1_refit"]
    return row, (pruned, repaired)


def pruned_only(dense: nn.Module, plan: Any, example: torch.Tensor) -> nn.Module:
    """`plan`'s channels removed from a copy of `dense`, nothing refit: the pruned-only column."""
    return apply_plan(dense, plan, example).eval()


def finetune_cfg(s: Settings, seed: int) -> FinetuneConfig:
    return FinetuneConfig(epochs=s.ft_epochs, optimizer={"lr": s.ft_lr, "momentum": 0.9, "weight_decay": 5e-4},
                          scheduler="cosine", seed=seed, amp=False,
                          distill={"enabled": s.ft_distill, "temperature": 4.0, "alpha": 0.5})


def run_finetune(model_name: str, criterion: str, allocation: str, recon: str, keep: float, seed: int,
                 model: nn.Module, data: Data, s: Settings, dense: nn.Module | None = None) -> dict:
    """The fixed short fine-tune: s.ft_epochs over a seeded s.ft_subset draw, the same for every method."""
    model = copy.deepcopy(model)
    started = time.perf_counter()
    finetune(model, data.loader(s.ft_subset, seed, s.batch_size, shuffle=True, augment=s.ft_augment), None,
             finetune_cfg(s, seed),
             teacher=dense if s.ft_distill else None, progress=False)
    seconds = time.perf_counter() - started
    return {"kind": "ft", "model": model_name, "criterion": criterion, "allocation": allocation,
            "reconstruct": recon, "keep_target": keep, "seed": seed, "finetune_s": seconds,
            "top1_ft": top1(model, data)}


def finetune_selection(s: Settings, rows: list[dict], model: str, keep: float, seed: int) -> list[tuple[str, str, str]]:
    """Which cells get the short fine-tune: for every criterion its best allocation by top-1 after
    reconstruction (judged on seed 0 where it ran, so every seed fine-tunes the same configurations),
    with reconstruction; plus the paper's pfp/paper/none and torch-pruning's usual l1/uniform/none."""
    cells = [r for r in rows if r.get("kind") == "cell" and r["model"] == model and math.isclose(r["keep_target"], keep)
             and "error" not in r]
    if s.finetune_cells == "none":
        return []
    if s.finetune_cells == "all":
        mine = [r for r in cells if r["seed"] == seed]
        return [(r["criterion"], r["allocation"], rec) for r in mine for rec in ("none", "least_squares")]
    judged = [r for r in cells if r["seed"] == 0] or [r for r in cells if r["seed"] == seed]
    chosen = []
    for criterion in s.criteria:
        mine = [r for r in judged if r["criterion"] == criterion]
        if mine:
            best = max(mine, key=lambda r: r["top1_recon"])
            chosen.append((criterion, best["allocation"], "least_squares"))
    chosen += [c for c in REFERENCE_FT if c[0] in s.criteria and c[1] in s.allocations and c not in chosen]
    return chosen


# ------------------------------------------------------------------------------------------- summary

def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


CELL_METRICS = ("top1_pruned", "top1_refit", "top1_recon", "macs_ratio", "params_ratio", "macs", "params",
                "sensitivity_s", "criterion_s", "allocation_s", "removal_s", "prune_s", "reconstruction_s",
                "distillation_s")


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and spread over seeds per (model, criterion, allocation, keep); the fine-tunes attached."""
    cells: dict[tuple, list[dict]] = {}
    fts: dict[tuple, list[dict]] = {}
    for row in rows:
        if "error" in row:
            continue
        key = (row["model"], row["criterion"], row["allocation"], row["keep_target"])
        if row["kind"] == "cell":
            cells.setdefault(key, []).append(row)
        else:
            fts.setdefault(key + (row["reconstruct"],), []).append(row)
    out = []
    for key, group in cells.items():
        entry = dict(zip(("model", "criterion", "allocation", "keep_target"), key))
        entry["seeds"] = sorted(r["seed"] for r in group)
        for metric in CELL_METRICS:
            entry[metric] = spread([r.get(metric) for r in group])
        for recon in ("none", "least_squares"):
            ft = fts.get(key + (recon,), [])
            entry[f"top1_ft_{recon}"] = spread([r["top1_ft"] for r in ft])
            entry[f"finetune_s_{recon}"] = spread([r["finetune_s"] for r in ft])
            entry[f"ft_seeds_{recon}"] = sorted(r["seed"] for r in ft)
        out.append(entry)
    order = {c: i for i, c in enumerate(CRITERIA)}
    aorder = {a: i for i, a in enumerate(ALLOCATIONS)}
    out.sort(key=lambda e: (e["model"], -e["keep_target"], order[e["criterion"]], aorder[e["allocation"]]))
    return out


def fmt_acc(stats: dict) -> str:
    if not stats or stats["mean"] is None:
        return "—"
    return f"{stats['mean']:.2f}" + (f" ± {stats['std']:.2f}" if stats["n"] > 1 else "")


def fmt(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def fmt_load(load: Any) -> str:
    return "—" if not load else ", ".join(f"{v:.1f}" for v in load)


def best_ft(e: dict) -> tuple[str, dict]:
    """The fine-tuned variant of a summary entry: (recon it started from, stats); ('', empty) when none."""
    for recon in ("least_squares", "none"):
        if e[f"top1_ft_{recon}"]["n"]:
            return recon, e[f"top1_ft_{recon}"]
    return "", {}


def goals(results: dict) -> list[str]:
    """The issue's ResNet-20 goals, against the measured best (no training) and best (short fine-tune)."""
    if "resnet20" not in results["dense"]:
        return []
    dense = results["dense"]["resnet20"]["top1"]
    entries = [e for e in results["summary"] if e["model"] == "resnet20"]
    lines = ["| goal | dense | best measured | configuration | met? |", "|---|---|---|---|---|"]
    for keep, margin, kind in ((0.5, 1.0, "recon"), (0.3, 3.0, "recon"), (0.5, 0.3, "ft"), (0.3, 0.3, "ft")):
        mine = [e for e in entries if math.isclose(e["keep_target"], keep)]
        if kind == "recon":
            cands = [(e["top1_recon"]["mean"], f"{e['criterion']}/{e['allocation']}/least_squares", e["top1_recon"])
                     for e in mine if e["top1_recon"]["mean"] is not None]
            label = f"keep {keep}, no training: ≥ dense − {margin}"
        else:
            cands = [(e[f"top1_ft_{r}"]["mean"], f"{e['criterion']}/{e['allocation']}/{r} + fine-tune",
                      e[f"top1_ft_{r}"]) for e in mine for r in ("none", "least_squares") if e[f"top1_ft_{r}"]["n"]]
            label = f"keep {keep}, short fine-tune: within {margin} of dense"
        default = [c for c in cands if c[1].startswith("pfp/cost_aware/least_squares")]
        for which, chosen in (("default", default), ("best cell", cands)):
            if not chosen:
                lines.append(f"| {label} ({which}) | {dense:.2f} | not run | — | — |")
                continue
            value, config, stats = max(chosen, key=lambda c: c[0])
            lines.append(f"| {label} ({which}) | {dense:.2f} | {fmt_acc(stats)} | {config} | "
                         f"{'yes' if value >= dense - margin else f'no ({value - dense:+.2f})'} |")
    return lines


def markdown(results: dict) -> str:
    env, s = results["environment"], results["settings"]
    lines = ["# Criterion x allocation x reconstruction on Fashion-MNIST", "",
             f"Command: `{results['command']}`  ",
             f"Machine: {env.get('cpu_model')}, {env.get('usable_cores')} usable cores, {s['threads']} torch thread(s); "
             f"torch {results['versions']['torch']}, torch-pruning {results['versions']['torch_pruning']}, "
             f"Python {env.get('python')}; load average at start / end "
             f"{fmt_load(env.get('load_average_start'))} / {fmt_load(env.get('load_average_end'))}  ",
             f"Wall time: {results['wall_seconds'] / 60:.1f} min. Top-1 on a fixed {s['test_subset']}-image test "
             f"subset. Calibration: {s['calib']} images per seed (\"auto\": the paper's size), used for scoring, "
             f"allocation and reconstruction. Fine-tune: {s['ft_epochs']} epoch(s) on {s['ft_subset']} training "
             f"images (SGD lr {s['ft_lr']}, momentum 0.9, cosine, batch {s['batch_size']}"
             f"{', distilled from the dense model' if s.get('ft_distill') else ''}"
             f"{', augmented (pad-2 crop + flip)' if s.get('ft_augment') else ', not augmented'}), the same draw for every "
             f"method. MACs by tp.utils.count_ops_and_params.", ""]
    if results.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in results["notes"]] + [""]
    lines += ["## Dense models", "", "| model | top-1 (test subset) | card top-1 (10k test) | MACs | params | "
              "training s | checkpoint |", "|---|---|---|---|---|---|---|"]
    for name, d in results["dense"].items():
        card = d.get("card") or {}
        lines.append(f"| {name} | {d['top1']:.2f} | {card.get('test_top1', '—')} | {d['macs'] / 1e6:.2f} M | "
                     f"{d['params'] / 1e3:.1f} K | {card.get('train_seconds', '—')} | `{d['checkpoint']}` |")
    if results.get("sensitivity"):
        lines += ["", "PFP sensitivity pass (once per model and seed, lent to every cell of that seed): "
                  + "; ".join(f"{k} {v:.2f} s" for k, v in results["sensitivity"].items())]
    lines += headline(results)
    g = goals(results)
    if g:
        lines += ["", "## ResNet-20 against the issue's goals", ""] + g
    summary = results["summary"]
    for model in results["dense"]:
        dense_top1 = results["dense"][model]["top1"]
        for keep in sorted({e["keep_target"] for e in summary if e["model"] == model}, reverse=True):
            entries = [e for e in summary if e["model"] == model and e["keep_target"] == keep]
            seeds = max(len(e["seeds"]) for e in entries)
            lines += ["", f"## {model}, keep {keep:.2f} of MACs (dense {dense_top1:.2f})", "",
                      "Mean ± std over the seeds listed. + refit: least squares; + recon: then calibration "
                      "distillation (the product's repair). +FT: the short fine-tune, from the +recon model (LS) or "
                      "from the pruned-only one (none). Times in s: scoring+allocation+removal (criterion, "
                      "allocation, removal; the shared sensitivity pass not included), refit, distillation, "
                      "fine-tune.", "",
                      "| criterion | allocation | seeds | MACs kept | params kept | pruned-only | + refit | + recon "
                      "| + FT | score+alloc+removal s | refit s | distil s | FT s |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for e in entries:
                ft_cells = [f"{fmt_acc(e[f'top1_ft_{r}'])} ({'LS' if r == 'least_squares' else 'none'})"
                            for r in ("least_squares", "none") if e[f"top1_ft_{r}"]["n"]]
                ft_times = [fmt(e[f"finetune_s_{r}"]["mean"], 1) for r in ("least_squares", "none")
                            if e[f"finetune_s_{r}"]["n"]]
                lines.append(f"| {e['criterion']} | {e['allocation']} | {len(e['seeds'])} | "
                             f"{fmt(e['macs_ratio']['mean'], 3)} | {fmt(e['params_ratio']['mean'], 3)} | "
                             f"{fmt_acc(e['top1_pruned'])} | {fmt_acc(e['top1_refit'])} | {fmt_acc(e['top1_recon'])} | "
                             f"{'; '.join(ft_cells) or '—'} | {fmt(e['prune_s']['mean'], 2)} | "
                             f"{fmt(e['reconstruction_s']['mean'], 2)} | {fmt(e['distillation_s']['mean'], 1)} | "
                             f"{' / '.join(ft_times) or '—'} |")
            lines += pivot(entries, "top1_recon", "Top-1 + reconstruction (refit + calibration distillation, no "
                           "fine-tune), criterion x allocation")
            lines += pivot(entries, "top1_pruned", "Top-1 pruned-only, criterion x allocation")
            if seeds > 1:
                lines.append(f"\n(up to {seeds} seeds)")
    if results.get("failures"):
        lines += ["", "## Failed cells", ""] + [f"- {f['model']} {f['criterion']}/{f['allocation']} "
                                                f"{f.get('reconstruct', '')} keep {f['keep_target']} seed {f['seed']}: "
                                                f"{f['error']}" for f in results["failures"]]
    if results.get("not_run"):
        lines += ["", "## Planned but not run (time budget)", ""] + [f"- {n}" for n in results["not_run"]]
    return "\n".join(lines) + "\n"


def headline(results: dict) -> list[str]:
    """One row per (model, keep): the paper's configuration, torch-pruning's usual one, the default and
    the best cell, each without training and after the short fine-tune."""
    lines = ["", "## Headline (mean ± std over the seeds run)", "",
             "| model | keep | dense | pfp/paper/none: pruned → +FT | l1/uniform/none: pruned → +FT | "
             "default pfp/cost_aware/LS: +recon → +FT | best without training | best after fine-tune |",
             "|---|---|---|---|---|---|---|---|"]
    summary = results["summary"]
    for model, d in results["dense"].items():
        for keep in sorted({e["keep_target"] for e in summary if e["model"] == model}, reverse=True):
            by = {(e["criterion"], e["allocation"]): e for e in summary
                  if e["model"] == model and e["keep_target"] == keep}

            def pair(key, first, ft):
                e = by.get(key)
                return "—" if e is None else f"{fmt_acc(e[first])} → {fmt_acc(e[ft])}"

            recon = [(e["top1_recon"]["mean"], f"{c}/{a}/LS {fmt_acc(e['top1_recon'])}") for (c, a), e in by.items()
                     if e["top1_recon"]["mean"] is not None]
            recon += [(e["top1_pruned"]["mean"], f"{c}/{a}/none {fmt_acc(e['top1_pruned'])}")
                      for (c, a), e in by.items() if e["top1_pruned"]["mean"] is not None]
            ft = [(e[f"top1_ft_{r}"]["mean"], f"{c}/{a}/{'LS' if r == 'least_squares' else 'none'} "
                   f"{fmt_acc(e[f'top1_ft_{r}'])}") for (c, a), e in by.items() for r in ("none", "least_squares")
                  if e[f"top1_ft_{r}"]["n"]]
            lines.append(f"| {model} | {keep:.2f} | {d['top1']:.2f} | "
                         f"{pair(('pfp', 'paper'), 'top1_pruned', 'top1_ft_none')} | "
                         f"{pair(('l1', 'uniform'), 'top1_pruned', 'top1_ft_none')} | "
                         f"{pair(('pfp', 'cost_aware'), 'top1_recon', 'top1_ft_least_squares')} | "
                         f"{max(recon)[1] if recon else '—'} | {max(ft)[1] if ft else '—'} |")
    return lines


def pivot(entries: list[dict], metric: str, title: str) -> list[str]:
    by = {(e["criterion"], e["allocation"]): e for e in entries}
    allocations = [a for a in ALLOCATIONS if any(k[1] == a for k in by)]
    criteria = [c for c in CRITERIA if any(k[0] == c for k in by)]
    lines = ["", f"{title}:", "", "| criterion | " + " | ".join(allocations) + " |",
             "|---|" + "---|" * len(allocations)]
    for c in criteria:
        lines.append(f"| {c} | " + " | ".join(fmt_acc(by[(c, a)][metric]) if (c, a) in by else "—"
                                                for a in allocations) + " |")
    return lines


PLOT_CONFIGS = [("pfp", "paper"), ("pfp", "cost_aware"), ("l1", "uniform"), ("l2", "cost_aware"),
                ("random", "uniform")]


def plot(summary: list[dict], dense: dict, out: Path) -> list[str]:
    """Per model: top-1 vs MACs kept, three panels (pruned-only, + reconstruction, + fine-tune), one line
    per configuration (PLOT_CONFIGS and, per keep, the best configuration of each panel)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for model, d in dense.items():
        entries = [e for e in summary if e["model"] == model]
        if not entries:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=False)
        panels = [("pruned-only (no repair)", lambda e: e["top1_pruned"]["mean"]),
                  ("+ reconstruction (refit + calibration distillation)", lambda e: e["top1_recon"]["mean"]),
                  ("+ short fine-tune", lambda e: best_ft(e)[1].get("mean"))]
        for ax, (title, value) in zip(axes, panels):
            for criterion, allocation in PLOT_CONFIGS:
                pts = sorted((e["macs_ratio"]["mean"], value(e)) for e in entries
                             if (e["criterion"], e["allocation"]) == (criterion, allocation) and value(e) is not None)
                if pts:
                    ax.plot([p[0] for p in pts] + [1.0], [p[1] for p in pts] + [d["top1"]], marker="o",
                            label=f"{criterion}/{allocation}")
            best = []
            for keep in sorted({e["keep_target"] for e in entries}):
                cands = [e for e in entries if e["keep_target"] == keep and value(e) is not None]
                if cands:
                    b = max(cands, key=value)
                    best.append((b["macs_ratio"]["mean"], value(b)))
            if best:
                ax.plot([p[0] for p in best], [p[1] for p in best], "k--", marker="*", label="best of all cells")
            ax.axhline(d["top1"], color="grey", lw=0.8, ls=":", label="dense")
            ax.set(xlabel="MACs kept (fraction of dense)", ylabel="top-1 (%)", title=title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{model} on Fashion-MNIST")
        fig.tight_layout()
        path = out / f"accuracy_vs_macs_{model}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(str(path))
    return files


# ----------------------------------------------------------------------------------------------- main

def slot_plan(s: Settings) -> list[tuple[float, int]]:
    """(keep, seed) slots in the order they run: the most informative first, so that a run cut by the
    clock loses the least: headline keep seed 0, the other full-grid keeps, the headline's seed 1, the other
    keeps, the headline's remaining seeds."""
    slots = [(s.headline_keep, 0)] if any(math.isclose(k, s.headline_keep) for k in s.keeps) else []
    slots += [(k, 0) for k in s.keeps if (k, 0) not in slots and any(math.isclose(k, g) for g in s.full_grid)]
    extra = [(s.headline_keep, seed) for seed in range(1, s.seeds) if (s.headline_keep, 0) in slots]
    slots += extra[:1] + [(k, 0) for k in s.keeps if (k, 0) not in slots] + extra[1:]
    return slots


def cells_of_slot(s: Settings, keep: float, seed: int) -> list[tuple[str, str]]:
    full = seed == 0 and any(math.isclose(keep, g) for g in s.full_grid)
    cells = [(c, a) for c in s.criteria for a in s.allocations]
    return cells if full else [c for c in cells if c in CORE_CELLS]


def deadline_passed(deadline: str) -> bool:
    if not deadline:
        return False
    now = time.gmtime()
    hours, minutes = (int(v) for v in deadline.split(":"))
    return now.tm_hour * 60 + now.tm_min >= hours * 60 + minutes


def main(argv: list[str] | None = None) -> dict:
    s = parse_args(argv)
    torch.set_num_threads(s.threads)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    command = " ".join(["python -m benchmarks.compare"] + (sys.argv[1:] if argv is None else list(argv)))
    env = hardware_fingerprint()
    env["load_average_start"] = os.getloadavg()
    tp_version = importlib.metadata.version("torch-pruning")

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    log(f"command: {command}")
    log(f"machine: {env.get('cpu_model')}, {env.get('usable_cores')} usable cores; torch {torch.__version__}, "
        f"torch-pruning {tp_version}, load average {env['load_average_start']}")
    dense_models, dense_info, dense_meta = {}, {}, {}
    for name in s.models:
        dense_models[name], dense_meta[name] = dense_model(name, s, log)
    if s.dense_only:
        return {}
    data = load_data(s)
    for name, model in dense_models.items():
        macs, params = count(model, data.example)
        dense_info[name] = {**dense_meta[name], "top1": top1(model, data), "macs": macs, "params": params}
        log(f"dense {name}: top-1 {dense_info[name]['top1']:.2f} on {s.test_subset} test images, "
            f"MACs {macs / 1e6:.2f} M, params {params}")

    cells_path, key = out / "cells.jsonl", s.cell_key()
    done: dict[tuple, dict] = {}
    if cells_path.exists():
        for line in cells_path.read_text().splitlines():
            row = json.loads(line)
            if row.get("settings_key") == key:
                done[row_key(row)] = row
    rows: list[dict] = []
    notes: list[str] = []
    not_run: list[str] = []
    sensitivity: dict[str, float] = {}
    shared_sensitivities: dict[tuple[str, int], dict] = {}

    def record(row: dict) -> None:
        row["settings_key"] = key
        rows.append(row)
        with cells_path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    for keep, seed in slot_plan(s):
        for model_name in s.models:
            dense = dense_models[model_name]
            cost = (dense_info[model_name]["macs"], dense_info[model_name]["params"])
            calibration = calibration_batches(s, data, dense, seed)
            shared = shared_sensitivities.setdefault((model_name, seed), {})  # same calibration draw
            built: dict[tuple[str, str], tuple[nn.Module, nn.Module]] = {}
            planned = cells_of_slot(s, keep, seed)
            planned += [(c, a) for c, a, _ in finetune_selection(s, rows, model_name, keep, seed)
                        if (c, a) not in planned]  # the other seeds also measure the cells seed 0 fine-tuned
            for criterion, allocation in planned:
                k = ("cell", model_name, criterion, allocation, "", keep, seed)
                if k in done:
                    rows.append(done[k])
                    continue
                if s.report_only or deadline_passed(s.deadline):
                    not_run.append(f"{model_name} {criterion}/{allocation} keep {keep} seed {seed}")
                    continue
                try:
                    row, models = run_cell(model_name, criterion, allocation, keep, seed, dense, cost, calibration,
                                           data, s, shared)
                except Exception as exc:  # noqa: BLE001 - a failure is a result: recorded, the run goes on
                    record({"kind": "cell", "model": model_name, "criterion": criterion, "allocation": allocation,
                            "keep_target": keep, "seed": seed, "error": f"{type(exc).__name__}: {exc}"})
                    log(f"FAILED {model_name} {criterion}/{allocation} keep {keep} seed {seed}: {rows[-1]['error']}")
                    continue
                built[(criterion, allocation)] = models
                record(row)
                log(f"{model_name} {criterion}/{allocation} keep {keep} seed {seed}: MACs {row['macs_ratio']:.3f}, "
                    f"params {row['params_ratio']:.3f}, top-1 pruned {row['top1_pruned']:.2f} / refit "
                    f"{row['top1_refit']:.2f} / recon {row['top1_recon']:.2f}; prune {row['prune_s']:.2f} s, refit "
                    f"{row['reconstruction_s']:.2f} s, distillation {row['distillation_s']:.1f} s")
            if "sensitivity_s" in shared:
                sensitivity[f"{model_name} seed {seed}"] = shared["sensitivity_s"]
            for criterion, allocation, recon in finetune_selection(s, rows, model_name, keep, seed):
                k = ("ft", model_name, criterion, allocation, recon, keep, seed)
                if k in done:
                    rows.append(done[k])
                    continue
                if s.report_only or deadline_passed(s.deadline):
                    not_run.append(f"{model_name} {criterion}/{allocation}/{recon} + fine-tune keep {keep} seed {seed}")
                    continue
                try:
                    if (criterion, allocation) not in built:  # resumed run: rebuild it (deterministic)
                        _, built[(criterion, allocation)] = run_cell(model_name, criterion, allocation, keep, seed,
                                                                     dense, cost, calibration, data, s, shared)
                    start_model = built[(criterion, allocation)][1 if recon == "least_squares" else 0]
                    row = run_finetune(model_name, criterion, allocation, recon, keep, seed, start_model, data, s,
                                       dense)
                except Exception as exc:  # noqa: BLE001
                    record({"kind": "ft", "model": model_name, "criterion": criterion, "allocation": allocation,
                            "reconstruct": recon, "keep_target": keep, "seed": seed,
                            "error": f"{type(exc).__name__}: {exc}"})
                    log(f"FAILED fine-tune {model_name} {criterion}/{allocation}/{recon}: {rows[-1]['error']}")
                    continue
                record(row)
                log(f"{model_name} {criterion}/{allocation}/{recon} keep {keep} seed {seed} + fine-tune: "
                    f"top-1 {row['top1_ft']:.2f} ({row['finetune_s']:.1f} s)")
    if not_run and not s.report_only:
        notes.append(f"--deadline {s.deadline} UTC passed: {len(not_run)} planned rows not run (listed at the end).")
    if s.report_only:
        notes.append(f"--report-only: {sum(1 for r in rows if 'error' not in r)} rows finished so far; "
                     f"{len(not_run)} planned rows not run.")
    summary = summarise(rows)
    failures = [r for r in rows if "error" in r]
    env["load_average_end"] = os.getloadavg()
    results = {"command": command, "environment": env, "settings": dataclasses.asdict(s),
               "versions": {"torch": torch.__version__, "torch_pruning": tp_version,
                            "python": platform.python_version()},
               "dense": dense_info, "sensitivity": sensitivity, "rows": rows, "summary": summary,
               "failures": failures, "not_run": not_run, "notes": notes,
               "wall_seconds": time.perf_counter() - started}
    results["plots"] = plot(summary, dense_info, out)
    results["wall_seconds"] = time.perf_counter() - started
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text(markdown(results))
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {', '.join(results['plots'])}")
    return results


def row_key(row: dict) -> tuple:
    return (row["kind"], row["model"], row["criterion"], row["allocation"], row.get("reconstruct", ""),
            row["keep_target"], row["seed"])


if __name__ == "__main__":
    main()
