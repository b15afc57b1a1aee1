"""report.md, plots, atomic JSON and the terminal summary, from report dicts built by hand."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pfp_deploy.report as report_module
from pfp_deploy.bench import LatencyStats
from pfp_deploy.checks import GateCheck, TargetResult
from pfp_deploy.export import OutputParity, ParityReport, RuntimeParity
from pfp_deploy.report import format_summary, plot_accuracy_vs_macs, render_markdown, write_json_atomic, write_report

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib (the report extra) is not installed")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _stats(runtime, device, p50, batch=1, provider=None):
    return LatencyStats(runtime=runtime, device=device, provider=provider, hint=None, precision="fp32", threads=4,
                        batch=batch, runs=200, first_ms=p50 * 3, p50_ms=p50, p90_ms=p50 * 1.12, p99_ms=p50 * 1.3,
                        mean_ms=p50 * 1.04, std_ms=p50 * 0.05, min_ms=p50 * 0.9, max_ms=p50 * 1.6,
                        throughput_ips=batch * 1000 / p50)


def _target(name, runtime, device, dense_ms, pruned_ms, batch=1, status="passed", reason="passed: 1 gate(s) met",
            provider=None):
    target = {"name": name, "runtime": runtime, "device": device, "provider": provider, "batch": batch,
              "precision": "fp32", "min_speedup": 1.5}
    result = TargetResult(name=name, status=status, reason=reason, target=target, macs_ratio=2.28,
                          accuracy_drop=0.73)
    if dense_ms is not None:
        result.dense = _stats(runtime, device or "CUDA", dense_ms, batch, provider)
        result.pruned = _stats(runtime, device or "CUDA", pruned_ms, batch, provider)
        result.speedup = result.p50_ratio = dense_ms / pruned_ms
        result.efficiency = result.speedup / result.macs_ratio
        result.gates = [GateCheck("min_speedup", 1.5, result.speedup, result.speedup >= 1.5)]
    return result.to_dict()


def _parity(file):
    runtimes = [RuntimeParity(runtime=rt, file=file, top1_agreement=0.995, accuracy=None,
                              outputs=[OutputParity("logits", [64, 1000], 2.1e-5, 3.4e-4, True)])
                for rt in ("onnxruntime", "openvino")]
    return ParityReport(status="pass", atol=1e-4, rtol=1e-3, samples=64, torch_accuracy=None,
                        runtimes=runtimes).to_dict()


def _groups(n):
    return [{"name": f"layer{i // 8 + 1}.{i % 8}.conv1", "width_before": 64 * (1 + i // 8),
             "width_after": int(64 * (1 + i // 8) * (0.35 + 0.5 * ((i * 37) % 10) / 10))} for i in range(n)]


def _history(start, epochs):
    return [{"epoch": e, "train_loss": 1.9 - 0.1 * e, "val_top1": start + 8 * (1 - 0.6 ** (e + 1)), "val_top5": 90.0,
             "lr": 0.01 * 0.5 ** e, "seconds": 312.5} for e in range(epochs)]


def full_report(n_groups=26, **overrides):
    report = {
        "name": "resnet50-edge", "status": "failed", "exit_code": 1, "created": "2025-06-01T12:00:00+00:00",
        "message": "1 target failed its gates",
        "model": {"name": "resnet50", "params_dense": 25_557_032, "params_pruned": 12_310_115,
                  "macs_dense": 4_111_514_624, "macs_pruned": 1_803_294_120},
        "prune": {"metric": "macs", "variant": "pfp-ln", "unprunable_groups": ["conv1", "fc"],
                  "steps": [{"keep": 0.7, "epsilon": 0.31, "achieved": 0.698, "macs": 2_878_060_236,
                              "params": 17_400_000, "seconds": {"sensitivity": 41.2, "allocation": 0.4,
                                                                "removal": 2.1}},
                             {"keep": 0.44, "epsilon": 0.52, "achieved": 0.4386, "macs": 1_803_294_120,
                              "params": 12_310_115, "seconds": {"sensitivity": 38.9, "allocation": 0.3,
                                                                "removal": 1.9, "reconstruction": 61.0},
                              "reconstruction": {"ridge": 0.001, "samples": 256, "seconds": 61.0, "layers": [
                                  {"name": "layer1.0.conv1", "kept_in": 48, "in_before": 64, "kept_out": 32,
                                   "out_before": 64, "error_before": 0.4123, "error_after": 0.1057,
                                   "status": "refit"}],
                                  "skipped": [{"name": "fc", "reason": "underdetermined"}]}}],
                  "groups": _groups(n_groups)},
        "accuracy": {"dense": {"top1": 76.13, "top5": 92.86}, "pruned_only": {"top1": 12.07, "top5": 28.4},
                     "reconstructed": {"top1": 58.80, "top5": 81.2},
                     "bn_recalibrated": {"top1": 61.52, "top5": 83.9}, "finetuned": {"top1": 75.40, "top5": 92.3}},
        "finetune": {"steps": [{"keep": 0.7, "history": _history(66.0, 4)},
                                {"keep": 0.44, "history": _history(62.0, 6)}]},
        "export": {"files": {"dense_onnx": "runs/x/dense.onnx", "pruned_onnx": "runs/x/pruned.onnx"},
                   "parity": {"dense": _parity("runs/x/dense.onnx"), "pruned": _parity("runs/x/pruned.onnx")}},
        "targets": [
            _target("cpu-ort-b1", "onnxruntime", "CPU", 24.6, 11.9),
            _target("cpu-ov-b8", "openvino", "CPU", 151.0, 70.2, batch=8),
            _target("gpu-ort", "onnxruntime", None, 3.1, 2.6, batch=32, provider="CUDAExecutionProvider",
                    status="failed", reason="failed: min_speedup 1.192 breaks limit >= 1.5"),
            _target("npu-ov", "openvino", "NPU", None, None, status="skipped",
                    reason="skipped: OpenVINO device NPU not present on this host (available: CPU)"),
        ],
        "checks": [{"name": "parity", "status": "passed", "detail": "max abs diff 2.1e-05"},
                   {"name": "targets", "status": "failed", "detail": "gpu-ort: min_speedup 1.192 < 1.5"},
                   {"name": "accuracy_drop", "status": "skipped", "detail": "no limit set"}],
        "times": {"prune": 84.8, "finetune": 3125.0, "export": 12.4, "bench": 96.1},
        "env": {"python": "3.11.9", "torch": "2.14.1", "cpu_model": "AMD EPYC 7763", "gpu": None,
                "versions": {"onnxruntime": "1.20.1", "openvino": "2025.1"}},
        "data": {"format": "imagefolder", "meaningful_accuracy": True},
    }
    report.update(overrides)
    return report


def _assert_png(path: Path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"


@needs_matplotlib
def test_full_report_has_figures_tables_and_plots(tmp_path):
    paths = write_report(full_report(), tmp_path)
    assert set(paths) == {"report", "latency", "widths", "finetune", "reconstruction"}
    for name in ("latency", "widths", "finetune", "reconstruction"):
        assert paths[name] == tmp_path / f"{name}.png"
        _assert_png(paths[name])
    md = paths["report"].read_text()
    assert "# pfp-deploy report: resnet50-edge" in md and "FAILED" in md
    # Summary: sizes with ratio and reduction, accuracy at each step and the drop.
    assert "25.56 M" in md and "12.31 M" in md and "2.08×" in md and "51.8 %" in md
    assert "4.11 G" in md and "1.80 G" in md and "2.28×" in md and "56.1 %" in md
    assert "| Top-1 (%) | 76.13 | 12.07 | 58.80 | 61.52 | 75.40 | 0.73 |" in md
    # Reconstruction: the per-layer certificate (error before/after) and what was left as pruned.
    assert "| layer1.0.conv1 | 48/64 | 32/64 | 0.4123 | 0.1057 | refit |" in md and "`fc` (underdetermined)" in md
    # Targets: one row each, latencies, speed-up, efficiency, reason only where not passed.
    target_rows = [line for line in md.splitlines() if line.startswith(("| cpu-", "| gpu-", "| npu-"))]
    assert len(target_rows) == 4
    assert "24.6 / 27.6" in target_rows[0] and "11.9 / 13.3" in target_rows[0] and "2.07×" in target_rows[0]
    assert "0.91" in target_rows[0]  # efficiency 2.07 / 2.28
    assert "onnxruntime / CUDAExecutionProvider" in target_rows[2] and "breaks limit" in target_rows[2]
    assert "NPU not present" in target_rows[3] and "—" in target_rows[3]
    assert "| targets | ❌ FAILED | gpu-ort: min_speedup 1.192 < 1.5 |" in md
    # Pruning steps, parity, groups (> 20 rows: folded), timings, env, plots embedded by relative path.
    assert "| 2 | 0.440 | 0.520 | 0.439 |" in md and "38.9 s" in md
    assert "`conv1`" in md
    assert md.count("| pruned | ") == 2 and "2.1e-05" in md and "99.50 %" in md
    assert "<details>" in md and "layer4.1.conv1" in md
    assert "52 min 05 s" in md and "AMD EPYC 7763" in md and "versions.openvino" in md
    for name in ("latency", "widths", "finetune"):
        assert f"]({name}.png)" in md
    assert "Not run" not in md and "Synthetic" not in md
    assert not list(tmp_path.glob(".*")), "temp files left behind"


def test_minimal_report_says_not_run_and_draws_nothing(tmp_path):
    (tmp_path / "latency.png").write_bytes(PNG_MAGIC)  # stale plot from an earlier run
    paths = write_report({"name": "quick", "status": "interrupted"}, tmp_path)
    assert set(paths) == {"report"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    md = paths["report"].read_text()
    assert "INTERRUPTED" in md
    for section in ("Deployment targets", "Checks", "Pruning", "Fine-tuning", "Export and parity", "Timings",
                    "Environment"):
        after = md.split(f"## {section}", 1)[1].split("##", 1)[0]
        assert "Not run" in after, section


@needs_matplotlib
def test_synthetic_data_warning_and_small_model_plots(tmp_path):
    report = full_report(n_groups=5, data={"format": "synthetic", "meaningful_accuracy": False})
    md = write_report(report, tmp_path)["report"].read_text()
    assert "Synthetic data" in md
    assert "<details>" not in md  # 5 groups: table shown inline
    _assert_png(tmp_path / "widths.png")


@needs_matplotlib
def test_wide_model_widths_plot_stays_readable(tmp_path):
    paths = write_report(full_report(n_groups=160), tmp_path)
    _assert_png(paths["widths"])


def test_report_survives_odd_values(tmp_path):
    """NaN figures and a target without measurements still give a report."""
    report = full_report(accuracy={"dense": {"top1": float("nan")}, "finetuned": {"top1": 70.0}})
    report["targets"][0]["speedup"] = None
    md = render_markdown(report)
    assert "| Top-1 (%) | — | 70.00 | — |" in md  # only the steps this run measured get a column


@needs_matplotlib
def test_broken_plot_becomes_a_warning_not_an_exception(tmp_path, monkeypatch):
    def broken(report, path):
        raise ValueError("bad data")

    monkeypatch.setitem(report_module.PLOTS, "widths", broken)
    paths = write_report(full_report(), tmp_path)
    assert "widths" not in paths and not (tmp_path / "widths.png").exists()
    assert "widths plot failed: ValueError: bad data" in paths["report"].read_text()
    _assert_png(paths["latency"])


def test_write_json_atomic_handles_nan_paths_and_tensors(tmp_path):
    path = tmp_path / "report.json"
    obj = {"b": float("nan"), "a": Path("runs/x"), "t": torch.tensor(1.5), "v": torch.tensor([1, 2]),
           "n": np.float32(0.25), "i": np.int64(7), "inf": [float("inf")], "ok": 0.1}
    assert write_json_atomic(path, obj) == path
    text = path.read_text()
    assert json.loads(text) == {"a": "runs/x", "b": None, "i": 7, "inf": [None], "n": 0.25, "ok": 0.1,
                                "t": 1.5, "v": [1, 2]}
    assert text.index('"a"') < text.index('"b"') and '\n  "a"' in text  # sorted, indent 2
    assert "NaN" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = write_json_atomic(tmp_path / "report.json", {"run": 1})
    monkeypatch.setattr("pfp_deploy.report.os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_json_atomic(path, {"run": 2})
    assert json.loads(path.read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_format_summary_is_short_and_has_figures(tmp_path):
    text = format_summary(full_report(), run_dir=tmp_path)
    lines = text.splitlines()
    assert len(lines) <= 30
    assert "FAILED" in lines[0]
    assert "25.56 M -> 12.31 M" in text and "2.28x" in text and "76.13 % -> 75.40 %" in text
    assert "gpu-ort" in text and "breaks limit" in text and "2.07x" in text
    assert str(tmp_path / "report.md") in text
    text.encode("ascii")  # a cp1252 console must be able to print it
    many = full_report(targets=full_report()["targets"] * 10)
    assert len(format_summary(many).splitlines()) <= 30
    assert format_summary({"name": "x", "status": "error"}).startswith("pfp-deploy x: ERROR")


@needs_matplotlib
def test_accuracy_vs_macs_plot(tmp_path):
    rows = [{"method": m, "macs_ratio": r, "top1": 76.1 - k * (r - 1) ** 1.5}
            for m, k in (("pfp", 0.6), ("l1-norm", 1.1), ("random", 2.0)) for r in (1.0, 1.5, 2.0, 3.0, 4.0)]
    path = plot_accuracy_vs_macs(rows, tmp_path / "sub" / "acc.png", title="ResNet-50 on ImageNet")
    _assert_png(path)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["acc.png"]


def test_import_stays_light():
    code = "import sys, pfp_deploy.report; assert 'matplotlib' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
