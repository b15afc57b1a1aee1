"""GPU targets (issue 12) as far as a CPU can check them: settings validation, skip/fail on a host
without the device, what-actually-ran in the stored rows, the CUDA-graph capture logic (with a fake
CUDA backend), IO binding, and benchmarks/gpu_checks.py's plan and no-CUDA path. The tests marked
`gpu` run the real CUDA paths and skip without a CUDA device."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from benchmarks import gpu_checks
from pfp_deploy.artifacts import TargetRow
from pfp_deploy.bench import measure_latency
from pfp_deploy.checks import TargetResult, evaluate_report, run_targets
from pfp_deploy.errors import RecipeError, RuntimeUnavailableError, UsageError
from pfp_deploy.recipe import load_recipe
from pfp_deploy.runtimes import SettingsError, get_runtime, make_runner
from pfp_deploy.runtimes._cuda_graph import GraphCache, GraphInput
from pfp_deploy.runtimes.torch import TorchRunner

SHAPE = (1, 3, 16, 16)
FAST = dict(warmup=1, min_runs=3, min_time_s=0)
RECIPE = {"name": "t", "model": {"source": "builtin", "name": "resnet20"}, "data": {"format": "synthetic"},
          "export": {"formats": ["onnx", "openvino"]}}
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
HAS_OV = importlib.util.find_spec("openvino") is not None


def tiny_cnn(width: int) -> nn.Module:
    torch.manual_seed(width)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4)).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from pfp_deploy.export import export_onnx, export_openvino

    out = tmp_path_factory.mktemp("gpu_targets")
    found: dict = {}
    for role, width in (("dense", 16), ("pruned", 4)):
        found[role] = model = tiny_cnn(width)
        if importlib.util.find_spec("onnx") is None:
            continue
        with pytest.warns(UserWarning):
            found[f"{role}_onnx"] = export_onnx(model, torch.randn(*SHAPE), out / f"{role}.onnx", opset=17)
        if HAS_OV:
            found[f"{role}_openvino"] = export_openvino(found[f"{role}_onnx"], None, out / f"ov_{role}")
    return found


def _recipe_error(target: dict) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe({**RECIPE, "checks": {"targets": [{"name": "x", **target}]}})
    return str(info.value)


def _resolved(target: dict) -> dict:
    return load_recipe({**RECIPE, "checks": {"targets": [{"name": "x", **target}]}}).checks.targets[0].model_dump()


# --------------------------------------------------------------------------------- settings

def test_cpu_targets_resolve_exactly_as_before():
    """Existing recipes keep their behaviour: torch on CPU is eager and contiguous, other runtimes
    get no torch-only settings."""
    row = _resolved({"runtime": "torch"})
    assert (row["device"], row["graph"], row["memory_format"], row["precision"]) == ("cpu", False, "contiguous", "fp32")
    for runtime in ("onnxruntime", "openvino"):
        row = _resolved({"runtime": runtime})
        assert row["graph"] is None and row["memory_format"] is None
    assert _resolved({"runtime": "onnxruntime"})["provider"] == "CPUExecutionProvider"
    defaults = get_runtime("torch").settings()
    assert defaults == {"device": "cpu", "provider": None, "precision": "fp32", "hint": None, "graph": False,
                        "memory_format": "contiguous"}
    assert get_runtime("torch").settings(**defaults) == defaults


@pytest.mark.parametrize("target, graph, memory_format", [
    ({"device": "cuda"}, True, "contiguous"),  # graph: auto is on for CUDA
    ({"device": "gpu", "precision": "fp16"}, True, "channels_last"),  # auto: NHWC for fp16 on CUDA
    ({"device": "cuda:1", "precision": "bf16", "graph": "auto", "memory_format": "auto"}, True, "channels_last"),
    ({"device": "cuda", "graph": False, "memory_format": "contiguous", "precision": "fp16"}, False, "contiguous"),
    ({"device": "cuda", "graph": "off"}, False, "contiguous"),
    ({"device": "cpu", "memory_format": "channels_last"}, False, "channels_last"),  # explicit: any device
    ({"device": "mps", "precision": "fp16"}, False, "contiguous"),  # auto is CUDA-only
])
def test_torch_gpu_settings_resolve(target, graph, memory_format):
    row = _resolved({"runtime": "torch", **target})
    assert (row["graph"], row["memory_format"]) == (graph, memory_format)
    entry = get_runtime("torch")
    settings = entry.settings(**{k: row[k] for k in ("device", "provider", "precision", "hint", "graph",
                                                     "memory_format")})
    assert entry.settings(**settings) == settings  # normalising twice changes nothing


@pytest.mark.parametrize("target, key, says", [
    ({"runtime": "torch", "graph": True}, "graph", "CUDA graphs (graph: true) need device cuda, got device cpu"),
    ({"runtime": "torch", "device": "mps", "graph": True}, "graph", "need device cuda, got device mps"),
    ({"runtime": "torch", "graph": "sometimes"}, "graph", "graph is true, false or auto, got 'sometimes'"),
    ({"runtime": "torch", "memory_format": "nhwc"}, "memory_format", "'nhwc'"),
    ({"runtime": "onnxruntime", "graph": True}, "graph", "onnxruntime takes no graph setting (got True); it is for torch"),
    ({"runtime": "openvino", "memory_format": "channels_last"}, "memory_format", "openvino takes no memory_format"),
    ({"runtime": "onnxruntime", "precision": "fp16"}, "precision",
     "onnxruntime runs precision fp32, not fp16: the export is an fp32 graph (fp16 only with provider "
     "TensorrtExecutionProvider"),
    ({"runtime": "onnxruntime", "device": "CUDA", "precision": "fp16"}, "precision", "fp16 only with provider"),
    ({"runtime": "onnxruntime", "provider": "TensorrtExecutionProvider", "precision": "bf16"}, "precision",
     "not bf16"),
    ({"runtime": "onnxruntime", "provider": "CUDAExecutionProvidr"}, "provider",
     "unknown onnxruntime provider 'CUDAExecutionProvidr'. Did you mean \"CUDAExecutionProvider\"?"),
    ({"runtime": "onnxruntime", "provider": "TensorRT"}, "provider", 'Did you mean "TensorrtExecutionProvider"?'),
    ({"runtime": "onnxruntime", "device": "CPU", "provider": "CUDAExecutionProvider"}, "provider",
     "provider CUDAExecutionProvider contradicts device CPU"),
    ({"runtime": "onnxruntime", "device": "CUDA", "provider": "CPUExecutionProvider"}, "provider",
     "contradicts device CUDA"),
])
def test_gpu_settings_that_cannot_work_are_recipe_errors_naming_the_key(target, key, says):
    message = _recipe_error(target)
    assert re.search(rf"checks\.targets\[0\]\.{key}: .*{re.escape(says)}", message), message
    # The same check, from Python: make_runner and a dict target for run_targets.
    with pytest.raises(UsageError, match=re.escape(says)):
        make_runner(target["runtime"], source="unused", **{k: v for k, v in target.items() if k != "runtime"})
    with pytest.raises(UsageError, match=rf"invalid target 'x': {key}: .*{re.escape(says)}"):
        run_targets([{"name": "x", **target}], None, None, SHAPE, **FAST)


def test_provider_spelling_is_normalised_and_tensorrt_takes_fp16():
    row = _resolved({"runtime": "onnxruntime", "provider": "TensorRTExecutionProvider", "precision": "fp16"})
    assert (row["provider"], row["precision"], row["device"]) == ("TensorrtExecutionProvider", "fp16", None)
    assert _resolved({"runtime": "onnxruntime", "device": "gpu"})["provider"] == "CUDAExecutionProvider"
    with pytest.raises(SettingsError) as info:
        get_runtime("torch").settings(graph=True, memory_format="sideways")
    assert [key for key, _ in info.value.problems] == ["graph", "memory_format"]  # every problem, by field
    with pytest.raises(UsageError, match="unknown runtime setting"):
        get_runtime("torch").settings(tiles=4)


# --------------------------------------------------------------------------------- unavailable on this host

def _run(target: dict, files: dict) -> TargetResult:
    row, = run_targets([{"name": "gpu", "batch": 2, **target}], files["dense"], files["pruned"], SHAPE,
                       files=files, **FAST, rounds=1)
    return row


UNAVAILABLE = [
    pytest.param({"runtime": "torch", "device": "cuda"}, "torch.cuda.is_available() is False",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="host has CUDA")),
    pytest.param({"runtime": "torch", "device": "cuda", "graph": True, "precision": "fp16"}, "torch device cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="host has CUDA")),
    pytest.param({"runtime": "onnxruntime", "provider": "CUDAExecutionProvider"}, "CUDAExecutionProvider not available",
                 marks=pytest.mark.skipif(not HAS_ORT or "CUDAExecutionProvider" in __import__(
                     "onnxruntime").get_available_providers(), reason="no onnxruntime, or it has CUDA")),
    pytest.param({"runtime": "onnxruntime", "provider": "TensorrtExecutionProvider", "precision": "fp16"},
                 "TensorrtExecutionProvider not available",
                 marks=pytest.mark.skipif(not HAS_ORT or "TensorrtExecutionProvider" in __import__(
                     "onnxruntime").get_available_providers(), reason="no onnxruntime, or it has TensorRT")),
    pytest.param({"runtime": "openvino", "device": "GPU", "precision": "fp16"}, "OpenVINO device GPU not present",
                 marks=pytest.mark.skipif(not HAS_OV or any(d.startswith("GPU") for d in __import__(
                     "openvino").Core().available_devices), reason="no openvino, or it has a GPU")),
]


@pytest.mark.parametrize("target, why", UNAVAILABLE)
def test_a_gpu_target_on_a_host_without_it_skips_or_fails_as_asked(target, why, files):
    if target["runtime"] != "torch" and "pruned_onnx" not in files:
        pytest.skip("onnx is not installed")
    skipped = _run({**target, "on_unavailable": "skip"}, files)
    assert skipped.status == "skipped" and skipped.reason.startswith("skipped: ") and why in skipped.reason
    assert skipped.dense is None and skipped.pruned is None and skipped.speedup is None  # no CPU number
    failed = _run({**target, "on_unavailable": "fail"}, files)
    assert failed.status == "failed" and failed.reason.startswith("failed: ") and "(on_unavailable: fail)" in failed.reason
    # Stored and re-checked, the row keeps its verdict (and the resolved GPU settings).
    stored = json.loads(json.dumps([skipped.to_dict(), failed.to_dict()]))
    TargetRow.model_validate(stored[0], strict=True)
    passed, again = evaluate_report({"targets": stored})
    assert not passed and [r.status for r in again] == ["skipped", "failed"]
    assert again[0].target["runtime"] == target["runtime"] and again[0].unavailable == skipped.unavailable


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed")
def test_ort_silent_cpu_fallback_is_unavailable_never_a_cpu_number(files, monkeypatch):
    """ORT builds a CPU session when a provider it lists cannot start; that must not be measured as GPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("host has CUDA ORT: no fallback to provoke")
    if "pruned_onnx" not in files:
        pytest.skip("onnx is not installed")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(UserWarning), pytest.raises(RuntimeUnavailableError, match="CUDAExecutionProvider failed to "
                                                                              "initialise.*fell back to CPUExecution"):
        make_runner("onnxruntime", onnx_path=files["pruned_onnx"], provider="CUDAExecutionProvider")
    with pytest.warns(UserWarning):
        row = _run({"runtime": "onnxruntime", "device": "CUDA", "on_unavailable": "skip"}, files)
    assert row.status == "skipped" and "fell back to CPUExecutionProvider" in row.reason and row.pruned is None


# --------------------------------------------------------------------------------- what actually ran

def test_rows_record_what_actually_ran(files):
    targets = [{"name": "torch", "runtime": "torch", "batch": 2}]
    if "pruned_onnx" in files and HAS_ORT:
        targets.append({"name": "ort", "runtime": "onnxruntime", "batch": 2})
    if "pruned_openvino" in files:
        targets.append({"name": "ov", "runtime": "openvino", "batch": 2})
    results = run_targets(targets, files["dense"], files["pruned"], SHAPE, files=files, **FAST, rounds=1)
    ran = {r.name: (r.status, r.dense.executed_on, r.pruned.executed_on, r.pruned.graph, r.pruned.memory_format)
           for r in results}
    assert ran["torch"] == ("passed", "cpu", "cpu", False, "contiguous")
    if "ort" in ran:
        assert ran["ort"] == ("passed", "CPUExecutionProvider", "CPUExecutionProvider", None, None)
    if "ov" in ran:
        assert ran["ov"] == ("passed", "CPU", "CPU", None, None)
    stored = json.loads(json.dumps({"targets": [r.to_dict() for r in results]}))
    for row in stored["targets"]:
        assert TargetRow.model_validate(row, strict=True).pruned.executed_on == row["pruned"]["executed_on"]
        assert TargetResult.from_dict(row).pruned.executed_on == row["pruned"]["executed_on"]
    # A report from before these fields still reads: missing means "not recorded".
    for row in stored["targets"]:
        for role in ("dense", "pruned"):
            for key in ("executed_on", "graph", "memory_format"):
                row[role].pop(key)
    passed, again = evaluate_report(stored)
    assert passed and again[0].pruned.executed_on is None


def test_torch_channels_last_runs_the_same_function():
    model = tiny_cnn(8)
    runner = make_runner("torch", model=model, memory_format="channels_last")
    assert runner.memory_format == "channels_last" and runner.describe()["memory_format"] == "channels_last"
    assert runner.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous()  # the caller's model is untouched
    x = torch.randn(3, *SHAPE[1:])
    assert runner.prepare(x).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(torch.from_numpy(runner.outputs(x)[0]), model(x), atol=1e-5, rtol=1e-4)
    stats = measure_latency(runner, x, **FAST)
    assert stats.memory_format == "channels_last" and stats.graph is False


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed")
def test_ort_io_binding_path_runs_on_cpu(files):
    """The GPU providers' IO-binding path (device-resident input and outputs), exercised on CPU memory."""
    if "pruned_onnx" not in files:
        pytest.skip("onnx is not installed")
    runner = make_runner("onnxruntime", onnx_path=files["pruned_onnx"])
    assert runner.io_device is None and runner.executed_on == "CPUExecutionProvider"
    runner.io_device = "cpu"
    x = torch.randn(3, *SHAPE[1:])
    prepared = runner.prepare(x)
    assert type(prepared).__name__ == "BoundInput"
    torch.testing.assert_close(torch.from_numpy(runner.to_numpy(runner.run(prepared))[0]), files["pruned"](x),
                               atol=1e-4, rtol=1e-3)
    stats = measure_latency(runner, x, **FAST)
    assert stats.runs >= FAST["min_runs"] and stats.executed_on == "CPUExecutionProvider"


# --------------------------------------------------------------------------------- CUDA-graph capture logic

class FakeGraphBackend:
    """Stands in for torch.cuda: a 'graph' re-runs the captured call and writes into the static output
    in place, as a replay writes into the memory captured; every call is logged."""

    def __init__(self, fail: bool = False):
        self.log: list[str] = []
        self.fail = fail

    def warmup(self, fn, iterations):
        self.log += ["warmup"] * iterations
        for _ in range(iterations):
            fn()

    def capture(self, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.log.append("capture")
        out = fn()
        return {"fn": fn, "out": out}, out

    def replay(self, graph):
        self.log.append("replay")
        graph["out"].copy_(graph["fn"]())


def _cache(model, **kw) -> tuple[GraphCache, FakeGraphBackend]:
    backend = FakeGraphBackend(**kw)
    return GraphCache(model, backend), backend


def test_graph_cache_captures_once_per_shape_outside_the_timed_calls():
    model = tiny_cnn(8)
    cache, backend = _cache(model)
    a = cache.prepare(torch.randn(2, *SHAPE[1:]))
    assert backend.log == ["warmup"] * cache.warmup_iterations + ["capture"] and cache.captures == 1
    b = cache.prepare(torch.randn(2, *SHAPE[1:]))  # same shape: the same graph and static buffers
    assert cache.captures == 1 and b.entry is a.entry
    c = cache.prepare(torch.randn(5, *SHAPE[1:]))  # a new batch size: a new graph
    nhwc = cache.prepare(torch.randn(5, *SHAPE[1:]).contiguous(memory_format=torch.channels_last))
    assert cache.captures == 3 and c.entry is not a.entry and nhwc.entry is not c.entry
    assert nhwc.entry.static_input.is_contiguous(memory_format=torch.channels_last)
    before = list(backend.log)
    for _ in range(4):
        cache.run(c)
    assert backend.log[len(before):] == ["replay"] * 4  # the timed call only replays


def test_graph_cache_gives_each_prepared_input_its_own_result():
    """Two inputs of one shape share a static buffer: running either gives its own output (the data
    is reloaded only when the other one was loaded last), and the output is a static buffer."""
    model = tiny_cnn(8)
    cache, _ = _cache(model)
    xa, xb = torch.randn(3, *SHAPE[1:]), torch.randn(3, *SHAPE[1:])
    a, b = cache.prepare(xa), cache.prepare(xb)
    with torch.no_grad():
        want_a, want_b = model(xa), model(xb)
    torch.testing.assert_close(cache.run(a).clone(), want_a)
    torch.testing.assert_close(cache.run(b).clone(), want_b)
    torch.testing.assert_close(cache.run(a).clone(), want_a)
    assert cache.run(a).data_ptr() == a.entry.static_output.data_ptr()
    xa.zero_()  # the static input holds a copy taken at prepare/load time
    torch.testing.assert_close(cache.run(a).clone(), want_a)
    with pytest.raises(UsageError, match="what its prepare"):
        cache.run(xa)


def test_graph_cache_limits_shapes_and_reports_capture_failures():
    cache, _ = _cache(tiny_cnn(4))
    cache.max_graphs = 2
    cache.prepare(torch.randn(1, *SHAPE[1:]))
    cache.prepare(torch.randn(2, *SHAPE[1:]))
    with pytest.raises(UsageError, match="already 2 input shapes captured"):
        cache.prepare(torch.randn(3, *SHAPE[1:]))
    broken, _ = _cache(tiny_cnn(4), fail=True)
    with pytest.raises(UsageError, match=r"CUDA graph capture failed for input \(1, 3, 16, 16\): RuntimeError: "
                                         r"operation not permitted.*set graph: false"):
        broken.prepare(torch.randn(*SHAPE))
    assert not broken.graphs


def test_torch_graph_runner_measures_replays_with_a_fake_backend():
    """The torch runner's graph path end to end on CPU: prepare captures, the timed loop replays."""
    model = tiny_cnn(8)
    cache, backend = _cache(model)
    runner = TorchRunner(runtime="torch", device="cpu", threads=torch.get_num_threads(), model=model, graph=True,
                         executed_on="cpu", graphs=cache)
    cache.forward = runner._forward
    x = torch.randn(4, *SHAPE[1:])
    torch.testing.assert_close(torch.from_numpy(runner.outputs(x)[0]), model(x).detach())
    assert cache.captures == 1
    stats = measure_latency(runner, x, warmup=2, min_runs=5, min_time_s=0)
    assert cache.captures == 1 and backend.log.count("capture") == 1  # nothing captured while timing
    assert backend.log.count("replay") == 1 + 2 + stats.runs
    assert stats.graph is True and stats.memory_format == "contiguous" and stats.runs >= 5
    assert isinstance(runner.prepare(x), GraphInput)


# --------------------------------------------------------------------------------- benchmarks/gpu_checks.py

def test_gpu_checks_dry_run_prints_the_matrix_and_the_budget_trims_it(capsys, tmp_path):
    assert gpu_checks.main(["--out", str(tmp_path / "o"), "--dry-run"]) == 0
    full = capsys.readouterr().out
    assert "gpu_checks plan: resnet50" in full and not (tmp_path / "o").exists()
    planned = re.findall(r"^\s+\d+\. (\S+) round_to=(\d+) batch=(\d+) (\w+)", full, re.M)
    # ResNet-50 dense vs round_to 16 and 64, batch 1/32/128, fp32/fp16, eager and graph: 24 torch cells.
    torch_cells = {c for c in planned if c[0].startswith("torch/")}
    assert len(torch_cells) == 24 and {c[0] for c in torch_cells} == {"torch/eager", "torch/graph"}
    assert {c[1] for c in torch_cells} == {"16", "64"} and {c[2] for c in torch_cells} == {"1", "32", "128"}
    assert gpu_checks.main(["--out", str(tmp_path), "--dry-run", "--budget-s", "100"]) == 0
    short = capsys.readouterr().out
    kept = re.findall(r"^\s+\d+\. (\S+ round_to=\d+ batch=\d+ \w+)", short, re.M)
    assert 0 < len(kept) < len(planned) and "dropped" not in short and "skipped: budget" in short
    assert all("round_to=16" in c for c in kept)  # the first round_to goes first; round_to 64 is dropped first
    estimate = float(re.search(r"estimated (\d+) s", short).group(1))
    assert estimate <= 100


def test_gpu_checks_plan_keeps_ort_rows_only_where_the_provider_exists():
    args = gpu_checks.parse_args(["--out", "x"])
    kept, dropped, fixed = gpu_checks.plan(args, ["CPUExecutionProvider"])
    assert all(c.runtime == "torch" for c in kept)
    assert {c.status for c in dropped if c.runtime == "onnxruntime"} == {"unavailable"}
    kept2, _, fixed2 = gpu_checks.plan(args, ["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    ort_cells = [c for c in kept2 if c.runtime == "onnxruntime"]
    assert {(c.mode, c.precision) for c in ort_cells} >= {("CUDAExecutionProvider", "fp32")}
    assert fixed2 > fixed  # the ONNX exports are budgeted only when an ORT row will run
    assert sum(c.estimate_s for c in kept2) + fixed2 <= args.budget_s


def test_gpu_checks_without_cuda_exits_0_at_once(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("host has CUDA")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_checks", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device: skipped" in done.stdout and time.perf_counter() - started < 60
    out = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert out["status"] == "skipped" and "no CUDA device" in out["reason"]
    assert "status: skipped" in (tmp_path / "gpu_checks.md").read_text()


def test_gpu_checks_markdown_renders_measured_and_missing_cells():
    cells = [{"runtime": "torch", "mode": "graph", "round_to": 16, "batch": 32, "precision": "fp16",
              "status": "measured", "reason": "",
              "result": {"dense_p50_ms": 2.0, "dense_p90_ms": 2.5, "pruned_p50_ms": 1.0, "pruned_p90_ms": 1.25,
                         "speedup": 2.0, "efficiency": 1.0, "executed_on": "cuda:0 GPU", "memory_format": "channels_last"}},
             {"runtime": "onnxruntime", "mode": "CUDAExecutionProvider", "round_to": 16, "batch": 1,
              "precision": "fp32", "status": "unavailable", "reason": "not installed", "result": {}}]
    md = gpu_checks.markdown({"arch": "resnet50", "keep": 0.5, "status": "finished", "gpu": "GPU", "torch": "2",
                              "models": {"16": {"achieved": 0.5, "macs_ratio": 2.0, "prune_seconds": 1.5}},
                              "cells": cells})
    assert "| torch / graph | 16 | 32 | fp16 | channels_last | 2.000 / 2.500 | 1.000 / 1.250 | 2.000 | 1.000 |" in md
    assert "| unavailable: not installed |" in md and "MACs ratio 2.000" in md


# --------------------------------------------------------------------------------- real CUDA (skipped without)

@pytest.mark.gpu
def test_cuda_graph_runner_matches_eager_and_captures_before_timing():
    model = tiny_cnn(16)
    x = torch.randn(8, *SHAPE[1:])
    eager = make_runner("torch", model=model, device="cuda", graph=False)
    graphed = make_runner("torch", model=model, device="cuda")  # graph: auto is on for CUDA
    assert graphed.graph and not eager.graph and graphed.executed_on.startswith("cuda:")
    torch.testing.assert_close(torch.from_numpy(graphed.outputs(x)[0]), torch.from_numpy(eager.outputs(x)[0]),
                               atol=1e-4, rtol=1e-3)
    assert graphed.graphs.captures == 1
    stats = measure_latency(graphed, x, warmup=3, min_runs=20, min_time_s=0)
    assert graphed.graphs.captures == 1 and stats.graph is True and stats.p50_ms > 0
    half = make_runner("torch", model=model, device="cuda", precision="fp16")
    assert half.memory_format == "channels_last"
    torch.testing.assert_close(torch.from_numpy(half.outputs(x)[0]), model(x).detach(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_cuda_targets_run_and_record_the_device(files):
    row = _run({"runtime": "torch", "device": "cuda", "precision": "fp16", "min_speedup": 1e-3}, files)
    assert row.status == "passed", row.reason
    assert row.pruned.graph is True and row.pruned.executed_on.startswith("cuda:")
    if HAS_ORT and "pruned_onnx" in files:
        ort_row = _run({"runtime": "onnxruntime", "device": "CUDA", "on_unavailable": "skip"}, files)
        assert ort_row.status in ("passed", "skipped"), ort_row.reason
        if ort_row.status == "passed":
            assert ort_row.pruned.executed_on == "CUDAExecutionProvider"


@pytest.mark.gpu
def test_gpu_checks_small_run(tmp_path):
    assert gpu_checks.main(["--out", str(tmp_path), "--arch", "resnet18", "--size", "64", "--calibration", "8",
                            "--round-to", "16", "--batches", "2", "--precisions", "fp32", "--rounds", "2",
                            "--warmup", "2", "--min-runs", "4", "--min-time-s", "0.05", "--no-ort"]) == 0
    out = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert out["status"] == "finished" and {c["status"] for c in out["cells"]} == {"measured"}
    assert {c["result"]["graph"] for c in out["cells"]} == {False, True}


@pytest.mark.slow
def test_gpu_checks_plumbing_end_to_end_on_cpu(tmp_path):
    """--device cpu runs the whole script (prune twice, export, ORT rows, budget, outputs) on a tiny
    setting: the GPU run's code path apart from the device. Its numbers mean nothing."""
    assert gpu_checks.main(["--out", str(tmp_path), "--device", "cpu", "--arch", "resnet18", "--size", "32",
                            "--calibration", "4", "--round-to", "16", "64", "--batches", "2", "--precisions", "fp32",
                            "--rounds", "1", "--warmup", "1", "--min-runs", "2", "--min-time-s", "0",
                            "--allocation", "paper", "--ort-providers", "CPUExecutionProvider"]
                           + ([] if HAS_ORT and importlib.util.find_spec("onnx") else ["--no-ort"])) == 0
    out = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert out["status"] == "finished" and set(out["models"]) == {"16", "64"}
    cells = [c for c in out["cells"] if c["status"] == "measured"]
    assert {(c["runtime"], c["round_to"]) for c in cells} >= {("torch", 16), ("torch", 64)}
    for cell in cells:
        r = cell["result"]
        assert r["efficiency"] == pytest.approx(r["speedup"] / out["models"][str(cell["round_to"])]["macs_ratio"])
        assert r["executed_on"] in ("cpu", "CPUExecutionProvider")
    assert "| torch / eager | 64 | 2 | fp32 |" in (tmp_path / "gpu_checks.md").read_text()
