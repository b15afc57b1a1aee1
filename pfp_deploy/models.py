"""Model sources: torchvision architectures (+ weights tag or file), checkpoints, factories, builtins,
and pruned model files (`save_pruned` / `load_pruned`: base architecture record + plan + state_dict).

Nothing is ever downloaded: a torchvision weights tag must already be in the torch hub cache.
Checkpoints are plain state_dicts read with weights_only=True; input files are only read.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

# Builtins live in architectures.py; re-exported because callers know them as models.resnet20 etc.
from pfp_deploy.architectures import (  # noqa: F401
    BUILTIN_MODELS,
    CifarResNet,
    VGGSmall,
    known_model_names,
    resnet20,
    vgg_small,
)
from pfp_deploy.errors import ModelLoadError, did_you_mean
from pfp_deploy.fileio import file_sha256, torch_save_atomic
from pfp_deploy.model_sources import get_model_source, model_sources
from pfp_deploy.plan import Plan, apply_plan
from pfp_deploy.schema import ModelConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- build_model

def build_model(model_cfg: ModelConfig, num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
    """Build the dense model a recipe's `model` section describes (weights loaded, train mode), through
    its model source (pfp_deploy.model_sources: builtin, torchvision, checkpoint, factory, pruned).

    num_classes / in_channels default to the section's values; pass the data's when they differ.
    """
    num_classes = num_classes or model_cfg.num_classes
    in_channels = in_channels or model_cfg.in_channels or 3
    return get_model_source(model_cfg.source).build(model_cfg, num_classes, in_channels)


def named_architecture(model_cfg: ModelConfig, num_classes: int | None, in_channels: int) -> tuple[nn.Module, str]:
    """(randomly initialised model, label) for model.name: a builtin, else a torchvision model."""
    name, kwargs = model_cfg.name, dict(model_cfg.kwargs or {})
    if name in BUILTIN_MODELS:
        if name == "vgg_small" and model_cfg.input_shape:
            kwargs.setdefault("image_size", tuple(model_cfg.input_shape[2:]))
        try:
            return BUILTIN_MODELS[name](num_classes=num_classes or 10, in_channels=in_channels, **kwargs), name
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"builtin {name}(num_classes={num_classes}, in_channels={in_channels}, "
                                 f"**{kwargs}) failed: {exc}. Check model.kwargs.") from None
    if model_cfg.source == "builtin":
        raise ModelLoadError(f"Unknown builtin model {name!r}.{did_you_mean(name, BUILTIN_MODELS)} "
                             f"Builtins: {', '.join(BUILTIN_MODELS)}")
    model = _torchvision_model(name, num_classes or 1000, kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels, pretrained=False)
    return model, f"torchvision {name}"


def load_weights(model: nn.Module, checkpoint: str, arch: str, num_classes: int | None, in_channels: int,
                 source: str) -> nn.Module:
    """Load the state_dict file `checkpoint` into `model` (checked against the architecture)."""
    if weights_is_tag(checkpoint):
        raise ModelLoadError(f"model.weights {checkpoint!r} is a torchvision weights tag, which only "
                             f"works with source torchvision; use a local state_dict path for {source}")
    load_state_into(model, load_checkpoint_state(checkpoint), arch=f"{arch} (num_classes="
                    f"{num_classes}, in_channels={in_channels})", path=checkpoint)
    return model


def architecture_from_file(base: Any, origin: str | os.PathLike) -> Any:
    """The architecture a saved model file records (its `base`), accepted as data only.

    A model file or run directory may come from anyone, so it may name a builtin or torchvision
    architecture with plain keyword arguments, never code to import or call (a factory) and never
    another file to read (weights, checkpoint, pruned): those come from the caller.
    """
    if not isinstance(base, dict) or not base:
        raise ModelLoadError(f"{origin} stores no base model architecture: pass base_model= (Python) "
                             "or rebuild the file with save_pruned(..., base=...)")
    source = base.get("source")
    in_files = [entry.name for entry in model_sources() if entry.in_files]  # the sources a file may name
    if source not in in_files:
        factory = base.get("factory")
        if source == "factory" and isinstance(factory, str):
            raise ModelLoadError(
                f"{origin} was saved from the factory model {factory!r}. A model file may not name code "
                "to run, so pfp-deploy will not import it. If you trust that code, pass it yourself: "
                f"base_model=<the model> to load_pruned(), --factory {factory} on the command line, or "
                "model.factory beside model.source: pruned in a recipe.")
        raise ModelLoadError(f"{origin}: the stored base model source {source!r} is not allowed in a file "
                             f"(allowed: {', '.join(in_files)}); pass base_model= instead")
    kwargs = base.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not _plain_data(kwargs):
        raise ModelLoadError(f"{origin}: the stored model kwargs must be plain numbers, strings and lists")
    fields = {k: base.get(k) for k in ("name", "num_classes", "in_channels", "input_shape")}
    try:
        return ModelConfig.model_validate({"source": source, "kwargs": kwargs, **fields})
    except Exception as exc:  # noqa: BLE001 - pydantic's message, shortened, names the bad field
        raise ModelLoadError(f"{origin}: the stored base model is invalid: {str(exc).splitlines()[-1]}") from None


def _plain_data(value: Any) -> bool:
    """JSON-like data only: what a weights-only file can hold and a constructor takes as settings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
    return False


def weights_is_tag(weights: str) -> bool:
    """A torchvision weights tag (IMAGENET1K_V2), not a file path."""
    return not (os.sep in weights or "/" in weights or Path(weights).suffix in (".pt", ".pth", ".bin", ".ckpt")
                or Path(weights).exists())


def _torchvision_model(name: str, num_classes: int, kwargs: dict) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ModelLoadError(f"Unknown torchvision model {name!r}.{did_you_mean(name, names)} "
                             f"See torchvision.models.list_models(); builtins: {', '.join(BUILTIN_MODELS)}")
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"torchvision {name}(num_classes={num_classes}, **{kwargs}) failed: {exc}") from None


def torchvision_weights_file(name: str, tag: str) -> tuple[Any, Path]:
    """(weights enum, the path torch hub caches that file at) for a torchvision weights tag."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise ModelLoadError(f"torchvision model {name!r} has no pretrained weights; set model.weights "
                             "to a local state_dict file or null") from None
    short = tag.split(".")[-1]  # accept "ResNet50_Weights.IMAGENET1K_V2"
    valid = [w.name for w in enum] + ["DEFAULT"]
    if short not in valid:
        raise ModelLoadError(f"Unknown weights tag {tag!r} for {name}.{did_you_mean(short, valid)} "
                             f"Valid tags: {', '.join(valid)}; or give a local file path")
    weights = enum[short] if short != "DEFAULT" else enum.DEFAULT
    filename = os.path.basename(urlparse(weights.url).path)
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / filename


def torchvision_pretrained(name: str, tag: str, num_classes: int | None, in_channels: int,
                            kwargs: dict) -> nn.Module:
    import torchvision

    weights, cached = torchvision_weights_file(name, tag)
    if not cached.is_file():
        raise ModelLoadError(
            f"Weights {name} {weights.name} are not on this machine and pfp-deploy never downloads. "
            f"Copy the file from {weights.url} to {cached}, or set model.weights to a local state_dict "
            "path (e.g. weights: /path/to/file.pth).")
    # The file is cached, so torchvision loads it without network access (and applies its own key fixes).
    model = torchvision.models.get_model(name, weights=weights, **kwargs)
    classes = len(weights.meta.get("categories") or []) or None
    if num_classes and classes and num_classes != classes:
        _replace_classifier(model, num_classes)
        log.warning("%s: the pretrained %d-class head was replaced by a new %d-class head; it needs "
                    "training before accuracy means anything", name, classes, num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels, pretrained=True)
    return model


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear for a fresh one with num_classes outputs."""
    last = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not last:
        raise ModelLoadError("cannot change num_classes: the model has no Linear classifier")
    parent_name, _, attr = last[-1].rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _replace_first_conv(model: nn.Module, in_channels: int, pretrained: bool) -> None:
    """Adapt the first 3-channel conv to in_channels (grayscale: sum of the RGB kernels)."""
    for name, conv in model.named_modules():  # noqa: B007 - `name` is used after the loop
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            break
    else:
        raise ModelLoadError(f"cannot set in_channels={in_channels}: no 3-channel input conv found")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
    if pretrained and in_channels == 1:
        with torch.no_grad():
            new.weight.copy_(conv.weight.sum(1, keepdim=True))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    elif pretrained:
        log.warning("first conv re-initialised for %d input channels; its pretrained weights are lost",
                    in_channels)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def from_factory(spec: str, kwargs: dict, num_classes: int | None, in_channels: int) -> nn.Module:
    """Call 'package.module:callable' (or 'file.py:callable') with num_classes/in_channels if accepted."""
    module_name, _, attr = spec.partition(":")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise ModelLoadError(f"model.factory {spec!r}: file {file} does not exist")
            module_spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ModelLoadError:
        raise
    except ImportError as exc:
        raise ModelLoadError(f"model.factory {spec!r}: cannot import {module_name!r} ({exc}). Install it, "
                             "or run from the directory that contains it (it must be on sys.path).") from None
    except Exception as exc:
        raise ModelLoadError(f"model.factory {spec!r}: importing {module_name!r} failed: "
                             f"{type(exc).__name__}: {exc}") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            public = [n for n in dir(module) if not n.startswith("_")]
            raise ModelLoadError(f"model.factory {spec!r}: {module_name} has no attribute {attr!r}."
                                 f"{did_you_mean(attr, public)}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelLoadError(f"model.factory {spec!r}: {attr} is a {type(factory).__name__}, not a callable")
    try:
        params = inspect.signature(factory).parameters
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        params, accepts_any = {}, False
    args = dict(kwargs)
    # Through **kwargs only what is needed: torchvision builders forward num_classes but not
    # in_channels, so in_channels goes there only when it differs from the usual 3.
    for key, value, through_kwargs in (("num_classes", num_classes, True),
                                       ("in_channels", in_channels, in_channels not in (None, 3))):
        if value is not None and key not in args and (key in params or (accepts_any and through_kwargs)):
            args[key] = value
    try:
        model = factory(**args)
    except Exception as exc:
        raise ModelLoadError(f"model.factory {spec!r} raised {type(exc).__name__}: {exc} "
                             f"(called with {args})") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model.factory {spec!r} returned a {type(model).__name__}, not a torch nn.Module")
    return model


# ---------------------------------------------------------------------------------- checkpoints

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "module")


def load_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict (weights_only=True), unwrapping {"state_dict": ...}/{"model": ...} and DDP 'module.'."""
    path = Path(path)
    card = _weights_card(path)
    if not path.is_file():
        remake = f" It is made by `{card['command']}` (see {path.with_suffix('.json')})." if card else ""
        raise ModelLoadError(f"Checkpoint {path} does not exist. Check model.path / model.weights.{remake}")
    if card and isinstance(card.get("sha256"), str):
        actual = file_sha256(path)
        if actual != card["sha256"]:
            raise ModelLoadError(
                f"Checkpoint {path} is not the file its card {path.with_suffix('.json')} describes (sha256 "
                f"{actual[:12]}..., expected {card['sha256'][:12]}...): it is corrupt or was replaced. "
                f"Recreate it with `{card.get('command', 'the command in the card')}` or restore it from git.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled modules, corrupt or non-torch files
        raise ModelLoadError(
            f"Cannot read checkpoint {path} as a state_dict ({type(exc).__name__}: {str(exc)[:200]}). "
            "pfp-deploy loads weights only (no pickled code): save it with "
            "torch.save(model.state_dict(), path).") from None
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"Checkpoint {path} does not hold a state_dict (name -> tensor); save it with "
                             "torch.save(model.state_dict(), path)")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _weights_card(path: Path) -> dict | None:
    """The JSON card shipped beside a checkpoint (weights/<name>.json: sha256, command, accuracy), if
    any. Read as data; a card that is not small plain JSON is ignored."""
    card = path.with_suffix(".json")
    try:
        if not card.is_file() or card.stat().st_size > 1 << 20:
            return None
        data = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("command", ""), str) else None


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], arch: str, path: Any = "checkpoint") -> None:
    """load_state_dict(strict) with a readable ModelLoadError listing the first mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        lines = [f"Checkpoint {path} does not fit {arch}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                lines.append(f"  {len(items)} {title}: {', '.join(items[:5])}{more}")
        lines.append("Set model.name / num_classes / in_channels to the architecture the checkpoint was saved from.")
        raise ModelLoadError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def architecture_config(model: ModelConfig) -> dict:
    """A recipe's model section (ModelConfig) without weights or training: the data-only architecture
    record saved in model.pt, enough to rebuild the architecture anywhere (see architecture_from_file)."""
    cfg = model.model_dump(mode="json")
    cfg.update(weights=None, pretrain=None)
    if cfg["source"] == "checkpoint":
        cfg.update(source="builtin" if cfg["name"] in BUILTIN_MODELS else "torchvision", path=None)
    return cfg


def model_label(model: ModelConfig) -> str:
    """A short name for a recipe's model section: its name, factory callable or file stem."""
    return model.name or (model.factory or "").rpartition(":")[2] or Path(model.path or "model").stem


# ------------------------------------------------------------------------------- pruned model files

def save_pruned(path, model: nn.Module, plan: Plan, base: dict | None = None, example_shape=None) -> Path:
    """Write {plan, state_dict, base model config} atomically; loads with weights_only=True."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": "pfp-deploy-pruned", "version": 1, "plan": plan.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "base": base or {}, "example_shape": list(example_shape) if example_shape else None}
    return torch_save_atomic(payload, path)


def load_pruned(path, base_model: nn.Module | None = None, example_inputs=None) -> nn.Module:
    """Rebuild a pruned model from base model + plan + state_dict (no pickled modules).

    Without `base_model` the architecture recorded in the file is built, which may only be a builtin
    or torchvision model: a file never makes pfp-deploy import or call code (pass base_model= for a
    model of your own)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"pruned model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot read pruned model {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != "pfp-deploy-pruned":
        raise ModelLoadError(f"{path} is not a pfp-deploy pruned model (save it with save_pruned)")
    if base_model is None:  # the file's architecture record: a builtin/torchvision name, never code
        base_model = build_model(architecture_from_file(payload.get("base"), path))
    if example_inputs is None:
        shape = payload.get("example_shape")
        if not shape:
            raise ModelLoadError(f"{path} stores no input shape: pass example_inputs=")
        example_inputs = torch.randn(*shape)
    model = apply_plan(base_model, Plan.from_dict(payload["plan"]), example_inputs)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ModelLoadError(f"weights in {path} do not match the rebuilt model: {exc}") from exc
    return model
