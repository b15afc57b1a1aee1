"""Export a PyTorch model to ONNX and OpenVINO IR, check the exported files against PyTorch, and record
their hashes (`export_hashes`) so a later benchmark measures only files made from model.pt (`verify_export`).

onnx, onnxruntime and openvino are imported inside the functions that need them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfp_deploy.bench import Runner, flatten_outputs
from pfp_deploy.errors import ExportError, ShapeMismatchError, UsageError, first_line
from pfp_deploy.fileio import atomic_path, file_sha256, replace_into
from pfp_deploy.modes import eval_mode
from pfp_deploy.runtimes import make_runner

log = logging.getLogger(__name__)

DYNAMO_MIN_OPSET = 18


def export_onnx(model: torch.nn.Module, example_input: torch.Tensor, path: str | os.PathLike, *, opset: int = 18,
                dynamic_batch: bool = True, input_names: Sequence[str] = ("input",),
                output_names: Sequence[str] = ("logits",)) -> Path:
    """Export `model` to one self-contained ONNX file at `path` (written atomically) and return the path.

    Uses the dynamo exporter (opset >= 18) and falls back to the TorchScript exporter with a warning."""
    path = Path(path)
    input_names, output_names = list(input_names), list(output_names)
    example_input = example_input.detach()
    dynamo_error = None
    with eval_mode(model), atomic_path(path) as tmp:
        if opset >= DYNAMO_MIN_OPSET:
            try:
                dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
                torch.onnx.export(model, (example_input,), str(tmp), dynamo=True, opset_version=opset,
                                  external_data=False, verbose=False, input_names=input_names,
                                  output_names=output_names, dynamic_shapes=dynamic_shapes)
            except Exception as exc:  # the exporter raises many unrelated types; the fallback handles all
                dynamo_error = exc
                warnings.warn(f"dynamo ONNX exporter failed for {type(model).__name__} ({first_line(exc)}); "
                              "falling back to the TorchScript exporter (dynamo=False)", stacklevel=2)
        else:
            warnings.warn(f"opset {opset} < {DYNAMO_MIN_OPSET}: using the TorchScript exporter (dynamo=False)",
                          stacklevel=2)
        if opset < DYNAMO_MIN_OPSET or dynamo_error is not None:
            _export_torchscript(model, example_input, tmp, opset, dynamic_batch, input_names, output_names,
                                dynamo_error)
        _validate_onnx(tmp, path)
    return path


def _export_torchscript(model, example_input, tmp, opset, dynamic_batch, input_names, output_names, dynamo_error):
    axes = {name: {0: "batch"} for name in input_names + output_names} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter" notice: we chose it knowingly
            torch.onnx.export(model, (example_input,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names, dynamic_axes=axes)
    except Exception as exc:
        before = f"dynamo exporter: {first_line(dynamo_error)}; " if dynamo_error else ""
        raise ExportError(f"cannot export {type(model).__name__} to ONNX ({before}TorchScript exporter: "
                          f"{first_line(exc)})") from exc


def _validate_onnx(tmp: Path, final: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(tmp))
    except Exception as exc:
        raise ExportError(f"exported ONNX for {final} fails onnx.checker: {first_line(exc)}") from exc


def export_openvino(onnx_path_or_model: str | os.PathLike | torch.nn.Module, example_input: torch.Tensor | None,
                    out_dir: str | os.PathLike, *, fp16: bool = False) -> Path:
    """Convert an ONNX file (or a model, exported to ONNX first) to OpenVINO IR in out_dir; return model.xml.

    Weights are stored as FP32 unless fp16=True."""
    from .environment import import_openvino

    ov = import_openvino()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    xml_path = out_dir / "model.xml"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ov.") as tmp:
        source = onnx_path_or_model
        if isinstance(source, torch.nn.Module):
            # Going through ONNX keeps input/output names and the dynamic batch identical to the .onnx file.
            if example_input is None:
                raise UsageError("export_openvino needs example_input when given a torch model")
            source = export_onnx(source, example_input, Path(tmp) / "model.onnx")
        source = Path(source)
        if not source.is_file():
            raise ExportError(f"ONNX file {source} does not exist; export the model first")
        try:
            ov_model = ov.convert_model(str(source))
            ov.save_model(ov_model, str(Path(tmp) / "model.xml"), compress_to_fp16=fp16)
        except Exception as exc:
            raise ExportError(f"OpenVINO cannot convert {source}: {first_line(exc)}") from exc
        # .bin first, then .xml: a reader that sees the new .xml also sees its weights.
        replace_into(Path(tmp) / "model.bin", out_dir / "model.bin")
        replace_into(Path(tmp) / "model.xml", xml_path)
    return xml_path


# ----------------------------------------------------------------------------- parity


@dataclass
class OutputParity:
    """One output of one runtime compared with PyTorch."""

    name: str
    shape: list[int]
    max_abs_diff: float
    max_rel_diff: float
    within_tolerance: bool


@dataclass
class RuntimeParity:
    """One exported file run in one runtime, compared with PyTorch."""

    runtime: str
    file: str
    outputs: list[OutputParity]
    top1_agreement: float | None  # fraction of samples whose argmax equals PyTorch's (first output)
    accuracy: float | None = None

    @property
    def within_tolerance(self) -> bool:
        return all(o.within_tolerance for o in self.outputs)


@dataclass
class ParityReport:
    """Result of check_parity; status is "pass" or "warn" (a "fail" raises instead)."""

    status: str
    atol: float
    rtol: float
    samples: int
    torch_accuracy: float | None
    runtimes: list[RuntimeParity] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_dict(self) -> dict:
        out = asdict(self)
        for rt, d in zip(self.runtimes, out["runtimes"]):
            d["within_tolerance"] = rt.within_tolerance
        return out


def _top1(logits: np.ndarray) -> np.ndarray | None:
    return logits.reshape(logits.shape[0], -1).argmax(axis=1) if logits.ndim >= 2 else None


def _run_in_batches(runner: Runner, samples: torch.Tensor) -> list[np.ndarray]:
    """Run all samples; a file exported with a static batch is fed in chunks of that batch."""
    batch = runner.fixed_batch or samples.shape[0]
    if samples.shape[0] % batch:
        raise ShapeMismatchError(f"{runner.source} has a static batch of {batch} but {samples.shape[0]} samples "
                                 f"were given; pass a multiple of {batch} or export with dynamic_batch=True")
    try:
        chunks = [runner.outputs(samples[i:i + batch]) for i in range(0, samples.shape[0], batch)]
    except Exception as exc:
        raise ExportError(f"{runner.runtime} failed to run {runner.source} on input of shape "
                          f"{list(samples.shape)}: {first_line(exc)}") from exc
    return [np.concatenate(parts) for parts in zip(*chunks)]


def _compare(runner: Runner, reference: list[np.ndarray], samples: torch.Tensor, atol: float, rtol: float,
             labels: np.ndarray | None, names: list[str]) -> RuntimeParity:
    got = _run_in_batches(runner, samples)
    if len(got) != len(reference):
        raise ShapeMismatchError(
            f"{runner.source} ({runner.runtime}) has {len(got)} outputs, PyTorch has {len(reference)}")
    outputs = []
    for i, (ref, out) in enumerate(zip(reference, got)):
        name = names[i] if i < len(names) else f"output{i}"
        if ref.shape != out.shape:
            raise ShapeMismatchError(f"{runner.source} ({runner.runtime}) output {name} has shape {list(out.shape)}, "
                                     f"PyTorch gives {list(ref.shape)}: the exported file does not match the model")
        abs_diff = np.abs(out.astype(np.float64) - ref)
        rel_diff = abs_diff / np.maximum(np.abs(ref), 1e-12)
        outputs.append(OutputParity(
            name=name, shape=list(out.shape), max_abs_diff=float(abs_diff.max(initial=0.0)),
            max_rel_diff=float(rel_diff.max(initial=0.0)),
            within_tolerance=bool(np.all(abs_diff <= atol + rtol * np.abs(ref)))))
    ref_top1, top1 = _top1(reference[0]), _top1(got[0])
    agreement = float(np.mean(ref_top1 == top1)) if top1 is not None else None
    accuracy = float(np.mean(top1 == labels)) if labels is not None and top1 is not None else None
    return RuntimeParity(runtime=runner.runtime, file=str(runner.source), outputs=outputs,
                         top1_agreement=agreement, accuracy=accuracy)


def check_parity(model: torch.nn.Module, samples: torch.Tensor, onnx_path: str | os.PathLike | None = None,
                 openvino_xml: str | os.PathLike | None = None, *, atol: float = 1e-4, rtol: float = 1e-3,
                 on_breach: str = "warn", labels: torch.Tensor | None = None) -> ParityReport:
    """Compare ONNX Runtime (CPU) and OpenVINO (CPU) outputs with PyTorch on `samples`.

    Shape mismatch raises ShapeMismatchError; a tolerance breach warns or, with on_breach="fail", raises ExportError."""
    if on_breach not in ("warn", "fail"):
        raise UsageError(f'on_breach must be "warn" or "fail" (got "{on_breach}")')
    if onnx_path is None and openvino_xml is None:
        raise UsageError("check_parity needs onnx_path and/or openvino_xml")
    samples = samples.detach().float().cpu()
    device = next(model.parameters(), torch.empty(0)).device
    with eval_mode(model), torch.inference_mode():
        reference = [t.double().cpu().numpy() for t in flatten_outputs(model(samples.to(device)))]
    labels_np = labels.cpu().numpy() if labels is not None else None
    ref_top1 = _top1(reference[0])
    torch_accuracy = float(np.mean(ref_top1 == labels_np)) if labels_np is not None and ref_top1 is not None else None

    runners = []
    if onnx_path is not None:
        runners.append(make_runner("onnxruntime", onnx_path=onnx_path, device="CPU"))
    if openvino_xml is not None:
        runners.append(make_runner("openvino", openvino_xml=openvino_xml, device="CPU"))
    names = _output_names(runners[0])
    results = [_compare(r, reference, samples, atol, rtol, labels_np, names) for r in runners]

    report = ParityReport(status="pass", atol=atol, rtol=rtol, samples=int(samples.shape[0]),
                          torch_accuracy=torch_accuracy, runtimes=results)
    breaches = [f"{r.runtime} {o.name}: max abs diff {o.max_abs_diff:.3g}, max rel diff {o.max_rel_diff:.3g}"
                for r in results for o in r.outputs if not o.within_tolerance]
    if breaches:
        message = f"exported model differs from PyTorch beyond atol={atol}, rtol={rtol}: " + "; ".join(breaches)
        if on_breach == "fail":
            raise ExportError(message)
        warnings.warn(message, stacklevel=2)
        report.status = "warn"
    return report


def _output_names(runner: Runner) -> list[str]:
    if runner.runtime == "onnxruntime":
        return [o.name for o in runner.session.get_outputs()]
    return [next(iter(o.get_names()), f"output{i}") for i, o in enumerate(runner.request.model_outputs)]


# ------------------------------------------------------------- integrity of the exported files

def export_hashes(run_dir: Path, files: Mapping[str, str]) -> dict[str, str]:
    """sha256 of model.pt, dense.pt and every exported file (OpenVINO: .xml and .bin), by path in the run
    directory: benchmarks verify them first, so exports that do not belong to model.pt are never measured."""
    names = ["model.pt", "dense.pt"]
    for rel in files.values():
        names.append(rel)
        if rel.endswith(".xml"):
            names.append(str(Path(rel).with_suffix(".bin")))
    return {name: artifact_sha256(run_dir / name) for name in names if (run_dir / name).is_file()}


def artifact_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in chunks. A torch .pt file is hashed by what it holds (tensors' dtype,
    shape and bytes, the plan and other plain values), not by its bytes: a resumed run writes model.pt
    again from a reloaded model whose tensors may sit in other storages (torch.save writes whole
    storages), with the same weights, while keeping its export."""
    if path.suffix == ".pt" and zipfile.is_zipfile(path):
        try:
            digest = hashlib.sha256(b"torch-payload\0")
            _hash_payload(digest, torch.load(path, map_location="cpu", weights_only=True, mmap=True))
            return digest.hexdigest()
        except Exception:  # noqa: BLE001 - unreadable: hash the bytes (and the mismatch names the file)
            pass
    return file_sha256(path, chunk)


def _hash_payload(digest: Any, obj: Any) -> None:
    """Feed a loaded checkpoint into `digest` canonically (dict keys sorted, tensors as raw bytes)."""
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b"")
    elif isinstance(obj, Mapping):
        digest.update(f"D{len(obj)}\0".encode())
        for key in sorted(obj, key=repr):
            digest.update(f"{key!r}\0".encode())
            _hash_payload(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"L{len(obj)}\0".encode())
        for item in obj:
            _hash_payload(digest, item)
    else:
        digest.update(f"V{obj!r}\0".encode())


def verify_export(run_dir: Path, export: Mapping | None) -> None:
    """Before measuring: every file recorded at export still has its hash (UsageError naming it otherwise)."""
    export = export or {}
    if not export.get("files"):
        return
    again = (f"Run `pfp-deploy export --run-dir {run_dir}` again to export model.pt and dense.pt afresh "
             "(then benchmark).")
    recorded = export.get("sha256")
    if not isinstance(recorded, Mapping) or not recorded:
        log.warning("%s records no export hashes (exported by an older pfp-deploy), so the exported files "
                    "cannot be checked against model.pt. %s", run_dir / "report.json", again)
        return
    for name, expected in recorded.items():
        path = run_dir / name
        if not path.is_file():
            raise UsageError(f"{path} is missing (it was written at export and is needed to benchmark). {again}")
        actual = artifact_sha256(path)
        if actual != expected:
            why = ("changed after the export, so the exported files are not made from it" if name in
                   ("model.pt", "dense.pt") else "is not the file the export wrote: it was replaced or modified "
                   "since, so it may not belong to model.pt")
            raise UsageError(f"{path} {why} (sha256 {actual[:12]}..., recorded at export {str(expected)[:12]}...). "
                             f"{again}")
