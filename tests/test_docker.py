"""The container image: Dockerfile + docker/ scripts, built with podman, the quickstart run inside it.

The slow tests need podman (skipped cleanly without it) and build the image exactly as `make docker`
does: docker/build_base_image.sh (kept once made) then docker/build_image.sh. podman's layer cache makes
the build a few seconds when the Dockerfile, pyproject.toml, pfp_deploy/, recipes/ and weights/ are
unchanged, so the image is reused when it is up to date and rebuilt when it is not.

The quickstart runs with no network, the data mounted read-only and a fresh runs/ directory mounted
read-write, as a non-root uid: the caller's own when the caller is not root (rootless podman,
--userns=keep-id), else a stand-in non-root uid (rootful podman with --user UID:GID, what a non-root
user gets from rootful docker with --user "$(id -u):$(id -g)"). For a root caller a second, quick
check maps the image's own user (uid 1000, non-root inside) onto the caller's uid 0 with --uidmap, so
that files land owned by the caller without the container process being root.

Settings: PFP_DOCKER_IMAGE (default localhost/pfp-deploy:latest, what `make docker` builds) and
PFP_DOCKER_BASE (default localhost/pfp-base:bookworm-py311, made by docker/build_base_image.sh, which
needs root; a non-root caller passes an image in its own store or one it can pull).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("PFP_DOCKER_IMAGE", "localhost/pfp-deploy:latest")
BASE_IMAGE = os.environ.get("PFP_DOCKER_BASE", "localhost/pfp-base:bookworm-py311")
FMNIST = Path("/usr/share/datasets/fashion-mnist")
STAND_IN_UID = 4242  # a non-root uid for the run when the caller is root
RUN_FILES = ("recipe.resolved.yaml", "sensitivity.json", "plan.json", "model.pt", "model.onnx", "report.json",
             "report.md", "env.json")

needs_podman = pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed "
                                  "(apt-get install -y podman runc debootstrap)")


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r'"(torch|torchvision)==([^"]+)"', text))


def test_dockerfile_pins_match_pyproject():
    """The Dockerfile installs torch before the project: its versions must be the project's pins."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (TORCH_VERSION|TORCHVISION_VERSION)=(\S+)$", dockerfile, re.M))
    pins = _pins((ROOT / "pyproject.toml").read_text())
    assert args == {"TORCH_VERSION": pins["torch"], "TORCHVISION_VERSION": pins["torchvision"]}
    assert re.search(r"^ARG BASE_IMAGE=\S+$", dockerfile, re.M) and re.search(r"^ARG TORCH_INDEX_URL=", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["pfp-deploy"\]$', dockerfile, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"weights", "recipes", "pfp_deploy", "pyproject.toml", "README.md"} & set(ignored)


@pytest.mark.parametrize("script", ["docker/build_base_image.sh", "docker/build_image.sh"])
def test_scripts_say_what_to_install_without_podman(script, tmp_path):
    """No podman on PATH: both scripts stop at once and name the packages to install."""
    bash = shutil.which("bash") or "/bin/bash"
    out = subprocess.run([bash, str(ROOT / script)], env={"PATH": str(tmp_path)}, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1
    assert "podman is not installed" in out.stderr and "apt-get install -y podman" in out.stderr


def _podman_env() -> dict[str, str]:
    """The environment podman needs here: docker/containers.conf where the kernel refuses podman's
    default rlimits (what docker/build_image.sh does too)."""
    env = dict(os.environ)
    probe = subprocess.run(["podman", "run", "--rm", "--pull", "never", "--network", "none", *_runtime(),
                            "--entrypoint", "true", BASE_IMAGE], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0 and "rlimit" in probe.stderr and "CONTAINERS_CONF" not in env:
        env["CONTAINERS_CONF"] = str(ROOT / "docker" / "containers.conf")
    return env


def _runtime() -> list[str]:
    return ["--runtime", "runc"] if shutil.which("runc") else []


@pytest.fixture(scope="module")
def image():
    """Build (or find up to date, through podman's layer cache) the image the way `make docker` does."""
    start = time.monotonic()
    cmds = [["docker/build_image.sh"]]
    if BASE_IMAGE.startswith("localhost/pfp-base:"):  # as `make docker`: the local base image first
        cmds.insert(0, ["docker/build_base_image.sh", BASE_IMAGE])
    for cmd in cmds:
        out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "IMAGE": IMAGE, "BASE_IMAGE": BASE_IMAGE},
                             capture_output=True, text=True, timeout=3600)
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    print(f"\nimage {IMAGE} built or found up to date in {time.monotonic() - start:.0f} s")
    return {"name": IMAGE, "env": _podman_env()}


def _podman(image, *args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    cmd = ["podman", "run", "--rm", "--network", "none", *_runtime(), *args]
    return subprocess.run(cmd, env=image["env"], capture_output=True, text=True, timeout=timeout, **kwargs)


def _as_user(uid: int, gid: int) -> list[str]:
    """Run as uid:gid, and have files the container writes owned by uid:gid on the host."""
    rootless = os.getuid() != 0
    return ["--userns=keep-id", "--user", f"{uid}:{gid}"] if rootless else ["--user", f"{uid}:{gid}"]


@pytest.mark.slow
@needs_podman
def test_unreachable_base_image_says_what_to_pass():
    start = time.monotonic()
    out = subprocess.run(["docker/build_image.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "BASE_IMAGE": "localhost/pfp-no-such-base:missing",
                              "IMAGE": "localhost/pfp-deploy:never-built"})
    assert out.returncode == 1, out.stderr
    assert "'localhost/pfp-no-such-base:missing' is neither local nor pullable" in out.stderr
    assert "Pass BASE_IMAGE=" in out.stderr and "docker/build_base_image.sh" in out.stderr
    assert time.monotonic() - start < 120


@pytest.mark.slow
@needs_podman
def test_image_user_is_not_root(image):
    inspect = subprocess.run(["podman", "image", "inspect", "--format", "{{.Config.User}} {{json .Config.Entrypoint}}",
                              image["name"]], env=image["env"], capture_output=True, text=True, timeout=60)
    assert inspect.returncode == 0, inspect.stderr
    assert inspect.stdout.split(" ", 1) == ["1000:1000", '["pfp-deploy"]\n']
    out = _podman(image, "--entrypoint", "id", image["name"], "-u")
    assert out.returncode == 0 and out.stdout.strip() == "1000", out.stderr
    # The shipped weights and their card are in the image, and match.
    out = _podman(image, "--entrypoint", "sha256sum", image["name"], "weights/resnet20_fashion_mnist.pt")
    card = json.loads((ROOT / "weights" / "resnet20_fashion_mnist.json").read_text())
    assert out.returncode == 0 and out.stdout.split()[0] == card["sha256"], out.stderr


@pytest.mark.slow
@needs_podman
@pytest.mark.skipif(not FMNIST.is_dir(), reason=f"{FMNIST} missing (apt-get install dataset-fashion-mnist)")
def test_quickstart_in_container(image, tmp_path):
    caller = os.getuid()
    uid, gid = (caller, os.getgid()) if caller != 0 else (STAND_IN_UID, STAND_IN_UID)
    runs = tmp_path / "runs"
    runs.mkdir()
    if caller == 0:
        os.chown(runs, uid, gid)
    mounts = ["-v", f"{FMNIST}:{FMNIST}:ro", "-v", f"{runs}:/work/runs"]

    who = _podman(image, *_as_user(uid, gid), *mounts, "--entrypoint", "id", image["name"], "-u")
    assert who.returncode == 0 and who.stdout.strip() == str(uid) != "0", who.stderr

    start = time.monotonic()
    out = _podman(image, *_as_user(uid, gid), *mounts, image["name"],
                  "optimize", "--recipe", "recipes/fashion_mnist_quickstart.yaml", timeout=3600)
    elapsed = time.monotonic() - start
    print(f"\nquickstart in the container: exit {out.returncode} in {elapsed:.0f} s")
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"

    run_dir = runs / "fashion_mnist_quickstart"
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    assert not missing, f"missing in {run_dir}: {missing}"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "passed" and report["exit_code"] == 0
    owners = {(p.relative_to(runs).as_posix(), p.stat().st_uid, p.stat().st_gid) for p in runs.rglob("*")}
    assert owners and all(o[1:] == (uid, gid) for o in owners), [o for o in owners if o[1:] != (uid, gid)]


@pytest.mark.slow
@needs_podman
@pytest.mark.skipif(os.getuid() != 0, reason="the root caller's case (rootless callers use --userns=keep-id)")
def test_root_caller_gets_its_files_from_a_non_root_process(image, tmp_path):
    """Rootful podman, caller root: the image's user 1000 (non-root inside) mapped to host uid/gid 0."""
    out_dir = tmp_path / "runs"
    out_dir.mkdir()
    maps = []
    for flag in ("--uidmap", "--gidmap"):
        maps += [flag, "0:1:1000", flag, "1000:0:1", flag, "1001:1001:64535"]
    out = _podman(image, *maps, "-v", f"{out_dir}:/work/runs", "--entrypoint", "sh", image["name"], "-c",
                  "id -u && touch /work/runs/probe", timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1000"
    st = (out_dir / "probe").stat()
    assert (st.st_uid, st.st_gid) == (0, 0)
