"""Export to ONNX/OpenVINO and parity checks, with real ONNX Runtime and OpenVINO sessions."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from pfp_deploy.errors import ExportError, ShapeMismatchError, UsageError
from pfp_deploy.export import check_parity, export_onnx, export_openvino

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


class TinyNet(nn.Module):
    """3 convs with BN/ReLU, a residual add and a Linear head."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.body(x) + x)
        return self.head(torch.relu(self.down(x)).mean((2, 3)))


def _model(seed: int = 0, **kw) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet(**kw)
    # Non-trivial BN statistics, so a wrong train/eval mode during export would show up in parity.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One dynamo ONNX export and both OpenVINO IRs, shared by the tests of this file."""
    out = tmp_path_factory.mktemp("export")
    model = _model()
    model.train()  # export must switch to eval and back
    before = copy.deepcopy(model.state_dict())
    onnx_path = export_onnx(model, torch.randn(1, 3, 32, 32), out / "model.onnx")
    assert model.training and all(m.training for m in model.modules()), "train/eval mode not restored"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"export modified {key}"
    xml32 = export_openvino(onnx_path, None, out / "ov32")
    xml16 = export_openvino(onnx_path, None, out / "ov16", fp16=True)
    return {"model": model.eval(), "onnx": onnx_path, "xml32": xml32, "xml16": xml16, "dir": out}


def test_export_both_formats_then_parity_passes(exported):
    samples = torch.randn(6, 3, 32, 32)
    labels = exported["model"](samples).argmax(1)
    report = check_parity(exported["model"], samples, exported["onnx"], exported["xml32"], labels=labels)
    assert report.status == "pass"
    assert [r.runtime for r in report.runtimes] == ["onnxruntime", "openvino"]
    for rt in report.runtimes:
        assert rt.outputs[0].name == "logits" and rt.outputs[0].shape == [6, 10]
        assert rt.outputs[0].max_abs_diff < 1e-4 and rt.within_tolerance
        assert rt.top1_agreement == 1.0 and rt.accuracy == 1.0
    assert report.torch_accuracy == 1.0
    json.dumps(report.to_dict())  # serialisable for the run report


def test_export_leaves_single_file_and_no_temp_files(exported):
    names = sorted(p.name for p in exported["dir"].iterdir())
    assert names == ["model.onnx", "ov16", "ov32"]
    assert sorted(p.name for p in (exported["dir"] / "ov32").iterdir()) == ["model.bin", "model.xml"]


def test_openvino_fp16_file_is_smaller(exported):
    size32 = exported["xml32"].with_suffix(".bin").stat().st_size
    size16 = exported["xml16"].with_suffix(".bin").stat().st_size
    assert size16 < 0.6 * size32
    # FP16 weights still agree with PyTorch at a looser tolerance.
    report = check_parity(exported["model"], torch.randn(4, 3, 32, 32), openvino_xml=exported["xml16"],
                          atol=5e-2, rtol=5e-2)
    assert report.passed


def test_openvino_from_torch_model_goes_through_onnx(tmp_path):
    model = _model(seed=3)
    xml = export_openvino(model, torch.randn(1, 3, 32, 32), tmp_path / "ov")
    assert sorted(p.name for p in tmp_path.joinpath("ov").iterdir()) == ["model.bin", "model.xml"]
    report = check_parity(model, torch.randn(5, 3, 32, 32), openvino_xml=xml)  # dynamic batch kept
    assert report.passed and report.runtimes[0].outputs[0].name == "logits"
    with pytest.raises(UsageError, match="example_input"):
        export_openvino(model, None, tmp_path / "ov2")


@pytest.mark.parametrize("batch", [1, 4])
def test_dynamic_batch_through_onnxruntime(exported, batch):
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    assert not isinstance(session.get_inputs()[0].shape[0], int)
    x = torch.randn(batch, 3, 32, 32)
    (got,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got, exported["model"](x).detach().numpy(), atol=1e-4, rtol=1e-3)


def test_static_batch_opset17_uses_torchscript_and_parity_chunks(tmp_path):
    model = _model(seed=1)
    with pytest.warns(UserWarning, match="TorchScript exporter"):
        path = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "static.onnx", opset=17, dynamic_batch=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, 32, 32]
    assert check_parity(model, torch.randn(6, 3, 32, 32), path).passed  # fed as 3 chunks of 2
    with pytest.raises(ShapeMismatchError, match="static batch of 2"):
        check_parity(model, torch.randn(5, 3, 32, 32), path)


def test_dynamo_failure_falls_back_with_warning(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def dynamo_breaks(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_breaks)
    model = _model(seed=2)
    with pytest.warns(UserWarning, match="simulated dynamo failure"):
        path = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "fallback.onnx")
    assert check_parity(model, torch.randn(3, 3, 32, 32), path).passed  # still dynamic batch


def test_failed_export_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")

    def always_fails(*args, **kwargs):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(torch.onnx, "export", always_fails)
    with pytest.warns(UserWarning), pytest.raises(ExportError, match="unsupported op"):
        export_onnx(_model(), torch.randn(1, 3, 32, 32), target)
    assert target.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_parity_shape_mismatch_is_fatal(exported):
    other = _model(classes=7)  # a different head than the exported model
    for on_breach in ("warn", "fail"):
        with pytest.raises(ShapeMismatchError, match=r"logits.*\[3, 10\].*\[3, 7\]"):
            check_parity(other, torch.randn(3, 3, 32, 32), exported["onnx"], on_breach=on_breach)


def test_tolerance_breach_warns_or_fails(exported):
    drifted = copy.deepcopy(exported["model"])
    with torch.no_grad():
        drifted.head.bias.add_(1e-2)  # same shapes, outputs off by 1e-2
    samples = torch.randn(4, 3, 32, 32)
    with pytest.warns(UserWarning, match="beyond atol"):
        report = check_parity(drifted, samples, exported["onnx"], exported["xml32"], on_breach="warn")
    assert report.status == "warn"
    assert all(abs(rt.outputs[0].max_abs_diff - 1e-2) < 1e-3 for rt in report.runtimes)
    assert not any(rt.within_tolerance for rt in report.runtimes)
    with pytest.raises(ExportError, match="onnxruntime logits"):
        check_parity(drifted, samples, exported["onnx"], on_breach="fail")
    # A looser tolerance accepts the same drift.
    assert check_parity(drifted, samples, exported["onnx"], atol=2e-2).passed


def test_corrupt_or_missing_onnx_gives_export_error(tmp_path, exported):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not a protobuf" * 10)
    with pytest.raises(ExportError, match="corrupt.onnx") as info:
        check_parity(exported["model"], torch.randn(1, 3, 32, 32), corrupt)
    assert not isinstance(info.value, ShapeMismatchError)
    with pytest.raises(ExportError, match="missing.onnx"):
        check_parity(exported["model"], torch.randn(1, 3, 32, 32), tmp_path / "missing.onnx")
    with pytest.raises(ExportError, match="missing.onnx"):
        export_openvino(tmp_path / "missing.onnx", None, tmp_path / "ov")


def test_parity_usage_errors(exported):
    with pytest.raises(UsageError, match="on_breach"):
        check_parity(exported["model"], torch.randn(1, 3, 32, 32), exported["onnx"], on_breach="ignore")
    with pytest.raises(UsageError, match="onnx_path"):
        check_parity(exported["model"], torch.randn(1, 3, 32, 32))
