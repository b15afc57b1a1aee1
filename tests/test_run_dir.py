"""The run directory under stress: a lock against a second run, SIGTERM, a full disk, --overwrite that
would delete its own inputs, and torn temp files left for --resume. Real processes and real signals."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from helpers.tiny_recipes import REPO, one_thread, tiny_recipe, write_recipe  # noqa: F401 (fixture)

from pfp_deploy.errors import UsageError
from pfp_deploy.pipeline import optimize


def _cli(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "pfp_deploy.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the other process")
        time.sleep(0.1)


def _finetuning(run_dir):
    state = run_dir / "state.json"
    try:
        return "prune1" in json.loads(state.read_text())["steps"]
    except (OSError, ValueError, KeyError):
        return False


def test_a_locked_run_is_refused_with_its_holder_and_sigterm_ends_it_like_ctrl_c(tmp_path):
    # Runs until the signal: 500 epochs of 2 steps once finished (exit 0) before the SIGTERM on a loaded machine.
    long = tiny_recipe(finetune={"epochs": 100_000, "max_steps_per_epoch": 2})
    recipe = write_recipe(tmp_path / "long.yaml", long)
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "tiny"
    first = _cli("optimize", "--recipe", str(recipe), "--output-dir", str(runs))
    try:
        _wait_for(lambda: _finetuning(run_dir) or first.poll() is not None)
        assert first.poll() is None, first.communicate()
        with pytest.raises(UsageError, match=f"in use by process {first.pid} on"):
            optimize(tiny_recipe(), output_dir=runs, overwrite=True, progress=False)
        assert (run_dir / "state.json").is_file()  # the second run deleted nothing

        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, err
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "interrupted" and report["exit_code"] == 130 and "--resume" in report["message"]

    # The holder is gone, so the lock is free (the kernel dropped it with the process).
    again = optimize(tiny_recipe(finetune={"epochs": 0}), output_dir=runs, overwrite=True, progress=False)
    assert again.passed


def test_a_full_disk_names_the_stage_and_still_writes_report_json(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(finetune={"epochs": 0}))
    limit = 150_000  # bytes per file: report.json fits, the pruned checkpoint (~0.5 MB) does not

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _cli("optimize", "--recipe", str(recipe), "--output-dir", str(tmp_path / "runs"),
                preexec_fn=small_files)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    run_dir = tmp_path / "runs" / "tiny"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "error" and report["message"].startswith("stage prune failed")
    assert not (run_dir / "checkpoints" / "prune1.pt").exists()
    assert not list(run_dir.rglob("*.tmp")), "a failed write left a temp file"
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    return optimize(tiny_recipe(finetune={"epochs": 0}), output_dir=tmp_path_factory.mktemp("runs"),
                    progress=False)


def test_overwrite_refuses_to_delete_its_own_data_root_or_recipe(finished):
    run_dir = finished.run_dir
    data_root = run_dir / "mydata"
    (data_root / "cat").mkdir(parents=True)
    recipe = tiny_recipe(data={"format": "imagefolder", "root": str(data_root)})
    with pytest.raises(UsageError, match="data root .* lies inside the run directory"):
        optimize(recipe, output_dir=run_dir.parent, overwrite=True, progress=False)
    inside = write_recipe(run_dir / "recipe.yaml", tiny_recipe())
    with pytest.raises(UsageError, match="recipe .* lies inside the run directory"):
        optimize(inside, output_dir=run_dir.parent, overwrite=True, progress=False)
    assert data_root.is_dir() and inside.is_file() and (run_dir / "model.pt").is_file()


def test_resume_removes_torn_temp_files(finished):
    run_dir = finished.run_dir
    stale = [run_dir / ".model.pt.k3j2.tmp", run_dir / "checkpoints" / ".prune1.pt.x9.tmp"]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"torn")
    resumed = optimize(tiny_recipe(finetune={"epochs": 0}), output_dir=run_dir.parent, resume=True, progress=False)
    assert resumed.passed and "prune1" in resumed.report["resumed_steps"]
    assert not any(path.exists() for path in stale)


def test_a_symlinked_run_directory_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(elsewhere)
    with pytest.raises(UsageError, match="is a symlink"):
        optimize(tiny_recipe(), output_dir=tmp_path / "runs", progress=False)
    assert not any(elsewhere.iterdir())


def test_a_forked_child_does_not_keep_the_run_locked(tmp_path):
    """A process forked while a run holds its lock (a DataLoader worker, a library's helper that
    outlives the run) gets no copy of the lock: once the run releases it, the next run can start."""
    from pfp_deploy.fileio import FileLock, LockedError

    lock = FileLock(tmp_path / ".run.lock", "first").acquire()
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # the child lingers past the parent's release
        os.write(ready_w, b"1")  # os.fork() has returned here: the at-fork hooks have run
        time.sleep(3)
        os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"1"  # on a busy machine the child may not have run yet
    os.close(ready_r)
    try:
        with pytest.raises(LockedError):
            FileLock(tmp_path / ".run.lock", "second").acquire()  # still held by the parent
        lock.release()
        FileLock(tmp_path / ".run.lock", "second").acquire().release()  # the child holds nothing
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_openvino_is_imported_with_its_telemetry_off_and_the_environment_unchanged():
    """Importing openvino sends a usage event (a forked helper that tries to reach Google Analytics)
    unless telemetry is off: pfp-deploy imports it with telemetry off and restores the environment."""
    pytest.importorskip("openvino")
    code = ("import os; before = os.environ.get('CI'); from pfp_deploy.environment import import_openvino; "
            "import_openvino(); import openvino_telemetry as t; "
            "print(t.Telemetry().consent, os.environ.get('CI') == before)")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr[-2000:]
