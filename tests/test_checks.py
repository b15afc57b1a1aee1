"""Deployment gates: real measurements per target row, unavailable runtimes, and re-checking stored reports."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn

from pfp_deploy.bench import LatencyStats
from pfp_deploy.checks import TargetResult, as_target, check_gates, check_report, evaluate_report, run_targets
from pfp_deploy.errors import UsageError
from pfp_deploy.recipe import TargetConfig

ort = pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")

SHAPE = (1, 3, 32, 32)
FAST = dict(warmup=1, min_runs=6, min_time_s=0.01, rounds=2)
HAS_ORT_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_OV_GPU = any(d.startswith("GPU") for d in ov.Core().available_devices)


def tiny_cnn(width: int) -> nn.Module:
    """3-conv CNN with BN/ReLU and a Linear head; `width` plays dense (wide) vs pruned (narrow)."""
    torch.manual_seed(width)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    ).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from pfp_deploy.export import export_onnx

    out = tmp_path_factory.mktemp("checks")
    dense, pruned = tiny_cnn(32), tiny_cnn(8)
    with pytest.warns(UserWarning):  # opset 17 -> TorchScript exporter (fast) is fine for gate tests
        onnx = {k: export_onnx(m, torch.randn(*SHAPE), out / f"{k}.onnx", opset=17)
                for k, m in (("dense", dense), ("pruned", pruned))}
    return {"dense": dense, "pruned": pruned, "onnx": onnx}


def _run(models, targets, **kw):
    return run_targets(targets, models["dense"], models["pruned"], SHAPE, dense_onnx=models["onnx"]["dense"],
                       pruned_onnx=models["onnx"]["pruned"], **FAST, **kw)


def test_targets_measure_and_gate_independently(models):
    targets = [
        {"name": "torch-loose", "runtime": "torch", "batch": 2, "threads": 1, "p50_ms": 1e4, "p99_ms": 1e4},
        {"name": "ort-impossible-speedup", "runtime": "onnxruntime", "min_speedup": 1000.0},
        {"name": "openvino-no-ir", "runtime": "openvino"},  # no IR given: an error, not a crash
        TargetConfig(name="ort-tiny-p50", runtime="onnxruntime", p50_ms=1e-6),
    ]
    seen = []
    results = _run(models, targets, macs_ratio=16.0, on_result=lambda r: seen.append(r.name))
    by_name = {r.name: r for r in results}
    assert seen == [t["name"] if isinstance(t, dict) else t.name for t in targets]

    ok = by_name["torch-loose"]
    assert ok.status == "passed", ok.reason
    assert ok.pruned.batch == 2 and ok.pruned.threads == 1 and ok.pruned.runs >= FAST["min_runs"]
    assert [g.gate for g in ok.gates] == ["p50_ms", "p99_ms"] and all(g.passed for g in ok.gates)
    assert ok.efficiency == pytest.approx(ok.speedup / 16.0) and ok.macs_ratio == 16.0

    slow = by_name["ort-impossible-speedup"]
    assert slow.status == "failed" and "min_speedup" in slow.reason
    assert slow.dense.provider == "CPUExecutionProvider" and slow.speedup > 0

    assert by_name["openvino-no-ir"].status == "error"
    assert "openvino" in by_name["openvino-no-ir"].reason

    tiny = by_name["ort-tiny-p50"]
    assert tiny.status == "failed" and "p50_ms" in tiny.reason and tiny.gates[0].measured == tiny.pruned.p50_ms


@pytest.mark.skipif(HAS_ORT_CUDA or HAS_OV_GPU, reason="host has a GPU runtime")
@pytest.mark.parametrize("row", [{"runtime": "onnxruntime", "device": "CUDA"},
                                 {"runtime": "onnxruntime", "provider": "CUDAExecutionProvider"},
                                 {"runtime": "openvino", "device": "GPU"}])
def test_unavailable_target_skips_or_fails(models, row):
    skip, fail = _run(models, [{"name": "skip", **row, "p50_ms": 1.0, "on_unavailable": "skip"},
                               {"name": "fail", **row, "p50_ms": 1.0, "on_unavailable": "fail"}])
    missing = "CUDAExecutionProvider not available" if row["runtime"] == "onnxruntime" else "GPU not present"
    assert skip.status == "skipped" and skip.reason.startswith("skipped: ") and missing in skip.reason
    assert fail.status == "failed" and missing in fail.reason
    assert skip.pruned is None and fail.pruned is None
    passed, _ = evaluate_report({"targets": [skip.to_dict()]})
    assert passed
    passed, _ = evaluate_report({"targets": [skip.to_dict(), fail.to_dict()]})
    assert not passed


def test_accuracy_drop_gate(models):
    row = {"name": "acc", "runtime": "torch", "max_accuracy_drop": 0.02}
    drop_small, = _run(models, [row], accuracy={"dense": 0.91, "pruned": 0.90})
    drop_big, = _run(models, [row], accuracy={"torch": {"dense": 0.91, "pruned": 0.80}, "dense": 0.9, "pruned": 0.9})
    no_figures, = _run(models, [row])
    assert drop_small.status == "passed" and drop_small.accuracy_drop == pytest.approx(0.01)
    assert drop_big.status == "failed" and drop_big.accuracy_drop == pytest.approx(0.11)  # per-runtime wins
    assert no_figures.status == "failed" and "not measured" in no_figures.reason


def _stats(p50: float, p90: float, p99: float) -> LatencyStats:
    return LatencyStats(runtime="onnxruntime", device="CPU", provider="CPUExecutionProvider", hint=None,
                        precision="fp32", threads=2, batch=1, runs=50, first_ms=9.0, p50_ms=p50, p90_ms=p90,
                        p99_ms=p99, mean_ms=p50, std_ms=0.1, min_ms=p50 * 0.9, max_ms=p99 * 1.1,
                        throughput_ips=1000.0 / p50)


@pytest.mark.parametrize("limits, failing", [
    ({"p50_ms": 2.0, "p90_ms": 3.0, "p99_ms": 4.0, "min_speedup": 1.5}, []),
    ({"p50_ms": 1.9}, ["p50_ms"]),
    ({"p90_ms": 2.4, "p99_ms": 3.9}, ["p90_ms", "p99_ms"]),
    ({"min_speedup": 1.8, "max_accuracy_drop": 0.005}, ["min_speedup", "max_accuracy_drop"]),
    ({"p50_ms": 2.0, "max_accuracy_drop": 0.01}, []),  # limits are inclusive
])
def test_gates_on_synthetic_stats(limits, failing):
    target = TargetConfig(name="t", runtime="onnxruntime", **limits)
    checks = check_gates(target, _stats(2.0, 2.5, 4.0), speedup=1.75, accuracy_drop=0.01)
    assert sorted(limits) == sorted(c.gate for c in checks)
    assert sorted(c.gate for c in checks if not c.passed) == sorted(failing)


def _stored_report() -> dict:
    target = TargetConfig(name="cpu", runtime="onnxruntime", p50_ms=5.0).model_dump()
    row = TargetResult(name="cpu", status="passed", reason="", target=target,
                       dense=_stats(6.0, 7.0, 8.0), pruned=_stats(3.0, 3.5, 4.0), speedup=2.0, p50_ratio=2.0,
                       macs_ratio=4.0)
    return json.loads(json.dumps({"targets": [row.to_dict()]}))  # as read back from disk


def test_evaluate_report_rechecks_stored_gates():
    passed, rows = evaluate_report(_stored_report())
    assert passed and rows[0].status == "passed" and rows[0].efficiency == pytest.approx(0.5)
    assert rows[0].pruned.p50_ms == 3.0

    # Tighter limits from a recipe, matched by name, turn the same measurements into a failure.
    passed, rows = evaluate_report(_stored_report(), targets=[{"name": "cpu", "p50_ms": 2.5, "min_speedup": 3.0}])
    assert not passed and rows[0].status == "failed"
    assert "p50_ms 3 breaks limit <= 2.5" in rows[0].reason and "min_speedup" in rows[0].reason

    # Stored failures are re-derived, not trusted: a row wrongly marked failed passes if its numbers do.
    report = _stored_report()
    report["targets"][0]["status"] = "failed"
    assert evaluate_report(report)[0]

    # Error rows stay errors and fail the check.
    report["targets"][0].update(status="error", reason="error: boom")
    passed, rows = evaluate_report(report["targets"])
    assert not passed and rows[0].reason == "error: boom"


def test_reports_stored_before_hints_were_checked_per_runtime_still_check():
    report = _stored_report()
    report["targets"][0]["target"]["hint"] = "LATENCY"  # older writers stored it on every row
    passed, rows = evaluate_report(report)
    assert passed and rows[0].target["hint"] is None and rows[0].target["provider"] == "CPUExecutionProvider"
    report["targets"][0]["target"].update(runtime="torch", provider=None, device="cpu")
    passed, rows = evaluate_report(report, targets=[{"name": "cpu", "p90_ms": 3.0}])  # limits replaced
    assert not passed and [g.gate for g in rows[0].gates] == ["p90_ms"] and rows[0].target["runtime"] == "torch"


def test_bad_target_rows_are_usage_errors():
    with pytest.raises(UsageError, match='Did you mean "p50_ms"'):
        as_target({"name": "x", "p50ms": 3})
    with pytest.raises(UsageError, match='runtime.*Did you mean "onnxruntime"'):
        as_target({"name": "x", "runtime": "onnxruntme"})
    with pytest.raises(UsageError, match="on_unavailable"):
        as_target({"name": "x", "on_unavailable": "ignore"})
    with pytest.raises(UsageError, match="batch"):
        as_target({"name": "x", "batch": 0})
    with pytest.raises(UsageError, match="targets"):
        evaluate_report({"rows": []})


def test_check_report_requires_the_run_itself_to_have_passed():
    report = {**_stored_report(), "status": "passed", "exit_code": 0, "checks": []}
    verdict = check_report(report)
    assert verdict.passed and verdict.results[0].status == "passed" and not verdict.run_problems
    for status, code in (("interrupted", 130), ("error", 3), ("running", None), ("passed", 1)):
        verdict = check_report({**report, "status": status, "exit_code": code})
        assert not verdict.passed and verdict.results[0].status == "passed"  # the rows alone would pass
        assert f"status {status!r} and exit_code {code}" in verdict.run_problems[0]
    failed_accuracy = {**report, "checks": [{"name": "accuracy", "status": "failed", "detail": "drop 3 pts"}]}
    assert not check_report(failed_accuracy).passed


def test_stored_reports_are_validated_before_use():
    report = _stored_report()
    report["targets"][0]["pruned"]["p50_ms"] = "abc"
    with pytest.raises(UsageError, match=r"^r\.json: targets\[0\]\.pruned\.p50_ms must be a number, got 'abc'$"):
        evaluate_report(report, origin="r.json")
    with pytest.raises(UsageError, match=r"targets\[0\]\.pruned\.p50_ms must be a number"):
        evaluate_report(report["targets"])  # the list form of the API too
    report = _stored_report()
    report["targets"][0]["gates"] = [{"gate": "p50_ms", "limit": 5.0, "measured": 3.0, "passed": True, "note": 1}]
    assert evaluate_report(report)[0]  # unknown keys (a newer writer) are ignored, not a TypeError
    with pytest.raises(UsageError, match="expected a JSON object"):
        check_report([report["targets"][0]])
    with pytest.raises(UsageError, match="status is missing; exit_code is missing"):
        check_report({"targets": []})


def test_latency_settings_are_bounded_so_a_benchmark_cannot_hang():
    import signal

    from helpers.tiny_recipes import tiny_recipe

    from pfp_deploy.errors import RecipeError
    from pfp_deploy.recipe import load_recipe

    for key, value, says in (("min_time_s", float("inf"), "finite number"), ("min_time_s", 601, "[0, 600]"),
                             ("warmup", 10**6, "[0, 1000]"), ("min_runs", 10**6, "[1, 10000]")):
        recipe = tiny_recipe()
        recipe["checks"]["latency"][key] = value
        with pytest.raises(RecipeError, match=rf"checks\.latency\.{key}: .*{re.escape(says)}"):
            load_recipe(recipe)
    signal.alarm(60)  # a regression would measure forever
    try:
        with pytest.raises(UsageError, match="min_time_s=inf"):
            run_targets([{"name": "t", "runtime": "torch"}], tiny_cnn(8), tiny_cnn(8), SHAPE, min_time_s=float("inf"))
    finally:
        signal.alarm(0)
