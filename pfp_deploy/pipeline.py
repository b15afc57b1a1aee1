"""optimize(recipe): the pipeline as a list of stage calls, each writing its artifact into runs/<name>/.

    data -> dense model (+ cached pre-training) -> dense accuracy -> calibration set
         -> per cascade step: PFP sensitivity -> prune -> BN re-calibration -> fine-tune
         -> save (plan.json, sensitivity.json, model.pt) -> export + parity -> benchmark -> checks -> report

Every artifact is written atomically, and only by rank 0 under torchrun. `state.json` records each
finished step with its result, so `resume=True` skips what is done and continues an interrupted
fine-tune from its last epoch checkpoint. Exit statuses follow pfp_deploy.errors (0/1/2/3/130).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pfp_deploy.bench import hardware_fingerprint, package_version
from pfp_deploy.checks import ACCURACY_FINAL_STEPS, FAILED, PASSED, gate_checks, run_targets
from pfp_deploy.data import DataBundle, build_data, calibration_size
from pfp_deploy.distributed import (
    DistContext,
    all_reduce_max,
    barrier,
    cleanup,
    init_distributed,
    wrap_loader_for_distributed,
)
from pfp_deploy.errors import (
    EXIT_CHECK_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STAGE_FAILED,
    PFPDeployError,
    RuntimeUnavailableError,
    UsageError,
    did_you_mean,
)
from pfp_deploy.fileio import FileLock, LockedError, file_sha256, remove_stale_temps, write_text_atomic
from pfp_deploy.finetune import evaluate, finetune, recalibrate_batchnorm
from pfp_deploy.models import BUILTIN_MODELS, build_model
from pfp_deploy.pfp import sensitivity as pfp_sensitivity
from pfp_deploy.pruning import Plan, count_cost, load_pruned, prune, reconstruct_layers, save_pruned
from pfp_deploy.recipe import Recipe, load_recipe, read_yaml
from pfp_deploy.report import to_jsonable, write_json_atomic, write_report

log = logging.getLogger("pfp_deploy")

STATE_FILE = "state.json"
RECIPE_FILE = "recipe.resolved.yaml"
# Recipe keys that may differ on --resume: they say where things are, not what is computed.
RESUME_MAY_CHANGE = ("data.root", "data.num_workers")


class ChecksFailedError(PFPDeployError):
    """The run finished but a check (accuracy, latency, speed-up, parity) failed."""

    exit_code = EXIT_CHECK_FAILED


class StageError(PFPDeployError):
    """A stage raised an unexpected exception; the traceback is in <run dir>/error.log."""


# ----------------------------------------------------------------------------------------- result

@dataclass
class Result:
    """What a run produced: the report dict (report.json), its directory and exit status."""

    report: dict
    run_dir: Path | None = None
    error: BaseException | None = field(default=None, repr=False)

    @property
    def status(self) -> str:
        return str(self.report.get("status", "error"))

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    @property
    def exit_code(self) -> int:
        return int(self.report.get("exit_code", EXIT_STAGE_FAILED))

    def raise_for_status(self) -> Result:
        """Return self when passed; else raise the stage's error or ChecksFailedError."""
        if self.passed:
            return self
        if isinstance(self.error, PFPDeployError):
            raise self.error
        if self.exit_code == EXIT_CHECK_FAILED:
            raise ChecksFailedError(self.report.get("message") or "a check failed")
        raise StageError(self.report.get("message") or "the run failed") from self.error

    def to_json(self) -> str:
        return json.dumps(to_jsonable(self.report), indent=2, sort_keys=True, allow_nan=False)


# ---------------------------------------------------------------------------------------- optimize

def optimize(recipe: Recipe | str | os.PathLike | dict, overrides: Iterable[str] = (),
             output_dir: str | os.PathLike = "runs", resume: bool = False, overwrite: bool = False,
             progress: bool = True, stop_after: str | None = None) -> Result:
    """Run a recipe end to end into <output_dir>/<name>/ and return its Result.

    Invalid recipes, inputs or usage raise UsageError (exit 2) before anything is computed; a failed
    stage returns a Result with exit_code 3 (report.json written); Ctrl-C writes report.json with
    status "interrupted" and re-raises KeyboardInterrupt. stop_after="prune" ends after saving the
    pruned model (no fine-tuning, export or benchmarks): `pfp-deploy prune`.
    """
    recipe_file = Path(recipe) if isinstance(recipe, (str, os.PathLike)) else None
    recipe = load_recipe(recipe, overrides)
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
    try:
        with run.stage("model"):
            pretrain(run, recipe, dense, data, progress)
        with run.stage("dense_eval"):
            run.report["accuracy"]["dense"] = run.once("dense_eval", lambda: accuracy(dense, data, dist))
        with run.stage("calibration"):
            calibration = calibration_loader(run, recipe, dense, data)
        pruned, plan = prune_cascade(run, recipe, dense, data, calibration, progress, stop_after)
        with run.stage("save"):
            save_artifacts(run, recipe, dense, pruned, plan)
        if stop_after is None and dist.is_main:
            with run.stage("export"):
                run.report["export"] = run.once("export", lambda: export_models(
                    run, recipe, dense, pruned, data))
            with run.stage("benchmark"):
                run.report["targets"] = run.once("benchmark", lambda: benchmark_targets(
                    run, recipe, dense, pruned, run.report["export"]))
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


# ------------------------------------------------------------------------------------- run directory

class Run:
    """The run directory: artifacts, state.json step markers and the report. Only rank 0 writes."""

    def __init__(self, path: Path, recipe: Recipe, dist: DistContext, resume: bool):
        self.path, self.recipe, self.dist = path, recipe, dist
        self.writer = dist.is_main
        self.steps: dict[str, Any] = {}
        self.current_stage = "setup"
        self.error: BaseException | None = None
        self.resume, self.overwrite = resume, False
        self.report: dict[str, Any] = new_report(recipe, path)
        self.lock: FileLock | None = None

    @classmethod
    def prepare(cls, path: Path, recipe: Recipe, dist: DistContext, *, resume: bool, overwrite: bool,
                recipe_file: Path | None = None) -> Run:
        """Check that the run can start here and lock it (nothing else is created yet): writable, not
        in the way, not in use by another run. The lock is held until release()."""
        if resume and overwrite:
            raise UsageError("pass either --resume (continue the run) or --overwrite (start it over), not both")
        _check_writable(path.parent)
        lock = lock_run_dir(path, dist)
        try:
            run = cls._checked(path, recipe, dist, resume, overwrite, recipe_file)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        run.lock = lock
        return run

    @classmethod
    def _checked(cls, path: Path, recipe: Recipe, dist: DistContext, resume: bool, overwrite: bool,
                 recipe_file: Path | None) -> Run:
        if path.is_symlink():
            raise UsageError(f"run directory {path} is a symlink; pfp-deploy writes only into a real "
                             "directory (it never deletes or writes through links). Use --output-dir.")
        exists = path.exists() and any(path.iterdir())
        if exists and not (resume or overwrite):
            raise UsageError(f"run directory {path} already exists. Pass --overwrite to start the run over, "
                             f"--resume to continue it, or choose another name (--set name=...) or --output-dir.")
        if exists and not (path / STATE_FILE).is_file():
            raise UsageError(f"{path} exists but is not a pfp-deploy run directory (no {STATE_FILE}); "
                             "refusing to " + ("resume from" if resume else "delete") + " it. Choose another "
                             "name (--set name=...) or --output-dir.")
        run = cls(path, recipe, dist, resume=resume and exists)
        if overwrite and exists:
            _check_inputs_outside(recipe, path, recipe_file)
        if run.resume:
            _check_same_recipe(path / RECIPE_FILE, recipe)
            run.steps = json.loads((path / STATE_FILE).read_text())["steps"]
        run.overwrite = overwrite and exists
        barrier()  # every rank checked before rank 0 changes anything
        return run

    def release(self) -> None:
        """Unlock the run directory (the end of optimize(); a dead process's lock goes by itself)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def start(self, data: DataBundle) -> None:
        """Create (or clear) the directory and write the resolved recipe and the first state."""
        self.report["data"].update(description=data.description, meaningful_accuracy=data.meaningful_accuracy,
                                   num_classes=data.num_classes, train_samples=len(data.train_loader.dataset),
                                   val_samples=len(data.val_loader.dataset))
        self.report["resumed_steps"] = [] if self.resume else None
        if self.writer:
            if self.overwrite:
                shutil.rmtree(self.path)
            elif self.resume:  # torn temp files of the interrupted run (no live writer: we hold the lock)
                for stale in remove_stale_temps(self.path):
                    log.info("removed %s, a temp file left by the interrupted run", stale)
            self.path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path / RECIPE_FILE, self.recipe.to_yaml())
            self._save_state()
        barrier()
        if not data.meaningful_accuracy:
            log.warning("synthetic data: accuracy figures are not meaningful (the pipeline is only exercised)")

    # -- stages and steps

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage (times add up over cascade steps) and name it in failure messages."""
        self.current_stage, started = name, time.perf_counter()
        try:
            yield
        finally:
            times = self.report["times"]
            times[name] = round(times.get(name, 0.0) + time.perf_counter() - started, 3)

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        """compute() unless step `key` finished before (then its stored result); the result must be JSON-able."""
        if key in self.steps:
            self.report["resumed_steps"].append(key)
        else:
            self.finish(key, to_jsonable(compute()))
        return self.steps[key]

    def finish(self, key: str, record: Any) -> None:
        self.steps[key] = record
        self._save_state()

    def model_step(self, key: str, dense: nn.Module, example: torch.Tensor,
                   make: Callable[[], tuple[nn.Module, Plan, dict]]) -> tuple[nn.Module, Plan, dict]:
        """A step producing a pruned model: run make() and save its model, or reload the saved one."""
        file = f"checkpoints/{key}.pt"
        if key in self.steps:
            record = self.steps[key]
            log.info("%s: finished in an earlier run, loading %s", key, file)
            self.report["resumed_steps"].append(key)
            model = load_pruned(self.path / file, base_model=dense, example_inputs=example)
            return model.to(example.device), Plan.from_dict(record["plan"]), record
        model, plan, record = make()
        self.save_model(file, model, plan)
        self.finish(key, to_jsonable({**record, "plan": plan.to_dict()}))
        return model, plan, self.steps[key]

    # -- writing (rank 0 only)

    def save_model(self, name: str, model: nn.Module, plan: Plan) -> None:
        if self.writer:
            save_pruned(self.path / name, model, plan, base=architecture_config(self.recipe),
                        example_shape=self.recipe.model.input_shape)

    def write_json(self, name: str, obj: Any) -> Path:
        if self.writer:
            write_json_atomic(self.path / name, obj)
        return self.path / name

    def _save_state(self) -> None:
        self.write_json(STATE_FILE, {"version": 1, "recipe": self.recipe.name, "steps": self.steps,
                                     "updated": _now()})

    # -- endings

    def conclude(self) -> None:
        self.report["checks"] = gate_checks(self.recipe, self.report)
        failed = [c["name"] for c in self.report["checks"] if c["status"] == FAILED]
        status = FAILED if failed else PASSED
        message = f"check(s) failed: {', '.join(failed)}" if failed else "all checks passed"
        self._end(status, EXIT_CHECK_FAILED if failed else EXIT_OK, message)

    def failed(self, exc: Exception) -> None:
        stage = self.current_stage
        if self.writer:
            with contextlib.suppress(OSError):  # e.g. the full disk that failed the stage
                write_text_atomic(self.path / "error.log", "".join(traceback.format_exception(exc)))
        if not isinstance(exc, PFPDeployError):
            error = StageError(f"{type(exc).__name__}: {exc} (traceback in {self.path / 'error.log'})")
            error.__cause__, exc = exc, error
        self.error = exc
        log.error("stage %s failed: %s", stage, exc)
        self._end("error", exc.exit_code, f"stage {stage} failed: {exc}")

    def interrupted(self) -> None:
        self._end("interrupted", EXIT_INTERRUPTED, f"interrupted during stage {self.current_stage}; continue "
                  "with --resume")

    def _end(self, status: str, exit_code: int, message: str) -> None:
        self.report.update(status=status, exit_code=exit_code, message=message, finished=_now())
        if not self.writer:
            return
        self.report["env"] = environment()
        # report.json first, and each file on its own: on a full disk the small machine-readable
        # report may still fit where plots do not, and a failed write keeps the previous file.
        writes = [("report.json", lambda: self.write_json("report.json", self.report)),
                  ("env.json", lambda: self.write_json("env.json", self.report["env"]))]
        if "md" in self.recipe.report.formats:
            writes.append(("report.md", lambda: write_markdown(self.report, self.path,
                                                               plots=self.recipe.report.plots)))
        for name, write in writes:
            try:
                write()
            except OSError as exc:
                log.error("could not write %s: %s", self.path / name, exc.strerror or exc)

    def result(self) -> Result:
        """This run's Result; other ranks read what rank 0 wrote, so every rank agrees."""
        report_file = self.path / "report.json"
        if not self.writer and report_file.is_file():
            return Result(json.loads(report_file.read_text()), self.path, self.error)
        return Result(self.report, self.path, self.error)


def new_report(recipe: Recipe, path: Path) -> dict:
    """The report skeleton; sections a stage has not reached stay None ("not run" in report.md)."""
    return {
        "name": recipe.name, "status": "running", "exit_code": None, "message": None,
        "created": _now(), "run_dir": str(path), "recipe": RECIPE_FILE, "pfp_deploy": package_version("pfp-deploy"),
        "model": {"name": model_label(recipe), "source": recipe.model.source,
                  "input_shape": recipe.model.input_shape},
        "data": {"format": recipe.data.format},
        "prune": {"method": recipe.prune.method, "metric": recipe.prune.metric, "variant": recipe.prune.variant,
                  "allocation": recipe.prune.allocation, "reconstruct": recipe.prune.reconstruct.method,
                  "schedule": recipe.prune.schedule or [recipe.prune.keep], "stages": [], "groups": []},
        "accuracy": {}, "finetune": {"stages": []},
        "export": None, "targets": None, "checks": None, "times": {}, "env": None,
    }


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise UsageError(f"output directory {directory} is not writable ({exc.strerror or exc}). "
                         "Pass --output-dir with a directory you can write to.") from None


def _check_inputs_outside(recipe: Recipe, run_dir: Path, recipe_file: Path | None) -> None:
    """--overwrite deletes the run directory: refuse when an input (model, data, recipe) lives inside it."""
    inputs = (("input model", recipe.model.path), ("input weights", recipe.model.weights),
              ("data root", recipe.data.root), ("recipe", recipe_file))
    inside = run_dir.resolve()
    for what, value in inputs:
        if value and Path(value).exists() and Path(value).resolve().is_relative_to(inside):
            raise UsageError(f"the {what} {value} lies inside the run directory {run_dir}, which "
                             "--overwrite would delete; move it elsewhere or give this run another name "
                             "(--set name=...)")


def lock_run_dir(path: Path, dist: DistContext) -> FileLock | None:
    """Lock <output>/.<name>.lock (beside the run directory, so --overwrite cannot delete it) for the
    run's lifetime. Rank 0 holds it; every rank learns whether it was taken, so all stop together."""
    lock, error = None, None
    if dist.is_main:
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                             "run_dir": str(path)})
        try:
            lock = FileLock(path.parent / f".{path.name}.lock", holder).acquire()
        except LockedError as exc:
            error = UsageError(f"run directory {path} is in use by {_describe_holder(exc.holder)}. Wait for "
                               "that run to finish (or stop it), or choose another name (--set name=...) "
                               "or --output-dir.")
        except OSError as exc:
            error = UsageError(f"cannot lock run directory {path} ({exc.strerror or exc}); the lock file "
                               f"{path.parent / f'.{path.name}.lock'} must be a regular, writable file")
    failed = all_reduce_max(torch.tensor([float(error is not None)], device=dist.device))
    if failed.item():
        raise error or UsageError(f"rank 0 could not lock the run directory {path} (see its message)")
    return lock


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"process {info['pid']} on {info['host']} (started {info['started']})"
    except (ValueError, TypeError, KeyError):
        return "another process"


def _check_same_recipe(stored: Path, recipe: Recipe) -> None:
    old = _flatten(read_yaml(stored)[0]) if stored.is_file() else {}
    new = _flatten(recipe.resolved())
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and not k.startswith(RESUME_MAY_CHANGE))
    if changed:
        shown = ", ".join(changed[:8]) + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")
        raise UsageError(f"cannot --resume {stored.parent}: the recipe differs from the run's {RECIPE_FILE} in "
                         f"{shown}. Undo the change, or pass --overwrite to start the run over.")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


# --------------------------------------------------------------------------------------- the stages

def build_dense_model(recipe: Recipe, data: DataBundle, device: torch.device) -> nn.Module:
    """The input model, weights loaded (seeded, so random initialisations agree across runs and ranks)."""
    torch.manual_seed(recipe.data.seed)
    model = build_model(recipe.model, num_classes=recipe.model.num_classes or data.num_classes,
                        in_channels=data.in_channels)
    return model.to(device)


def pretrain(run: Run, recipe: Recipe, dense: nn.Module, data: DataBundle, progress: bool) -> None:
    """Train the dense model per model.pretrain, once: the weights are cached by a hash of the model and
    data sections under <output_dir>/.cache/pretrained/, and an interrupted training resumes there."""
    cfg = recipe.model.pretrain
    if cfg is None or cfg.epochs == 0:
        return
    key = hashlib.sha256(json.dumps({"model": recipe.model.model_dump(mode="json"),
                                     "data": recipe.data.model_dump(mode="json", exclude={"num_workers"})},
                                    sort_keys=True).encode()).hexdigest()[:16]
    cache = run.path.parent / ".cache" / "pretrained"
    weights = cache / f"{model_label(recipe)}-{key}.pt"
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
            save_pruned(weights, dense, Plan(), base=architecture_config(recipe),
                        example_shape=recipe.model.input_shape)
        info.update(cached=False, history=[_percent(h) for h in result.history])
    run.report["model"]["pretrain"] = info


def accuracy(model: nn.Module, data: DataBundle, dist: DistContext) -> dict[str, float | None]:
    """Validation top-1/top-5 in percent (the report's unit), sharded across ranks under torchrun."""
    loader = wrap_loader_for_distributed(data.val_loader, dist, shuffle=False, even=False)
    metrics = evaluate(model, loader, dist.device, dist=dist)
    return {k: None if metrics[k] is None else 100.0 * metrics[k] for k in ("top1", "top5")}


def calibration_loader(run: Run, recipe: Recipe, dense: nn.Module, data: DataBundle):
    """The PFP calibration draw (the paper's size for "auto"); under torchrun each rank gets its shard."""
    n = calibration_size(recipe.data.calibration_samples, dense, example_input(recipe, run.dist.device),
                         delta=recipe.prune.delta)
    run.report["prune"]["calibration_samples"] = n
    shard = (run.dist.rank, run.dist.world_size) if run.dist.world_size > 1 else None
    return data.calibration_loader(n, shard=shard)


def prune_cascade(run: Run, recipe: Recipe, dense: nn.Module, data: DataBundle, calibration, progress: bool,
                  stop_after: str | None) -> tuple[nn.Module, Plan]:
    """One-shot or cascade: per schedule entry prune (fresh sensitivities) then fine-tune."""
    example = example_input(recipe, run.dist.device)
    model, plan = dense, Plan()
    schedule = recipe.prune.schedule or [recipe.prune.keep]
    for step, keep in enumerate(schedule, 1):
        log.info("prune step %d/%d: keep %.3f of the dense %s", step, len(schedule), keep, recipe.prune.metric)
        with run.stage("prune"):
            model, plan, record = run.model_step(f"prune{step}", dense, example, lambda: prune_step(
                run, recipe, step, keep, model, plan, dense, data, calibration, progress))
        run.report["prune"]["stages"].append(record["report"])
        run.report["accuracy"].update(record["accuracy"])
        if recipe.finetune.epochs and stop_after != "prune":
            with run.stage("finetune"):
                model, plan, record = run.model_step(f"finetune{step}", dense, example, lambda: finetune_step(
                    run, recipe, step, model, plan, dense, data, progress))
            run.report["finetune"]["stages"].append({"keep": keep, "history": record["history"]})
            run.report["accuracy"]["finetuned"] = record["accuracy"]
    return model, plan


def prune_step(run: Run, recipe: Recipe, step: int, keep: float, model: nn.Module, plan: Plan,
               dense: nn.Module, data: DataBundle, calibration, progress: bool) -> tuple[nn.Module, Plan, dict]:
    """Score `model`, prune it to `keep` x the dense cost, reconstruct, re-estimate BatchNorm.

    The accuracy after each repair is measured (pruned_only, reconstructed, bn_recalibrated), so
    the report shows what each one bought."""
    cfg, dist = recipe.prune, run.dist
    example = example_input(recipe, dist.device)
    dense_cost = cost(dense, example, cfg.metric)
    current = cost(model, example, cfg.metric) / dense_cost  # a cascade step starts below 1
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
    macs, params = count_cost(pruned, example)
    achieved = (macs if cfg.metric == "macs" else params) / dense_cost
    accuracies = {"pruned_only": accuracy(pruned, data, dist)}
    log.info("step %d: pruned to %.3f of the dense %s; top-1 %.2f %% before repairs", step, achieved,
             cfg.metric, accuracies["pruned_only"]["top1"])
    repaired = {"method": "none"}
    if cfg.reconstruct.method != "none":  # every rank: the Gram matrices are summed across ranks
        started = time.perf_counter()
        repaired = reconstruct_layers(model, pruned, calibration, cfg.reconstruct, plan=result.plan,
                                      example_inputs=example, progress=progress).to_dict()
        result.report["seconds"]["reconstruction"] = round(time.perf_counter() - started, 4)
        accuracies["reconstructed"] = accuracy(pruned, data, dist)
        log.info("step %d: top-1 %.2f %% after least-squares reconstruction", step,
                 accuracies["reconstructed"]["top1"])
    if cfg.bn_recalibration_samples:
        loader = data.calibration_loader(cfg.bn_recalibration_samples, seed=recipe.data.seed + step)
        recalibrate_batchnorm(pruned, loader, cfg.bn_recalibration_samples, dist.device)
        accuracies["bn_recalibrated"] = accuracy(pruned, data, dist)
        log.info("step %d: top-1 %.2f %% after BN re-calibration", step, accuracies["bn_recalibrated"]["top1"])
    report = {"keep": keep, "keep_relative": result.report["target"], "method": result.report["method"],
              "epsilon": result.report["epsilon"],
              "allocation": result.report["allocation"], "epsilon_widths": result.report["epsilon_widths"],
              "achieved": achieved, "macs": macs, "params": params,
              "seconds": {**result.report["seconds"], "sensitivity": round(seconds, 4)},
              "groups": result.report["groups"], "unscored_groups": result.report["unscored_groups"],
              "skipped_groups": result.report.get("skipped_groups", []), "reconstruction": repaired,
              "accuracy": accuracies}
    return pruned, plan.then(result.plan), {"report": report, "accuracy": accuracies}


def sensitivities(model: nn.Module, calibration, progress: bool) -> dict[str, torch.Tensor]:
    """PFP sensitivities over this rank's calibration shard, MAX-reduced across ranks (a max over
    samples, so every rank ends with the single-process values and prunes identically)."""
    scores = pfp_sensitivity(model, calibration, progress=progress)
    for tensor in scores.values():
        all_reduce_max(tensor)
    return scores


def finetune_step(run: Run, recipe: Recipe, step: int, model: nn.Module, plan: Plan, dense: nn.Module,
                  data: DataBundle, progress: bool) -> tuple[nn.Module, Plan, dict]:
    """Fine-tune (DDP under torchrun), distilling from the dense model when enabled; resumes from last.pt."""
    teacher = dense if recipe.finetune.distill.enabled else None
    result = finetune(model, data.train_loader, data.val_loader, recipe.finetune, teacher=teacher,
                      device=run.dist.device, checkpoint_dir=run.path / "checkpoints" / f"finetune{step}",
                      resume=True, progress=progress, dist=run.dist)
    history = [_percent(h) for h in result.history]
    final = {"top1": history[-1]["val_top1"], "top5": history[-1]["val_top5"]} if history else \
        accuracy(model, data, run.dist)
    return model, plan, {"history": history, "accuracy": final, "stopped_early": result.stopped_early}


def save_artifacts(run: Run, recipe: Recipe, dense: nn.Module, pruned: nn.Module, plan: Plan) -> None:
    """plan.json, sensitivity.json (per step, per layer), model.pt and dense.pt; sizes into the report."""
    example = example_input(recipe, run.dist.device)
    steps = run.report["prune"]["stages"]
    run.write_json("plan.json", plan.to_dict())
    if run.writer:
        layers = [json.loads((run.path / f"checkpoints/sensitivity{i}.json").read_text())
                  for i in range(1, len(steps) + 1)]
        run.write_json("sensitivity.json", {"stages": [{"keep": s["keep"], "layers": scores}
                                                       for s, scores in zip(steps, layers)]})
    run.save_model("model.pt", pruned, plan)
    run.save_model("dense.pt", dense, Plan())
    (macs_dense, params_dense), (macs, params) = count_cost(dense, example), count_cost(pruned, example)
    run.report["model"].update(macs_dense=macs_dense, params_dense=params_dense, macs_pruned=macs,
                               params_pruned=params)
    run.report["prune"]["groups"] = merged_widths(steps)
    run.report["prune"]["unprunable_groups"] = steps[-1]["unscored_groups"] if steps else []
    # Groups whose removal broke the model (checked after every removal), left whole, with the reason.
    run.report["prune"]["skipped_groups"] = [g for s in steps for g in s.get("skipped_groups", [])]


def export_models(run: Run, recipe: Recipe, dense: nn.Module, pruned: nn.Module, data: DataBundle | None) -> dict:
    """ONNX (+ OpenVINO IR) of the dense and the pruned model, each checked against PyTorch."""
    cfg = recipe.export
    if not cfg.formats:
        return {"files": {}, "parity": {}}
    from pfp_deploy.export import check_parity, export_onnx, export_openvino  # onnx, openvino: lazily

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
    return {"files": files, "parity": parity, "sha256": export_hashes(run.path, files)}


def export_hashes(run_dir: Path, files: Mapping[str, str]) -> dict[str, str]:
    """sha256 of model.pt, dense.pt and every exported file (OpenVINO: .xml and .bin), by path in the run
    directory: benchmarks verify them first, so exports that do not belong to model.pt are never measured."""
    names = ["model.pt", "dense.pt"]
    for rel in files.values():
        names.append(rel)
        if rel.endswith(".xml"):
            names.append(str(Path(rel).with_suffix(".bin")))
    return {name: artifact_sha256(run_dir / name) for name in names if (run_dir / name).is_file()}


def artifact_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in chunks. A torch .pt file is hashed by what it holds (tensors' dtype,
    shape and bytes, the plan and other plain values), not by its bytes: a resumed run writes model.pt
    again from a reloaded model whose tensors may sit in other storages (torch.save writes whole
    storages), with the same weights, while keeping its export."""
    if path.suffix == ".pt" and zipfile.is_zipfile(path):
        try:
            digest = hashlib.sha256(b"torch-payload\0")
            _hash_payload(digest, torch.load(path, map_location="cpu", weights_only=True, mmap=True))
            return digest.hexdigest()
        except Exception:  # noqa: BLE001 - unreadable: hash the bytes (and the mismatch names the file)
            pass
    return file_sha256(path, chunk)


def _hash_payload(digest: Any, obj: Any) -> None:
    """Feed a loaded checkpoint into `digest` canonically (dict keys sorted, tensors as raw bytes)."""
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b"")
    elif isinstance(obj, Mapping):
        digest.update(f"D{len(obj)}\0".encode())
        for key in sorted(obj, key=repr):
            digest.update(f"{key!r}\0".encode())
            _hash_payload(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"L{len(obj)}\0".encode())
        for item in obj:
            _hash_payload(digest, item)
    else:
        digest.update(f"V{obj!r}\0".encode())


def verify_export(run_dir: Path, export: Mapping | None) -> None:
    """Before measuring: every file recorded at export still has its hash (UsageError naming it otherwise)."""
    export = export or {}
    if not export.get("files"):
        return
    again = (f"Run `pfp-deploy export --run-dir {run_dir}` again to export model.pt and dense.pt afresh "
             "(then benchmark).")
    recorded = export.get("sha256")
    if not isinstance(recorded, Mapping) or not recorded:
        log.warning("%s records no export hashes (exported by an older pfp-deploy), so the exported files "
                    "cannot be checked against model.pt. %s", run_dir / "report.json", again)
        return
    for name, expected in recorded.items():
        path = run_dir / name
        if not path.is_file():
            raise UsageError(f"{path} is missing (it was written at export and is needed to benchmark). {again}")
        actual = artifact_sha256(path)
        if actual != expected:
            why = ("changed after the export, so the exported files are not made from it" if name in
                   ("model.pt", "dense.pt") else "is not the file the export wrote: it was replaced or modified "
                   "since, so it may not belong to model.pt")
            raise UsageError(f"{path} {why} (sha256 {actual[:12]}..., recorded at export {str(expected)[:12]}...). "
                             f"{again}")


def parity_samples(recipe: Recipe, data: DataBundle | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first validation images (seeded noise when the data is not at hand, e.g. on an edge box)."""
    n = recipe.export.parity.samples
    if data is None:
        shape = (n, *recipe.model.input_shape[1:])
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)), None
    items = [data.val_loader.dataset[i] for i in range(min(n, len(data.val_loader.dataset)))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def benchmark_targets(run: Run, recipe: Recipe, dense: nn.Module, pruned: nn.Module, export: dict | None,
                      names: Iterable[str] | None = None) -> list[dict]:
    """Latency of dense vs pruned per recipe target (all, or those named) with each target's gates.

    The exported files are verified against the hashes recorded at export first (UsageError on a mismatch)."""
    targets = select_targets(recipe, names)
    if not targets:
        return []
    verify_export(run.path, export)
    files = {k: run.path / v for k, v in ((export or {}).get("files") or {}).items()}
    model = run.report["model"]
    top1 = {k: (run.report["accuracy"].get(k) or {}).get("top1") for k in ("dense", *ACCURACY_FINAL_STEPS)}
    final = next((top1[k] for k in ACCURACY_FINAL_STEPS if top1[k] is not None), None)
    latency = recipe.checks.latency

    def show(result) -> None:
        log.info("target %s: %s", result.name, result.reason)

    results = run_targets(targets, dense.cpu(), pruned.cpu(), recipe.model.input_shape,
                          files=files,  # "<role>_<format>": each target's runtime picks its export format
                          macs_ratio=model["macs_dense"] / model["macs_pruned"] if model.get("macs_pruned") else None,
                          accuracy={"dense": top1["dense"], "pruned": final},
                          warmup=latency.warmup, min_runs=latency.min_runs, min_time_s=latency.min_time_s,
                          on_result=show)
    return [to_jsonable(r.to_dict()) for r in results]  # as stored: NaN -> null, numpy -> Python numbers


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


# ---------------------------------------------------------------------------- standalone run-dir commands

def export_run(run_dir: str | os.PathLike, factory: str | None = None) -> Result:
    """Re-export the dense and pruned models of an existing run directory (`pfp-deploy export`).

    `factory` ('module:callable'): the code that builds the architecture of a run made from a
    factory model; the run directory itself is never trusted to name code."""
    run, dense, pruned = _open_run_dir(run_dir, factory)
    with run.stage("export"):
        run.report["export"] = export_models(run, run.recipe, dense, pruned, None)
    return _rewrite(run)


def benchmark_run(run_dir: str | os.PathLike, targets: Iterable[str] | None = None,
                  factory: str | None = None) -> Result:
    """Benchmark a run directory made elsewhere (e.g. on the edge box): its saved models and exported
    files, the recipe's targets (or those named); updates report.json/report.md, gates decide the status."""
    run, dense, pruned = _open_run_dir(run_dir, factory)
    with run.stage("benchmark"):
        results = benchmark_targets(run, run.recipe, dense, pruned, run.report.get("export"), targets)
    fresh = {r["name"]: r for r in results}
    old = [r for r in run.report.get("targets") or [] if r.get("name") not in fresh]
    run.report["targets"] = old + results
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
    run.lock = lock_run_dir(path, run.dist)  # released by _rewrite (or when `run` is collected)
    if (path / "report.json").is_file():
        run.report = json.loads((path / "report.json").read_text())
    run.report.update(times={}, run_dir=str(path))

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


# ------------------------------------------------------------------------------------------- helpers

def example_input(recipe: Recipe, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(recipe.model.input_shape, device=device)


def cost(model: nn.Module, example: torch.Tensor, metric: str) -> float:
    macs, params = count_cost(model, example)
    return float(macs if metric == "macs" else params)


def merged_widths(stages: list[dict]) -> list[dict]:
    """Per group: width in the dense model (first step) and after the last step."""
    groups: dict[str, dict] = {}
    for stage in stages:
        for g in stage["groups"]:
            groups.setdefault(g["name"], {"name": g["name"], "width_before": g["width_before"]})
            groups[g["name"]]["width_after"] = g["width_after"]
    return list(groups.values())


def architecture_config(recipe: Recipe) -> dict:
    """The model section without weights or training: enough to rebuild the architecture anywhere."""
    cfg = recipe.model.model_dump(mode="json")
    cfg.update(weights=None, pretrain=None)
    if cfg["source"] == "checkpoint":
        cfg.update(source="builtin" if cfg["name"] in BUILTIN_MODELS else "torchvision", path=None)
    return cfg


def model_label(recipe: Recipe) -> str:
    m = recipe.model
    return m.name or (m.factory or "").rpartition(":")[2] or Path(m.path or "model").stem


def write_markdown(report: dict, run_dir: Path, plots: bool = True) -> None:
    if plots:
        write_report(report, run_dir)
    else:
        from pfp_deploy.report import render_markdown

        write_text_atomic(run_dir / "report.md", render_markdown(report))


def environment() -> dict:
    """Host and versions for env.json and `pfp-deploy env`: CPU, GPU, packages, ORT providers, OV devices."""
    info = hardware_fingerprint()
    info["versions"] = {name: package_version(name) for name in
                        ("pfp-deploy", "torchvision", "torch-pruning", "numpy", "onnx", "matplotlib")}
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = None
    try:
        import openvino

        info["openvino_devices"] = openvino.Core().available_devices
    except ImportError:
        info["openvino_devices"] = None
    return info


def _percent(record: Mapping) -> dict:
    """A fine-tuning history record with accuracies in percent, like the rest of the report."""
    return {k: (100.0 * v if k in ("val_top1", "val_top5") and v is not None else v) for k, v in record.items()}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
