"""Untrusted files: a model file or run directory never makes pfp-deploy run code; writes never follow
symlinks; YAML cannot blow up memory; artifact modes follow the umask."""
from __future__ import annotations

import os
import stat
import time

import pytest
import torch
from helpers.tiny_recipes import one_thread, tiny_recipe, write_recipe  # noqa: F401

from pfp_deploy import cli
from pfp_deploy.errors import ModelLoadError, RecipeError
from pfp_deploy.fileio import atomic_open, remove_stale_temps, write_text_atomic
from pfp_deploy.models import build_model, load_pruned, resnet20, save_pruned
from pfp_deploy.pruning import Plan
from pfp_deploy.recipe import ModelConfig, load_recipe

EXAMPLE = (1, 3, 16, 16)


def _crafted_model_file(path, marker, **base):
    """A model.pt whose architecture record names a callable that would create `marker` if called."""
    base = {"source": "factory", "factory": "os:system", "kwargs": {"command": f"touch {marker}"}, **base}
    return save_pruned(path, resnet20(num_classes=4), Plan(), base=base, example_shape=EXAMPLE)


def test_load_pruned_never_calls_a_factory_named_by_the_file(tmp_path):
    marker = tmp_path / "pwned"
    path = _crafted_model_file(tmp_path / "model.pt", marker)
    with pytest.raises(ModelLoadError, match="may not name code to run.*--factory os:system"):
        load_pruned(path)
    assert not marker.exists()


@pytest.mark.parametrize("base", [
    {"source": "pruned", "path": "elsewhere.pt"},
    {"source": "checkpoint", "name": "resnet20", "path": "/etc/passwd"},
    {"source": "builtin", "name": "resnet20", "kwargs": {"widths": "x" * 3}, "weights": "/etc/passwd"},
    ["not", "a", "dict"],
])
def test_other_file_sources_are_refused_or_reduced_to_an_architecture(tmp_path, base):
    path = save_pruned(tmp_path / "model.pt", resnet20(num_classes=4), Plan(), example_shape=EXAMPLE)
    payload = torch.load(path, weights_only=True)
    payload["base"] = base
    torch.save(payload, path)
    with pytest.raises(ModelLoadError):  # the last one: weights ignored, then kwargs do not fit resnet20
        load_pruned(path)


def test_a_builtin_architecture_record_still_loads(tmp_path):
    model = resnet20(num_classes=4).eval()
    path = save_pruned(tmp_path / "model.pt", model, Plan(), example_shape=EXAMPLE,
                       base={"source": "builtin", "name": "resnet20", "num_classes": 4, "weights": None})
    loaded = load_pruned(path).eval()
    x = torch.randn(EXAMPLE)
    assert torch.equal(loaded(x), model(x))


def test_recipe_source_pruned_takes_a_run_directory_and_a_factory_from_the_recipe(tmp_path):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    _crafted_model_file(run_dir / "model.pt", marker)
    with pytest.raises(ModelLoadError, match="may not name code"):
        build_model(ModelConfig(source="pruned", path=str(run_dir)), num_classes=4)
    # The caller (the recipe) may name the factory that builds the architecture: that is trusted.
    model = build_model(ModelConfig(source="pruned", path=str(run_dir), factory="pfp_deploy.models:resnet20"),
                        num_classes=4)
    assert isinstance(model, torch.nn.Module) and not marker.exists()


def test_benchmark_of_a_crafted_run_directory_runs_no_code(tmp_path, capsys):
    from pfp_deploy.pipeline import optimize

    recipe = tiny_recipe(finetune={"epochs": 0}, checks={"targets": []})
    run = optimize(recipe, output_dir=tmp_path, progress=False)
    marker = tmp_path / "pwned"
    _crafted_model_file(run.run_dir / "dense.pt", marker)
    assert cli.main(["benchmark", "--run-dir", str(run.run_dir)]) == 2
    assert "may not name code to run" in capsys.readouterr().err
    assert not marker.exists()
    # With the factory named by the caller, the same directory works.
    assert cli.main(["benchmark", "--run-dir", str(run.run_dir), "--factory", "pfp_deploy.models:resnet20"]) == 0
    assert not marker.exists()


def test_torchvision_factory_works_without_in_channels_injection():
    model = build_model(ModelConfig(source="factory", factory="torchvision.models:resnet18"), num_classes=7)
    assert model.fc.out_features == 7


# ------------------------------------------------------------------------------- writes

def test_crash_log_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "error.log").symlink_to(victim)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe())

    def boom(args):
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "cmd_optimize", boom)
    code = cli.main(["optimize", "--recipe", str(recipe), "--output-dir", str(tmp_path / "runs")])
    assert code == 3
    assert victim.read_text() == "precious"
    log = run_dir / "error.log"
    assert not log.is_symlink() and "ValueError: a bug" in log.read_text()


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = write_text_atomic(tmp_path / "report.json", "old")
    with pytest.raises(OSError):
        with atomic_open(path) as f:
            f.write("half")
            raise OSError(28, "No space left on device")
    assert path.read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / ".model.pt.abc.tmp", tmp_path / "checkpoints" / ".last.pt.x.tmp"]
    for p in stale:
        p.write_text("torn")
    keep = tmp_path / "model.pt"
    keep.write_text("ok")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(stale)
    assert keep.exists() and not any(p.exists() for p in stale)


def test_artifact_modes_follow_the_umask(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    from pfp_deploy.export import export_onnx, export_openvino

    old = os.umask(0o027)
    try:
        model = resnet20(num_classes=4).eval()
        onnx_file = export_onnx(model, torch.zeros(EXAMPLE), tmp_path / "model.onnx")
        xml = export_openvino(onnx_file, None, tmp_path / "openvino")
        files = [onnx_file, xml, xml.with_suffix(".bin"),
                 save_pruned(tmp_path / "model.pt", model, Plan(), example_shape=EXAMPLE),
                 write_text_atomic(tmp_path / "report.md", "x")]
    finally:
        os.umask(old)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o640)}


# ------------------------------------------------------------------------------- YAML

BOMB = "\n".join(["a: &a [" + ",".join(['"lol"'] * 9) + "]"]
                 + [f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi")])


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    started = time.perf_counter()
    with pytest.raises(RecipeError, match="expands to more than"):
        load_recipe(path)
    assert time.perf_counter() - started < 10  # a hang guard: it takes milliseconds


def test_recursive_alias_and_huge_recipes_are_refused(tmp_path):
    (tmp_path / "rec.yaml").write_text("a: &a [*a]\n")
    with pytest.raises(RecipeError, match="refers to itself"):
        load_recipe(tmp_path / "rec.yaml")
    (tmp_path / "big.yaml").write_text("name: x\n" + "#" * (2 << 20))
    with pytest.raises(RecipeError, match="at most"):
        load_recipe(tmp_path / "big.yaml")
    with pytest.raises(RecipeError, match="expands to more than"):
        load_recipe(tiny_recipe(), [f"name={BOMB.replace(chr(10), ', ').join('{}')}"])

