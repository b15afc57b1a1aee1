"""The run directory runs/<name>/: its lock, the resume state (state.json), the report and the Result.

Only rank 0 writes. `Run.prepare` checks that a run may start here (writable, not another run's, not
in use) and locks it; `Run.once` / `Run.model_step` skip the steps state.json records as finished
(resume); `conclude` / `failed` / `interrupted` end the run and write report.json first, then report.md.
Vocabulary: a *stage* is a pipeline stage (data, model, prune, finetune, export, ...: the keys of
report["times"]); a *step* is one entry of the cascade schedule (prune1, finetune1, ...: the keys of
state.json).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pfp_deploy.artifacts import DataInfo, ModelInfo, PruneSection, Report
from pfp_deploy.checks import FAILED, PASSED, gate_checks
from pfp_deploy.data import DataBundle
from pfp_deploy.distributed import DistContext, all_reduce_max, barrier
from pfp_deploy.environment import environment, package_version
from pfp_deploy.errors import (
    EXIT_CHECK_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STAGE_FAILED,
    ChecksFailedError,
    PFPDeployError,
    StageError,
    TrackingError,
    UsageError,
)
from pfp_deploy.fileio import FileLock, LockedError, remove_stale_temps, write_text_atomic
from pfp_deploy.models import architecture_config, load_pruned, model_label, save_pruned
from pfp_deploy.pruning import Plan
from pfp_deploy.recipe import read_yaml
from pfp_deploy.report import to_jsonable, write_json_atomic, write_markdown
from pfp_deploy.schema import Recipe
from pfp_deploy.tracking import log_run

log = logging.getLogger("pfp_deploy")

STATE_FILE = "state.json"
RECIPE_FILE = "recipe.resolved.yaml"
# Recipe keys that may differ on --resume: they say where things are (or are logged), not what is computed.
RESUME_MAY_CHANGE = ("data.root", "data.num_workers", "report.mlflow")


@dataclass
class Result:
    """What a run produced: the report as report.json holds it (the JSON contract), its directory and
    exit status. `typed()` gives the same report as an artifacts.Report."""

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

    def typed(self) -> Report:
        return Report.model_validate(self.report)

    def to_json(self) -> str:
        return json.dumps(to_jsonable(self.report), indent=2, sort_keys=True, allow_nan=False)


class Run:
    """The run directory: artifacts, state.json step markers and the report. Only rank 0 writes."""

    def __init__(self, path: Path, recipe: Recipe, dist: DistContext, resume: bool):
        self.path, self.recipe, self.dist = path, recipe, dist
        self.writer = dist.is_main
        self.steps: dict[str, Any] = {}
        self.current_stage = "setup"
        self.error: BaseException | None = None
        self.resume, self.overwrite = resume, False
        self.report: Report = new_report(recipe, path)
        self.lock: FileLock | None = None
        self.track = True  # log to MLflow at the end (report.mlflow); off when re-benchmarking a run directory

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
        self.report.data = DataInfo(format=self.recipe.data.format, description=data.description,
                                    meaningful_accuracy=data.meaningful_accuracy, num_classes=data.num_classes,
                                    train_samples=len(data.train_loader.dataset),
                                    val_samples=len(data.val_loader.dataset))
        self.report.resumed_steps = [] if self.resume else None
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
            times = self.report.times
            times[name] = round(times.get(name, 0.0) + time.perf_counter() - started, 3)

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        """compute() unless step `key` finished before (then its stored result); the result must be JSON-able."""
        if key in self.steps:
            self.report.resumed_steps.append(key)
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
            self.report.resumed_steps.append(key)
            model = load_pruned(self.path / file, base_model=dense, example_inputs=example)
            return model.to(example.device), Plan.from_dict(record["plan"]), record
        model, plan, record = make()
        self.save_model(file, model, plan)
        self.finish(key, to_jsonable({**record, "plan": plan.to_dict()}))
        return model, plan, self.steps[key]

    # -- writing (rank 0 only)

    def save_model(self, name: str, model: nn.Module, plan: Plan) -> None:
        if self.writer:
            save_pruned(self.path / name, model, plan, base=architecture_config(self.recipe.model),
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
        self.report.checks = gate_checks(self.recipe, self.report)
        failed = [c.name for c in self.report.checks if c.status == FAILED]
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
        self.report.status, self.report.exit_code, self.report.message = status, exit_code, message
        self.report.finished = _now()
        if not self.writer:
            return
        self.report.env = environment()
        # report.json first, and each file on its own: on a full disk the small machine-readable
        # report may still fit where plots do not, and a failed write keeps the previous file.
        writes = [("report.json", lambda: self.write_json("report.json", self.report.to_dict())),
                  ("env.json", lambda: self.write_json("env.json", self.report.env))]
        if "md" in self.recipe.report.formats:
            writes.append(("report.md", lambda: write_markdown(self.report, self.path,
                                                               plots=self.recipe.report.plots)))
        for name, write in writes:
            try:
                write()
            except OSError as exc:
                log.error("could not write %s: %s", self.path / name, exc.strerror or exc)
        if status != "interrupted":
            self._track()

    def _track(self) -> None:
        """Log the finished run directory to MLflow (report.mlflow; rank 0 only, after report.json is
        written). The outcome goes into report.json's `tracking`; when tracking is required and fails,
        the run fails with the TrackingError (its files are all written: `--resume` only logs again)."""
        cfg = self.recipe.report.mlflow
        if cfg is None or not cfg.enabled or not self.track or not self.writer:
            return
        try:
            result = log_run(self.path, cfg, self.recipe.resolved()).to_dict()
        except TrackingError as exc:
            log.error("MLflow tracking failed: %s", exc)
            self.error = exc
            result = {"status": "failed", "error": str(exc)}
            self.report.status, self.report.exit_code = "error", exc.exit_code
            self.report.message = f"stage tracking failed: {exc}"
        else:
            if result.get("status") == "logged":
                log.info("logged to MLflow: experiment %s, run %s", result.get("experiment"), result.get("run_id"))
        self.report.tracking = result
        try:
            self.write_json("report.json", self.report.to_dict())
        except OSError as exc:
            log.error("could not write %s: %s", self.path / "report.json", exc.strerror or exc)

    def result(self) -> Result:
        """This run's Result; other ranks read what rank 0 wrote, so every rank agrees."""
        report_file = self.path / "report.json"
        if not self.writer and report_file.is_file():
            return Result(json.loads(report_file.read_text()), self.path, self.error)
        return Result(to_jsonable(self.report.to_dict()), self.path, self.error)


def new_report(recipe: Recipe, path: Path) -> Report:
    """The report skeleton; sections a stage has not reached stay None / empty ("not run" in report.md)."""
    cfg = recipe.prune
    return Report(
        name=recipe.name, status="running", created=_now(), run_dir=str(path), recipe=RECIPE_FILE,
        pfp_deploy=package_version("pfp-deploy"),
        model=ModelInfo(name=model_label(recipe.model), source=recipe.model.source,
                        input_shape=recipe.model.input_shape),
        data=DataInfo(format=recipe.data.format),
        prune=PruneSection(method=cfg.method, metric=cfg.metric, variant=cfg.variant, allocation=cfg.allocation,
                           reconstruct=cfg.reconstruct.method, schedule=cfg.schedule or [cfg.keep]),
    )


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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
