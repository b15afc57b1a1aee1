"""Deployment gates: measure dense vs pruned per target row and check latency/speed-up/accuracy limits.

`run_targets` measures; `evaluate_report` re-checks the gates from a stored JSON report and
`check_report` also requires the run itself to have passed, so `pfp-deploy check --report R` needs no
runtimes at all. Stored reports are validated first, strictly, against the one report schema
(artifacts.Report): a malformed one is a UsageError naming the field, never a TypeError from deep inside.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, get_args

import torch
from pydantic import TypeAdapter, ValidationError

from pfp_deploy.artifacts import ACCURACY_FINAL_STEPS, CheckRow, Report, TargetRow
from pfp_deploy.bench import LatencyStats, compare_latency
from pfp_deploy.errors import EXIT_OK, RuntimeUnavailableError, UsageError, did_you_mean
from pfp_deploy.recipe import _dotted, _show
from pfp_deploy.runtimes import get_runtime, make_runner
from pfp_deploy.schema import LatencyConfig, TargetConfig, _Problems

if TYPE_CHECKING:
    from pfp_deploy.schema import Recipe

PASSED, FAILED, SKIPPED, ERROR = "passed", "failed", "skipped", "error"
LATENCY_GATES = ("p50_ms", "p90_ms", "p99_ms")


# What a stored row's target keeps when an override dict names only new limits.
LIMITS = (*LATENCY_GATES, "min_speedup", "max_accuracy_drop", "on_unavailable")


def as_target(row: TargetConfig | Mapping[str, Any]) -> TargetConfig:
    """A recipe target (TargetConfig, returned as it is) or a dict validated into one; a bad dict raises
    UsageError naming each field, with a suggestion for a misspelt key or runtime."""
    if isinstance(row, TargetConfig):
        return row
    if not isinstance(row, Mapping):
        raise UsageError(f"a target is a TargetConfig or a dict of its fields, got {type(row).__name__}")
    try:
        return TargetConfig.model_validate(dict(row))
    except ValidationError as exc:
        raise UsageError(f"invalid target {row.get('name', '?')!r}: " + "; ".join(_target_problems(exc))) from None


def _target_problems(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = _dotted(err["loc"])
        problem = err.get("ctx", {}).get("error")
        if isinstance(problem, _Problems):  # the runtime's own checks: device, provider, precision, hint
            problems += [f"{key}: {msg}" for key, msg in problem.problems]
        elif err["type"] == "value_error":  # e.g. an unknown runtime, with its suggestion
            problems.append(f"{loc}: {problem}")
        elif err["type"] == "extra_forbidden":
            problems.append(f"{loc}: unknown key.{did_you_mean(loc, TargetConfig.model_fields)}")
        elif err["type"] == "literal_error":
            valid = get_args(TargetConfig.model_fields[loc].annotation)
            problems.append(f"{loc}: got {_show(err['input'])}, {err['msg'][0].lower()}{err['msg'][1:]}."
                            f"{did_you_mean(err['input'], valid)}")
        else:
            problems.append(f"{loc}: {err['msg']}")
    return problems


def _stored_target(target: Mapping[str, Any]) -> dict:
    """A stored row's target as TargetConfig fields. Reports written before precision and hint were
    checked per runtime store hint "LATENCY" on every row; off OpenVINO it meant nothing, so it goes."""
    target = dict(target)
    if target.get("hint") == "LATENCY" and target.get("runtime") in ("torch", "onnxruntime"):
        target.pop("hint")
    return target


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


def check_gates(target: TargetConfig, pruned: LatencyStats | None, speedup: float | None,
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


def _apply_gates(result: TargetResult, target: TargetConfig) -> TargetResult:
    result.gates = check_gates(target, result.pruned, result.speedup, result.accuracy_drop)
    failed = [g.describe() for g in result.gates if not g.passed]
    if failed:
        result.status, result.reason = FAILED, "failed: " + "; ".join(failed)
    else:
        result.status, result.reason = PASSED, f"passed: {len(result.gates)} gate(s) met"
    return result


def _unavailable(result: TargetResult, target: TargetConfig, why: str) -> TargetResult:
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
    targets: Iterable[TargetConfig | Mapping[str, Any]],
    dense_model: torch.nn.Module | None,
    pruned_model: torch.nn.Module | None,
    example_input_shape: Sequence[int],
    *,
    files: Mapping[str, str | os.PathLike] | None = None,
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

    Each target's runtime runs the torch models, or the exported files of its export format: `files`
    maps "<dense|pruned>_<format>" to a path (as report["export"]["files"] does, e.g. "pruned_onnx");
    dense_onnx=... and the other three keywords are the same for the built-in formats.
    A target that fails or errors never stops the others; on_result is called after each one.
    warmup, min_runs and min_time_s have the recipe's bounds (checks.latency): no endless measurement."""
    targets = [as_target(t) for t in targets]  # validate every row before spending time measuring
    _check_timing(warmup=warmup, min_runs=min_runs, min_time_s=min_time_s)
    named = {"dense_onnx": dense_onnx, "pruned_onnx": pruned_onnx, "dense_openvino": dense_openvino,
             "pruned_openvino": pruned_openvino}
    files = {**{k: v for k, v in named.items() if v is not None}, **(files or {})}
    results = []
    for target in targets:
        result = _run_one(target, dense_model, pruned_model, example_input_shape, files, macs_ratio, accuracy,
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
    fmt = get_runtime(target.runtime).export_format  # what it runs: the torch model, or that export
    try:
        runners = {}
        for role, model in (("dense", dense_model), ("pruned", pruned_model)):
            source = model if fmt is None else files.get(f"{role}_{fmt}")
            runners[role] = make_runner(target.runtime, source=source, device=target.device,
                                        provider=target.provider, threads=target.threads,
                                        precision=target.precision, hint=target.hint, graph=target.graph,
                                        memory_format=target.memory_format)
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
                    targets: Iterable[TargetConfig | Mapping[str, Any]] | None = None,
                    *, origin: str = "report") -> tuple[bool, list[TargetResult]]:
    """Re-check gates from a stored report ({"targets": [TargetResult.to_dict(), ...]} or the list itself).

    `targets` (matched by name) replaces the stored limits: a TargetConfig as it is; a dict's missing
    non-limit fields (runtime, device, ...) come from the stored row, so {"name": "cpu", "p50_ms": 2}
    tightens one gate. Passed means no row failed or errored.
    Rows are validated first: a malformed one raises UsageError "<origin>: targets[i].<field> ..."."""
    rows = report.get("targets") if isinstance(report, Mapping) else report
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise UsageError(f'{origin} has no "targets" list of results; pass the JSON written by the deploy stage')
    try:
        _STORED_ROWS.validate_python(list(rows), strict=True)
    except ValidationError as exc:
        raise UsageError(f"{origin}: " + "; ".join(_stored_problems(exc, ("targets",)))) from None
    overrides = {}
    for t in targets or []:
        if not isinstance(t, (TargetConfig, Mapping)):
            raise UsageError(f"a target is a TargetConfig or a dict of its fields, got {type(t).__name__}")
        overrides[t.name if isinstance(t, TargetConfig) else t.get("name")] = t
    results = []
    for i, row in enumerate(rows):
        result = TargetResult.from_dict(row)
        try:
            stored = _stored_target(result.target)
            override = overrides.get(result.name)
            if isinstance(override, Mapping):
                override = {**{k: v for k, v in stored.items() if k not in LIMITS}, **override}
            target = as_target(override if override is not None else stored)
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


# --------------------------------------------------------------------------------- the checks table

def gate_checks(recipe: Recipe, report: Report) -> list[CheckRow]:
    """The checks table of a run's report: accuracy drop, export parity and the deployment targets
    (their gates re-derived from the stored rows)."""
    checks = [accuracy_check(recipe, report)]
    parity = report.export.parity if report.export is not None else {}
    if parity:
        warned = [role for role, p in parity.items() if p.get("status") != "pass"]
        checks.append(CheckRow(name="parity", status="warning" if warned else PASSED,
                               detail=f"outside tolerance (on_breach: warn): {', '.join(warned)}" if warned
                               else f"{', '.join(parity)} within atol {recipe.export.parity.atol}, "
                                    f"rtol {recipe.export.parity.rtol}"))
    if report.targets is None:
        checks.append(CheckRow(name="targets", status=SKIPPED, detail="not run"))
    elif report.targets:
        passed, results = evaluate_report({"targets": [row.to_dict() for row in report.targets]})
        bad = [f"{r.name}: {r.reason}" for r in results if r.status not in (PASSED, SKIPPED)]
        checks.append(CheckRow(name="targets", status=PASSED if passed else FAILED,
                               detail="; ".join(bad) or f"{len(results)} target(s) passed or skipped"))
    return checks


def accuracy_check(recipe: Recipe, report: Report) -> CheckRow:
    """checks.accuracy: dense minus the last measured step's accuracy (percentage points) against max_drop."""
    cfg, acc = recipe.checks.accuracy, report.accuracy
    dense = getattr(acc.dense, cfg.metric) if acc.dense is not None else None
    step = next((k for k in ACCURACY_FINAL_STEPS if getattr(acc, k) is not None), None)
    final = getattr(getattr(acc, step), cfg.metric) if step else None
    if cfg.max_drop is None:
        return CheckRow(name="accuracy", status=SKIPPED, detail="no limit (checks.accuracy.max_drop is null)")
    if dense is None or final is None:
        return CheckRow(name="accuracy", status=SKIPPED, detail=f"{cfg.metric} not measured")
    drop = dense - final
    detail = (f"{cfg.metric} {dense:.2f} % -> {final:.2f} % ({step.replace('_', ' ')}): drop {drop:.2f} pts, "
              f"limit {cfg.max_drop} pts")
    if report.data.meaningful_accuracy is False:
        return CheckRow(name="accuracy", status=SKIPPED, detail=f"synthetic data, accuracy not meaningful: {detail}")
    return CheckRow(name="accuracy", status=PASSED if drop <= cfg.max_drop else FAILED, detail=detail)


# --------------------------------------------------------------------------------- stored reports

# report.json as `check` reads it: the one Report schema (artifacts.py), validated strictly.
_STORED_ROWS = TypeAdapter(list[TargetRow])
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
    # A run always writes these three (null when not reached); without them it is not a run's report.
    missing = [key for key in ("status", "exit_code", "targets") if key not in report]
    if missing:
        raise UsageError(f"{origin}: " + "; ".join(f"{key} is missing" for key in missing))
    try:
        stored = Report.model_validate(dict(report), strict=True)
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
