"""Runner interface and latency measurement on real runtimes (CPU) and on fake runners with known timing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from pfp_deploy.bench import LatencyStats, Runner, compare_latency, hardware_fingerprint, measure_latency
from pfp_deploy.errors import ExportError, RuntimeUnavailableError, UsageError
from pfp_deploy.runtimes import make_runner

ort = pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")

FAST = dict(warmup=2, min_runs=20, min_time_s=0.05)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(torch.relu(self.conv3(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """ONNX (TorchScript exporter: fast) and OpenVINO IR of SmallCNN."""
    from pfp_deploy.export import export_onnx, export_openvino

    out = tmp_path_factory.mktemp("bench")
    model = SmallCNN().eval()
    with pytest.warns(UserWarning):
        onnx_path = export_onnx(model, torch.randn(1, 1, 28, 28), out / "m.onnx", opset=17)
    return {"model": model, "onnx": onnx_path, "xml": export_openvino(onnx_path, None, out / "ov")}


def _runner(runtime, files, **kw):
    return make_runner(runtime, model=files["model"], onnx_path=files["onnx"], openvino_xml=files["xml"], **kw)


def _assert_sane(stats: LatencyStats, batch: int, min_runs: int):
    assert stats.runs >= min_runs
    assert 0 < stats.min_ms <= stats.p50_ms <= stats.p90_ms <= stats.p99_ms <= stats.max_ms
    assert stats.min_ms <= stats.mean_ms <= stats.max_ms and stats.std_ms >= 0
    assert stats.first_ms > 0 and stats.batch == batch
    assert stats.throughput_ips == pytest.approx(batch * 1000.0 / stats.mean_ms)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "openvino"])
def test_measure_latency_is_sane_on_each_runtime(files, runtime):
    runner = _runner(runtime, files, threads=1)
    x = torch.randn(4, 1, 28, 28)
    # Every runtime computes the same function.
    torch.testing.assert_close(torch.from_numpy(runner.outputs(x)[0]), files["model"](x), atol=1e-4, rtol=1e-3)
    stats = measure_latency(runner, x, **FAST)
    _assert_sane(stats, batch=4, min_runs=FAST["min_runs"])
    assert (stats.runtime, stats.device.upper(), stats.threads, stats.precision) == (runtime, "CPU", 1, "fp32")
    assert stats.provider == ("CPUExecutionProvider" if runtime == "onnxruntime" else None)
    assert stats.hint == ("LATENCY" if runtime == "openvino" else None)
    assert json.loads(json.dumps(stats.to_dict()))["p50_ms"] == stats.p50_ms


def test_torch_runner_does_not_touch_callers_model(files):
    model = SmallCNN().train()
    runner = make_runner("torch", model=model, precision="bf16")
    runner.outputs(torch.randn(1, 1, 28, 28))
    assert model.training and model.conv1.weight.dtype == torch.float32


class SleepRunner(Runner):
    """A fake runner whose call takes `ms` milliseconds; logs calls to a shared list."""

    def __init__(self, name, ms, log):
        super().__init__(runtime="torch", device="CPU")
        self.name, self.ms, self.log = name, ms, log

    def prepare(self, x):
        return x

    def run(self, prepared):
        self.log.append(self.name)
        time.sleep(self.ms / 1000.0)


def test_min_time_keeps_measuring_past_min_runs():
    stats = measure_latency(SleepRunner("a", 5, []), torch.zeros(1), warmup=0, min_runs=1, min_time_s=0.1)
    assert stats.runs >= 10  # 0.1 s of 5 ms calls, not just the one run asked for
    assert 5 <= stats.p50_ms < 50


def test_compare_latency_interleaves_and_reports_speedup():
    log = []
    dense, pruned = SleepRunner("dense", 8, log), SleepRunner("pruned", 4, log)
    result = compare_latency(dense, pruned, torch.zeros(2), rounds=4, warmup=1, min_runs=12, min_time_s=0)
    # After one warm-up call each, blocks of ceil(12/4)=3 calls alternate with the order flipping each round.
    blocks = [log[i] for i in range(2, len(log), 3)]
    assert log[:2] == ["dense", "pruned"] and len(log) == 2 + 2 * 12
    assert blocks == ["dense", "pruned", "pruned", "dense", "dense", "pruned", "pruned", "dense"]
    assert result.dense.runs == result.pruned.runs == 12 and len(result.round_speedups) == 4
    assert 1.4 < result.speedup < 2.6 and 1.4 < result.p50_ratio < 2.6  # ~8 ms / ~4 ms
    assert result.dense.batch == 2
    json.dumps(result.to_dict())


def test_compare_real_runners(files):
    dense = _runner("onnxruntime", files)
    pruned = _runner("openvino", files)
    result = compare_latency(dense, pruned, torch.randn(1, 1, 28, 28), rounds=2, **FAST)
    _assert_sane(result.dense, 1, FAST["min_runs"])
    _assert_sane(result.pruned, 1, FAST["min_runs"])
    assert result.speedup > 0 and result.dense.runtime == "onnxruntime" and result.pruned.runtime == "openvino"


def test_unknown_names_are_usage_errors_with_suggestion(files):
    with pytest.raises(UsageError, match='Did you mean "onnxruntime"'):
        make_runner("onnxruntme", onnx_path=files["onnx"])
    with pytest.raises(UsageError, match='Did you mean "CPU"'):
        make_runner("openvino", openvino_xml=files["xml"], device="CPUU")
    with pytest.raises(UsageError, match='Did you mean "CUDAExecutionProvider"'):
        make_runner("onnxruntime", onnx_path=files["onnx"], provider="CUDAExecutionProvide")
    with pytest.raises(UsageError, match='Did you mean "THROUGHPUT"'):
        make_runner("openvino", openvino_xml=files["xml"], hint="THROUGHPT")
    with pytest.raises(UsageError, match="needs model"):
        make_runner("torch")


def test_device_spellings(files):
    assert make_runner("torch", model=files["model"], device="CPU").device == "cpu"
    assert make_runner("openvino", openvino_xml=files["xml"], device="cpu").device == "CPU"
    assert make_runner("openvino", openvino_xml=files["xml"], device="AUTO").device == "AUTO"
    assert make_runner("onnxruntime", onnx_path=files["onnx"], provider="CPUExecutionProvider").device == "CPU"
    with pytest.raises(UsageError, match="provider"):
        make_runner("onnxruntime", onnx_path=files["onnx"], device="CUDA:1")
    with pytest.raises(UsageError, match="cuda:0"):
        make_runner("torch", model=files["model"], device="cuda:x")
    if not torch.cuda.is_available():
        for device in ("gpu", "cuda:0"):
            with pytest.raises(RuntimeUnavailableError, match="torch.cuda.is_available"):
                make_runner("torch", model=files["model"], device=device)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="host has CUDA ORT")
def test_missing_ort_provider_is_unavailable(files):
    for kw in ({"device": "CUDA"}, {"provider": "CUDAExecutionProvider"}, {"provider": "TensorrtExecutionProvider"}):
        missing = kw.get("provider", "CUDAExecutionProvider")
        with pytest.raises(RuntimeUnavailableError, match=f"{missing} not available"):
            make_runner("onnxruntime", onnx_path=files["onnx"], **kw)


@pytest.mark.skipif(any(d.startswith("GPU") for d in ov.Core().available_devices), reason="host has an OpenVINO GPU")
def test_missing_openvino_gpu_is_unavailable(files):
    with pytest.raises(RuntimeUnavailableError, match="OpenVINO device GPU not present"):
        make_runner("openvino", openvino_xml=files["xml"], device="GPU")
    with pytest.raises(RuntimeUnavailableError, match="OpenVINO device GPU.1 not present"):
        make_runner("openvino", openvino_xml=files["xml"], device="gpu.1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="host has CUDA")
def test_missing_torch_cuda_is_unavailable(files):
    with pytest.raises(RuntimeUnavailableError, match="cuda"):
        make_runner("torch", model=files["model"], device="CUDA")


def test_missing_or_corrupt_files_are_export_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("garbage")
    with pytest.raises(ExportError, match="bad.onnx"):
        make_runner("onnxruntime", onnx_path=bad)
    with pytest.raises(ExportError, match="nothere.xml"):
        make_runner("openvino", openvino_xml=tmp_path / "nothere.xml")


def test_hardware_fingerprint():
    info = hardware_fingerprint()
    assert info["cpu_model"] and info["logical_cores"] == os.cpu_count()
    assert info["torch"] == torch.__version__
    assert info["onnxruntime"] == ort.__version__ and info["openvino"] is not None
    assert (info["gpu"] is not None) == torch.cuda.is_available()
    json.dumps(info)


def test_import_does_not_load_deploy_runtimes():
    code = ("import sys, pfp_deploy, pfp_deploy.bench, pfp_deploy.export, pfp_deploy.checks; "
            "print(sorted(m for m in ('onnxruntime', 'openvino', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_cuda_latency(files):
    runner = make_runner("torch", model=files["model"], device="CUDA")
    _assert_sane(measure_latency(runner, torch.randn(8, 1, 28, 28), **FAST), 8, FAST["min_runs"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ort_cuda_provider_runs_or_reports_unavailable(files):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeUnavailableError):
            make_runner("onnxruntime", onnx_path=files["onnx"], device="CUDA")
        return
    runner = make_runner("onnxruntime", onnx_path=files["onnx"], device="CUDA")
    _assert_sane(measure_latency(runner, torch.randn(8, 1, 28, 28), **FAST), 8, FAST["min_runs"])
