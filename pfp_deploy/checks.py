"""Deployment gates: measure dense vs pruned per target row and check latency/speed-up/accuracy limits.

`run_targets` measures; `evaluate_report` re-checks the gates from a stored JSON report and
`check_report` also requires the run itself to have passed, so `pfp-deploy check --report R` needs no
runtimes at all. Stored reports are validated first (`StoredReport`): a malformed one is a UsageError
naming the field, never a TypeError from deep inside.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from pfp_deploy.bench import LatencyStats, compare_latency, make_runner
from pfp_deploy.errors import EXIT_OK, RuntimeUnavailableError, UsageError, did_you_mean
from pfp_deploy.recipe import LatencyConfig, _dotted, _show

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
        stats = {k: LatencyStats(**{f: data[k].get(f) for f in LatencyStats.__dataclass_fields__})
                 if data.get(k) else None for k in ("dense", "pruned")}
        gates = [GateCheck(**{f: g.get(f) for f in GateCheck.__dataclass_fields__}) for g in data.get("gates") or []]
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

    A target that fails or errors never stops the others; on_result is called after each one.
    warmup, min_runs and min_time_s have the recipe's bounds (checks.latency): no endless measurement."""
    targets = [as_target(t) for t in targets]  # validate every row before spending time measuring
    _check_timing(warmup=warmup, min_runs=min_runs, min_time_s=min_time_s)
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


def _check_timing(**timing: Any) -> None:
    try:
        LatencyConfig(**timing)
    except ValidationError as exc:
        raise UsageError("latency settings out of range: " + "; ".join(
            f"{err['loc'][0]}={err['input']!r}: {err['msg']}" for err in exc.errors())) from None


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
                    targets: Iterable[Target | Mapping[str, Any]] | None = None,
                    *, origin: str = "report") -> tuple[bool, list[TargetResult]]:
    """Re-check gates from a stored report ({"targets": [TargetResult.to_dict(), ...]} or the list itself).

    `targets` (matched by name) replaces the stored limits. Passed means no row failed or errored.
    Rows are validated first: a malformed one raises UsageError "<origin>: targets[i].<field> ..."."""
    rows = report.get("targets") if isinstance(report, Mapping) else report
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise UsageError(f'{origin} has no "targets" list of results; pass the JSON written by the deploy stage')
    try:
        _STORED_ROWS.validate_python(list(rows))
    except ValidationError as exc:
        raise UsageError(f"{origin}: " + "; ".join(_stored_problems(exc, ("targets",)))) from None
    overrides = {t.name: t for t in (as_target(t) for t in targets or [])}
    results = []
    for i, row in enumerate(rows):
        result = TargetResult.from_dict(row)
        try:
            target = overrides.get(result.name) or as_target(result.target)
        except UsageError as exc:
            raise UsageError(f"{origin}: targets[{i}].target: {exc}") from None
        result.target = target.model_dump()
        if result.unavailable:
            _unavailable(result, target, result.unavailable)
        elif result.status != ERROR:
            if result.macs_ratio and result.speedup is not None:
                result.efficiency = result.speedup / result.macs_ratio
            _apply_gates(result, target)
        results.append(result)
    return all(r.status in (PASSED, SKIPPED) for r in results), results


# --------------------------------------------------------------------------------- stored reports

class _Stored(BaseModel):
    """A part of report.json as `check` reads it: strict types (a string is never a number), other keys kept."""

    model_config = ConfigDict(strict=True, extra="allow")


class StoredLatency(_Stored):
    """LatencyStats as stored; NaN is stored as null, so every figure may be null."""

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


class StoredGate(_Stored):
    gate: str
    limit: float
    measured: float | None
    passed: bool


class StoredTargetRow(_Stored):
    """One TargetResult.to_dict() row."""

    name: str
    status: Literal["passed", "failed", "skipped", "error"]
    reason: str = ""
    target: dict[str, Any]
    dense: StoredLatency | None = None
    pruned: StoredLatency | None = None
    speedup: float | None = None
    p50_ratio: float | None = None
    macs_ratio: float | None = None
    efficiency: float | None = None
    accuracy_drop: float | None = None
    unavailable: str | None = None
    gates: list[StoredGate] = []


class StoredCheck(_Stored):
    name: str
    status: str
    detail: str | None = None


class StoredReport(_Stored):
    """The fields of report.json that `pfp-deploy check` reads."""

    status: str
    exit_code: int | None
    message: str | None = None
    targets: list[StoredTargetRow] | None
    checks: list[StoredCheck] | None = None


_STORED_ROWS = TypeAdapter(list[StoredTargetRow])
_MUST_BE = {"float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
            "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
            "string_type": "a string", "bool_type": "true or false", "list_type": "a list",
            "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object"}


def _stored_problems(exc: ValidationError, prefix: tuple = ()) -> list[str]:
    """'targets[0].pruned.p50_ms must be a number, got 'abc'' per validation error."""
    problems = []
    for err in exc.errors():
        where, kind = _dotted(prefix + tuple(err["loc"])) or "the report", err["type"]
        if kind == "missing":
            problems.append(f"{where} is missing")
        elif kind in _MUST_BE:
            problems.append(f"{where} must be {_MUST_BE[kind]}, got {_show(err['input'])}")
        elif kind == "literal_error":
            problems.append(f"{where} must be one of {err['ctx']['expected']}, got {_show(err['input'])}")
        else:
            problems.append(f"{where}: {err['msg']}, got {_show(err['input'])}")
    return problems


@dataclass
class ReportCheck:
    """What `pfp-deploy check` decides about a stored report."""

    passed: bool
    results: list[TargetResult]  # target rows, gates re-derived from their numbers
    failed_checks: list[dict]  # other failed rows of the report's checks table (accuracy, ...)
    run_problems: list[str]  # why the run itself did not pass (status / exit_code)


def check_report(report: Any, origin: str = "report") -> ReportCheck:
    """Gate a stored report: it passes only when the run finished as passed (status "passed",
    exit_code 0), every target row passes or is skipped on its stored numbers and no other check
    failed. A malformed report raises UsageError naming the field (origin prefixes the message)."""
    if not isinstance(report, Mapping):
        raise UsageError(f"{origin}: expected a JSON object with status, exit_code and targets (the "
                         f"report.json of a run), got {_show(report) if report is None else type(report).__name__}")
    try:
        stored = StoredReport.model_validate(dict(report))
    except ValidationError as exc:
        raise UsageError(f"{origin}: " + "; ".join(_stored_problems(exc))) from None
    run_problems = []
    if stored.status != PASSED or stored.exit_code != EXIT_OK:
        run_problems.append(f"the run ended with status {stored.status!r} and exit_code {stored.exit_code}"
                            + (f": {stored.message}" if stored.message else ""))
    results: list[TargetResult] = []
    if stored.targets is not None:
        results = evaluate_report(report, origin=origin)[1]
    elif not run_problems:
        raise UsageError(f"{origin}: targets is null: this run measured no targets (made by `pfp-deploy "
                         "prune`, or stopped before the benchmark stage). Measure them first: pfp-deploy "
                         "benchmark --run-dir <its run directory>")
    failed_checks = [c.model_dump() for c in stored.checks or [] if c.name != "targets" and c.status == FAILED]
    passed = not run_problems and not failed_checks and all(r.status in (PASSED, SKIPPED) for r in results)
    return ReportCheck(passed, results, failed_checks, run_problems)
