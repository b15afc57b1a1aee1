"""MLflow tracking (pfp_deploy.tracking): a real tiny run logged to a real local MLflow store (sqlite, in
tmp_path) and read back through MlflowClient; MLflow missing, an unreachable or silent server, fail-soft
mode and the config's validation."""
from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers.tiny_recipes import one_thread, tiny_recipe  # noqa: F401 (fixture)
from pydantic import ValidationError

from pfp_deploy.errors import PFPDeployError, TrackingError
from pfp_deploy.pipeline import optimize
from pfp_deploy.tracking import MlflowConfig, TrackingResult, log_run

# Export what the installed extras allow ('pfp-deploy[deploy]' brings all four), so model artifacts are real.
ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
EXPORTS = (["onnx"] if ONNX else []) + (["openvino"] if ONNX and importlib.util.find_spec("openvino") else [])
REPORT_FILES = {"report.json", "report.md", "plan.json", "recipe.resolved.yaml", "env.json"}
# MLflow 3.17's sqlite store on SQLAlchemy 2.1: an upstream deprecation, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One finished tiny run (synthetic data, two fine-tuning epochs, a torch latency target, exports)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe = tiny_recipe(
            data={"synthetic": {"num_samples": 32, "num_classes": 4}, "calibration_samples": 16},
            prune={"keep": 0.5, "bn_recalibration_samples": 16},
            finetune={"epochs": 2, "max_steps_per_epoch": 1, "distill": {"enabled": False}},
            export={"formats": EXPORTS, "parity": {"samples": 2}},
            checks={"targets": [{"name": "torch-cpu", "runtime": "torch", "batch": 1}],
                    "latency": {"warmup": 0, "min_runs": 2, "min_time_s": 0}})
        result = optimize(recipe, output_dir=tmp_path_factory.mktemp("runs"), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result.passed, result.report["message"]
    return result.run_dir


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A real local MLflow store: a sqlite database (MLflow 3's local default) in a fresh folder."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def artifact_paths(mlflow_client, run_id: str, folder: str | None = None) -> set[str]:
    paths = set()
    for item in mlflow_client.list_artifacts(run_id, folder):
        paths |= artifact_paths(mlflow_client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `directory` with its size, mtime and sha256: the run directory must not change."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns,
                                            hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def recipe_params(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())


def expected_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """The documented flattening: dotted keys, sections in lists by index, other values as JSON, strings as-is."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(expected_params(value, name + "."))
        elif isinstance(value, list) and any(isinstance(item, dict) for item in value):
            for index, item in enumerate(value):
                out.update(expected_params(item, f"{name}.{index}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def steps(section: dict) -> list[dict]:
    return section["steps"] if "steps" in section else section["stages"]  # "stages" in older reports


def millis(stamp: str) -> int:
    return int(datetime.datetime.fromisoformat(stamp).timestamp() * 1000)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ a real local store

def test_run_is_logged_and_reads_back_as_in_report_json(run_dir, store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory (MLflow's ./mlruns default)
    before = snapshot(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    params = recipe_params(run_dir)

    result = log_run(run_dir, MlflowConfig(tracking_uri=store, tags={"team": "vision", "nightly": True}), params)

    assert isinstance(result, TrackingResult) and result.status == "logged", result.error
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()
    assert result.tracking_uri == store and result.run_name == run_dir.name and result.error is None
    mlflow_client = client(store)
    run = mlflow_client.get_run(result.run_id)
    assert mlflow_client.get_experiment(result.experiment_id).name == "pfp-deploy"
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert (run.info.start_time, run.info.end_time) == (millis(report["created"]), millis(report["finished"]))

    # Params: the resolved recipe, flattened to its --set keys.
    logged = run.data.params
    assert logged == expected_params(params) and result.params == len(logged)
    assert logged["prune.keep"] == "0.5" and logged["model.input_shape"] == "[1, 3, 16, 16]"
    assert logged["checks.targets.0.runtime"] == "torch" and logged["data.root"] == "null"

    # Metrics: report.json's numbers, exactly.
    metrics, accuracy, model = run.data.metrics, report["accuracy"], report["model"]
    for step in ("dense", "pruned_only", "reconstructed", "bn_recalibrated", "finetuned"):
        assert metrics[f"accuracy/{step}.top1"] == accuracy[step]["top1"]
    assert metrics["accuracy/pruned.top1"] == accuracy["finetuned"]["top1"]
    assert metrics["accuracy/drop.top1"] == pytest.approx(accuracy["dense"]["top1"] - accuracy["finetuned"]["top1"])
    for cost in ("macs", "params"):
        assert metrics[f"cost/{cost}.dense"] == model[f"{cost}_dense"]
        assert metrics[f"cost/{cost}.pruned"] == model[f"{cost}_pruned"]
    assert metrics["cost/macs.kept"] == pytest.approx(model["macs_pruned"] / model["macs_dense"])
    stage = steps(report["prune"])[0]
    assert metrics["prune/achieved"] == stage["achieved"] and metrics["prune/epsilon"] == stage["epsilon"]
    (target,) = report["targets"]
    assert target["name"] == "torch-cpu" and target["speedup"] > 0
    assert metrics["target/torch-cpu.p50_ms.dense"] == target["dense"]["p50_ms"]
    assert metrics["target/torch-cpu.p50_ms.pruned"] == target["pruned"]["p50_ms"]
    assert metrics["target/torch-cpu.speedup"] == target["speedup"]
    assert metrics["time/prune"] == report["times"]["prune"]
    # Per step: the cascade by step number, fine-tuning by epoch.
    history = [h for s in steps(report["finetune"]) for h in s["history"]]
    assert len(history) == 2
    assert [(m.step, m.value) for m in mlflow_client.get_metric_history(result.run_id, "finetune/val_top1")] == \
        [(i, h["val_top1"]) for i, h in enumerate(history, start=1)]
    keep = mlflow_client.get_metric_history(result.run_id, "cascade/keep")
    assert [(m.step, m.value) for m in keep] == [(1, stage["keep"])]
    tuned = [s["accuracy"]["top1"] for s in steps(report["finetune"]) if "accuracy" in s]
    assert [m.value for m in mlflow_client.get_metric_history(result.run_id, "cascade/accuracy.finetuned.top1")] == tuned
    assert result.metrics >= len(metrics)

    # Tags: the outcome and the checks, searchable; the recipe's own tags as text.
    tags = run.data.tags
    assert tags["pfp_deploy.status"] == report["status"] == "passed"
    assert {c["name"]: c["status"] for c in report["checks"]} == \
        {k.removeprefix("pfp_deploy.check."): v for k, v in tags.items() if k.startswith("pfp_deploy.check.")}
    assert tags["team"] == "vision" and tags["nightly"] == "true" and tags["pfp_deploy.model"] == "resnet20"
    assert report["name"] in tags["mlflow.note.content"]
    assert mlflow_client.search_runs([result.experiment_id], "tags.`pfp_deploy.status` = 'passed'")

    # Artifacts: the reports, plots and the pruned model, in the run directory's layout, byte for byte.
    models = ({"model.onnx"} if "onnx" in EXPORTS else set()) | \
        ({"openvino/model.xml", "openvino/model.bin"} if "openvino" in EXPORTS else set())
    plots = {p.name for p in run_dir.glob("*.png")}
    assert artifact_paths(mlflow_client, result.run_id) == REPORT_FILES | plots | models
    assert result.artifacts == len(REPORT_FILES | plots | models)
    for name in ("report.json", *sorted(models)):
        copy = mlflow_client.download_artifacts(result.run_id, name, str(tmp_path / "download"))
        assert Path(copy).read_bytes() == (run_dir / name).read_bytes()
    # Artifacts sit beside the database, the run directory is untouched, the working directory stays empty.
    assert result.artifact_uri.startswith((Path(store.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri())
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["download"]


def test_second_run_reuses_the_experiment_without_models_and_nests(run_dir, store, monkeypatch):
    mlflow_client = client(store)
    first = log_run(run_dir, MlflowConfig(tracking_uri=store, run_name="no-models", log_models=False), {})
    assert first.status == "logged" and first.params == 0
    assert not {p for p in artifact_paths(mlflow_client, first.run_id) if p.endswith((".onnx", ".xml", ".bin"))}
    assert REPORT_FILES <= artifact_paths(mlflow_client, first.run_id)

    # tracking_uri null: MLflow's own default, i.e. MLFLOW_TRACKING_URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    child = log_run(run_dir, MlflowConfig(parent_run_id=first.run_id, log_models=False), {"prune": {"keep": 0.5}})
    assert child.status == "logged" and child.tracking_uri == store
    assert child.experiment_id == first.experiment_id and child.run_id != first.run_id
    run = mlflow_client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == first.run_id and run.data.params == {"prune.keep": "0.5"}


def test_params_are_flattened_within_mlflow_limits(run_dir, store):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    params = {"model": {"kwargs": {"path/to": "x", "drop rate": 0.1, "ids": [1, 2, 3], "note": "é" * 10_000}},
              "many": {f"k{i}": i for i in range(230)}, "empty": {}, "layers": [{"name": "a"}, {"name": "b"}]}
    result = log_run(run_dir, MlflowConfig(tracking_uri=store, log_models=False), params)
    assert result.status == "logged"
    logged = client(store).get_run(result.run_id).data.params
    assert len(logged) == result.params == 4 + 230 + 1 + 2  # more than one batch of 100
    assert logged["model.kwargs.path_to"] == "x" and logged["model.kwargs.drop rate"] == "0.1"
    assert logged["model.kwargs.ids"] == "[1, 2, 3]" and logged["empty"] == "{}"
    assert logged["layers.1.name"] == "b" and logged["many.k229"] == "229"
    note = logged["model.kwargs.note"]
    assert len(note) == MAX_PARAM_VAL_LENGTH and note.endswith("...[truncated]") and note.startswith("é" * 100)


def test_deleted_experiment_is_a_clear_error(run_dir, store):
    mlflow_client = client(store)
    mlflow_client.delete_experiment(mlflow_client.create_experiment("gone"))
    with pytest.raises(TrackingError, match=r"'gone'.*deleted.*report.mlflow.experiment"):
        log_run(run_dir, MlflowConfig(tracking_uri=store, experiment="gone"), {})


def test_missing_report_json_is_a_tracking_error(tmp_path, store):
    with pytest.raises(TrackingError, match="report.json does not exist"):
        log_run(tmp_path, MlflowConfig(tracking_uri=store), {})
    result = log_run(tmp_path, MlflowConfig(tracking_uri=store, required=False), {})
    assert result.status == "failed" and "report.json" in result.error and result.run_id is None


def test_file_store(run_dir, tmp_path, monkeypatch):
    """MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE=true: the error says what to do."""
    pytest.importorskip("mlflow")
    path = str(tmp_path / "mlruns")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    try:
        refused = None
        log_run(run_dir, MlflowConfig(tracking_uri=path, log_models=False), {})
    except TrackingError as exc:
        refused = str(exc)
    if refused is not None:  # MLflow >= 3.x; older ones simply use the file store
        assert path in refused and "sqlite:///" in refused and "MLFLOW_ALLOW_FILE_STORE=true" in refused
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    result = log_run(run_dir, MlflowConfig(tracking_uri=path, log_models=False), {"prune": {"keep": 0.5}})
    assert result.status == "logged"
    assert client(path).get_run(result.run_id).data.params == {"prune.keep": "0.5"}


# ------------------------------------------------------------------------------------ failures

def test_mlflow_missing_is_a_clear_error(tmp_path):
    """MLflow made unimportable in a fresh interpreter (a meta-path finder refuses it): our error, not mlflow's."""
    script = textwrap.dedent("""
        import importlib.abc, json, sys

        class NoMlflow(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "mlflow" or name.startswith("mlflow."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NoMlflow())
        from pfp_deploy.errors import TrackingError
        from pfp_deploy.tracking import MlflowConfig, log_run

        try:
            log_run(sys.argv[1], MlflowConfig(tracking_uri="sqlite:///mlflow.db"), {})
        except TrackingError as exc:
            print("ERROR", exc)
        print("RESULT", json.dumps(log_run(sys.argv[1], MlflowConfig(required=False), {}).to_dict()))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert "needs MLflow, which is not installed: pip install 'pfp-deploy[mlflow]'" in lines["ERROR"]
    result = json.loads(lines["RESULT"])
    assert result["status"] == "failed" and "pip install 'pfp-deploy[mlflow]'" in result["error"]
    assert "MLflow tracking failed" in proc.stderr  # the warning
    assert not list(tmp_path.iterdir())  # no store was created


def test_unreachable_server_fails_in_seconds_naming_the_uri(run_dir):
    pytest.importorskip("mlflow")
    uri = f"http://127.0.0.1:{closed_port()}"
    env_before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    start = time.monotonic()
    with pytest.raises(TrackingError) as info:
        log_run(run_dir, MlflowConfig(tracking_uri=uri), {})
    assert time.monotonic() - start < 10  # MLflow's defaults (7 retries, backoff) would take minutes
    assert isinstance(info.value, PFPDeployError)
    assert uri in str(info.value) and "report.mlflow.tracking_uri" in str(info.value)
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")} == env_before  # settings restored


def test_silent_server_times_out_within_the_request_timeout(run_dir):
    """A server that accepts connections but never answers (a hung proxy): bounded by request_timeout_s."""
    pytest.importorskip("mlflow")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel completes the handshakes; nothing ever reads or answers
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingError, match="timed out") as info:
            log_run(run_dir, MlflowConfig(tracking_uri=uri, request_timeout_s=1), {})
        assert time.monotonic() - start < 8
    assert uri in str(info.value)


def test_not_required_failure_is_a_warning_and_no_exception(run_dir):
    pytest.importorskip("mlflow")
    uri = f"http://127.0.0.1:{closed_port()}"
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # on the package logger itself: the CLI may have stopped propagation
    logger = logging.getLogger("pfp_deploy")
    logger.addHandler(handler)
    try:
        result = log_run(run_dir, MlflowConfig(tracking_uri=uri, required=False), {})
    finally:
        logger.removeHandler(handler)
    assert result.status == "failed" and uri in result.error and result.run_id is None
    assert json.loads(json.dumps(result.to_dict()))["status"] == "failed"
    assert [r.levelno for r in records] == [logging.WARNING] and uri in records[0].getMessage()


def test_skipped_when_disabled_or_not_rank_zero(tmp_path, monkeypatch):
    missing = tmp_path / "no-run"  # never read: nothing is logged
    result = log_run(missing, MlflowConfig(enabled=False), {})
    assert result.status == "skipped" and "enabled is false" in result.reason
    monkeypatch.setenv("RANK", "1")
    result = log_run(missing, MlflowConfig(tracking_uri="http://127.0.0.1:9"), {})
    assert result.status == "skipped" and "rank 1" in result.reason and result.run_id is None


# ---------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("uri, message", [
    ("ftp://host/mlruns", "unsupported scheme 'ftp:'"),
    ("htp://host:5000", 'Did you mean "http"?'),
    ("sqlite://mlflow.db", "three slashes"),
    ("sqlite:///:memory:", "in-memory"),
    ("http://", "names no host"),
    ("  ", "is empty"),
])
def test_bad_tracking_uri_is_a_validation_error_naming_the_key(uri, message):
    with pytest.raises(ValidationError) as info:
        MlflowConfig(tracking_uri=uri)
    assert message in str(info.value) and "report.mlflow.tracking_uri" in str(info.value)


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://mlflow.example.com/", "sqlite:///mlflow.db",
                                 "sqlite:////abs/mlflow.db", "postgresql+psycopg2://u:p@db:5432/mlflow",
                                 "databricks", "databricks://profile", "file:///tmp/mlruns", "./mlruns",
                                 "/data/mlruns", r"C:\mlruns"])
def test_supported_tracking_uris_validate(uri):
    assert MlflowConfig(tracking_uri=uri).tracking_uri == uri


def test_config_is_strict_with_teaching_messages():
    with pytest.raises(ValidationError, match="trackinguri"):
        MlflowConfig(trackinguri="http://x:5000")
    with pytest.raises(ValidationError, match="request_timeout_s"):
        MlflowConfig(request_timeout_s=0)
    with pytest.raises(ValidationError, match="tag name 'bad\\*name'"):
        MlflowConfig(tags={"bad*name": "x"})
    with pytest.raises(ValidationError, match="report.mlflow.experiment"):
        MlflowConfig(experiment=" ")
    config = MlflowConfig(tags={"epoch": 3, "nightly": True, "team": "vision"})
    assert config.tags == {"epoch": "3", "nightly": "true", "team": "vision"}
    assert all(field.description for field in MlflowConfig.model_fields.values())  # they become the recipe docs


# ------------------------------------------------------------------ through the recipe and optimize()

def _pipeline_recipe(**report) -> dict:
    return tiny_recipe(data={"synthetic": {"num_samples": 32, "num_classes": 4}, "calibration_samples": 16},
                       prune={"keep": 0.5, "bn_recalibration_samples": 16}, finetune={"epochs": 0},
                       export={"formats": []}, checks={"targets": []}, report={"plots": False, **report})


def test_recipe_key_logs_the_run_and_records_it_in_report_json(store, tmp_path):
    recipe = _pipeline_recipe(mlflow={"tracking_uri": store, "experiment": "pipeline", "tags": {"team": "vision"}})
    result = optimize(recipe, output_dir=tmp_path, progress=False).raise_for_status()
    tracking = result.report["tracking"]
    assert tracking["status"] == "logged" and tracking["experiment"] == "pipeline"
    stored = json.loads((result.run_dir / "report.json").read_text())
    assert stored["tracking"]["run_id"] == tracking["run_id"]
    run = client(store).get_run(tracking["run_id"])
    assert run.data.params["prune.keep"] == "0.5" and run.data.tags["team"] == "vision"
    assert run.data.metrics["accuracy/dense.top1"] == pytest.approx(result.report["accuracy"]["dense"]["top1"])


def test_optimize_tracking_argument_replaces_the_recipe_section(store, tmp_path):
    recipe = _pipeline_recipe(mlflow={"tracking_uri": "http://127.0.0.1:1", "required": True})
    result = optimize(recipe, output_dir=tmp_path, progress=False,
                      tracking={"tracking_uri": store, "experiment": "from-the-api"})
    assert result.passed and result.report["tracking"]["experiment"] == "from-the-api"
    with pytest.raises(PFPDeployError, match=r"optimize\(tracking=...\): experimentt: unknown key"):
        optimize(recipe, output_dir=tmp_path / "bad", progress=False, tracking={"experimentt": "x"})


def test_required_tracking_failure_fails_the_run_but_keeps_its_files(tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    result = optimize(_pipeline_recipe(mlflow={"tracking_uri": uri, "request_timeout_s": 2}), output_dir=tmp_path,
                      progress=False)
    assert result.status == "error" and result.exit_code == 3 and uri in result.report["message"]
    assert result.report["tracking"]["status"] == "failed"
    assert {"report.json", "model.pt", "plan.json"} <= {p.name for p in result.run_dir.iterdir()}
    with pytest.raises(TrackingError, match="cannot reach the MLflow tracking server"):
        result.raise_for_status()
    soft = optimize(_pipeline_recipe(mlflow={"tracking_uri": uri, "required": False}), output_dir=tmp_path / "soft",
                    progress=False)
    assert soft.passed and soft.report["tracking"]["status"] == "failed"
