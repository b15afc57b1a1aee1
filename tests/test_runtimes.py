"""The runtime registry: every entry measures on CPU and validates devices; a new runtime is one file."""
from __future__ import annotations

import importlib.util
import re

import pytest
import torch
import torch.nn as nn
from helpers.doc_examples import registered_doc_example

from pfp_deploy.bench import measure_latency
from pfp_deploy.checks import run_targets
from pfp_deploy.errors import RecipeError, RuntimeUnavailableError, UsageError
from pfp_deploy.recipe import TargetConfig, load_recipe
from pfp_deploy.runtimes import (
    REGISTRY,
    Runtime,
    SettingsError,
    get_runtime,
    make_runner,
    register_runtime,
    runtime_names,
    runtimes,
)

DOC_EXAMPLE = "onnx-reference"  # the runtime docs/extending.md adds
SHAPE = (1, 3, 16, 16)
FAST = dict(warmup=1, min_runs=3, min_time_s=0)
RECIPE = {"name": "t", "model": {"source": "builtin", "name": "resnet20"}, "data": {"format": "synthetic"}}


def tiny_cnn(width: int) -> nn.Module:
    torch.manual_seed(width)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Dense and pruned tiny CNNs with every export the installed packages can write, keyed like
    report["export"]["files"] ("pruned_onnx", ...); the torch models under their role."""
    from pfp_deploy.export import export_onnx, export_openvino

    out = tmp_path_factory.mktemp("runtimes")
    found: dict = {}
    for role, width in (("dense", 16), ("pruned", 4)):
        found[role] = model = tiny_cnn(width)
        if importlib.util.find_spec("onnx") is None:
            continue
        with pytest.warns(UserWarning):  # opset 17: the TorchScript exporter, fast
            found[f"{role}_onnx"] = export_onnx(model, torch.randn(*SHAPE), out / f"{role}.onnx", opset=17)
        if importlib.util.find_spec("openvino") is not None:
            found[f"{role}_openvino"] = export_openvino(found[f"{role}_onnx"], None, out / f"ov_{role}")
    return found


@pytest.fixture
def doc_runtime(tmp_path):
    """Register the doc's example the way the doc says: import the file that holds it. Removed after."""
    with registered_doc_example("A runtime", "onnx_reference_runtime", DOC_EXAMPLE, REGISTRY, tmp_path) as entry:
        yield entry


def _entry(name: str, request) -> Runtime:
    if name == DOC_EXAMPLE:
        request.getfixturevalue("doc_runtime")
    return get_runtime(name)


EVERY = [*runtime_names(), DOC_EXAMPLE]  # every registered entry, and the doc's


@pytest.mark.parametrize("name", EVERY)
def test_each_runtime_runs_its_export_and_measures_latency_on_cpu(name, exported, request):
    entry = _entry(name, request)
    if not entry.available():
        pytest.skip(f"{entry.package} is not installed")
    try:
        device = entry.parse_device("CPU")
    except ValueError:
        pytest.skip(f"{name} has no CPU device")
    source = exported.get("pruned" if entry.export_format is None else f"pruned_{entry.export_format}")
    if source is None:
        pytest.skip(f"no {entry.export_format} export here")
    runner = make_runner(name, source=source, device=device, threads=1)
    x = torch.randn(2, *SHAPE[1:])
    torch.testing.assert_close(torch.from_numpy(runner.outputs(x)[0]), exported["pruned"](x), atol=1e-4, rtol=1e-3)
    stats = measure_latency(runner, x, **FAST)
    assert stats.runtime == name and stats.batch == 2 and stats.runs >= FAST["min_runs"]
    assert 0 < stats.min_ms <= stats.p50_ms <= stats.max_ms
    # The defaults are valid settings, and normalising them again changes nothing.
    defaults = entry.settings()
    assert entry.settings(**defaults) == defaults


@pytest.mark.parametrize("name", EVERY)
def test_device_validation_rejects_a_bad_device_clearly(name, request):
    entry = _entry(name, request)
    with pytest.raises(SettingsError) as info:
        entry.settings(device="quantum9")
    (field, message), = info.value.problems
    assert field == "device" and "'quantum9'" in message and "valid:" in message
    with pytest.raises(UsageError, match="'quantum9'.*valid:"):
        make_runner(name, source="unused", device="quantum9")  # rejected before anything is loaded
    formats = [entry.export_format] if entry.export_format else []
    recipe = {**RECIPE, "export": {"formats": formats},
              "checks": {"targets": [{"name": "x", "runtime": name, "device": "quantum9"}]}}
    with pytest.raises(RecipeError, match=r"checks\.targets\[0\]\.device: .*'quantum9'.*valid:"):
        load_recipe(recipe)


def test_unknown_runtime_in_a_recipe_gets_a_did_you_mean():
    recipe = {**RECIPE, "checks": {"targets": [{"name": "ort", "runtime": "onnxruntme"},
                                               {"name": "ov", "runtime": "openvnio"}]}}
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    message = str(info.value)
    assert ("checks.targets[0].runtime: unknown runtime 'onnxruntme'; valid: " + ", ".join(runtime_names())
            + '. Did you mean "onnxruntime"?') in message
    assert 'checks.targets[1].runtime: unknown runtime \'openvnio\'' in message and 'Did you mean "openvino"?' in message
    with pytest.raises(UsageError, match='Did you mean "torch"'):
        make_runner("torhc")


def test_precision_and_hint_are_recipe_settings_checked_per_runtime(exported):
    targets = [{"name": "torch-bf16", "runtime": "torch", "precision": "bf16"},
               {"name": "ov-throughput", "runtime": "openvino", "hint": "throughput"}]
    recipe = load_recipe({**RECIPE, "export": {"formats": ["onnx", "openvino"]}, "checks": {"targets": targets}})
    torch_row, ov_row = recipe.checks.targets
    assert (torch_row.precision, torch_row.hint, ov_row.precision, ov_row.hint) == ("bf16", None, "fp32", "THROUGHPUT")
    for bad, says in (({"runtime": "onnxruntime", "precision": "fp16"}, "precision: onnxruntime runs precision fp32"),
                      ({"runtime": "torch", "hint": "LATENCY"}, "hint: torch takes no performance hint"),
                      ({"runtime": "openvino", "hint": "FASTEST"}, "hint: unknown openvino hint 'FASTEST'"),
                      ({"runtime": "torch", "provider": "CPUExecutionProvider"}, "provider: torch takes no provider")):
        with pytest.raises(RecipeError, match=rf"checks\.targets\[0\]\.{re.escape(says)}"):
            load_recipe({**RECIPE, "export": {"formats": ["onnx", "openvino"]},
                         "checks": {"targets": [{"name": "x", **bad}]}})
    if not get_runtime("openvino").available():
        targets = targets[:1]
    results = run_targets(recipe.checks.targets[:len(targets)], exported["dense"], exported["pruned"], SHAPE,
                          files=exported, **FAST, rounds=1)
    assert [r.status for r in results] == ["passed"] * len(targets), [r.reason for r in results]
    assert results[0].pruned.precision == "bf16" and results[0].target["precision"] == "bf16"
    if len(results) > 1:
        assert results[1].pruned.hint == "THROUGHPUT"


def test_a_new_runtime_is_one_file_and_one_decorator(doc_runtime, exported):
    """The doc's runtime, once its file is imported, is a recipe runtime like the built-ins: validated,
    tied to its export format, measured by run_targets on the file of that format."""
    assert doc_runtime in runtimes() and DOC_EXAMPLE in runtime_names()
    target = {"name": "ref", "runtime": DOC_EXAMPLE, "batch": 2, "min_speedup": 1e-3}
    with pytest.raises(RecipeError, match=r"checks\.targets\[0\]\.runtime: onnx-reference needs export\.formats "
                                          r"to include onnx"):
        load_recipe({**RECIPE, "export": {"formats": []}, "checks": {"targets": [target]}})
    recipe = load_recipe({**RECIPE, "export": {"formats": ["onnx"]}, "checks": {"targets": [target]}})
    assert recipe.checks.targets[0].device == "CPU"
    if "pruned_onnx" not in exported:
        pytest.skip("onnx is not installed")
    result, = run_targets(recipe.checks.targets, exported["dense"], exported["pruned"], SHAPE, files=exported,
                          **FAST, rounds=1)
    assert result.status == "passed", result.reason
    assert result.pruned.runtime == DOC_EXAMPLE and result.pruned.batch == 2 and result.speedup > 0
    missing, = run_targets([TargetConfig(name="no-file", runtime=DOC_EXAMPLE)], exported["dense"], exported["pruned"],
                           SHAPE, **FAST, rounds=1)
    assert missing.status == "error" and "needs the path of its onnx export" in missing.reason


def test_registration_refuses_what_would_break_the_registry():
    class Impostor(Runtime):
        name = "torch"

    with pytest.raises(UsageError, match="'torch' is already registered by pfp_deploy.runtimes.torch"):
        register_runtime(Impostor)
    Impostor.name, Impostor.precisions = "impostor", ("int4",)
    with pytest.raises(UsageError, match="precisions must be a non-empty subset"):
        register_runtime(Impostor)
    Impostor.name = "Not A Name"
    with pytest.raises(UsageError, match="lower-case name"):
        register_runtime(Impostor)
    with pytest.raises(TypeError, match="subclass of pfp_deploy.runtimes.Runtime"):
        register_runtime(object)
    assert "impostor" not in runtime_names() and get_runtime("torch").__class__.__name__ == "TorchRuntime"


def test_a_missing_package_is_unavailable_not_a_crash(monkeypatch):
    entry = get_runtime("onnxruntime")
    monkeypatch.setattr(type(entry), "package", "onnxruntime_not_installed_here")
    assert not entry.available()
    with pytest.raises(RuntimeUnavailableError, match="onnxruntime_not_installed_here is not installed.*pip install"):
        make_runner("onnxruntime", onnx_path="model.onnx")
    row, = run_targets([{"name": "ort", "runtime": "onnxruntime", "on_unavailable": "skip"}], None, None, SHAPE,
                       dense_onnx="d.onnx", pruned_onnx="p.onnx", **FAST)
    assert row.status == "skipped" and "not installed" in row.reason
