"""Deployment gates: measure dense vs pruned per target row and check latency/speed-up/accuracy limits.

`run_targets` measures; `evaluate_report` re-checks the gates from a stored JSON report, so
`pfp-deploy check --report R` needs no runtimes at all.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pfp_deploy.bench import LatencyStats, compare_latency, make_runner
from pfp_deploy.errors import RuntimeUnavailableError, UsageError, did_you_mean

PASSED, FAILED, SKIPPED, ERROR = "passed", "failed", "skipped", "error"
LATENCY_GATES = ("p50_ms", "p90_ms", "p99_ms")


class Target(BaseModel):
    """One deployment target row: where to measure and which limits the pruned model must meet."""

    model_config = ConfigDict(extra="forbid")

    name: str
    runtime: Literal["torch", "onnxruntime", "openvino"] = "onnxruntime"
    device: str | None = None  # None: CPU, or for onnxruntime whatever the provider runs on
    provider: str | None = None
    batch: int = Field(1, ge=1)
    threads: int | None = Field(None, ge=1)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    hint: Literal["LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"] = "LATENCY"
    p50_ms: float | None = Field(None, gt=0)
    p90_ms: float | None = Field(None, gt=0)
    p99_ms: float | None = Field(None, gt=0)
    min_speedup: float | None = Field(None, gt=0)
    max_accuracy_drop: float | None = Field(None, ge=0)
    on_unavailable: Literal["skip", "fail"] = "fail"


def as_target(row: Target | BaseModel | Mapping[str, Any]) -> Target:
    """A Target from a dict or pydantic model (e.g. a recipe row); bad rows raise UsageError naming the field."""
    if isinstance(row, Target):
        return row
    if isinstance(row, BaseModel):  # e.g. the recipe's own target model
        row = row.model_dump()
    try:
        return Target.model_validate(dict(row))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            hint = ""
            if err["type"] == "extra_forbidden":
                hint = did_you_mean(loc, Target.model_fields)
            elif err["type"] == "literal_error":  # e.g. runtime "onnxruntme"
                hint = did_you_mean(err["input"], get_args(Target.model_fields[loc].annotation))
            problems.append(f"{loc}: {err['msg']}{hint}")
        raise UsageError(f"invalid target {dict(row).get('name', '?')!r}: " + "; ".join(problems)) from exc


@dataclass
class GateCheck:
    """One limit of a target compared with its measured value."""

    gate: str
    limit: float
    measured: float | None
    passed: bool

    def describe(self) -> str:
        if self.measured is None:
            return f"{self.gate}: not measured"
        op = ">=" if self.gate == "min_speedup" else "<="
        return f"{self.gate} {self.measured:.4g} {op} {self.limit:.4g}" if self.passed else \
            f"{self.gate} {self.measured:.4g} breaks limit {op} {self.limit:.4g}"


@dataclass
class TargetResult:
    """Outcome of one target: status passed/failed/skipped/error, why, and what was measured."""

    name: str
    status: str
    reason: str
    target: dict
    dense: LatencyStats | None = None
    pruned: LatencyStats | None = None
    speedup: float | None = None  # median of per-round dense/pruned p50 ratios
    p50_ratio: float | None = None
    macs_ratio: float | None = None  # dense MACs / pruned MACs
    efficiency: float | None = None  # speedup / macs_ratio: how much of the MACs cut turned into time
    accuracy_drop: float | None = None
    unavailable: str | None = None  # why the runtime/device was missing on the host, when it was
    gates: list[GateCheck] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetResult:
        """Rebuild a result from to_dict() output (unknown keys are ignored)."""
        data = dict(data)
        stats = {k: LatencyStats(**data[k]) if data.get(k) else None for k in ("dense", "pruned")}
        gates = [GateCheck(**g) for g in data.get("gates") or []]
        plain = set(cls.__dataclass_fields__) - {"dense", "pruned", "gates"}
        known = {k: v for k, v in data.items() if k in plain}
        return cls(**known, **stats, gates=gates)


def check_gates(target: Target, pruned: LatencyStats | None, speedup: float | None,
                accuracy_drop: float | None) -> list[GateCheck]:
    """Compare each limit the target sets with the measured value; unset limits are not checked."""
    checks = []
    for gate in LATENCY_GATES:
        limit = getattr(target, gate)
        if limit is not None:
            measured = getattr(pruned, gate) if pruned is not None else None
            checks.append(GateCheck(gate, limit, measured, measured is not None and measured <= limit))
    if target.min_speedup is not None:
        checks.append(GateCheck("min_speedup", target.min_speedup, speedup,
                                speedup is not None and speedup >= target.min_speedup))
    if target.max_accuracy_drop is not None:
        checks.append(GateCheck("max_accuracy_drop", target.max_accuracy_drop, accuracy_drop,
                                accuracy_drop is not None and accuracy_drop <= target.max_accuracy_drop))
    return checks


def _apply_gates(result: TargetResult, target: Target) -> TargetResult:
    result.gates = check_gates(target, result.pruned, result.speedup, result.accuracy_drop)
    failed = [g.describe() for g in result.gates if not g.passed]
    if failed:
        result.status, result.reason = FAILED, "failed: " + "; ".join(failed)
    else:
        result.status, result.reason = PASSED, f"passed: {len(result.gates)} gate(s) met"
    return result


def _unavailable(result: TargetResult, target: Target, why: str) -> TargetResult:
    result.unavailable = why
    if target.on_unavailable == "skip":
        result.status, result.reason = SKIPPED, f"skipped: {why}"
    else:
        result.status, result.reason = FAILED, f"failed: {why} (on_unavailable: fail)"
    return result


def _accuracy_drop(accuracy: Mapping[str, Any] | None, runtime: str) -> float | None:
    """dense - pruned accuracy; figures may be given per runtime ({"openvino": {"dense":..,"pruned":..}})."""
    if not accuracy:
        return None
    figures = accuracy.get(runtime, accuracy)
    if not isinstance(figures, Mapping) or figures.get("dense") is None or figures.get("pruned") is None:
        return None
    return float(figures["dense"]) - float(figures["pruned"])


def run_targets(
    targets: Iterable[Target | Mapping[str, Any]],
    dense_model: torch.nn.Module | None,
    pruned_model: torch.nn.Module | None,
    example_input_shape: Sequence[int],
    *,
    dense_onnx: str | os.PathLike | None = None,
    pruned_onnx: str | os.PathLike | None = None,
    dense_openvino: str | os.PathLike | None = None,
    pruned_openvino: str | os.PathLike | None = None,
    macs_ratio: float | None = None,
    accuracy: Mapping[str, Any] | None = None,
    warmup: int = 10,
    min_runs: int = 50,
    min_time_s: float = 2.0,
    rounds: int = 5,
    on_result: Callable[[TargetResult], None] | None = None,
) -> list[TargetResult]:
    """Measure dense vs pruned for each target (batch from the target) and check its gates.

    A target that fails or errors never stops the others; on_result is called after each one."""
    targets = [as_target(t) for t in targets]  # validate every row before spending time measuring
    results = []
    for target in targets:
        result = _run_one(target, dense_model, pruned_model, example_input_shape,
                          {"dense": (dense_onnx, dense_openvino), "pruned": (pruned_onnx, pruned_openvino)},
                          macs_ratio, accuracy,
                          dict(warmup=warmup, min_runs=min_runs, min_time_s=min_time_s, rounds=rounds))
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _run_one(target, dense_model, pruned_model, shape, files, macs_ratio, accuracy, timing) -> TargetResult:
    result = TargetResult(name=target.name, status=ERROR, reason="", target=target.model_dump(),
                          macs_ratio=macs_ratio, accuracy_drop=_accuracy_drop(accuracy, target.runtime))
    try:
        runners = {}
        for role, model in (("dense", dense_model), ("pruned", pruned_model)):
            onnx_path, xml_path = files[role]
            runners[role] = make_runner(target.runtime, model=model, onnx_path=onnx_path, openvino_xml=xml_path,
                                        device=target.device, provider=target.provider, threads=target.threads,
                                        precision=target.precision, hint=target.hint)
        # Same seeded input for every target so runs are repeatable.
        x = torch.randn(target.batch, *shape[1:], generator=torch.Generator().manual_seed(0))
        comparison = compare_latency(runners["dense"], runners["pruned"], x, **timing)
    except RuntimeUnavailableError as exc:
        return _unavailable(result, target, str(exc))
    except Exception as exc:  # one broken target must not abort the others
        result.reason = f"error: {type(exc).__name__}: {exc}"
        return result
    result.dense, result.pruned = comparison.dense, comparison.pruned
    result.speedup, result.p50_ratio = comparison.speedup, comparison.p50_ratio
    if macs_ratio:
        result.efficiency = comparison.speedup / macs_ratio
    return _apply_gates(result, target)


def evaluate_report(report: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                    targets: Iterable[Target | Mapping[str, Any]] | None = None) -> tuple[bool, list[TargetResult]]:
    """Re-check gates from a stored report ({"targets": [TargetResult.to_dict(), ...]} or the list itself).

    `targets` (matched by name) replaces the stored limits. Passed means no row failed or errored."""
    rows = report.get("targets") if isinstance(report, Mapping) else report
    if not isinstance(rows, Sequence):
        raise UsageError('report has no "targets" list of results; pass the JSON written by the deploy stage')
    overrides = {t.name: t for t in (as_target(t) for t in targets or [])}
    results = []
    for row in rows:
        result = TargetResult.from_dict(row)
        target = overrides.get(result.name) or as_target(result.target)
        result.target = target.model_dump()
        if result.unavailable:
            _unavailable(result, target, result.unavailable)
        elif result.status != ERROR:
            if result.macs_ratio and result.speedup is not None:
                result.efficiency = result.speedup / result.macs_ratio
            _apply_gates(result, target)
        results.append(result)
    return all(r.status in (PASSED, SKIPPED) for r in results), results
