"""`pfp-deploy` commands and their exit codes: 0 passed, 1 check failed, 2 usage, 3 stage failed, 130 Ctrl-C."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers.tiny_recipes import REPO, one_thread, tiny_recipe, write_recipe  # noqa: F401 (fixture)

import pfp_deploy.pipeline as pipeline
from pfp_deploy.cli import main
from pfp_deploy.errors import UsageError

IMPOSSIBLE = {"targets": [{"name": "torch-cpu", "runtime": "torch", "batch": 1, "min_speedup": 1000.0}],
              "latency": {"warmup": 1, "min_runs": 3, "min_time_s": 0}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two CLI runs of the tiny recipe: one passing, one failing an impossible speed-up gate."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    recipe = write_recipe(root / "tiny.yaml", tiny_recipe())
    assert main(["-q", "optimize", "--recipe", str(recipe), "--output-dir", str(root / "runs")]) == 0
    bad = write_recipe(root / "bad.yaml", tiny_recipe(name="impossible", checks=IMPOSSIBLE))
    assert main(["-q", "optimize", "--recipe", str(bad), "--output-dir", str(root / "runs")]) == 1
    return root


def test_help_teaches_with_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--set" in out and "exit codes" in out
    for command in ("optimize", "validate", "prune", "export", "benchmark", "check", "env"):
        assert command in out
        assert main([command, "--help"]) == 0
    assert main(["no-such-command"]) == 2


def test_validate_prints_the_resolved_recipe_or_every_problem(tmp_path, capsys):
    assert main(["validate", str(REPO / "recipes" / "fashion_mnist_quickstart.yaml"), "--set", "prune.keep=0.4"]) == 0
    assert "keep: 0.4" in capsys.readouterr().out
    bad = write_recipe(tmp_path / "bad.yaml", tiny_recipe(prune={"keep": 1.5}, data={"batch_size": 0}))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "prune.keep" in err and "data.batch_size" in err and "Traceback" not in err


def test_missing_recipe_file_is_a_usage_error(tmp_path, capsys):
    assert main(["optimize", "--recipe", str(tmp_path / "nope.yaml"), "--output-dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_optimize_exit_codes_and_json(runs, capsys, tmp_path):
    passed = json.loads((runs / "runs" / "tiny" / "report.json").read_text())
    failed = json.loads((runs / "runs" / "impossible" / "report.json").read_text())
    assert passed["status"] == "passed" and passed["exit_code"] == 0
    assert failed["status"] == "failed" and failed["exit_code"] == 1
    assert "min_speedup" in next(c for c in failed["checks"] if c["name"] == "targets")["detail"]
    # --json: the report on stdout for machines, the summary on stderr; an existing run needs --overwrite.
    recipe = str(runs / "tiny.yaml")
    assert main(["optimize", "--recipe", recipe, "--output-dir", str(runs / "runs")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["-q", "optimize", "--recipe", recipe, "--output-dir", str(runs / "runs"), "--resume", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["status"] == "passed" and "PASSED" in captured.err


def test_benchmark_and_check_work_on_a_copied_run_directory(runs, tmp_path, capsys):
    edge = shutil.copytree(runs / "runs" / "tiny", tmp_path / "edge")  # as if made on another machine
    assert main(["-q", "benchmark", "--run-dir", str(edge), "--target", "torch-cpu"]) == 0
    report = json.loads((edge / "report.json").read_text())
    assert report["run_dir"] == str(edge) and report["targets"][0]["status"] == "passed"
    assert main(["check", "--report", str(edge / "report.json")]) == 0
    assert main(["benchmark", "--run-dir", str(edge), "--target", "torch-gpu"]) == 2
    assert 'Did you mean "torch-cpu"' in capsys.readouterr().err

    impossible = runs / "runs" / "impossible"
    assert main(["check", "--report", str(impossible / "report.json")]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert main(["-q", "benchmark", "--run-dir", str(impossible)]) == 1
    assert main(["check", "--report", str(tmp_path / "missing.json")]) == 2
    assert main(["benchmark", "--run-dir", str(tmp_path)]) == 2


def test_prune_one_shot(tmp_path):
    args = ["-q", "prune", "--model", "resnet20", "--data", "synthetic", "--keep", "0.5", "--output-dir",
            str(tmp_path), "--set", "model.input_shape=[1, 3, 16, 16]", "--set", "data.synthetic.num_samples=32",
            "--set", "data.calibration_samples=16", "--set", "prune.bn_recalibration_samples=16"]
    assert main(args) == 0
    run = tmp_path / "resnet20_keep0.5"
    report = json.loads((run / "report.json").read_text())
    assert (run / "model.pt").is_file() and report["prune"]["steps"][0]["achieved"] == pytest.approx(0.5, abs=0.01)
    assert report["targets"] is None and not report["finetune"]["steps"]
    assert main(["prune", "--model", "resnet20"]) == 2


def test_prune_with_a_recipe_applies_keep_and_name_and_refuses_one_shot_flags(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe())
    args = ["-q", "prune", "--recipe", str(recipe), "--output-dir", str(tmp_path)]
    assert main(args + ["--keep", "0.7", "--name", "tiny_keep0.7"]) == 0
    report = json.loads((tmp_path / "tiny_keep0.7" / "report.json").read_text())
    assert report["prune"]["steps"][0]["achieved"] == pytest.approx(0.7, abs=0.01)  # the recipe says 0.5
    assert not (tmp_path / "tiny").exists()
    for flags in (["--model", "vgg_small"], ["--data", "fashion_mnist"], ["--weights", "x.pt", "--keep", "0.3"]):
        assert main(args + flags) == 2
        err = capsys.readouterr().err
        assert "cannot be combined with --recipe" in err and flags[0] in err and "--set" in err
    assert main(["prune", "--help"]) == 0
    assert "with --recipe: prune.keep" in " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def _check(tmp_path, report) -> int:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    return main(["check", "--report", str(path)])


def test_check_fails_a_report_whose_run_did_not_pass(runs, tmp_path, capsys):
    good = json.loads((runs / "runs" / "tiny" / "report.json").read_text())
    assert _check(tmp_path, good) == 0
    interrupted = {**good, "status": "interrupted", "exit_code": 130,
                   "message": "interrupted during stage report; continue with --resume"}
    assert _check(tmp_path, interrupted) == 1  # every target row passes, but the run never finished
    out = capsys.readouterr().out
    assert "status 'interrupted'" in out and "--resume" in out and out.rstrip().splitlines()[-1].startswith("FAILED")
    assert _check(tmp_path, {**good, "exit_code": 3}) == 1
    assert _check(tmp_path, {**good, "status": "running", "exit_code": None, "targets": None}) == 1
    assert _check(tmp_path, {**good, "targets": None}) == 2  # passed but nothing measured (pfp-deploy prune)
    assert "pfp-deploy benchmark" in capsys.readouterr().err


def _broken(good: dict, edit) -> dict:
    report = json.loads(json.dumps(good))
    edit(report)
    return report


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["targets"][0]["pruned"].update(p50_ms="abc"), "targets[0].pruned.p50_ms must be a number, got 'abc'"),
    (lambda r: r.pop("status"), "status is missing"),
    (lambda r: r.update(exit_code="0"), "exit_code must be an integer, got '0'"),
    (lambda r: r.update(targets={"torch-cpu": {}}), "targets must be a list"),
    (lambda r: r["targets"].append("torch-cpu"), "targets[1] must be an object, got 'torch-cpu'"),
    (lambda r: r["targets"][0].update(speedup=[2.0]), "targets[0].speedup must be a number, got [2.0]"),
    (lambda r: r["targets"][0].pop("name"), "targets[0].name is missing"),
    (lambda r: r["targets"][0].update(status="passd"), "targets[0].status must be one of"),
    (lambda r: r["targets"][0]["dense"].pop("p90_ms"), "targets[0].dense.p90_ms is missing"),
    (lambda r: r["targets"][0]["gates"][0].update(passed="yes"), "targets[0].gates[0].passed must be true or false"),
    (lambda r: r["targets"][0]["target"].update(p50_ms="fast"), "targets[0].target: invalid target 'torch-cpu'"),
    (lambda r: r.update(checks=[{"status": "failed"}]), "checks[0].name is missing"),
])
def test_check_rejects_malformed_reports_naming_the_field(runs, tmp_path, capsys, edit, message):
    good = json.loads((runs / "runs" / "impossible" / "report.json").read_text())  # has gates to break
    assert _check(tmp_path, _broken(good, edit)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'report.json'}: ") and message in err, err
    assert "unexpected" not in err and "Traceback" not in err


@pytest.mark.parametrize("document", ["[]", '[{"name": "x"}]', '"passed"', "null", "3"])
def test_check_rejects_a_report_that_is_not_an_object(tmp_path, capsys, document):
    (tmp_path / "report.json").write_text(document)
    assert main(["check", "--report", str(tmp_path / "report.json")]) == 2
    err = capsys.readouterr().err
    assert "expected a JSON object" in err and "unexpected" not in err


@pytest.mark.parametrize("raised, code, text", [
    (KeyboardInterrupt(), 130, "--resume"),
    (UsageError("output directory x is not writable"), 2, "error: output directory x is not writable"),
    (RuntimeError("boom"), 3, "unexpected RuntimeError: boom (traceback in"),
])
def test_exceptions_become_one_line_and_an_exit_code(monkeypatch, capsys, tmp_path, raised, code, text):
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(pipeline, "optimize", fail)
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe())
    assert main(["optimize", "--recipe", str(recipe), "--output-dir", str(tmp_path)]) == code
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err


def test_env_lists_runtimes(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"cpu_model", "torch", "versions", "onnxruntime_providers", "openvino_devices"} <= set(info)


def test_importing_the_package_and_cli_loads_no_deploy_runtime():
    code = ("import sys, pfp_deploy, pfp_deploy.cli, pfp_deploy.pipeline; pfp_deploy.optimize; "
            "print(sorted(m for m in ('onnxruntime', 'openvino', 'onnx', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_export_and_onnxruntime_benchmark_from_a_run_directory(tmp_path):
    recipe = write_recipe(tmp_path / "onnx.yaml", tiny_recipe(
        name="onnx", export={"formats": ["onnx"]},
        checks={"targets": [{"name": "ort-cpu", "runtime": "onnxruntime", "batch": 1}],
                "latency": {"warmup": 1, "min_runs": 3, "min_time_s": 0}}))
    assert main(["-q", "optimize", "--recipe", str(recipe), "--output-dir", str(tmp_path)]) == 0
    run = tmp_path / "onnx"
    (run / "model.onnx").unlink()
    assert main(["export", "--run-dir", str(run)]) == 0 and (run / "model.onnx").is_file()
    assert main(["-q", "benchmark", "--run-dir", str(run), "--target", "ort-cpu"]) == 0


def test_progress_lines_follow_the_current_stderr(monkeypatch):
    """main() installs its log handler once; a later swap of sys.stderr (pytest's capture of the next
    test, a tool embedding the CLI) must not leave it writing to the old, closed stream."""
    import io
    import logging

    from pfp_deploy.cli import _log_to_stderr

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    _log_to_stderr(quiet=False)
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("pfp_deploy").info("still visible")
    assert "still visible" in second.getvalue()
