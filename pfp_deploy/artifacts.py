"""What the stages hand each other and what report.json holds: small typed, JSON-serialisable models.

Each stage returns one of these (PruneStep, FinetuneStep, ExportResult, TargetRow, CheckRow, ...);
the run assembles them into a `Report`, which is written as report.json, rendered by report.py and
read back by `pfp-deploy check` / `benchmark` (validated strictly there: a string is never a number).
One schema per concept: report.json's layout is defined here and nowhere else.

Every field has a default, so a report from an interrupted run (or an older pfp-deploy) still
validates; keys this version does not know are kept (extra="allow"), never an error.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pfp_deploy.errors import UsageError

MAX_REPORT_BYTES = 64 << 20  # report.json of a 500-layer network with 50 targets is ~2 MB

# The accuracy steps of a run, in order, with the report's labels. The "final" accuracy (what gates
# compare with dense) is the last one measured.
ACCURACY_STEPS = (("dense", "Dense"), ("pruned_only", "Pruned only"), ("reconstructed", "+ Reconstruction"),
                  ("distilled", "+ Calibration distillation"), ("bn_recalibrated", "+ BN recalibration"),
                  ("finetuned", "+ Fine-tune"))
# The accuracy steps after pruning, latest first: the accuracy gate reads the first one measured.
ACCURACY_FINAL_STEPS = tuple(key for key, _ in reversed(ACCURACY_STEPS) if key != "dense")
TargetStatus = Literal["passed", "failed", "skipped", "error"]


class Artifact(BaseModel):
    """Base of every stored part: extra keys kept; `to_dict()` is the JSON form."""

    model_config = ConfigDict(extra="allow")

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


class Accuracy(Artifact):
    """Validation top-1 / top-5 in percent (None: not measured, e.g. fewer than 5 classes)."""

    top1: float | None = None
    top5: float | None = None


class AccuracySteps(Artifact):
    """Accuracy after each step of the run (see ACCURACY_STEPS)."""

    dense: Accuracy | None = None
    pruned_only: Accuracy | None = None
    reconstructed: Accuracy | None = None
    distilled: Accuracy | None = None
    bn_recalibrated: Accuracy | None = None
    finetuned: Accuracy | None = None

    def top1(self, step: str) -> float | None:
        measured = getattr(self, step, None)
        return measured.top1 if measured is not None else None

    def final_step(self) -> str | None:
        """The last step after pruning whose top-1 was measured."""
        return next((step for step in ACCURACY_FINAL_STEPS if self.top1(step) is not None), None)


class GroupWidth(Artifact):
    name: str
    width_before: int | None = None
    width_after: int | None = None


class SkippedGroup(Artifact):
    """A group left whole because removing its channels broke the model."""

    name: str
    reason: str = ""


class LayerError(Artifact):
    """One dense consumer's relative output error on the calibration data, before / after the refit."""

    name: str
    kept_in: int | None = None
    in_before: int | None = None
    kept_out: int | None = None
    out_before: int | None = None
    error_before: float | None = None
    error_after: float | None = None
    heldout_before: float | None = None  # the same on held-out validation images (full forwards)
    heldout_after: float | None = None
    status: str = ""


class CalibrationDistillation(Artifact):
    """calibration_distill.CalibrationDistillResult.to_dict(): KL to the dense model and top-1 agreement
    with it on the calibration images, before and after the distillation."""

    epochs: int | None = None
    steps: int | None = None
    lr: float | None = None
    temperature: float | None = None
    samples: int | None = None
    kl_before: float | None = None
    kl_after: float | None = None
    agreement_before: float | None = None
    agreement_after: float | None = None
    status: str | None = None  # distilled | kept_refit | skipped
    reason: str | None = None  # why it was skipped
    seconds: float | None = None


class Reconstruction(Artifact):
    """reconstruction.ReconstructionResult.to_dict(), or {"method": "none"} when switched off."""

    method: str | None = None
    ridge: float | None = None
    samples: int | None = None
    seconds: float | None = None
    heldout_samples: int | None = None
    layers: list[LayerError] = []
    skipped: list[dict[str, Any]] = []
    distillation: CalibrationDistillation | None = None  # after the refit (prune.reconstruct.distill)


class PruneStep(Artifact):
    """One cascade step's prune: the target, what was reached, the paper's ε, widths, repairs, times."""

    keep: float | None = None  # of the dense cost
    keep_relative: float | None = None  # of the step's input model (a cascade step starts below 1)
    method: str | None = None  # the criterion
    allocation: str | None = None
    allocation_used: str | None = None  # another allocation when the requested one missed the target
    epsilon: float | None = None  # the paper's global ε (allocation: paper)
    epsilon_widths: Any = None  # the ε the chosen widths certify
    achieved: float | None = None
    macs: int | None = None
    params: int | None = None
    seconds: dict[str, float] = {}
    groups: list[GroupWidth] = []
    unscored_groups: list[str] = []
    criterion_fallback: list[str] = []  # groups the criterion could not rank, ranked by L1 instead (lsq)
    selection_ridge: float | None = None  # the ridge lsq's greedy ranking used (None: no such ranking)
    skipped_groups: list[SkippedGroup] = []
    reconstruction: Reconstruction | None = None
    accuracy: dict[str, Accuracy] = {}  # pruned_only / reconstructed / distilled / bn_recalibrated


class FinetuneStep(Artifact):
    keep: float | None = None
    history: list[dict[str, Any]] = []  # per epoch: train_loss, val_top1/top5 (%), lr, seconds
    accuracy: Accuracy | None = None
    stopped_early: bool = False


class ModelInfo(Artifact):
    """The input model and, once saved, the dense and pruned sizes."""

    name: str | None = None
    source: str | None = None
    input_shape: list[int] | None = None
    pretrain: dict[str, Any] | None = None
    macs_dense: int | None = None
    params_dense: int | None = None
    macs_pruned: int | None = None
    params_pruned: int | None = None


class DataInfo(Artifact):
    format: str | None = None
    description: str | None = None
    meaningful_accuracy: bool | None = None  # False for synthetic data
    num_classes: int | None = None
    train_samples: int | None = None
    val_samples: int | None = None


class PruneSection(Artifact):
    """The pruning settings and, per cascade step, a PruneStep; widths merged over the steps."""

    method: str | None = None
    metric: str | None = None
    variant: str | None = None
    allocation: str | None = None
    reconstruct: str | None = None
    schedule: list[float] = []
    calibration_samples: int | None = None
    steps: list[PruneStep] = []
    groups: list[GroupWidth] = []  # width in the dense model and after the last step
    unprunable_groups: list[str] = []
    skipped_groups: list[SkippedGroup] = []


class FinetuneSection(Artifact):
    steps: list[FinetuneStep] = []


class ExportResult(Artifact):
    """Exported files by "<role>_<format>" (role dense|pruned, format onnx|openvino), relative to the
    run directory; parity per role; sha256 of model.pt, dense.pt and every exported file."""

    files: dict[str, str] = {}
    parity: dict[str, dict[str, Any]] = {}
    sha256: dict[str, str] = {}

    def file(self, role: str, fmt: str) -> str | None:
        return self.files.get(f"{role}_{fmt}")


class LatencyRow(Artifact):
    """bench.LatencyStats as stored; NaN is stored as null, so every figure may be null."""

    runtime: str
    device: str | None = None
    provider: str | None = None
    hint: str | None = None
    precision: str | None = None
    threads: int | None = None
    batch: int | None = None
    runs: int | None = None
    first_ms: float | None = None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None = None
    std_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    throughput_ips: float | None = None
    executed_on: str | None = None  # what actually ran: ORT's session provider, the CUDA device's name
    graph: bool | None = None  # torch: CUDA graph replay
    memory_format: str | None = None  # torch: contiguous | channels_last


class GateRow(Artifact):
    gate: str
    limit: float
    measured: float | None
    passed: bool


class TargetRow(Artifact):
    """One deployment target's result (checks.TargetResult.to_dict()): dense vs pruned and its gates."""

    name: str
    status: TargetStatus
    reason: str = ""
    target: dict[str, Any]
    dense: LatencyRow | None = None
    pruned: LatencyRow | None = None
    speedup: float | None = None
    p50_ratio: float | None = None
    macs_ratio: float | None = None
    efficiency: float | None = None
    accuracy_drop: float | None = None
    unavailable: str | None = None
    gates: list[GateRow] = []

    def efficiency_or_derived(self) -> float | None:
        if self.efficiency is not None:
            return self.efficiency
        return self.speedup / self.macs_ratio if self.speedup and self.macs_ratio else None


class CheckRow(Artifact):
    name: str
    status: str
    detail: str | None = None


class Report(Artifact):
    """report.json: the run's outcome and every stage's artifact (None / empty: not reached)."""

    name: str = "unnamed run"
    status: str = "unknown"  # running | passed | failed | error | interrupted
    exit_code: int | None = None
    message: str | None = None
    created: str | None = None
    finished: str | None = None
    run_dir: str | None = None
    recipe: str | None = None  # the resolved recipe's file in the run directory
    pfp_deploy: str | None = None  # the version that wrote it
    model: ModelInfo = Field(default_factory=ModelInfo)
    data: DataInfo = Field(default_factory=DataInfo)
    prune: PruneSection = Field(default_factory=PruneSection)
    accuracy: AccuracySteps = Field(default_factory=AccuracySteps)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    export: ExportResult | None = None
    targets: list[TargetRow] | None = None
    checks: list[CheckRow] | None = None
    times: dict[str, float] = {}  # seconds per pipeline stage
    env: dict[str, Any] | None = None
    resumed_steps: list[str] | None = None
    tracking: dict[str, Any] | None = None  # what the MLflow logging did (report.mlflow)


def load_report_json(path: str | os.PathLike) -> dict:
    """report.json as a dict, read as untrusted data: a regular file (never through a symlink) of
    bounded size holding a JSON object. UsageError naming the file otherwise."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise UsageError(f"report {path} does not exist; pass the report.json of a run") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{path} is not a regular file (a symlink or a device is never read as a report)")
    if info.st_size > MAX_REPORT_BYTES:
        raise UsageError(f"{path} is {info.st_size:,} bytes; a report is read only up to {MAX_REPORT_BYTES:,}")
    try:
        with open(path, "rb") as f:
            report = json.loads(f.read(MAX_REPORT_BYTES + 1).decode("utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"cannot read {path} as JSON ({exc})") from None
    if not isinstance(report, dict):
        kind = "null" if report is None else type(report).__name__
        raise UsageError(f"{path}: expected a JSON object with status, exit_code and targets (the report.json "
                         f"of a run), got a JSON {kind}")
    return report


def read_report(path: str | os.PathLike) -> Report:
    """report.json as a Report (see load_report_json); a field of the wrong type is a UsageError naming it."""
    try:
        return Report.model_validate(load_report_json(path))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UsageError(f"{path}: {where}: {first['msg']} ({exc.error_count()} problem(s)); it is not a "
                         "report.json written by pfp-deploy, or it was edited") from None
