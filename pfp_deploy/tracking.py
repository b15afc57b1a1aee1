"""Experiment tracking: log a finished run directory to MLflow (recipe as params, report.json as metrics,
reports, plots and the deployable models as artifacts).

    log_run(run_dir, MlflowConfig(tracking_uri="sqlite:///mlflow.db"), params=resolved_recipe_dict)

The run directory is only read, never modified: MLflow copies the files into its own artifact store.
MLflow is optional (`pip install 'pfp-deploy[mlflow]'`) and imported only inside log_run, so importing
this module stays cheap. At import it needs only pfp_deploy.errors and pfp_deploy.artifacts (the recipe
schema and the pipeline import it, so it never imports them).

Names in MLflow:
- params: the resolved recipe flattened to its `--set` keys, lists by index: `prune.keep`,
  `checks.targets.0.name`; values as YAML/JSON scalars (`0.5`, `true`, `null`, `[1, 3, 224, 224]`), cut
  to MLflow's length limit with a `...[truncated]` marker (recipe.resolved.yaml, an artifact, is whole).
- metrics, grouped into sections by the part before "/" (the MLflow UI charts each section together):
  `accuracy/<step>.top1|top5` for dense, pruned_only, reconstructed, distilled, bn_recalibrated, finetuned;
  `accuracy/pruned.top1` (the last step measured), `accuracy/drop.top1` (dense minus pruned, points);
  `cost/macs.dense|pruned|kept`, `cost/params.dense|pruned|kept`; `prune/achieved`, `prune/epsilon`;
  per cascade step (MLflow step = 1, 2, ...) `cascade/keep|achieved|macs|params|epsilon|accuracy.<step>.top1`;
  per fine-tuning epoch (step = epoch, counted over all cascade steps) `finetune/val_top1|train_loss|...`;
  per target `target/<name>.p50_ms.dense|pruned` (also p90_ms, p99_ms, mean_ms, throughput_ips), `.speedup`,
  `.p50_ratio`, `.efficiency`, `.macs_ratio`, `.accuracy_drop`; `time/<stage>` in seconds.
- tags: `pfp_deploy.status` (passed | failed | error | interrupted), `pfp_deploy.check.<name>`,
  `pfp_deploy.version`, `pfp_deploy.model`, `pfp_deploy.run_dir`, a summary as the run's description
  (`mlflow.note.content`), then the recipe's own `tags` (which win). The MLflow run status is FINISHED
  for a passed run, KILLED for an interrupted one and FAILED otherwise; start and end times are the
  report's `created` and `finished`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import re
import stat
import time
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pfp_deploy.artifacts import ACCURACY_STEPS, load_report_json
from pfp_deploy.errors import TrackingError, UsageError, did_you_mean

__all__ = ["MlflowConfig", "TrackingResult", "log_run", "flatten_params", "report_metrics", "uri_problem"]

log = logging.getLogger("pfp_deploy")

INSTALL_HINT = "pip install 'pfp-deploy[mlflow]'"
KEY = "report.mlflow"  # where the config sits in a recipe: error messages name its keys
# MLflow's limits (mlflow.utils.validation), used where the installed MLflow does not say.
MAX_KEY_LENGTH = 250
MAX_TAG_VALUE_LENGTH = 8000
MAX_EXPERIMENT_NAME_LENGTH = 500
FALLBACK_PARAM_VALUE_LENGTH = 500  # when the installed MLflow does not say (MLflow 3 allows 6000)
TRUNCATED = "...[truncated]"
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000
# The run directory's report files (each logged when present) and, with log_models, the pruned model.
REPORT_FILES = ("report.json", "report.md", "plan.json", "recipe.resolved.yaml", "env.json", "error.log")
MODEL_FILES = {"pruned_onnx": "model.onnx", "pruned_openvino": "openvino/model.xml"}
# Tracking URI schemes MLflow itself serves; plugins add theirs through the "mlflow.tracking_store"
# entry point group, which validation also accepts.
SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "file")
_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_NAME_OK = re.compile(r"[\w.\- :/]*")  # MLflow's rule for param, metric and tag names
_LATENCY_STATS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_ips")
_TARGET_RATIOS = ("speedup", "p50_ratio", "efficiency", "macs_ratio", "accuracy_drop")
_CASCADE_VALUES = ("keep", "achieved", "macs", "params", "epsilon")


# ------------------------------------------------------------------------------------------ config

class MlflowConfig(BaseModel):
    """`report.mlflow`: log each finished run to an MLflow tracking server or local store."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Log the run to MLflow; `--set report.mlflow.enabled=false` turns "
                          "it off for one run without editing the recipe.")
    tracking_uri: str | None = Field(
        None, description="Where runs go: a tracking server `http(s)://host:5000`, a local database "
        "`sqlite:///mlflow.db` (relative to the working directory; `sqlite:////abs/path/mlflow.db` with four "
        "slashes for an absolute path), another database (`postgresql://`, `mysql://`, `mssql://`), "
        "`databricks` or `databricks://<profile>`, or a file store (`file:///path` or a plain path; MLflow "
        "3 refuses those unless MLFLOW_ALLOW_FILE_STORE=true). null: MLflow's own default, i.e. the "
        "MLFLOW_TRACKING_URI environment variable, else `sqlite:///mlflow.db` in the working directory.")
    experiment: str = Field("pfp-deploy", description="MLflow experiment name; created when missing.")
    run_name: str | None = Field(None, description="MLflow run name; null: the run directory's name "
                                 "(the recipe's `name`).")
    tags: dict[str, str] = Field(
        default_factory=dict, description="Extra run tags, e.g. `{team: vision, dataset: v3}`; they "
        "override pfp-deploy's own tags of the same name (`mlflow.note.content` sets the run description).")
    parent_run_id: str | None = Field(None, description="Log as a child of this MLflow run (the UI nests it "
                                      "there), e.g. the run of a sweep that launched this recipe.")
    artifact_location: str | None = Field(
        None, description="Artifact root of the experiment when pfp-deploy creates it (an existing "
        "experiment keeps its own): a path or an s3://, gs://, ... URI. null: the server's default artifact "
        "root; for a local sqlite store a folder `mlartifacts/<experiment>` beside the database file.")
    log_models: bool = Field(True, description="Also log the pruned model as artifacts: model.onnx and the "
                             "OpenVINO IR (openvino/model.xml + .bin), when exported.")
    required: bool = Field(True, description="true: a tracking failure (MLflow missing, server unreachable, "
                           "store refused) fails the run's tracking step with an error; false: it is logged "
                           "as a warning and the run's outcome stands.")
    request_timeout_s: int = Field(15, ge=1, le=600, description="Seconds an HTTP request to the tracking "
                                   "server may take (MLFLOW_HTTP_REQUEST_TIMEOUT while logging): an "
                                   "unreachable server fails within this, not MLflow's minutes of retries.")
    max_retries: int = Field(2, ge=0, le=10, description="HTTP retries (with backoff) once the server has "
                             "answered, for transient errors during logging; the first contact is never "
                             "retried, so an unreachable server fails fast.")

    @field_validator("tracking_uri")
    @classmethod
    def _supported_uri(cls, value: str | None) -> str | None:
        if value is None:
            return None
        problem = uri_problem(value)
        if problem:
            raise ValueError(problem)
        return value.strip()

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError(f"must not be empty; set {KEY}.experiment to a name, e.g. pfp-deploy")
        if len(value) > MAX_EXPERIMENT_NAME_LENGTH:
            raise ValueError(f"is {len(value)} characters; MLflow allows at most {MAX_EXPERIMENT_NAME_LENGTH}")
        return value

    @field_validator("run_name", "parent_run_id", "artifact_location")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty; use null for the default")
        return None if value is None else value.strip()

    @field_validator("tags", mode="before")
    @classmethod
    def _scalar_tags(cls, value: Any) -> Any:
        """YAML reads `{epoch: 3, nightly: true}` as numbers and booleans: tags are their text."""
        if isinstance(value, Mapping):
            return {k: v if isinstance(v, str) or not isinstance(v, (int, float, bool)) else _scalar(v)
                    for k, v in value.items()}
        return value

    @field_validator("tags")
    @classmethod
    def _valid_tags(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if not key or len(key) > MAX_KEY_LENGTH or not _NAME_OK.fullmatch(key):
                raise ValueError(f"tag name {key!r} is not valid in MLflow: 1 to {MAX_KEY_LENGTH} letters, digits, "
                                 "'_', '-', '.', ' ', ':' or '/'")
            if len(text) > MAX_TAG_VALUE_LENGTH:
                raise ValueError(f"tag {key!r} is {len(text)} characters; MLflow allows at most "
                                 f"{MAX_TAG_VALUE_LENGTH}")
        return value


def uri_problem(uri: str) -> str | None:
    """Why `uri` cannot be an MLflow tracking URI, or None when it can (its scheme is one MLflow or an
    installed plugin serves, or it is a local path)."""
    where = f"set {KEY}.tracking_uri"
    uri = uri.strip()
    if not uri:
        return f"is empty; {where} to a tracking server (http://host:5000), sqlite:///mlflow.db or null"
    scheme = _scheme(uri)
    if scheme is None:
        return None  # a local path: MLflow's file store
    base = scheme.split("+", 1)[0]
    rest = uri.split(":", 1)[1]
    if base in ("http", "https"):
        if not re.match(r"//[^/?#\s]+", rest):
            return f"{uri!r} names no host; {where} to e.g. {base}://mlflow.example.com:5000"
    elif base == "sqlite":
        path = rest.split("?", 1)[0]
        if not path.startswith("///") or len(path) == 3 or path[3:] == ":memory:":
            return (f"{uri!r} is not a sqlite file: {where} to sqlite:///mlflow.db (three slashes: relative to the "
                    "working directory) or sqlite:////abs/path/mlflow.db (four: absolute); an in-memory "
                    "database would lose the run")
    elif base in _SQL_SCHEMES or scheme in ("databricks", "file"):
        pass
    elif scheme not in _plugin_schemes():
        known = [*SCHEMES, *_plugin_schemes()]
        return (f"unsupported scheme {scheme + ':'!r} in {uri!r}.{did_you_mean(scheme, known)} S{where[1:]} to an "
                "http(s):// tracking server, sqlite:///path/mlflow.db, a postgresql://, mysql:// or mssql:// "
                "database, databricks[://profile], file:///path or a local path")
    return None


def _scheme(uri: str) -> str | None:
    """The URI's scheme in lower case; None for a plain path (a one-letter "scheme" is a Windows drive)."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*):", uri)
    if not match or len(match.group(1)) == 1:
        return None
    return match.group(1).lower()


def _plugin_schemes() -> tuple[str, ...]:
    """Schemes that installed MLflow plugins register (found without importing mlflow)."""
    try:
        return tuple(sorted({ep.name for ep in metadata.entry_points(group="mlflow.tracking_store")}))
    except Exception:  # noqa: BLE001 - broken distribution metadata must not break validation
        return ()


# ------------------------------------------------------------------------------------------ result

@dataclasses.dataclass
class TrackingResult:
    """What log_run did. `status`: logged (the run is in MLflow), failed (only with required: false; see
    `error`), skipped (disabled, or not rank 0; see `reason`). `artifacts`, `params`, `metrics`: how many were logged."""

    status: Literal["logged", "failed", "skipped"]
    tracking_uri: str | None = None
    experiment: str | None = None
    experiment_id: str | None = None
    run_id: str | None = None
    run_name: str | None = None
    run_url: str | None = None  # the run's page, for an http(s) tracking server
    artifact_uri: str | None = None
    artifacts: int = 0
    params: int = 0
    metrics: int = 0
    error: str | None = None  # why it failed (status "failed")
    reason: str | None = None  # why nothing was logged (status "skipped")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------- log_run

def log_run(run_dir: str | os.PathLike, config: MlflowConfig, params: Mapping[str, Any]) -> TrackingResult:
    """Log the finished run in `run_dir` to MLflow: `params` (the resolved recipe as a nested dict) as
    flattened params, report.json's numbers as metrics, report.json/.md, plots, plan.json,
    recipe.resolved.yaml, env.json (and error.log) as artifacts, with `config.log_models` the pruned
    model.onnx and OpenVINO IR too. Creates the experiment when missing and one new MLflow run per call.

    Distributed runs: call it from rank 0 only, after rank 0 has written report.json; other ranks have
    nothing to log. As a safeguard a process whose RANK environment variable is not 0 logs nothing and
    returns status "skipped".

    Raises TrackingError (MLflow not installed, tracking store unreachable or refusing, report.json
    missing or unreadable) when `config.required`; otherwise returns status "failed" with the message in
    `error` and logs a warning. The run directory is never modified. HTTP requests to a tracking server
    use `config.request_timeout_s` and `config.max_retries` (set as MLflow's MLFLOW_HTTP_REQUEST_*
    environment variables while logging, restored afterwards); the first contact is not retried.
    """
    run_dir = Path(run_dir)
    result = TrackingResult("skipped", tracking_uri=config.tracking_uri, experiment=config.experiment)
    if not config.enabled:
        result.reason = f"{KEY}.enabled is false"
        return result
    rank = os.environ.get("RANK", "").strip()
    if rank not in ("", "0"):
        result.reason = f"rank {rank}: only rank 0 logs to MLflow"
        return result
    try:
        _log(run_dir, config, params, result)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a TrackingError (required) or a warning
        error = exc if isinstance(exc, TrackingError) else TrackingError(
            f"logging {run_dir} to MLflow at {result.tracking_uri or 'its default tracking URI'} failed: "
            f"{type(exc).__name__}: {_reason(exc)}")
        if config.required:
            if error is exc:
                raise
            raise error from exc
        log.warning("MLflow tracking failed; the run's own outcome stands (%s.required is false): %s", KEY, error)
        result.status, result.error = "failed", str(error)
        return result
    result.status = "logged"
    log.info("logged to MLflow: experiment %r, run %s (%s)", result.experiment, result.run_id,
             result.run_url or result.tracking_uri)
    return result


def _log(run_dir: Path, config: MlflowConfig, params: Mapping[str, Any], result: TrackingResult) -> None:
    client_cls, entities = _import_mlflow()
    import mlflow

    uri = config.tracking_uri or mlflow.get_tracking_uri()
    result.tracking_uri = uri
    if config.tracking_uri is None and (problem := uri_problem(uri)):
        raise TrackingError(f"MLFLOW_TRACKING_URI {problem}")
    report = read_report(run_dir)
    files = artifact_files(run_dir, report, config.log_models)  # before any MLflow call: fails on bad input

    with _http_settings(config, retries=0):  # first contact: an unreachable server fails in seconds
        try:
            client = client_cls(tracking_uri=uri)
            experiment_id = _experiment(client, config, uri)
        except TrackingError:
            raise
        except Exception as exc:  # noqa: BLE001 - MlflowException, requests/sqlalchemy errors, OSError
            raise _store_error(uri, exc) from exc
    result.experiment_id = experiment_id

    with _http_settings(config, retries=config.max_retries):
        run_name = config.run_name or run_dir.resolve().name
        tags = {**run_tags(report, run_dir), **config.tags}
        if config.parent_run_id:
            tags["mlflow.parentRunId"] = config.parent_run_id
        run = client.create_run(experiment_id, start_time=_millis(report.get("created")), tags=tags,
                                run_name=run_name)
        run_id = run.info.run_id
        result.run_id, result.run_name, result.artifact_uri = run_id, run.info.run_name, run.info.artifact_uri
        if _scheme(uri) in ("http", "https"):
            result.run_url = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        try:
            flat = flatten_params(params, _param_value_limit())
            param_rows = [entities.Param(k, v) for k, v in flat.items()]
            for i in range(0, len(param_rows), PARAMS_PER_BATCH):
                client.log_batch(run_id, params=param_rows[i:i + PARAMS_PER_BATCH])
            result.params = len(param_rows)
            stamp = _millis(report.get("finished"))
            metric_rows = [entities.Metric(k, v, stamp, step) for k, v, step in report_metrics(report)]
            for i in range(0, len(metric_rows), METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=metric_rows[i:i + METRICS_PER_BATCH])
            result.metrics = len(metric_rows)
            for path, folder in files:
                client.log_artifact(run_id, str(path), artifact_path=folder)
                result.artifacts += 1
            client.set_terminated(run_id, _run_status(report.get("status")), end_time=_millis(report.get("finished")))
        except BaseException as exc:  # best effort: no MLflow run is left RUNNING forever
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            with contextlib.suppress(Exception), _http_settings(config, retries=0):
                client.set_terminated(run_id, status)
            raise


def _import_mlflow():
    try:
        from mlflow import entities
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        missing = getattr(exc, "name", None) in ("mlflow", "mlflow.tracking", "mlflow.entities")
        detail = "is not installed" if missing else f"cannot be imported ({exc})"
        raise TrackingError(f"MLflow tracking ({KEY}) needs MLflow, which {detail}: {INSTALL_HINT}, "
                            f"or set {KEY}.enabled: false") from exc
    return MlflowClient, entities


def _experiment(client: Any, config: MlflowConfig, uri: str) -> str:
    """The experiment's id, created when missing (a concurrent creation is fine)."""
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is None:
        location = config.artifact_location or default_artifact_location(uri, config.experiment)
        try:
            return client.create_experiment(config.experiment, artifact_location=location)
        except Exception:  # noqa: BLE001 - another process created it first: use theirs
            experiment = client.get_experiment_by_name(config.experiment)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise TrackingError(f"MLflow experiment {config.experiment!r} at {uri} is deleted: restore it "
                            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or set "
                            f"{KEY}.experiment to another name")
    if config.artifact_location and config.artifact_location != experiment.artifact_location:
        log.warning("MLflow experiment %r exists with artifact location %s; %s.artifact_location (%s) applies "
                    "only to a new experiment", config.experiment, experiment.artifact_location, KEY,
                    config.artifact_location)
    return experiment.experiment_id


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """`mlartifacts/<experiment>` beside a local sqlite database (MLflow's own default would be ./mlruns in
    whatever directory the run happens to start from); None elsewhere (the server's default)."""
    if _scheme(uri) != "sqlite":
        return None
    path = uri.split(":", 1)[1].split("?", 1)[0][3:]  # after "sqlite:///"
    if not path or path == ":memory:":
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (Path(path).parent.resolve() / "mlartifacts" / slug).as_uri()


def _store_error(uri: str, exc: BaseException) -> TrackingError:
    reason = _reason(exc)
    text = str(exc)
    if _scheme(uri) in ("http", "https"):
        if re.search(r"Errno|timed out|Connection|resolve|Max retries", text):
            return TrackingError(f"cannot reach the MLflow tracking server {uri} ({reason}): check {KEY}.tracking_uri"
                                 " (or MLFLOW_TRACKING_URI) and that the server is running and reachable from here")
        return TrackingError(f"the MLflow tracking server {uri} refused the request ({reason}): check "
                             f"{KEY}.tracking_uri and the credentials (MLFLOW_TRACKING_TOKEN or _USERNAME/_PASSWORD)")
    if "MLFLOW_ALLOW_FILE_STORE" in text:
        return TrackingError(f"MLflow refuses the file store {uri} (its file store is in maintenance mode): set "
                             f"{KEY}.tracking_uri to sqlite:///path/mlflow.db, or set MLFLOW_ALLOW_FILE_STORE=true")
    if _scheme(uri) in _SQL_SCHEMES and ("sqlalchemy" in text.lower() or "alembic" in text.lower()
                                         or "registry" in text.lower()):
        reason += f"; a database store needs sqlalchemy and alembic: {INSTALL_HINT}"
    return TrackingError(f"MLflow cannot use the tracking store {uri}: {reason}")


def _reason(exc: BaseException) -> str:
    """The useful part of an exception's message: the OS or HTTP error, not a page of urllib3 retries."""
    text = " ".join(str(exc).split())
    for pattern in (r"\[Errno -?\d+\][^'\")]*", r"Read timed out[^'\")]*", r"timed out", r"Connection refused",
                    r"Name or service not known", r"Failed to resolve[^'\")]*",
                    r"error code \d+[^\n]{0,200}", r"status code \d+[^\n]{0,200}"):
        match = re.search(pattern, text)
        if match:
            return match.group(0).strip(" .,;")
    return text[:300] + ("..." if len(text) > 300 else "") or type(exc).__name__


@contextlib.contextmanager
def _http_settings(config: MlflowConfig, retries: int) -> Iterator[None]:
    """MLflow reads its HTTP timeout and retries from the environment at each request: set them for the
    block, then restore what the process had."""
    values = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(config.request_timeout_s),
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries)}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _param_value_limit() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
        return int(MAX_PARAM_VAL_LENGTH)
    except (ImportError, TypeError, ValueError):
        return FALLBACK_PARAM_VALUE_LENGTH


def _run_status(status: Any) -> str:
    return {"passed": "FINISHED", "interrupted": "KILLED"}.get(str(status), "FAILED")


def _millis(stamp: Any) -> int:
    """An ISO time from the report in epoch milliseconds; now when absent or unreadable."""
    if isinstance(stamp, str):
        with contextlib.suppress(ValueError):
            moment = datetime.datetime.fromisoformat(stamp)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=datetime.timezone.utc)
            return int(moment.timestamp() * 1000)
    return int(time.time() * 1000)


# ------------------------------------------------------------------------------- run directory

def read_report(run_dir: Path) -> dict:
    """report.json as a dict, read as untrusted data (artifacts.load_report_json: a regular file, no
    symlink, bounded size); TrackingError naming the file otherwise."""
    try:
        return load_report_json(Path(run_dir) / "report.json")
    except UsageError as exc:
        raise TrackingError(f"{exc} (log_run needs a run directory that a run has finished writing)") from None


def artifact_files(run_dir: Path, report: Mapping[str, Any], log_models: bool) -> list[tuple[Path, str | None]]:
    """(file, artifact folder) pairs to log, in the run directory's layout. Only regular files inside the
    run directory: a symlink, or a path from report.json that leads outside, is skipped with a warning."""
    run_dir = Path(run_dir)
    names = list(REPORT_FILES)
    names += sorted(p.name for p in run_dir.glob("*.png"))
    if log_models:
        exported = (report.get("export") or {}).get("files") or {}
        exported = exported if isinstance(exported, Mapping) else {}
        for role, default in MODEL_FILES.items():
            rel = exported.get(role, default)
            if not isinstance(rel, str):
                continue
            names.append(rel)
            if rel.endswith(".xml"):
                names.append(rel[:-4] + ".bin")
            elif rel.endswith(".onnx"):
                names.append(rel + ".data")  # external weights of a large ONNX model, when present
    files, seen = [], set()
    for rel in names:
        path = _inside(run_dir, rel)
        if path is None or rel in seen:
            continue
        seen.add(rel)
        parent = Path(rel).parent.as_posix()
        files.append((path, None if parent == "." else parent))
    return files


def _inside(run_dir: Path, rel: str) -> Path | None:
    """run_dir/rel when it is a regular file inside run_dir (not through a symlink); else None."""
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        log.warning("not logging %r to MLflow: not a path inside %s", rel, run_dir)
        return None
    path = run_dir / rel
    try:
        info = os.lstat(path)
    except OSError:
        return None  # not written by this run (e.g. no export): nothing to log
    if not stat.S_ISREG(info.st_mode) or not path.resolve().is_relative_to(run_dir.resolve()):
        log.warning("not logging %s to MLflow: not a regular file inside %s", path, run_dir)
        return None
    return path


# ------------------------------------------------------------------------------------------ params

def flatten_params(tree: Any, max_length: int = FALLBACK_PARAM_VALUE_LENGTH) -> dict[str, str]:
    """A nested recipe dict as MLflow params: `{"prune": {"keep": 0.5}}` -> `{"prune.keep": "0.5"}`; lists of
    sections by index (`checks.targets.0.name`), lists of values as JSON (`[1, 3, 224, 224]`), scalars as
    YAML/JSON (`true`, `null`), strings as they are. Names get MLflow's characters and length; a value over
    `max_length` characters is cut, ending in "...[truncated]"."""
    out: dict[str, str] = {}

    def visit(node: Any, key: str) -> None:
        if isinstance(node, Mapping) and (node or not key):  # {} at the top: no params
            for name, child in node.items():
                visit(child, f"{key}.{name}" if key else str(name))
        elif isinstance(node, (list, tuple)) and node and any(isinstance(v, (Mapping, list, tuple)) for v in node):
            for index, child in enumerate(node):
                visit(child, f"{key}.{index}" if key else str(index))
        else:
            name = _metric_name(key or "value")
            if name in out:  # two keys that differ only in characters MLflow does not allow
                name = f"{name[:MAX_KEY_LENGTH - 9]}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
            out[name] = _truncate(_scalar(node), max_length)

    visit(tree, "")
    return out


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:max(limit - len(TRUNCATED), 0)] + TRUNCATED


def _metric_name(name: str) -> str:
    """`name` with only the characters MLflow allows in a param/metric/tag name, and at most its length."""
    clean = re.sub(r"[^\w.\- :]", "_", name)
    if clean.startswith("."):
        clean = "_" + clean
    if len(clean) > MAX_KEY_LENGTH:
        clean = f"{clean[:MAX_KEY_LENGTH - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return clean


# ----------------------------------------------------------------------------------------- metrics

def report_metrics(report: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """(name, value, step) for every number of report.json worth charting (see the module docstring);
    steps are 0 for whole-run values, the cascade step (1, 2, ...) or the fine-tuning epoch."""
    rows: list[tuple[str, float, int]] = []

    def add(name: str, value: Any, step: int = 0) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            rows.append((name, float(value), step))

    accuracy = _section(report, "accuracy")
    for step, _label in ACCURACY_STEPS:
        for metric in ("top1", "top5"):
            add(f"accuracy/{step}.{metric}", _section(accuracy, step).get(metric))
    final = next((_section(accuracy, step) for step, _ in reversed(ACCURACY_STEPS[1:])
                  if _section(accuracy, step).get("top1") is not None), {})
    dense = _section(accuracy, "dense")
    for metric in ("top1", "top5"):
        add(f"accuracy/pruned.{metric}", final.get(metric))
        if _number(dense.get(metric)) and _number(final.get(metric)):
            add(f"accuracy/drop.{metric}", dense[metric] - final[metric])

    model = _section(report, "model")
    for cost in ("macs", "params"):
        add(f"cost/{cost}.dense", model.get(f"{cost}_dense"))
        add(f"cost/{cost}.pruned", model.get(f"{cost}_pruned"))
        if _number(model.get(f"{cost}_dense")) and _number(model.get(f"{cost}_pruned")) and model[f"{cost}_dense"]:
            add(f"cost/{cost}.kept", model[f"{cost}_pruned"] / model[f"{cost}_dense"])

    prune = _section(report, "prune")
    stages = _steps(prune)
    if stages:
        add("prune/achieved", stages[-1].get("achieved"))
        add("prune/epsilon", stages[-1].get("epsilon"))
    for number, stage in enumerate(stages, start=1):
        for value in _CASCADE_VALUES:
            add(f"cascade/{value}", stage.get(value), number)
        for step, metric in _section(stage, "accuracy").items():
            if isinstance(metric, Mapping):
                add(f"cascade/accuracy.{_metric_name(str(step))}.top1", metric.get("top1"), number)

    epoch = 0
    for number, stage in enumerate(_steps(_section(report, "finetune")), start=1):
        add("cascade/accuracy.finetuned.top1", _section(stage, "accuracy").get("top1"), number)
        for entry in stage.get("history") or []:
            if not isinstance(entry, Mapping):
                continue
            epoch += 1
            for name, value in entry.items():
                if name != "epoch":
                    add(f"finetune/{_metric_name(str(name))}", value, epoch)

    for target in report.get("targets") or []:
        if not isinstance(target, Mapping) or not isinstance(target.get("name"), str):
            continue
        name = _metric_name(target["name"])
        for role in ("dense", "pruned"):
            for stat_name in _LATENCY_STATS:
                add(f"target/{name}.{stat_name}.{role}", _section(target, role).get(stat_name))
        for ratio in _TARGET_RATIOS:
            add(f"target/{name}.{ratio}", target.get(ratio))

    for stage, seconds in _section(report, "times").items():
        add(f"time/{_metric_name(str(stage))}", seconds)
    return rows


def run_tags(report: Mapping[str, Any], run_dir: Path) -> dict[str, str]:
    """pfp-deploy's own tags for the run (see the module docstring)."""
    model, data = _section(report, "model"), _section(report, "data")
    tags = {"pfp_deploy.status": report.get("status"), "pfp_deploy.version": report.get("pfp_deploy"),
            "pfp_deploy.model": model.get("name"), "pfp_deploy.data": data.get("format"),
            "pfp_deploy.prune_method": _section(report, "prune").get("method"),
            "pfp_deploy.run_dir": str(Path(run_dir).resolve()), "pfp_deploy.message": report.get("message"),
            "mlflow.source.name": "pfp-deploy", "mlflow.note.content": summary(report)}
    for check in report.get("checks") or []:
        if isinstance(check, Mapping) and isinstance(check.get("name"), str):
            tags[f"pfp_deploy.check.{_metric_name(check['name'])}"] = check.get("status")
    return {k: _truncate(str(v), MAX_TAG_VALUE_LENGTH) for k, v in tags.items() if v is not None}


def summary(report: Mapping[str, Any]) -> str:
    """A few lines of Markdown for the MLflow run's description."""
    model, accuracy = _section(report, "model"), _section(report, "accuracy")
    lines = [f"pfp-deploy run **{report.get('name')}**: {report.get('status')} ({report.get('message')})"]
    if _number(model.get("macs_dense")) and _number(model.get("macs_pruned")) and model["macs_dense"]:
        lines.append(f"- {model.get('name')}: MACs {model['macs_dense']:,} -> {model['macs_pruned']:,} "
                     f"({100 * model['macs_pruned'] / model['macs_dense']:.1f} %)")
    final = next((step for step, _ in reversed(ACCURACY_STEPS[1:])
                  if _number(_section(accuracy, step).get("top1"))), None)
    if final and _number(_section(accuracy, "dense").get("top1")):
        lines.append(f"- top-1 {accuracy['dense']['top1']:.2f} % dense -> {accuracy[final]['top1']:.2f} % "
                     f"({final.replace('_', ' ')})")
    for target in report.get("targets") or []:
        if isinstance(target, Mapping) and _number(target.get("speedup")):
            lines.append(f"- {target.get('name')}: speed-up {target['speedup']:.2f}x ({target.get('status')})")
    if (_section(report, "data")).get("meaningful_accuracy") is False:
        lines.append("- synthetic data: accuracy figures are not meaningful")
    return "\n".join(lines)


def _steps(section: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A prune or finetune section's cascade steps (older reports call them "stages")."""
    steps = section.get("steps", section.get("stages"))
    return [s for s in steps if isinstance(s, Mapping)] if isinstance(steps, list) else []


def _section(node: Any, key: str) -> Mapping[str, Any]:
    value = node.get(key) if isinstance(node, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
