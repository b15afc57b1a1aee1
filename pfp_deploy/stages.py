"""The pipeline's stages: each takes the recipe and the previous stages' outputs and returns a typed
artifact (artifacts.py) that the run puts into its report; a cascade runs prune_step / finetune_step
once per schedule entry (a *step*), each recorded in state.json so --resume skips it.

    build_dense_model -> pretrain -> accuracy (dense) -> calibration_loader
      -> prune_cascade: per step prune_step (score, prune, reconstruct, BN) -> finetune_step
      -> save_artifacts -> export_models -> benchmark_targets
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from pfp_deploy.artifacts import Accuracy, ExportResult, FinetuneStep, GroupWidth, PruneStep, TargetRow
from pfp_deploy.checks import run_targets
from pfp_deploy.data import DataBundle, calibration_size, calibration_subset, make_loader
from pfp_deploy.distributed import DistContext, all_reduce_max, wrap_loader_for_distributed
from pfp_deploy.errors import RuntimeUnavailableError, UsageError, did_you_mean
from pfp_deploy.export import check_parity, export_hashes, export_onnx, export_openvino, verify_export
from pfp_deploy.finetune import distills, evaluate, finetune, recalibrate_batchnorm
from pfp_deploy.models import architecture_config, build_model, model_label, save_pruned
from pfp_deploy.pfp import sensitivity as pfp_sensitivity
from pfp_deploy.pfp.sensitivity import _first_tensor
from pfp_deploy.pruning import Plan, count_cost, distill_pruned, prune, reconstruct_layers
from pfp_deploy.reconstruction import index_maps_from_plan, layer_errors
from pfp_deploy.report import to_jsonable
from pfp_deploy.run_dir import Run
from pfp_deploy.schema import Recipe

log = logging.getLogger("pfp_deploy")


def build_dense_model(recipe: Recipe, data: DataBundle, device: torch.device) -> nn.Module:
    """The input model, weights loaded (seeded, so random initialisations agree across runs and ranks)."""
    torch.manual_seed(recipe.data.seed)
    model = build_model(recipe.model, num_classes=recipe.model.num_classes or data.num_classes,
                        in_channels=data.in_channels)
    return model.to(device)


def pretrain(run: Run, recipe: Recipe, dense: nn.Module, data: DataBundle, progress: bool) -> dict | None:
    """Train the dense model per model.pretrain, once: the weights are cached by a hash of the model and
    data sections under <output_dir>/.cache/pretrained/, and an interrupted training resumes there.
    Returns the report's model.pretrain record (None: no pre-training)."""
    cfg = recipe.model.pretrain
    if cfg is None or cfg.epochs == 0:
        return None
    key = hashlib.sha256(json.dumps({"model": recipe.model.model_dump(mode="json"),
                                     "data": recipe.data.model_dump(mode="json", exclude={"num_workers"})},
                                    sort_keys=True).encode()).hexdigest()[:16]
    cache = run.path.parent / ".cache" / "pretrained"
    weights = cache / f"{model_label(recipe.model)}-{key}.pt"
    info: dict[str, Any] = {"file": str(weights)}
    if weights.is_file():
        log.info("pre-trained dense model from cache %s", weights)
        dense.load_state_dict(torch.load(weights, map_location=run.dist.device, weights_only=True)["state_dict"])
        info["cached"] = True
    else:
        log.info("pre-training the dense model for %d epoch(s) (cached afterwards in %s)", cfg.epochs, weights)
        result = finetune(dense, data.train_loader, data.val_loader, cfg, device=run.dist.device,
                          checkpoint_dir=cache / f"{weights.stem}.checkpoints", resume=True, progress=progress,
                          dist=run.dist)
        if run.writer:
            save_pruned(weights, dense, Plan(), base=architecture_config(recipe.model),
                        example_shape=recipe.model.input_shape)
        info.update(cached=False, history=[_percent(h) for h in result.history])
    return info


def accuracy(model: nn.Module, data: DataBundle, dist: DistContext) -> Accuracy:
    """Validation top-1/top-5 in percent (the report's unit), sharded across ranks under torchrun."""
    loader = wrap_loader_for_distributed(data.val_loader, dist, shuffle=False, even=False)
    metrics = evaluate(model, loader, dist.device, dist=dist)
    return Accuracy(**{k: None if metrics[k] is None else 100.0 * metrics[k] for k in ("top1", "top5")})


def calibration_loader(run: Run, recipe: Recipe, dense: nn.Module, data: DataBundle) -> tuple[Any, int]:
    """The PFP calibration draw (the paper's size for "auto") and its size; under torchrun each rank
    gets its shard."""
    n = calibration_size(recipe.data.calibration_samples, dense, example_input(recipe, run.dist.device),
                         delta=recipe.prune.delta)
    shard = (run.dist.rank, run.dist.world_size) if run.dist.world_size > 1 else None
    return data.calibration_loader(n, shard=shard), n


def prune_cascade(run: Run, recipe: Recipe, dense: nn.Module, data: DataBundle, calibration, progress: bool,
                  stop_after: str | None) -> tuple[nn.Module, Plan]:
    """One-shot or cascade: per schedule entry prune (fresh sensitivities) then fine-tune. Each step's
    PruneStep / FinetuneStep goes into the report as soon as it is done (a later failure keeps them)."""
    example = example_input(recipe, run.dist.device)
    dense_cost = cost(dense, example, recipe.prune.metric)
    model, plan = dense, Plan()
    schedule = recipe.prune.schedule or [recipe.prune.keep]
    for step, keep in enumerate(schedule, 1):
        log.info("prune step %d/%d: keep %.3f of the dense %s", step, len(schedule), keep, recipe.prune.metric)
        with run.stage("prune"):
            model, plan, record = run.model_step(f"prune{step}", dense, example, lambda: prune_step(
                run, recipe, step, keep, model, plan, dense_cost, data, calibration, progress))
        pruned = PruneStep.model_validate(record["report"])
        run.report.prune.steps.append(pruned)
        for name, measured in pruned.accuracy.items():
            setattr(run.report.accuracy, name, measured)
        if recipe.finetune.epochs and stop_after != "prune":
            with run.stage("finetune"):
                model, plan, record = run.model_step(f"finetune{step}", dense, example, lambda: finetune_step(
                    run, recipe, step, keep, model, plan, dense, data, progress))
            tuned = FinetuneStep.model_validate(record["report"])
            run.report.finetune.steps.append(tuned)
            run.report.accuracy.finetuned = tuned.accuracy
    return model, plan


def prune_step(run: Run, recipe: Recipe, step: int, keep: float, model: nn.Module, plan: Plan,
               dense_cost: float, data: DataBundle, calibration, progress: bool) -> tuple[nn.Module, Plan, dict]:
    """Score `model`, prune it to `keep` x the dense cost, reconstruct, re-estimate BatchNorm.

    The accuracy after each repair is measured (pruned_only, reconstructed, distilled, bn_recalibrated), so
    the report shows what each one bought. Returns the model, the plan so far and {"report": PruneStep}."""
    cfg, dist = recipe.prune, run.dist
    example = example_input(recipe, dist.device)
    # prune() targets a share of the model it is given; a cascade step's model starts below the dense cost.
    current = cost(model, example, cfg.metric) / dense_cost
    started = time.perf_counter()
    scores = sensitivities(model, calibration, progress)
    seconds = time.perf_counter() - started
    result = prune(model, calibration, example, keep=min(1.0, keep / current), metric=cfg.metric,
                   variant=cfg.variant, round_to=cfg.round_to, min_channels=cfg.min_channels,
                   max_prune_ratio=cfg.max_prune_ratio, ignored_layers=cfg.ignored_layers,
                   overrides={k: v.model_dump(exclude_none=True) for k, v in cfg.overrides.items()},
                   seed=cfg.seed, tolerance=cfg.tolerance / current,
                   delta=cfg.delta, c=cfg.c, K=cfg.K, sensitivities=scores, reconstruct="none", allocation=cfg.allocation,
                   method=cfg.method)
    pruned = result.model
    run.write_json(f"checkpoints/sensitivity{step}.json", scores)
    macs, params = result.report["macs_after"], result.report["params_after"]
    achieved = (macs if cfg.metric == "macs" else params) / dense_cost
    accuracies = {"pruned_only": accuracy(pruned, data, dist)}
    log.info("step %d: pruned to %.3f of the dense %s; top-1 %s %% before repairs", step, achieved,
             cfg.metric, _pct(accuracies["pruned_only"].top1))
    repaired = {"method": "none"}
    if cfg.reconstruct.method != "none":  # every rank: the Gram matrices are summed across ranks
        started = time.perf_counter()
        maps = index_maps_from_plan(model, result.plan, example)
        heldout = heldout_batches(data, cfg.reconstruct.heldout_samples, recipe.data.seed)
        before = layer_errors(model, pruned, heldout, maps) if heldout else {}
        repaired = reconstruct_layers(model, pruned, calibration, cfg.reconstruct, index_maps=maps,
                                      progress=progress).to_dict()
        if heldout:
            after = layer_errors(model, pruned, heldout, maps)
            repaired["heldout_samples"] = sum(len(_first_tensor(b)) for b in heldout)
            for layer in repaired["layers"]:
                layer.update(heldout_before=before.get(layer["name"]), heldout_after=after.get(layer["name"]))
        result.report["seconds"]["reconstruction"] = round(time.perf_counter() - started, 4)
        accuracies["reconstructed"] = accuracy(pruned, data, dist)
        log.info("step %d: top-1 %s %% after least-squares reconstruction", step, _pct(accuracies["reconstructed"].top1))
        if cfg.reconstruct.distill.epochs:  # every rank: the gradients are averaged across ranks
            started = time.perf_counter()
            distilled = distill_pruned(model, pruned, calibration, cfg.reconstruct, seed=cfg.seed + step,
                                       progress=progress)
            repaired["distillation"] = distilled.to_dict()
            result.report["seconds"]["distillation"] = round(time.perf_counter() - started, 4)
            accuracies["distilled"] = accuracy(pruned, data, dist)
            kl = [f"{v:.4g}" if v is not None else "n/a" for v in (distilled.kl_before, distilled.kl_after)]
            log.info("step %d: top-1 %s %% after calibration distillation (%s; KL to the dense model %s -> %s)", step,
                     _pct(accuracies["distilled"].top1), distilled.status, *kl)
    if cfg.bn_recalibration_samples:
        loader = data.calibration_loader(cfg.bn_recalibration_samples, seed=recipe.data.seed + step)
        recalibrate_batchnorm(pruned, loader, cfg.bn_recalibration_samples, dist.device)
        accuracies["bn_recalibrated"] = accuracy(pruned, data, dist)
        log.info("step %d: top-1 %s %% after BN re-calibration", step, _pct(accuracies["bn_recalibrated"].top1))
    report = PruneStep(
        keep=keep, keep_relative=result.report["target"], method=result.report["method"],
        allocation=result.report["allocation"], allocation_used=result.report["allocation_used"],
        epsilon=result.report["epsilon"],
        epsilon_widths=to_jsonable(result.report["epsilon_widths"]), achieved=achieved, macs=macs, params=params,
        seconds={**result.report["seconds"], "sensitivity": round(seconds, 4)}, groups=result.report["groups"],
        unscored_groups=result.report["unscored_groups"], skipped_groups=result.report["skipped_groups"],
        criterion_fallback=result.report["criterion_fallback"], selection_ridge=result.report["selection_ridge"],
        reconstruction=to_jsonable(repaired), accuracy=accuracies)
    return pruned, plan.then(result.plan), {"report": report.to_dict()}


def heldout_batches(data: DataBundle, n: int, seed: int) -> list:
    """A seeded draw of n validation images, in memory (read twice: before and after the refit)."""
    if n <= 0:
        return []
    subset = calibration_subset(data.val_loader.dataset, min(n, len(data.val_loader.dataset)), seed)
    return list(make_loader(subset, data.batch_size, shuffle=False))


def sensitivities(model: nn.Module, calibration, progress: bool) -> dict[str, torch.Tensor]:
    """PFP sensitivities over this rank's calibration shard, MAX-reduced across ranks (a max over
    samples, so every rank ends with the single-process values and prunes identically)."""
    scores = pfp_sensitivity(model, calibration, progress=progress)
    for tensor in scores.values():
        all_reduce_max(tensor)
    return scores


def finetune_step(run: Run, recipe: Recipe, step: int, keep: float, model: nn.Module, plan: Plan, dense: nn.Module,
                  data: DataBundle, progress: bool) -> tuple[nn.Module, Plan, dict]:
    """Fine-tune (DDP under torchrun), distilling from the dense model unless distill.enabled is false, on the
    training images without augmentation unless finetune.augment is true; resumes from last.pt.
    Returns the model, its plan and {"report": FinetuneStep}."""
    teacher = dense if distills(recipe.finetune) else None
    result = finetune(model, data.finetune_loader(recipe.finetune.augment), data.val_loader, recipe.finetune,
                      teacher=teacher, device=run.dist.device,
                      checkpoint_dir=run.path / "checkpoints" / f"finetune{step}", resume=True, progress=progress,
                      dist=run.dist)
    history = to_jsonable([_percent(h) for h in result.history])
    final = Accuracy(top1=history[-1]["val_top1"], top5=history[-1]["val_top5"]) if history else \
        accuracy(model, data, run.dist)
    report = FinetuneStep(keep=keep, history=history, accuracy=final, stopped_early=result.stopped_early)
    return model, plan, {"report": report.to_dict()}


def save_artifacts(run: Run, recipe: Recipe, dense: nn.Module, pruned: nn.Module, plan: Plan) -> None:
    """plan.json, sensitivity.json (per step, per layer), model.pt and dense.pt; the sizes and the
    widths merged over the steps into the report."""
    example = example_input(recipe, run.dist.device)
    steps = run.report.prune.steps
    run.write_json("plan.json", plan.to_dict())
    if run.writer:
        layers = [json.loads((run.path / f"checkpoints/sensitivity{i}.json").read_text())
                  for i in range(1, len(steps) + 1)]
        run.write_json("sensitivity.json", {"steps": [{"keep": s.keep, "layers": scores}
                                                      for s, scores in zip(steps, layers)]})
    run.save_model("model.pt", pruned, plan)
    run.save_model("dense.pt", dense, Plan())
    (macs_dense, params_dense), (macs, params) = count_cost(dense, example), count_cost(pruned, example)
    model = run.report.model
    model.macs_dense, model.params_dense, model.macs_pruned, model.params_pruned = macs_dense, params_dense, macs, params
    run.report.prune.groups = merged_widths(steps)
    run.report.prune.unprunable_groups = steps[-1].unscored_groups if steps else []
    # Groups whose removal broke the model (checked after every removal), left whole, with the reason.
    run.report.prune.skipped_groups = [g for s in steps for g in s.skipped_groups]


def export_models(run: Run, recipe: Recipe, dense: nn.Module, pruned: nn.Module,
                  data: DataBundle | None) -> ExportResult:
    """ONNX (+ OpenVINO IR) of the dense and the pruned model, each checked against PyTorch."""
    cfg = recipe.export
    if not cfg.formats:
        return ExportResult()
    samples, labels = parity_samples(recipe, data)
    files, parity = {}, {}
    for role, model, stem in (("dense", dense, "dense"), ("pruned", pruned, "model")):
        model = model.cpu()
        try:
            onnx_file = export_onnx(model, torch.zeros(recipe.model.input_shape), run.path / f"{stem}.onnx",
                                    opset=cfg.onnx.opset, dynamic_batch=cfg.onnx.dynamic_batch)
            xml = None
            if "openvino" in cfg.formats:
                ov_dir = run.path / ("openvino" if role == "pruned" else "openvino_dense")
                xml = export_openvino(onnx_file, None, ov_dir, fp16=cfg.openvino.fp16)
        except ImportError as exc:
            raise RuntimeUnavailableError(f"export needs the deploy extras ({exc}); pip install "
                                          "'pfp-deploy[deploy]' or set export.formats: []") from None
        files[f"{role}_onnx"] = str(onnx_file.relative_to(run.path))
        if xml is not None:
            files[f"{role}_openvino"] = str(xml.relative_to(run.path))
        parity[role] = check_parity(model, samples, onnx_file if "onnx" in cfg.formats else None, xml,
                                    atol=cfg.parity.atol, rtol=cfg.parity.rtol, on_breach=cfg.parity.on_breach,
                                    labels=labels).to_dict()
    return ExportResult(files=files, parity=to_jsonable(parity), sha256=export_hashes(run.path, files))


def parity_samples(recipe: Recipe, data: DataBundle | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first validation images (seeded noise when the data is not at hand, e.g. on an edge box)."""
    n = recipe.export.parity.samples
    if data is None:
        shape = (n, *recipe.model.input_shape[1:])
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)), None
    items = [data.val_loader.dataset[i] for i in range(min(n, len(data.val_loader.dataset)))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def benchmark_targets(run: Run, recipe: Recipe, dense: nn.Module, pruned: nn.Module, export: ExportResult | None,
                      names: Iterable[str] | None = None) -> list[TargetRow]:
    """Latency of dense vs pruned per recipe target (all, or those named) with each target's gates.

    The exported files are verified against the hashes recorded at export first (UsageError on a mismatch)."""
    targets = select_targets(recipe, names)
    if not targets:
        return []
    verify_export(run.path, export.to_dict() if export is not None else None)
    files = {k: run.path / v for k, v in (export.files if export is not None else {}).items()}
    model, measured = run.report.model, run.report.accuracy
    final = measured.final_step()
    latency = recipe.checks.latency

    def show(result) -> None:
        log.info("target %s: %s", result.name, result.reason)

    results = run_targets(targets, dense.cpu(), pruned.cpu(), recipe.model.input_shape,
                          files=files,  # "<role>_<format>": each target's runtime picks its export format
                          macs_ratio=model.macs_dense / model.macs_pruned if model.macs_pruned else None,
                          accuracy={"dense": measured.top1("dense"), "pruned": measured.top1(final) if final else None},
                          warmup=latency.warmup, min_runs=latency.min_runs, min_time_s=latency.min_time_s,
                          on_result=show)
    # as stored: NaN -> null, numpy -> Python numbers
    return [TargetRow.model_validate(to_jsonable(r.to_dict())) for r in results]


def select_targets(recipe: Recipe, names: Iterable[str] | None) -> list:
    targets = recipe.checks.targets
    if names is None:
        return list(targets)
    known = [t.name for t in targets]
    for name in names:
        if name not in known:
            raise UsageError(f"the recipe has no target {name!r}.{did_you_mean(name, known)} "
                             f"Targets: {', '.join(known) or '(none)'}")
    return [t for t in targets if t.name in set(names)]


# ------------------------------------------------------------------------------------------- helpers

def example_input(recipe: Recipe, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(recipe.model.input_shape, device=device)


def cost(model: nn.Module, example: torch.Tensor, metric: str) -> float:
    macs, params = count_cost(model, example)
    return float(macs if metric == "macs" else params)


def merged_widths(steps: list[PruneStep]) -> list[GroupWidth]:
    """Per group: width in the dense model (first step) and after the last step."""
    groups: dict[str, GroupWidth] = {}
    for step in steps:
        for g in step.groups:
            groups.setdefault(g.name, GroupWidth(name=g.name, width_before=g.width_before))
            groups[g.name].width_after = g.width_after
    return list(groups.values())


def _percent(record: Mapping) -> dict:
    """A fine-tuning history record with accuracies in percent, like the rest of the report."""
    return {k: (100.0 * v if k in ("val_top1", "val_top5") and v is not None else v) for k, v in record.items()}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
