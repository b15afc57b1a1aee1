"""optimize(recipe): the pipeline as a list of stage calls, each writing its artifact into runs/<name>/.

    data -> dense model (+ cached pre-training) -> dense accuracy -> calibration set
         -> per cascade step: PFP sensitivity -> prune -> reconstruct -> BN re-calibration -> fine-tune
         -> save (plan.json, sensitivity.json, model.pt) -> export + parity -> benchmark -> checks -> report

The stages are in stages.py, the run directory (lock, resume state, report files) in run_dir.py.
Every artifact is written atomically, and only by rank 0 under torchrun. `state.json` records each
finished step with its result, so `resume=True` skips what is done and continues an interrupted
fine-tune from its last epoch checkpoint. Exit statuses follow pfp_deploy.errors (0/1/2/3/130).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from pfp_deploy.artifacts import Accuracy, ExportResult, TargetRow, read_report
from pfp_deploy.data import build_data
from pfp_deploy.distributed import DistContext, barrier, cleanup, init_distributed
from pfp_deploy.errors import UsageError
from pfp_deploy.export import artifact_sha256  # noqa: F401 (re-exported: the integrity hash of a run's files)
from pfp_deploy.models import build_model, load_pruned
from pfp_deploy.recipe import load_recipe, validate_section
from pfp_deploy.run_dir import RECIPE_FILE, Result, Run, lock_run_dir
from pfp_deploy.schema import Recipe
from pfp_deploy.stages import (
    accuracy,
    benchmark_targets,
    build_dense_model,
    calibration_loader,
    export_models,
    pretrain,
    prune_cascade,
    save_artifacts,
)
from pfp_deploy.tracking import MlflowConfig


def optimize(recipe: Recipe | str | os.PathLike | dict, overrides: Iterable[str] = (),
             output_dir: str | os.PathLike = "runs", resume: bool = False, overwrite: bool = False,
             progress: bool = True, stop_after: str | None = None,
             tracking: MlflowConfig | dict | None = None) -> Result:
    """Run a recipe end to end into <output_dir>/<name>/ and return its Result.

    `tracking` (an MlflowConfig or its dict) logs the finished run to MLflow, as the recipe's
    report.mlflow does (it replaces that section): a pipeline step gets its run id from
    result.report["tracking"].

    Invalid recipes, inputs or usage raise UsageError (exit 2) before anything is computed; a failed
    stage returns a Result with exit_code 3 (report.json written); Ctrl-C writes report.json with
    status "interrupted" and re-raises KeyboardInterrupt. stop_after="prune" ends after saving the
    pruned model (no fine-tuning, export or benchmarks): `pfp-deploy prune`.
    """
    recipe_file = Path(recipe) if isinstance(recipe, (str, os.PathLike)) else None
    recipe = load_recipe(recipe, overrides)
    if tracking is not None:
        recipe.report.mlflow = validate_section(MlflowConfig, tracking, "optimize(tracking=...)")
    if stop_after not in (None, "prune"):
        raise UsageError(f'stop_after must be None or "prune", got {stop_after!r}')
    joined = not torch.distributed.is_initialized()
    dist = init_distributed()
    run = None
    try:
        with terminate_as_interrupt():
            run = Run.prepare(Path(output_dir) / recipe.name, recipe, dist, resume=resume, overwrite=overwrite,
                              recipe_file=recipe_file)
            return _run_stages(run, recipe, dist, progress, stop_after)
    finally:
        if run is not None:
            run.release()
        if joined:
            cleanup()


def _run_stages(run: Run, recipe: Recipe, dist: DistContext, progress: bool, stop_after: str | None) -> Result:
    """optimize()'s stages, in order, in a prepared (locked) run directory."""
    with run.stage("data"):
        data = build_data(recipe.data, recipe.model.input_shape)
    with run.stage("model"):
        dense = build_dense_model(recipe, data, dist.device)
    run.start(data)  # the run directory exists from here: every failure below leaves a report
    report = run.report
    try:
        with run.stage("model"):
            report.model.pretrain = pretrain(run, recipe, dense, data, progress)
        with run.stage("dense_eval"):
            report.accuracy.dense = Accuracy.model_validate(run.once("dense_eval", lambda: accuracy(dense, data, dist)))
        with run.stage("calibration"):
            calibration, report.prune.calibration_samples = calibration_loader(run, recipe, dense, data)
        pruned, plan = prune_cascade(run, recipe, dense, data, calibration, progress, stop_after)
        with run.stage("save"):
            save_artifacts(run, recipe, dense, pruned, plan)
        if stop_after is None and dist.is_main:
            with run.stage("export"):
                report.export = ExportResult.model_validate(run.once("export", lambda: export_models(
                    run, recipe, dense, pruned, data)))
            with run.stage("benchmark"):
                report.targets = [TargetRow.model_validate(row) for row in run.once("benchmark", lambda: (
                    benchmark_targets(run, recipe, dense, pruned, report.export)))]
        run.conclude()
    except KeyboardInterrupt:
        run.interrupted()
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a report; usage errors re-raise
        run.failed(exc)
        if isinstance(exc, UsageError):
            raise
    barrier()
    return run.result()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (docker stop, a CI timeout, torchrun stopping its workers) ends a run like Ctrl-C: the
    report says "interrupted", exit 130, and --resume continues. Only the main thread can set it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------- standalone run-dir commands

def export_run(run_dir: str | os.PathLike, factory: str | None = None) -> Result:
    """Re-export the dense and pruned models of an existing run directory (`pfp-deploy export`).

    `factory` ('module:callable'): the code that builds the architecture of a run made from a
    factory model; the run directory itself is never trusted to name code."""
    run, dense, pruned = _open_run_dir(run_dir, factory)
    with run.stage("export"):
        run.report.export = export_models(run, run.recipe, dense, pruned, None)
    return _rewrite(run)


def benchmark_run(run_dir: str | os.PathLike, targets: Iterable[str] | None = None,
                  factory: str | None = None) -> Result:
    """Benchmark a run directory made elsewhere (e.g. on the edge box): its saved models and exported
    files, the recipe's targets (or those named); updates report.json/report.md, gates decide the status."""
    run, dense, pruned = _open_run_dir(run_dir, factory)
    with run.stage("benchmark"):
        results = benchmark_targets(run, run.recipe, dense, pruned, run.report.export, targets)
    fresh = {r.name for r in results}
    run.report.targets = [r for r in run.report.targets or [] if r.name not in fresh] + results
    return _rewrite(run)


def _open_run_dir(run_dir: str | os.PathLike, factory: str | None = None) -> tuple[Run, nn.Module, nn.Module]:
    """The run's recipe, report and models. Everything here is read as data: the models' architecture
    comes from the files' builtin/torchvision record, or from the caller's `factory`."""
    path = Path(run_dir)
    if not (path / RECIPE_FILE).is_file() or not (path / "model.pt").is_file():
        raise UsageError(f"{path} is not a finished pfp-deploy run directory (needs {RECIPE_FILE} and "
                         "model.pt); pass the runs/<name> directory written by `pfp-deploy optimize`")
    recipe = load_recipe(path / RECIPE_FILE)
    run = Run(path, recipe, DistContext(), resume=False)
    run.track = False  # the run was logged when it was made; a re-export or re-benchmark is not a new run
    run.lock = lock_run_dir(path, run.dist)  # released by _rewrite (or when `run` is collected)
    if (path / "report.json").is_file():
        run.report = read_report(path / "report.json")
    run.report.times, run.report.run_dir = {}, str(path)

    def base() -> nn.Module | None:  # a fresh instance per file: a plan without steps returns its base
        if factory is None:
            return None
        cfg = recipe.model.model_copy(update={"source": "factory", "factory": factory, "weights": None,
                                              "path": None, "pretrain": None})
        return build_model(cfg)

    return (run, load_pruned(path / "dense.pt", base_model=base()).eval(),
            load_pruned(path / "model.pt", base_model=base()).eval())


def _rewrite(run: Run) -> Result:
    try:
        run.conclude()
        return run.result()
    finally:
        run.release()
