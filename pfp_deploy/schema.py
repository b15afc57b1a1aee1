"""The recipe schema: one pydantic model per concept, and the stages take these models directly.

`Recipe` holds a section per stage (model, data, prune, finetune, export, checks, report); typos fail
at parse time (every section forbids unknown keys) and defaults live here once, in the Field
descriptions. Names a registry owns (criteria, runtimes, builtin models) are checked against it.
Loading YAML, `--set` overrides and error formatting are in recipe.py (`load_recipe`).
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pfp_deploy.errors import UsageError, closest
from pfp_deploy.tracking import MlflowConfig

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
# Calibration images by default: where the least-squares criterion, allocation and refit stop gaining
# (ResNet-20 at half the MACs, lsq, 3 seeds: 181 -> 92.55 %, 512 -> 92.92 %, 1024 -> 92.91 %, 2048 -> 92.92 %;
# docs/BENCHMARKS.md §5).
DEFAULT_CALIBRATION_SAMPLES = 512


Ratio = Annotated[float, Field(gt=0, le=1)]


class _Strict(BaseModel):
    """Base of every section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class _Problems(ValueError):
    """Cross-field problems as (key path relative to the validated section, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in problems))


def _raise_problems(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise _Problems(problems)


def _fill(section: BaseModel, field: str, value: Any) -> None:
    """Store a derived value without marking it as user-set (so exclude_unset dumps stay the input)."""
    was_set = field in section.model_fields_set
    setattr(section, field, value)
    if not was_set:
        section.model_fields_set.discard(field)


# ----------------------------------------------------------------------------------------- model

class ModelConfig(_Strict):
    source: str = Field(
        "torchvision",
        description="Where the dense model comes from (pfp_deploy.model_sources): torchvision (an "
        "architecture by name), checkpoint (a state_dict for a named architecture), factory (a "
        "'package.module:callable'), pruned (a model from an earlier run), builtin (resnet20, vgg_small, "
        "...), or one registered with register_model_source.")
    name: str | None = Field(
        None, description="Architecture: a torchvision classification model (e.g. resnet50) or a "
        "builtin (resnet20, vgg_small). Required for torchvision, builtin and checkpoint sources.")
    weights: str | None = Field(
        None, description="None (random init), a torchvision weights tag (e.g. IMAGENET1K_V2, "
        "DEFAULT; must already be in the torch hub cache: nothing is downloaded) or a local "
        "state_dict file.")
    path: str | None = Field(
        None, description="checkpoint: the state_dict file; pruned: the run directory or model file "
        "of an earlier pfp-deploy run. Never modified.")
    factory: str | None = Field(
        None, description="'package.module:callable' (or 'path/to/file.py:callable') returning an "
        "nn.Module; num_classes / in_channels are passed when the callable accepts them. This imports "
        "and runs that code: use only factories you trust. With source pruned: builds the base "
        "architecture (a saved file never names code itself).")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the model constructor.")
    num_classes: int | None = Field(
        None, ge=1, description="Classifier outputs. None: taken from the data (10 for "
        "fashion_mnist, the class folders for imagefolder, data.synthetic.num_classes).")
    in_channels: int | None = Field(
        None, ge=1, description="Input channels. None: from model.input_shape or the data format "
        "(1 for fashion_mnist, 3 otherwise).")
    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, description="Example input [N, C, H, W] for tracing, "
        "export and latency. None: [1, in_channels, data.image_size, data.image_size].")
    pretrain: TrainConfig | None = Field(
        None, description="Train the dense model before pruning (for builtin or untrained models). "
        "None: use the model as loaded.")

    @field_validator("input_shape")
    @classmethod
    def _four_dims(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(value) != 4:
            raise ValueError(f"must be [N, C, H, W] (4 integers), got {value}")
        return value

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^:\s]+:[A-Za-z_][\w.]*", value):
            raise ValueError(f"must look like 'package.module:callable', got {value!r}")
        return value

    @field_validator("source")
    @classmethod
    def _registered_source(cls, value: str) -> str:
        from pfp_deploy.model_sources import get_model_source  # lazily: loads the source files (and torch)

        return _registered_name(get_model_source, value)

    @model_validator(mode="after")
    def _source_needs(self) -> ModelConfig:
        from pfp_deploy.model_sources import get_model_source

        source = get_model_source(self.source)
        problems = [(key, f"required when model.source is {self.source}") for key in source.required
                    if getattr(self, key) is None]
        _raise_problems(problems + source.problems(self))
        return self


# ------------------------------------------------------------------------------------------ data

class SyntheticConfig(_Strict):
    num_classes: int = Field(10, ge=2, description="Classes of the random labels.")
    num_samples: int = Field(512, ge=1, description="Training samples (validation gets a quarter).")


class DataConfig(_Strict):
    format: str = Field(
        ..., description="Where the images come from (pfp_deploy.data_formats): imagefolder: <root>/train "
        "and <root>/val with one folder per class; fashion_mnist: the gzipped IDX files; synthetic: random "
        "tensors (accuracy is meaningless); or one registered with register_data_format.")
    root: str | None = Field(
        None, description=f"Dataset directory. Default for fashion_mnist: {DEFAULT_FASHION_MNIST_ROOT};"
        " required for imagefolder.")
    batch_size: int = Field(64, ge=1, description="Batch size for training and evaluation.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: load in-process).")
    image_size: int | None = Field(
        None, ge=8, description="Square input size. None: from model.input_shape, else 28 for "
        "fashion_mnist, 224 for imagefolder, 32 for synthetic.")
    augment: bool = Field(True, description="Training augmentation: random-resized-crop + flip "
                          "(imagefolder), random crop with 2-pixel padding + flip (fashion_mnist), for "
                          "model.pretrain, and for the fine-tune when finetune.augment is true.")
    mean: list[float] | None = Field(
        None, description="Per-channel normalisation mean. None: Fashion-MNIST's (0.2860) or "
        "ImageNet's.")
    std: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="Per-channel normalisation std. None: Fashion-MNIST's (0.3530) or "
        "ImageNet's.")
    calibration_samples: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        DEFAULT_CALIBRATION_SAMPLES, description="Calibration images, drawn from the training set with "
        "evaluation transforms: they score the channels, feed the cost-aware allocation and the "
        "least-squares reconstruction. auto: the paper's PFP size ceil(3 ln(8 eta_max eta / delta)), "
        "about 180-210. The default 512 is measured (docs/BENCHMARKS.md §5, ResNet-20, lsq, 3 seeds): "
        "92.55 % (auto) -> 92.92 % at half the MACs without training; 1024 and 2048 gain nothing more "
        "and each pass over the images costs time in proportion.")
    train_subset: int | None = Field(None, ge=1, description="Use a seeded random subset of this "
                                     "many training images (quick runs). None: all.")
    val_subset: int | None = Field(None, ge=1, description="Same for the validation set.")
    seed: int = Field(0, description="Seed for subsets, calibration draws and shuffling.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig,
                                       description="Only for format synthetic.")

    @field_validator("format")
    @classmethod
    def _registered_format(cls, value: str) -> str:
        from pfp_deploy.data_formats import get_data_format  # lazily: loads the format files

        return _registered_name(get_data_format, value)

    @model_validator(mode="after")
    def _format_needs(self) -> DataConfig:
        from pfp_deploy.data_formats import get_data_format

        fmt = get_data_format(self.format)
        problems = list(fmt.problems(self))
        if self.root is None and fmt.default_root is not None:
            _fill(self, "root", fmt.default_root)
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            problems.append(("std", f"has {len(self.std)} entries but data.mean has {len(self.mean)}"))
        _raise_problems(problems)
        return self


# ----------------------------------------------------------------------------------------- prune

class LayerOverride(_Strict):
    min_channels: int | None = Field(None, ge=1, description="Overrides prune.min_channels.")
    max_prune_ratio: float | None = Field(None, ge=0, le=1, description="Overrides prune.max_prune_ratio.")
    round_to: int | None = Field(None, ge=1, description="Overrides prune.round_to.")
    skip: bool = Field(False, description="Do not prune this layer's output channels.")


class CalibrationDistillConfig(_Strict):
    """After the least-squares refit: distil the pruned model from the dense one on the calibration images
    alone (pfp_deploy.calibration_distill: KL at temperature T, Adam, BatchNorm frozen, no labels)."""

    # 20, not 0: before any fine-tune +0.2 points of top-1 on ResNet-20 and MobileNetV2-small at keep 0.5 (0 on
    # VGG-small) and +0.7 to +0.9 at keep 0.3; after one distilled fine-tuning epoch +0.05 on ResNet-20
    # (docs/BENCHMARKS.md §5, "Seventh run": 512 calibration images, 3 seeds, full test set; 10 epochs gave less).
    # Adam 1e-4 matched 3e-4 and SGD on ResNet-20 and beat 3e-4 on MobileNetV2-small; BatchNorm in train mode
    # instead of frozen measured the same (within 0.03), and frozen it never normalises a small calibration
    # batch by its own statistics.
    epochs: int = Field(20, ge=0, description="Passes over the calibration images (0: the "
                        "refit alone). 1.5-2x the refit's time on a CPU (docs/BENCHMARKS.md §5).")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate, constant (1e-4 measured best of 1e-4 / 3e-4).")
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of the KL loss.")


class ReconstructConfig(_Strict):
    """Least-squares repair of each pruned layer on the calibration data, then a calibration-only
    distillation (see pfp_deploy.reconstruction, pfp_deploy.calibration_distill). `none` is the
    paper's method: prune only."""

    method: Literal["least_squares", "none"] = Field(
        "least_squares", description="least_squares: refit each pruned (and downstream) Conv2d/Linear "
        "(grouped and depthwise convs group by group) so its outputs on the calibration images match the "
        "dense model's (docs/BENCHMARKS.md: ResNet-20 at 50 % MACs 9 % -> 82 % top-1 before fine-tuning); "
        "none: the paper's method, prune only.")
    ridge: float = Field(1e-3, ge=0, description="Ridge, relative to each layer's mean Gram diagonal "
                         "(measured: 1e-3 best of 0..1e-1 at 256 images).")
    layers: Literal["all", "pruned"] = Field(
        "all", description="all: every layer pruning changed and every layer downstream of one; "
        "pruned: only the changed ones.")
    max_memory_mb: float = Field(1024, gt=0, description="Bound on reconstruction's own buffers (Gram "
                                 "matrices, cached targets, held inputs); a layer that does not fit is skipped.")
    underdetermined: Literal["skip", "error"] = Field(
        "skip", description="A layer with fewer calibration rows than unknowns (e.g. flatten -> Linear "
        "with thousands of features): skip it (reported) or fail.")
    heldout_samples: int = Field(
        64, ge=0, description="Validation images on which the report also gives each layer's relative "
        "output error before and after the refit (held-out: the refit never saw them; four forward passes "
        "each, so 64 keeps it a fraction of the refit's time at 224 px). 0: calibration only.")
    distill: CalibrationDistillConfig = Field(
        default_factory=CalibrationDistillConfig, description="Gradient steps on the calibration images after the "
        "refit, matching the dense model's outputs (with method none: not run).")


class PruneConfig(_Strict):
    method: str = Field("lsq", description="Which channels each group keeps: lsq (the default: greedy "
                        "least-squares selection from the calibration Gram matrices; with the default "
                        "allocation and reconstruction the best measured criterion before training on ResNet-20 "
                        "and about level with l1 and fpgm on VGG-small and MobileNetV2-small, "
                        "docs/BENCHMARKS.md §5), pfp "
                        "(Provable Filter Pruning, Liebenwein et al. 2020; the default when variant is "
                        "randomized or hybrid), l1, l2, taylor, fpgm, bn_scale, random, or one registered "
                        "with pfp_deploy.criteria.register_criterion. Groups, allocation, reconstruction and "
                        "removal are the same for every method.")
    variant: Literal["deterministic", "randomized", "hybrid"] = Field(
        "deterministic", description="deterministic: keep the top channels by sensitivity (the "
        "paper's experiments); randomized: importance sampling with reweighting (the provable one); "
        "hybrid: keep the certain ones, sample the rest.")
    metric: Literal["macs", "params"] = Field("macs", description="Cost the keep ratio refers to.")
    keep: float = Field(0.5, gt=0, le=1, description="Fraction of the dense network's cost (MACs "
                        "or params) to keep. With a schedule, its last entry.")
    schedule: list[Ratio] | None = Field(
        None, description="Cascade: decreasing keep ratios relative to the dense network, each "
        "followed by fine-tuning and fresh sensitivities, e.g. [0.8, 0.65, 0.5]. None: one step.")
    tolerance: float = Field(0.01, gt=0, lt=1, description="Accepted |achieved - keep| as a fraction "
                             "of the dense cost, for keep >= 0.1; below that it shrinks in proportion to keep (the "
                             "default 0.01 then allows 10 % of keep), so a tiny target is never met by a much "
                             "larger model.")
    round_to: int = Field(16, ge=1, description="Kept channels per group are rounded up to a "
                          "multiple of this. 16 is measured in docs/BENCHMARKS.md: unrounded widths "
                          "knock ONNX Runtime off its blocked CPU kernels (ResNet-50 at 50 % MACs: "
                          "efficiency 0.69 with 1, 0.97 with 16). Use 1 for the finest allocation.")
    min_channels: int = Field(1, ge=1, description="No group keeps fewer channels than this.")
    max_prune_ratio: float = Field(1.0, ge=0, le=1, description="Largest fraction of one group's "
                                   "channels that may be removed (1.0: no cap beyond min_channels).")
    ignored_layers: list[str] = Field(
        default_factory=list, description="Module names (or 're:<regex>') whose output channels "
        "are never pruned. The classifier's outputs are never pruned anyway.")
    overrides: dict[str, LayerOverride] = Field(
        default_factory=dict, description="Per-layer settings keyed by module name or "
        "'re:<regex>' (full match), e.g. {'re:layer4\\\\..*': {max_prune_ratio: 0.5}}.")
    delta: float = Field(1e-16, gt=0, lt=1, description="Failure probability delta of the PFP bounds.")
    c: float = Field(3.0, gt=0, description="Constant c in alpha_l = 2 c ln(8 (P_l+1) k_l / delta).")
    K: float = Field(3.0, gt=0, description="Constant K in m_l = K (6 + 2 eps) alpha_l S_l / eps^2.")
    allocation: Literal["cost_aware", "paper", "uniform", "cost_aware_norefit"] = Field(
        "cost_aware", description="How many channels each group keeps. cost_aware (default): spend the "
        "budget where the least-squares output error after reconstruction (from calibration Gram "
        "matrices; no refit where a layer has too few calibration rows, as reconstruction skips it) "
        "grows least per unit of cost; cost_aware_norefit: the same, error without refit (for "
        "reconstruct: none); "
        "uniform: one keep ratio for every group; paper: the paper's global eps (PFP.md §3). The "
        "report gives the paper's eps in every case (docs/BENCHMARKS.md, Allocation).")
    reconstruct: ReconstructConfig = Field(
        default_factory=ReconstructConfig, description="Repair after removal: least_squares (default) "
        "or none (the paper's method). Shorthand: reconstruct: none.")
    bn_recalibration_samples: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        "auto", description="Training images used to re-estimate BatchNorm statistics after pruning "
        "(0 disables). auto: 0 after least-squares reconstruction (measured: it changed top-1 by -0.33 "
        "to +0.08 points there, docs/BENCHMARKS.md), 2048 with reconstruct: none (10 % -> 61 %).")
    seed: int = Field(0, description="Seed for the randomized and hybrid variants.")

    @model_validator(mode="after")
    def _bn_samples_for_the_repair(self) -> PruneConfig:
        if self.bn_recalibration_samples == "auto":
            _fill(self, "bn_recalibration_samples", 0 if self.reconstruct.method != "none" else 2048)
        return self

    @field_validator("method")
    @classmethod
    def _registered_method(cls, value: str) -> str:
        from pfp_deploy.criteria import get_criterion  # lazily: loads the criteria files

        return _registered_name(get_criterion, value)

    @model_validator(mode="after")
    def _variant_is_pfps(self) -> PruneConfig:
        if self.variant != "deterministic" and "method" not in self.model_fields_set:
            _fill(self, "method", "pfp")  # the sampling variants are PFP's: they imply its scores
        if self.method != "pfp" and self.variant != "deterministic":
            raise _Problems([("variant", f"{self.variant} samples channels by PFP's sensitivities; with method "
                              f"{self.method} the criterion's scores choose them: use variant: deterministic")])
        return self

    @field_validator("allocation", mode="before")
    @classmethod
    def _known_allocation(cls, value: Any) -> Any:
        valid = get_args(cls.model_fields["allocation"].annotation)
        if isinstance(value, str) and value not in valid:
            hint = closest(value, valid)
            raise ValueError(f"must be one of {', '.join(valid)}" + (f'. Did you mean "{hint}"?' if hint else ""))
        return value

    @field_validator("reconstruct", mode="before")
    @classmethod
    def _method_shorthand(cls, value: Any) -> Any:
        return {"method": value} if isinstance(value, str) else value

    @field_validator("ignored_layers")
    @classmethod
    def _regexes_compile(cls, names: list[str]) -> list[str]:
        for name in names:
            _check_regex(name)
        return names

    @field_validator("overrides")
    @classmethod
    def _override_regexes_compile(cls, overrides: dict[str, LayerOverride]) -> dict[str, LayerOverride]:
        for name in overrides:
            _check_regex(name)
        return overrides

    @model_validator(mode="after")
    def _schedule_ends_at_keep(self) -> PruneConfig:
        if not self.schedule:
            return self
        steps = self.schedule
        bad = [i for i in range(1, len(steps)) if steps[i] >= steps[i - 1]]
        if bad:
            raise _Problems([("schedule", f"must be strictly decreasing, got {steps} "
                              f"(entry {bad[0]} is {steps[bad[0]]} after {steps[bad[0] - 1]})")])
        if "keep" not in self.model_fields_set:
            _fill(self, "keep", steps[-1])
        elif not math.isclose(self.keep, steps[-1]):
            raise _Problems([("schedule", f"ends at {steps[-1]} but prune.keep is {self.keep}; make "
                              "the last entry equal keep, or drop keep (it defaults to the last entry)")])
        return self


def _registered_name(lookup: Any, value: str) -> str:
    """A registry entry's canonical name, or the registry's own message (with did-you-mean) as a
    validation error, which the recipe's error report then places at its key."""
    try:
        return lookup(value).name
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def _check_regex(name: str) -> None:
    if name.startswith("re:"):
        try:
            re.compile(name[3:])
        except re.error as exc:
            raise ValueError(f"invalid regular expression {name[3:]!r}: {exc}") from None


# -------------------------------------------------------------------------------------- finetune

class OptimizerConfig(_Strict):
    name: Literal["sgd", "adamw"] = Field("sgd", description="Optimizer.")
    lr: float = Field(0.01, ge=0, description="Peak learning rate (0 freezes the weights).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by adamw).")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay (not applied to biases and norm layers).")
    nesterov: bool = Field(False, description="Nesterov momentum for SGD.")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimizerConfig:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise _Problems([("nesterov", "needs name sgd with momentum > 0; set nesterov: false or give "
                              "a momentum")])
        return self


class DistillConfig(_Strict):
    # auto, not false: distilling from the dense model fine-tuned every pruned model we measured better or as well
    # (docs/BENCHMARKS.md §5, "Fifth run": keep 0.5, one epoch, 3 seeds, against labels only: ResNet-20
    # +0.27 lsq / +0.37 l1, VGG-small +0.15, MobileNetV2-small 0.00; ~1.25x the time per epoch).
    enabled: Literal["auto"] | bool = Field(
        "auto", description="Distil from the teacher during fine-tuning. auto (the default): whenever a teacher "
        "is at hand, which the pipeline always has (the dense model); finetune() when called with teacher=. "
        "true: require one; false: train on the labels only.")
    teacher: Literal["dense"] = Field("dense", description="dense: the unpruned input model.")
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of the KD loss.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KD loss (1 - alpha: labels).")


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=0, description="Training epochs (0: skip).")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer settings.")
    scheduler: Literal["cosine", "none"] = Field("cosine", description="Learning-rate schedule after warm-up.")
    warmup_epochs: float = Field(0.0, ge=0, description="Linear warm-up epochs, may be fractional (at most epochs).")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm to this (None: no clipping).")
    amp: Literal["auto"] | bool = Field("auto", description="Mixed precision: auto = on for CUDA, off on CPU.")
    channels_last: Literal["auto"] | bool = Field(
        "auto", description="Train (and run the distillation teacher) in channels_last memory format: "
        "auto = on for CPU (measured: a ResNet-20 fine-tuning step with distillation takes 0.73x the time, "
        "with the teacher's BatchNorm folded into its convs), off for CUDA (not measured there). The model "
        "is given back in the default format.")
    early_stop_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement (None: never).")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Cap batches per epoch (smoke runs).")
    eval_every: int = Field(1, ge=1, description="Evaluate on the validation set every N epochs.")
    seed: int = Field(0, description="Seed for shuffling and augmentation during training.")

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_epochs > self.epochs:
            raise _Problems([("warmup_epochs", f"is {self.warmup_epochs:g} but epochs is only "
                              f"{self.epochs}; lower warmup_epochs or raise epochs")])
        return self


class FinetuneConfig(TrainConfig):
    """The training loop's configuration (pfp_deploy.finetune.finetune takes it as is): the recipe's
    `finetune` section, or `model.pretrain` without distillation."""

    distill: DistillConfig = Field(default_factory=DistillConfig, description="Knowledge distillation.")
    # false, not data.augment: the pruned model starts next to its teacher, and a short fine-tune on augmented
    # images ended lower on every network measured (docs/BENCHMARKS.md §5, "Sixth run": keep 0.5, one distilled
    # epoch, 3 seeds: ResNet-20 -0.24, VGG-small -0.17, MobileNetV2-small -0.37 points).
    augment: bool = Field(
        False, description="Fine-tune on augmented training images (data.augment's transforms; the pipeline only: "
        "finetune() trains on the loader it is given). false (the default): the training images as evaluated, "
        "which measured better after pruning (fine-tunes of 1-3 epochs; for long ones, measure true as well). "
        "model.pretrain always uses data.augment.")


ModelConfig.model_rebuild()


# ---------------------------------------------------------------------------------------- export

class OnnxConfig(_Strict):
    opset: int = Field(18, ge=18, description="ONNX opset (the torch.export-based exporter needs >= 18).")
    dynamic_batch: bool = Field(True, description="Export the batch dimension as dynamic.")


class OpenVINOConfig(_Strict):
    fp16: bool = Field(False, description="Compress weights to FP16 in the IR.")


class ParityConfig(_Strict):
    samples: int = Field(8, ge=1, description="Validation inputs compared between PyTorch and each export.")
    atol: float = Field(1e-4, ge=0, description="Absolute tolerance on outputs.")
    rtol: float = Field(1e-3, ge=0, description="Relative tolerance on outputs.")
    on_breach: Literal["warn", "fail"] = Field(
        "warn", description="Outside tolerance: warn, or fail the export stage. A shape mismatch always fails.")


class ExportConfig(_Strict):
    formats: list[Literal["onnx", "openvino"]] = Field(
        default_factory=lambda: ["onnx"], description="Exports to write ([] disables export).")
    onnx: OnnxConfig = Field(default_factory=OnnxConfig, description="ONNX settings.")
    openvino: OpenVINOConfig = Field(default_factory=OpenVINOConfig, description="OpenVINO IR settings.")
    parity: ParityConfig = Field(default_factory=ParityConfig, description="Numeric check of each export.")


# ---------------------------------------------------------------------------------------- checks

class AccuracyCheck(_Strict):
    metric: Literal["top1", "top5"] = Field("top1", description="Accuracy metric.")
    max_drop: float | None = Field(
        1.0, ge=0, description="Largest allowed drop in percentage points vs the dense model (None: no check).")


class TargetConfig(_Strict):
    """One deployment target: where to measure (runtime, device, ...) and the limits the pruned model
    must meet there. The same class is what checks.run_targets takes. Which devices, precisions and
    hints a runtime takes is its registry entry's business (pfp_deploy/runtimes/<runtime>.py)."""

    name: str = Field(..., min_length=1, description="Row name in the report (unique).")
    runtime: str = Field(..., description="Inference runtime: torch, onnxruntime, openvino, or one "
                         "registered with pfp_deploy.runtimes.register_runtime.")
    device: str | None = Field(
        None, description="Where it runs, spelled per runtime: torch cpu, cuda, cuda:N, mps, xpu (default "
        "cpu); openvino CPU, GPU, GPU.N, NPU, AUTO, AUTO:GPU,CPU (default CPU); onnxruntime CPU or CUDA "
        "(picks the default provider; set provider for others).")
    provider: str | None = Field(
        None, description="onnxruntime execution provider (default: the device's, else CPUExecutionProvider).")
    batch: int = Field(1, ge=1, description="Batch size of the latency measurement.")
    threads: int | None = Field(None, ge=1, description="Intra-op threads (None: runtime default).")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="Inference precision: torch casts the model (model.to(dtype), not autocast); openvino "
        "sets INFERENCE_PRECISION_HINT; onnxruntime runs the exported fp32 graph (fp16: TensorRT provider only).")
    hint: str | None = Field(
        None, description="Performance hint, for runtimes that take one: openvino LATENCY (default), "
        "THROUGHPUT or CUMULATIVE_THROUGHPUT.")
    graph: bool | str | None = Field(
        None, description="torch only: true, false or auto. Capture the model in CUDA graphs (one per batch size, "
        "captured before timing). auto (default): on for device cuda, off elsewhere; true needs device cuda.")
    memory_format: Literal["auto", "contiguous", "channels_last"] | None = Field(
        None, description="torch only: the model's and input's layout. auto (default): channels_last on cuda in "
        "fp16/bf16, contiguous otherwise.")
    p50_ms: float | None = Field(None, gt=0, description="Fail when median latency exceeds this.")
    p90_ms: float | None = Field(None, gt=0, description="Fail when 90th-percentile latency exceeds this.")
    p99_ms: float | None = Field(None, gt=0, description="Fail when 99th-percentile latency exceeds this.")
    min_speedup: float | None = Field(
        None, gt=0, description="Fail when dense/pruned median latency on this target is below this.")
    max_accuracy_drop: float | None = Field(
        None, ge=0, description="Fail when this runtime's accuracy is more than this many points "
        "below the dense PyTorch model.")
    on_unavailable: Literal["skip", "fail"] = Field(
        "fail", description="When the runtime or device is missing on this host: skip the row or fail.")

    @field_validator("runtime")
    @classmethod
    def _registered(cls, value: str) -> str:
        from pfp_deploy.runtimes import get_runtime  # lazily: loads the runtime files (and torch)

        return _registered_name(get_runtime, value)

    @model_validator(mode="after")
    def _settings_fit_runtime(self) -> TargetConfig:
        from pfp_deploy.runtimes import SettingsError, get_runtime

        try:
            settings = get_runtime(self.runtime).settings(device=self.device, provider=self.provider,
                                                          precision=self.precision, hint=self.hint, graph=self.graph,
                                                          memory_format=self.memory_format)
        except SettingsError as exc:
            raise _Problems(exc.problems) from None
        for key, value in settings.items():
            _fill(self, key, value)
        return self


class LatencyConfig(_Strict):
    """Bounded on purpose: each target runs dense and pruned, so an unbounded setting hangs the benchmark."""

    warmup: int = Field(10, ge=0, le=1000, description="Untimed runs before measuring (per model).")
    min_runs: int = Field(50, ge=1, le=10000, description="Timed runs, at least (per model).")
    min_time_s: float = Field(1.0, ge=0, le=600, allow_inf_nan=False,
                              description="Keep measuring each model until this many seconds have passed.")


class ChecksConfig(_Strict):
    accuracy: AccuracyCheck = Field(default_factory=AccuracyCheck, description="Accuracy gate.")
    targets: list[TargetConfig] = Field(default_factory=list, description="One benchmark row per runtime/device.")
    latency: LatencyConfig = Field(default_factory=LatencyConfig, description="How latency is measured.")

    @model_validator(mode="after")
    def _unique_names(self) -> ChecksConfig:
        seen: dict[str, int] = {}
        for i, target in enumerate(self.targets):
            if target.name in seen:
                raise _Problems([(f"targets[{i}].name", f"{target.name!r} is already used by "
                                  f"targets[{seen[target.name]}]; names must be unique")])
            seen[target.name] = i
        return self


# ---------------------------------------------------------------------------------------- report

class ReportConfig(_Strict):
    plots: bool = Field(True, description="Write PNG plots (needs matplotlib; skipped with a note if missing).")
    formats: list[Literal["json", "md"]] = Field(
        default_factory=lambda: ["json", "md"], description="Report files (report.json is always written).")
    mlflow: MlflowConfig | None = Field(
        None, description="Log each finished run to MLflow (pip install 'pfp-deploy[mlflow]'): the resolved "
        "recipe as params, report.json's accuracy, size and latency figures as metrics, the reports, plots and "
        "models as artifacts. None: no tracking.")


# ---------------------------------------------------------------------------------------- recipe

class Recipe(_Strict):
    version: Literal[1] = Field(1, description="Recipe format version.")
    name: str = Field(..., description="Run name; outputs go to runs/<name>/.")
    model: ModelConfig = Field(..., description="The dense input model.")
    data: DataConfig = Field(..., description="Training, validation and calibration data.")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="PFP pruning.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="Fine-tuning after pruning.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="ONNX / OpenVINO export.")
    checks: ChecksConfig = Field(default_factory=ChecksConfig, description="Accuracy and latency gates.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="Report outputs.")

    @field_validator("name")
    @classmethod
    def _name_is_a_directory_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError(f"must be a plain directory name (letters, digits, '.', '_', '-'), got {value!r}")
        return value

    @model_validator(mode="after")
    def _resolve_shapes(self) -> Recipe:
        """Fill model.in_channels / input_shape / num_classes and data.image_size so they agree."""
        model, data = self.model, self.data
        from pfp_deploy.data_formats import get_data_format  # lazily: loads the format files (and torch)

        fmt = get_data_format(data.format)
        shape = model.input_shape
        channels = model.in_channels or (shape[1] if shape else fmt.channels)
        size = data.image_size or (shape[2] if shape else fmt.image_size)
        problems = []
        if shape is None:
            shape = [1, channels, size, size]
        if shape[1] != channels:
            problems.append(("model.in_channels", f"is {channels} but model.input_shape {shape} has "
                             f"{shape[1]} channels; make them agree or drop one"))
        if data.image_size is not None and shape[2:] != [size, size]:
            problems.append(("data.image_size", f"is {size} but model.input_shape is {shape}; make "
                             "them agree or drop one"))
        if fmt.allowed_channels and channels not in fmt.allowed_channels:
            problems.append(("model.in_channels", f"{data.format} images have {fmt.allowed_channels[0]} channel(s): "
                             f"use one of {list(fmt.allowed_channels)}, got {channels}"))
        data_classes = fmt.classes(data)
        if model.num_classes is not None and data_classes is not None and model.num_classes != data_classes:
            problems.append(("model.num_classes", f"is {model.num_classes} but the {data.format} data "
                             f"has {data_classes} classes"))
        from pfp_deploy.runtimes import get_runtime  # lazily, as in TargetConfig

        for i, target in enumerate(self.checks.targets):
            needed = get_runtime(target.runtime).export_format  # None: runs the torch model itself
            if needed and needed not in self.export.formats:
                problems.append((f"checks.targets[{i}].runtime", f"{target.runtime} needs "
                                 f"export.formats to include {needed} (now {self.export.formats})"))
        _raise_problems(problems)
        _fill(model, "in_channels", channels)
        _fill(model, "input_shape", list(shape))
        if shape[2] == shape[3]:
            _fill(data, "image_size", shape[2])
        if model.num_classes is None and data_classes is not None:
            _fill(model, "num_classes", data_classes)
        return self

    def resolved(self) -> dict:
        """The recipe with every default and derived value filled in, as plain YAML-able data."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (written to runs/<name>/recipe.resolved.yaml)."""
        return yaml.safe_dump(self.resolved(), sort_keys=False, default_flow_style=None)
