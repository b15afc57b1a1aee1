"""Inference runtimes: one file each in this package, registered with `@register_runtime`.

A `Runtime` says which export it runs (`export_format`: None runs the torch model itself), which
devices it knows and how they are spelled, which precisions and performance hints it takes, which
extra settings of OPTIONS it takes (`options`: torch's `graph` and `memory_format`), whether its
package is installed, and how to build a `pfp_deploy.bench.Runner`. Everything that names a
runtime goes through this registry: the recipe (`checks.targets[*].runtime` and the settings of a
target), `checks.run_targets` (which exported file to measure) and `make_runner`.

Every module in this package whose name does not start with "_" is imported on first use of the
registry, so a new built-in runtime is one new file here. A runtime of your own lives in your code:
import its module before loading a recipe that names it (docs/extending.md, "A runtime").

This module imports no runtime package: onnxruntime and openvino load only when a runner is built.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pfp_deploy.errors import ExportError, RuntimeUnavailableError, UsageError, did_you_mean
from pfp_deploy.registry import Registry

if TYPE_CHECKING:
    from pfp_deploy.bench import Runner

PRECISIONS = ("fp32", "fp16", "bf16")
# Settings only some runtimes take (Runtime.options), e.g. torch's CUDA graphs; None everywhere means "unset".
OPTIONS = ("graph", "memory_format")
# make_runner's keyword for each built-in export format (source= works for every format).
_SOURCE_KEYWORDS = {None: "model", "onnx": "onnx_path", "openvino": "openvino_xml"}


class SettingsError(UsageError):
    """Settings a runtime does not take, as (field, message) pairs; str() joins the messages."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(msg for _, msg in problems))


def choose(kind: str, value: str, valid: tuple[str, ...]) -> str:
    """The entry of `valid` equal to `value` ignoring case; ValueError saying what is valid otherwise."""
    upper = {v.upper(): v for v in valid}
    if str(value).upper() in upper:
        return upper[str(value).upper()]
    raise ValueError(f"unknown {kind} {str(value)!r}; valid: {', '.join(valid)}.{did_you_mean(value, valid)}")


class Runtime:
    """What the pipeline needs to know about one inference runtime. Subclass it, set the class
    attributes, implement `make_runner` (and `parse_device` when devices take an index or a list),
    and decorate the class with `@register_runtime`."""

    name: ClassVar[str]  # as written in a recipe: lower case, e.g. "onnxruntime"
    export_format: ClassVar[str | None] = None  # the export it runs ("onnx", "openvino"); None: the torch model
    package: ClassVar[str | None] = None  # module that must be importable (None: always available)
    install: ClassVar[str] = "pip install 'pfp-deploy[deploy]'"  # how to get `package`
    devices: ClassVar[tuple[str, ...]] = ("CPU",)  # device names, spelled the runtime's way
    default_device: ClassVar[str | None] = "CPU"  # None: the runtime picks (onnxruntime: its provider)
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)  # a subset of PRECISIONS
    hints: ClassVar[tuple[str, ...]] = ()  # performance hints it takes; the first is the default
    # Extra settings beyond device/provider/precision/hint (one of OPTIONS each) that it takes; each is
    # validated by check_option and passed to make_runner as a keyword. Others must be left unset (None).
    options: ClassVar[tuple[str, ...]] = ()

    def parse_device(self, device: str) -> str:
        """Validate `device` and return it spelled the runtime's way; ValueError saying what is valid."""
        return choose(f"{self.name} device", device, self.devices)

    def check_provider(self, provider: str | None, device: str | None) -> str | None:
        """Validate an execution provider (only onnxruntime takes one); ValueError otherwise."""
        if provider is not None:
            raise ValueError(f"{self.name} takes no provider (that is an onnxruntime setting); set device instead")
        return None

    def check_option(self, name: str, value: Any, settings: dict[str, Any]) -> Any:
        """Validate one of `options` (None: its default) given the settings parsed so far (device,
        provider, precision, hint, earlier options); the value to store, or ValueError."""
        raise NotImplementedError(f"runtime {self.name} lists option {name} but has no check_option for it")

    def check_precision(self, precision: str, settings: dict[str, Any]) -> str:
        """Validate `precision` given the parsed device and provider; ValueError saying what is valid."""
        return self._precision(precision)

    def settings(self, *, device: str | None = None, provider: str | None = None, precision: str = "fp32",
                 hint: str | None = None, **options: Any) -> dict[str, Any]:
        """{device, provider, precision, hint, *self.options} validated and spelled this runtime's way,
        defaults filled. `options` are the OPTIONS keywords; one this runtime does not take must be None.

        Raises SettingsError listing every problem by field. Normalising twice gives the same values."""
        values: dict[str, Any] = {}
        problems: list[tuple[str, str]] = []
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise UsageError(f"unknown runtime setting(s) {', '.join(unknown)}; valid: {', '.join(OPTIONS)}")
        checks = [("device", lambda: self.default_device if device is None else self.parse_device(str(device).strip())),
                  ("provider", lambda: self.check_provider(provider, values.get("device"))),
                  ("precision", lambda: self.check_precision(precision, values)),
                  ("hint", lambda: self._hint(hint))]
        checks += [(name, lambda name=name: self.check_option(name, options.get(name), values)) for name in self.options]
        for key, check in checks:  # in order: the provider sees the parsed device, options all before them
            try:
                values[key] = check()
            except ValueError as exc:
                problems.append((key, str(exc)))
        for name in OPTIONS:
            if name not in self.options and options.get(name) is not None:
                takers = [r.name for r in runtimes() if name in r.options]
                problems.append((name, f"{self.name} takes no {name} setting (got {options[name]!r}); it is for "
                                       f"{', '.join(takers) or 'no registered runtime'}"))
        if problems:
            raise SettingsError(problems)
        return values

    def _precision(self, precision: str) -> str:
        value = choose("precision", precision, PRECISIONS).lower()
        if value not in self.precisions:
            raise ValueError(f"{self.name} runs precision {', '.join(self.precisions)}, not {value}")
        return value

    def _hint(self, hint: str | None) -> str | None:
        if not self.hints:
            if hint is None:
                return None
            takers = [r.name for r in runtimes() if r.hints]
            raise ValueError(f"{self.name} takes no performance hint (got {hint!r}); hints are for "
                             f"{', '.join(takers) or 'no registered runtime'}")
        return self.hints[0] if hint is None else choose(f"{self.name} hint", hint, self.hints)

    def available(self) -> bool:
        """Whether `package` is installed (found without importing it)."""
        return self.package is None or importlib.util.find_spec(self.package) is not None

    def import_package(self) -> Any:
        """Import `package`; RuntimeUnavailableError saying how to install it when it is missing."""
        try:
            return self._import()
        except ImportError as exc:
            raise RuntimeUnavailableError(f"{self.package} is not installed ({exc}); {self.install}") from exc

    def _import(self) -> Any:
        """The plain import of `package`; a runtime whose package needs more (OpenVINO) overrides it."""
        return importlib.import_module(self.package)

    def existing_file(self, source: str | os.PathLike | None) -> Path:
        """`source` as a Path; ExportError naming it when there is no such file, UsageError when None.
        (Checked after the host's devices, so a missing device reads as unavailable, not as a usage error.)"""
        if source is None:
            keyword = _SOURCE_KEYWORDS.get(self.export_format)
            raise UsageError(f"runtime {self.name} needs the path of its {self.export_format} export: "
                             + (f"{keyword}=... or source=..." if keyword else "source=..."))
        path = Path(source)
        if not path.is_file():
            raise ExportError(f"{self.export_format} export {path} does not exist; export the model first")
        return path

    def make_runner(self, source: Any, *, device: str | None, provider: str | None, threads: int | None,
                    precision: str, hint: str | None) -> Runner:
        """A ready Runner for `source` (the torch model, or the path of its `export_format` file) with
        settings already validated by `settings` (plus one keyword per entry of `options`, if any). A
        package, device or provider missing on this host raises RuntimeUnavailableError; a missing or
        unreadable file raises ExportError naming it. Set the Runner's `executed_on` to what actually
        runs when the runtime can say (ORT's session provider, the GPU's name)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<runtime {self.name} ({type(self).__module__}.{type(self).__qualname__})>"


# ----------------------------------------------------------------------------- the registry

def _check_precisions(cls: type[Runtime]) -> None:
    unknown = [p for p in cls.precisions if p not in PRECISIONS]
    if not cls.precisions or unknown:
        raise UsageError(f"runtime {cls.name}: precisions must be a non-empty subset of {PRECISIONS}, "
                         f"got {cls.precisions}")


REGISTRY: Registry[Runtime] = Registry("runtime", Runtime, __name__, example="tensorrt", check=_check_precisions)
register_runtime = REGISTRY.register
unregister_runtime = REGISTRY.unregister
runtimes = REGISTRY.all
runtime_names = REGISTRY.names
get_runtime = REGISTRY.get


def make_runner(
    runtime: str,
    *,
    source: Any = None,
    model: Any = None,
    onnx_path: str | os.PathLike | None = None,
    openvino_xml: str | os.PathLike | None = None,
    device: str | None = None,
    provider: str | None = None,
    threads: int | None = None,
    precision: str = "fp32",
    hint: str | None = None,
    graph: bool | str | None = None,
    memory_format: str | None = None,
) -> Runner:
    """Build a Runner for a registered `runtime` ("torch", "onnxruntime", "openvino", ...) on `device`
    (default: the runtime's, CPU for the built-ins).

    What it runs is `source`, or by the runtime's export format: `model` (torch), `onnx_path`
    (onnxruntime), `openvino_xml` (openvino). Unknown names and settings the runtime does not take
    raise UsageError; a runtime, provider or device missing on this host raises
    RuntimeUnavailableError; a missing or unreadable model file raises ExportError naming it.
    `graph` (True, False, "auto") and `memory_format` ("auto", "contiguous", "channels_last") are torch's
    settings (CUDA graphs, NHWC); on a runtime that takes no such setting they must stay None."""
    entry = get_runtime(runtime)
    settings = entry.settings(device=device, provider=provider, precision=precision, hint=hint, graph=graph,
                              memory_format=memory_format)
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be >= 1 (got {threads})")
    fmt = entry.export_format
    if source is None:
        source = {"model": model, "onnx_path": onnx_path, "openvino_xml": openvino_xml}.get(_SOURCE_KEYWORDS.get(fmt))
    if source is None and fmt is None:  # a missing file is the runtime's to report (Runtime.existing_file)
        raise UsageError(f"runtime {entry.name} needs model=... (the torch model to run)")
    return entry.make_runner(source, threads=threads, **settings)
