"""Typed errors and the CLI exit-code contract.

Every error a user can cause is a PFPDeployError whose message says what was received, what is
valid and how to fix it. The CLI maps the class to an exit code; Python callers catch the class.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable

# Exit codes: a contract for CI pipelines (see README).
EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_STAGE_FAILED = 3
EXIT_INTERRUPTED = 130


class PFPDeployError(Exception):
    """Base class of every error pfp-deploy raises on purpose."""

    exit_code = EXIT_STAGE_FAILED


class UsageError(PFPDeployError):
    """Bad arguments, recipe or input files: the user can fix it."""

    exit_code = EXIT_USAGE


class RecipeError(UsageError):
    """The recipe does not parse or does not validate."""


class DataError(UsageError):
    """A data source is missing, empty or malformed."""


class ModelLoadError(UsageError):
    """A model or checkpoint cannot be loaded (missing file, wrong architecture, download needed)."""


class UnsupportedModelError(PFPDeployError):
    """The model contains a layer or op that cannot be traced or pruned; the message names it."""


class PruningError(PFPDeployError):
    """Pruning cannot proceed: nothing prunable, an impossible target, bad calibration data."""


class CalibrationError(PruningError):
    """The calibration data is empty or produces NaN/inf activations."""


class TargetUnattainableError(PruningError):
    """The requested keep ratio lies outside what the constraints allow; the message gives the bound."""


class ExportError(PFPDeployError):
    """Export to ONNX/OpenVINO failed or the exported file does not match PyTorch."""


class ShapeMismatchError(ExportError):
    """An exported model's output shape differs from PyTorch's: always fatal."""


class RuntimeUnavailableError(PFPDeployError):
    """A runtime or device the recipe names is not installed or not present on this host."""


class TrainingError(PFPDeployError):
    """Fine-tuning diverged (NaN loss) or failed."""


class ChecksFailedError(PFPDeployError):
    """The run finished but a check (accuracy, latency, speed-up, parity) failed."""

    exit_code = EXIT_CHECK_FAILED


class StageError(PFPDeployError):
    """A stage raised an unexpected exception; the traceback is in <run dir>/error.log."""


class TrackingError(PFPDeployError):
    """Experiment tracking (MLflow) failed: not installed, tracking server unreachable, store refused."""


def first_line(exc: BaseException) -> str:
    """'ErrorType: first line of its message': how a wrapped exception is quoted inside our messages."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def closest(name: str, valid: Iterable[str]) -> str | None:
    """The valid name closest to `name`, or None when none is close: the one did-you-mean rule."""
    match = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return match[0] if match else None


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' Did you mean "x"?' when a close match exists, else ''."""
    match = closest(name, valid)
    return f' Did you mean "{match}"?' if match else ""
