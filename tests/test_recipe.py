"""Recipe schema, YAML loading, --set overrides and the error messages users see."""
from pathlib import Path

import pytest
import yaml

from pfp_deploy.errors import RecipeError, UsageError
from pfp_deploy.recipe import DEFAULT_FASHION_MNIST_ROOT, Recipe, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
MINIMAL = {"name": "t", "model": {"source": "builtin", "name": "resnet20"}, "data": {"format": "synthetic"}}


def with_(section: str, **values) -> dict:
    recipe = {k: dict(v) if isinstance(v, dict) else v for k, v in MINIMAL.items()}
    recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


def error_of(*args, **kwargs) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    # The resolved recipe validates again to the same values (it is written next to the outputs).
    assert load_recipe(yaml.safe_load(recipe.to_yaml())) == recipe


def test_shipped_recipes_exist():
    assert {p.name for p in RECIPES} >= {"fashion_mnist_quickstart.yaml", "resnet50_edge.yaml"}


def test_defaults_and_derived_values():
    recipe = load_recipe({"name": "fm", "model": {"source": "builtin", "name": "resnet20"},
                          "data": {"format": "fashion_mnist"}})
    assert recipe.data.root == DEFAULT_FASHION_MNIST_ROOT
    assert recipe.model.input_shape == [1, 1, 28, 28]
    assert (recipe.model.in_channels, recipe.model.num_classes, recipe.data.image_size) == (1, 10, 28)
    assert recipe.prune.keep == 0.5 and recipe.prune.delta == 1e-16 and recipe.prune.K == 3
    assert recipe.data.calibration_samples == 512  # "auto": the paper's size
    resolved = recipe.resolved()
    assert resolved["finetune"]["optimizer"]["name"] == "sgd"
    assert "model_config" not in resolved


def test_schedule_sets_keep_and_must_decrease():
    assert load_recipe(with_("prune", schedule=[0.8, 0.65, 0.5])).prune.keep == 0.5
    assert "prune.schedule: must be strictly decreasing" in error_of(with_("prune", schedule=[0.8, 0.9]))
    message = error_of(with_("prune", schedule=[0.8, 0.5], keep=0.4))
    assert "prune.schedule: ends at 0.5 but prune.keep is 0.4" in message
    assert "prune.schedule[1]: must be in (0, 1], got 1.2" in error_of(with_("prune", schedule=[1.5, 1.2]))


def test_typo_key_names_path_and_suggestion(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: t\nmodel: {source: builtin, name: resnet20}\ndata:\n  format: synthetic\n"
                    "finetune:\n  epoch: 3\n")
    message = error_of(path)
    assert f"{path}:6: finetune.epoch: unknown key." in message
    assert 'Did you mean "finetune.epochs"?' in message


def test_all_errors_reported_at_once():
    recipe = with_("prune", keep=1.5, varient="hybrid")
    recipe["data"] = {"format": "synthetic", "batch_size": "big"}
    message = error_of(recipe)
    assert message.startswith("Invalid recipe (3 problems):")  # a dict: no file to name
    assert "prune.keep: must be in (0, 1], got 1.5" in message
    assert 'prune.varient: unknown key. Did you mean "prune.variant"?' in message
    assert "data.batch_size: expected a valid integer, got 'big'" in message


def test_wrong_types_and_values_name_the_path():
    assert "finetune.optimizer.lr: must be >= 0, got -1" in error_of(with_("finetune", optimizer={"lr": -1}))
    message = error_of(with_("data", format="fashion_mnst"))
    assert "data.format: unknown data format 'fashion_mnst'" in message and 'Did you mean "fashion_mnist"?' in message
    assert "finetune.amp: expected 'auto' or a valid boolean, got 'maybe'" in error_of(with_("finetune", amp="maybe"))
    assert "finetune.distill.enabled: expected 'auto' or a valid boolean, got 'sometimes'" in \
        error_of(with_("finetune", distill={"enabled": "sometimes"}))
    assert "prune: expected a mapping" in error_of({**MINIMAL, "prune": 3})
    assert "model.input_shape: must be [N, C, H, W]" in error_of(with_("model", input_shape=[1, 3, 32]))
    assert "name: must be a plain directory name" in error_of({**MINIMAL, "name": "my run"})
    assert "data: required key is missing" in error_of({"name": "t", "model": MINIMAL["model"]})


def test_unknown_model_name_suggests():
    message = error_of(with_("model", name="resnet2O"))
    assert "model.name: unknown builtin model 'resnet2O'" in message and 'Did you mean "resnet20"?' in message
    tv = error_of({**MINIMAL, "model": {"source": "torchvision", "name": "resnet5O"}})
    assert 'Did you mean "resnet50"?' in tv
    assert "model.path: required when model.source is checkpoint" in error_of(
        {**MINIMAL, "model": {"source": "checkpoint", "name": "resnet20"}})


def test_cross_section_checks():
    message = error_of(with_("checks", targets=[{"name": "ov", "runtime": "openvino"}]))
    assert "checks.targets[0].runtime: openvino needs export.formats to include openvino" in message
    targets = [{"name": "a", "runtime": "torch"}, {"name": "a", "runtime": "torch"}]
    assert "checks.targets[1].name: 'a' is already used" in error_of(with_("checks", targets=targets))
    bad_device = [{"name": "a", "runtime": "onnxruntime", "provider": "CUDAExecutionProvidr"}]
    assert 'Did you mean "CUDAExecutionProvider"?' in error_of(with_("checks", targets=bad_device))
    assert "model.num_classes: is 5 but the fashion_mnist data has 10" in error_of(
        {"name": "t", "model": {"source": "builtin", "name": "resnet20", "num_classes": 5},
         "data": {"format": "fashion_mnist"}})
    assert "data.root: required for format imagefolder" in error_of(with_("data", format="imagefolder"))
    assert "finetune.warmup_epochs: is 5 but epochs is only 2" in error_of(with_("finetune", epochs=2, warmup_epochs=5))
    assert "invalid regular expression" in error_of(with_("prune", ignored_layers=["re:layer[4"]))


def test_target_defaults_are_filled():
    recipe = load_recipe(with_("checks", targets=[{"name": "o", "runtime": "onnxruntime"},
                                                  {"name": "t", "runtime": "torch", "device": "CUDA:0"}]))
    assert recipe.checks.targets[0].provider == "CPUExecutionProvider"
    assert recipe.checks.targets[1].device == "cuda:0"
    assert recipe.checks.targets[1].on_unavailable == "fail"


def test_set_overrides_scalars_nested_and_lists():
    recipe = load_recipe(MINIMAL, ["finetune.epochs=2", "finetune.optimizer.lr=0.05",
                                   "prune.schedule=[0.9, 0.7]", "export.formats=[onnx, openvino]",
                                   "finetune.distill.enabled=true", "data.synthetic.num_samples=64"])
    assert recipe.finetune.epochs == 2 and recipe.finetune.optimizer.lr == 0.05
    assert recipe.prune.schedule == [0.9, 0.7] and recipe.prune.keep == 0.7
    assert recipe.export.formats == ["onnx", "openvino"]
    assert recipe.finetune.distill.enabled is True and recipe.data.synthetic.num_samples == 64
    # list entries by index, both spellings
    base = with_("checks", targets=[{"name": "a", "runtime": "torch"}])
    recipe = load_recipe(base, ["checks.targets[0].batch=8", "checks.targets.0.threads=2"])
    assert (recipe.checks.targets[0].batch, recipe.checks.targets[0].threads) == (8, 2)
    load_recipe(MINIMAL, ["data.batch_size=8"])
    assert MINIMAL["data"] == {"format": "synthetic"}  # the caller's dict is not modified


def test_set_overrides_a_file_and_a_recipe(tmp_path):
    recipe = load_recipe(RECIPES[0], ["name=renamed"])
    assert recipe.name == "renamed"
    again = load_recipe(recipe, ["prune.keep=0.3"])
    assert again.prune.keep == 0.3 and again.name == "renamed"


def test_set_override_errors():
    message = error_of(MINIMAL, ["finetune.epoch=3"])
    assert "--set finetune.epoch" in message and 'Did you mean "finetune.epochs"?' in message
    assert "expected key.path=value" in error_of(MINIMAL, ["finetune.epochs"])
    assert "prune.keep is a value, not a section" in error_of(MINIMAL, ["prune.keep.x=1"])
    assert "index 3 does not exist" in error_of(MINIMAL, ["checks.targets[3].batch=1"])
    assert "(from --set) finetune.epochs: expected a valid integer, got 'abc'" in error_of(MINIMAL, ["finetune.epochs=abc"])
    assert "(from --set) prune.keep: must be in (0, 1], got 1.5" in error_of(MINIMAL, ["prune.keep=1.5"])


def test_keep_out_of_range():
    for bad in (0, 1.5, -0.1):
        assert f"prune.keep: must be in (0, 1], got {bad}" in error_of(with_("prune", keep=bad))


def test_missing_file_and_bad_yaml(tmp_path):
    assert "does not exist" in error_of(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nmodel:\n  source: builtin\n name: resnet20\n")
    message = error_of(bad)
    assert f"{bad}:4:" in message and "YAML syntax error" in message
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert "must be a mapping" in error_of(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert "is empty" in error_of(empty)
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text("name: a\nname: b\n")
    assert "duplicate key name (first defined on line 1)" in error_of(duplicate)


def test_recipe_error_is_a_usage_error():
    with pytest.raises(UsageError):
        load_recipe({"name": "t"})
    assert isinstance(load_recipe(MINIMAL), Recipe)


def test_training_config_is_the_loops_config():
    recipe = load_recipe(with_("finetune", optimizer={"name": "adamw", "lr": 0.001},
                               distill={"enabled": True, "alpha": 0.7}))
    from pfp_deploy.finetune import FinetuneConfig, distills

    assert isinstance(recipe.finetune, FinetuneConfig)  # one schema: the loop takes the section as is
    assert (recipe.finetune.optimizer.name, recipe.finetune.optimizer.lr, recipe.finetune.distill.alpha) == \
        ("adamw", 0.001, 0.7)
    assert distills(recipe.finetune) and distills(recipe.finetune, teacher_given=False)  # true: one is required
    # "auto" by default: the pipeline (it always has the dense model) distils; finetune() without a teacher does not
    minimal = load_recipe(MINIMAL).finetune
    assert minimal.distill.enabled == "auto" and distills(minimal) and not distills(minimal, teacher_given=False)
    assert not distills(load_recipe(with_("finetune", distill={"enabled": False})).finetune)


def test_repair_defaults_follow_the_measurements():
    # Reconstruction by default; BN re-estimation only where it was measured to help (after none).
    default = load_recipe(MINIMAL).prune
    assert default.reconstruct.method == "least_squares" and default.bn_recalibration_samples == 0
    paper = load_recipe(with_("prune", reconstruct="none")).prune  # the shorthand names the paper's method
    assert paper.reconstruct.method == "none" and paper.bn_recalibration_samples == 2048
    assert load_recipe(with_("prune", bn_recalibration_samples=64)).prune.bn_recalibration_samples == 64
    assert "prune.reconstruct.method" in error_of(with_("prune", reconstruct="lsq"))
