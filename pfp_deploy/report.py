"""Human-readable run report: report.md with tables and PNG plots, an atomic JSON writer and a terminal summary.

The input is an artifacts.Report (the pipeline's, or report.json's dict, validated by `as_report`): every
section has its typed fields, so nothing here probes a dict. matplotlib is imported inside the plotting
functions, so importing this module stays cheap and works without the report extra.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pfp_deploy.artifacts import (
    ACCURACY_STEPS,
    FinetuneStep,
    GroupWidth,
    PruneStep,
    Report,
    TargetRow,
)
from pfp_deploy.fileio import atomic_open, write_text_atomic

PLOT_DPI = 110
MAX_GROUP_ROWS = 20  # more groups than this: the width table goes under <details>
MAX_BAR_LABELS = 40  # more groups than this: widths.png becomes a profile with sparse labels
MAX_SUMMARY_TARGETS = 12
STATUS_BADGE = {"passed": "✅ PASSED", "failed": "❌ FAILED", "error": "💥 ERROR",
                "interrupted": "⏸️ INTERRUPTED", "skipped": "⏭️ SKIPPED"}
NOT_RUN = "_Not run._"


# ----------------------------------------------------------------------------- JSON


def to_jsonable(obj: Any) -> Any:
    """`obj` as plain JSON types: NaN/inf -> None, Path -> str, tensors/numpy -> numbers or lists."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (datetime.datetime, datetime.date)):
        return obj.isoformat()
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars, without importing either
        return to_jsonable(obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj))
    if hasattr(obj, "model_dump"):  # pydantic models, e.g. recipe rows
        return to_jsonable(obj.model_dump())
    return str(obj)  # a report must never fail at the end of a long run over one odd value


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as JSON (sorted keys, indent 2, NaN -> null) via a temp file and rename; return the path."""
    path = Path(path)
    text = json.dumps(to_jsonable(obj), sort_keys=True, indent=2, allow_nan=False)
    with atomic_open(path) as f:
        f.write(text + "\n")
    return path


# ----------------------------------------------------------------------------- formatting


def _num(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _count(n: Any) -> str:
    """25557032 -> '25.56 M'."""
    n = _num(n)
    if n is None:
        return "—"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _ms(v: Any) -> str:
    v = _num(v)
    return "—" if v is None else f"{v:#.3g}" if v < 99.95 else f"{v:.0f}"  # 3.10, 24.6, 151


def _fixed(v: Any, digits: int = 2, suffix: str = "") -> str:
    v = _num(v)
    return "—" if v is None else f"{v:.{digits}f}{suffix}"


def _secs(s: Any) -> str:
    s = _num(s)
    if s is None:
        return "—"
    if s < 60:
        return f"{s:.1f} s"
    minutes, sec = divmod(round(s), 60)
    return f"{minutes} min {sec:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _cell(value: Any, limit: int = 200) -> str:
    """Text safe inside a markdown table cell."""
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _ratio(dense: Any, pruned: Any) -> tuple[float | None, float | None]:
    """(dense / pruned, reduction %)."""
    d, p = _num(dense), _num(pruned)
    if not d or not p:
        return None, None
    return d / p, 100.0 * (1 - p / d)


def _target_where(row: TargetRow) -> str:
    """'onnxruntime / CUDAExecutionProvider', 'openvino / GPU fp16'."""
    target, measured = row.target, row.dense
    runtime = target.get("runtime") or (measured.runtime if measured else None) or "?"
    where = target.get("provider") or target.get("device") or (measured.device if measured else None) or "CPU"
    precision = target.get("precision") or "fp32"
    return f"{runtime} / {where}" + ("" if precision == "fp32" else f" {precision}")


def as_report(report: Report | Mapping) -> Report:
    """A Report from the pipeline, or report.json's dict read back (validated; unknown keys kept)."""
    return report if isinstance(report, Report) else Report.model_validate(dict(report))


# ----------------------------------------------------------------------------- markdown sections


def _header(report: Report, warnings: list[str]) -> list[str]:
    lines = [f"# pfp-deploy report: {report.name}", "",
             f"**Status: {STATUS_BADGE.get(report.status, report.status.upper())}** · exit code "
             f"{'—' if report.exit_code is None else report.exit_code}"
             + (f" · {report.created}" if report.created else "")]
    facts = [f"{label} `{value}`" for label, value in (("model", report.model.name), ("data", report.data.format),
                                                       ("PFP variant", report.prune.variant)) if value]
    if facts:
        lines += ["", " · ".join(facts)]
    if report.message:
        lines += ["", f"> {_cell(report.message, 1000)}"]
    if report.data.meaningful_accuracy is False:
        lines += ["", "> ⚠️ **Synthetic data:** accuracy figures below are not meaningful; "
                      "they only show that the pipeline ran. Point the recipe at a real dataset to judge accuracy."]
    for warning in warnings:
        lines += ["", f"> ⚠️ {warning}"]
    return lines


def _summary(report: Report) -> list[str]:
    lines = ["## Summary", ""]
    model, accuracy = report.model, report.accuracy
    if model.macs_dense is not None or model.params_dense is not None:
        rows = []
        for label, dense, pruned in (("Parameters", model.params_dense, model.params_pruned),
                                     ("MACs", model.macs_dense, model.macs_pruned)):
            ratio, reduction = _ratio(dense, pruned)
            rows.append([label, _count(dense), _count(pruned), _fixed(ratio, 2, "×"), _fixed(reduction, 1, " %")])
        lines += _table(["", "Dense", "Pruned", "Ratio", "Reduction"], rows) + [""]
    else:
        lines += ["Model size: " + NOT_RUN, ""]
    final = accuracy.final_step()
    steps = [(step, label) for step, label in ACCURACY_STEPS  # the steps this run had (e.g. no distillation)
             if step == "dense" or getattr(accuracy, step) is not None]
    rows = []
    for metric in ("top1", "top5"):
        values = [_num(getattr(getattr(accuracy, step), metric)) if getattr(accuracy, step) else None
                  for step, _ in steps]
        if all(v is None for v in values):
            continue
        dense = values[0]
        final_value = values[[step for step, _ in steps].index(final)] if final else None
        drop = dense - final_value if dense is not None and final_value is not None else None
        rows.append([f"Top-{metric[3:]} (%)", *(_fixed(v) for v in values), _fixed(drop)])
    if rows:
        lines += _table(["Accuracy", *(label for _, label in steps), "Drop (pts)"], rows)
    else:
        lines += ["Accuracy: " + NOT_RUN]
    return lines


def _targets(report: Report, plots: Mapping[str, Path]) -> list[str]:
    lines = ["## Deployment targets", ""]
    if report.targets is None:
        return lines + [NOT_RUN]
    if not report.targets:
        return lines + ["_No targets configured._"]
    table = []
    for row in report.targets:
        dense, pruned = row.dense, row.pruned
        batch = row.target.get("batch") or (dense.batch if dense else None) or "—"
        table.append([row.name, _target_where(row), batch, STATUS_BADGE.get(row.status, row.status),
                      f"{_ms(dense and dense.p50_ms)} / {_ms(dense and dense.p90_ms)}",
                      f"{_ms(pruned and pruned.p50_ms)} / {_ms(pruned and pruned.p90_ms)}",
                      _fixed(row.speedup, 2, "×"), _fixed(row.macs_ratio, 2, "×"),
                      _fixed(row.efficiency_or_derived(), 2), "" if row.status == "passed" else row.reason])
    lines += _table(["Target", "Runtime / device", "Batch", "Status", "Dense p50 / p90 (ms)",
                     "Pruned p50 / p90 (ms)", "Speed-up", "MACs ratio", "Efficiency", "Reason"], table)
    lines += ["", "_Efficiency = speed-up ÷ MACs ratio: the share of the MACs cut that turned into time._"]
    if "latency" in plots:
        lines += ["", f"![Latency dense vs pruned]({plots['latency'].name})"]
    return lines


def _checks(report: Report) -> list[str]:
    lines = ["## Checks", ""]
    if report.checks is None:
        return lines + [NOT_RUN]
    if not report.checks:
        return lines + ["_No checks._"]
    rows = [[c.name, STATUS_BADGE.get(c.status, c.status), c.detail or ""] for c in report.checks]
    return lines + _table(["Check", "Status", "Detail"], rows)


def _pruning(report: Report, plots: Mapping[str, Path]) -> list[str]:
    lines = ["## Pruning", ""]
    prune = report.prune
    if not (prune.steps or prune.groups or prune.method or prune.metric):
        return lines + [NOT_RUN]
    facts = [f"{label} `{value}`" for label, value in (
        ("Criterion", prune.method), ("metric", prune.metric), ("variant", prune.variant),
        ("allocation", prune.allocation), ("reconstruction", prune.reconstruct)) if value]
    lines += [" · ".join(facts), ""]
    if prune.steps:
        rows = []
        for i, step in enumerate(prune.steps, 1):
            secs = step.seconds
            rows.append([i, _fixed(step.keep, 3), _fixed(step.epsilon, 3), _fixed(step.achieved, 3),
                         _count(step.macs), _count(step.params), _secs(secs.get("sensitivity")),
                         _secs(secs.get("allocation")), _secs(secs.get("removal")), _secs(secs.get("reconstruction")),
                         _secs(secs.get("distillation"))])
        lines += _table(["Step", "Keep", "ε (paper)", "Achieved", "MACs", "Params", "Sensitivity", "Allocation",
                         "Removal", "Reconstruction", "Distillation"], rows) + [""]
    if prune.unprunable_groups:
        names = ", ".join(f"`{g}`" for g in prune.unprunable_groups)
        lines += [f"Not prunable ({len(prune.unprunable_groups)}): {names}", ""]
    if prune.skipped_groups:
        lines += [f"Left unpruned because removing their channels broke the model "
                  f"({len(prune.skipped_groups)}):", ""]
        lines += [f"- `{g.name}`: {g.reason}" for g in prune.skipped_groups] + [""]
    if prune.groups:
        rows = []
        for g in prune.groups:
            before, after = _num(g.width_before), _num(g.width_after)
            kept = 100.0 * after / before if before and after is not None else None
            rows.append([g.name, _or_dash(g.width_before), _or_dash(g.width_after), _fixed(kept, 0, " %")])
        table = _table(["Group", "Width before", "Width after", "Kept"], rows)
        if len(prune.groups) > MAX_GROUP_ROWS:  # long tables would push everything else off screen
            table = [f"<details><summary>Channel widths of {len(prune.groups)} groups</summary>", "", *table, "",
                     "</details>"]
        lines += table
    if "widths" in plots:
        lines += ["", f"![Channel widths before and after pruning]({plots['widths'].name})"]
    lines += _reconstruction(prune.steps, plots)
    return lines


def _or_dash(value: Any) -> Any:
    return "—" if value is None else value


def _reconstruction(steps: Sequence[PruneStep], plots: Mapping[str, Path]) -> list[str]:
    """Per dense layer: relative output error on the calibration data before / after the refit."""
    lines: list[str] = []
    for i, step in enumerate(steps, 1):
        rec = step.reconstruction
        if rec is None or not rec.layers:
            continue
        title = "### Reconstruction" + (f" (step {i})" if len(steps) > 1 else "")
        heldout = any(layer.heldout_after is not None for layer in rec.layers)
        lines += ["", title, "",
                  f"Least squares, ridge {rec.ridge}, {rec.samples} calibration samples, "
                  f"{_secs(rec.seconds)}. Relative output error of each layer, with the dense model's "
                  "outputs as the reference (0 = exact): on the calibration data, as the refit saw it"
                  + (f"; and on {rec.heldout_samples} held-out validation images the refit never saw, "
                     "through the whole pruned model (so upstream error is included)" if heldout else "")
                  + ".", ""]
        rows = [[layer.name, f"{layer.kept_in}/{layer.in_before}", f"{layer.kept_out}/{layer.out_before}",
                 _fixed(layer.error_before, 4), _fixed(layer.error_after, 4),
                 *((_fixed(layer.heldout_before, 4), _fixed(layer.heldout_after, 4)) if heldout else ()),
                 layer.status] for layer in rec.layers]
        table = _table(["Layer", "Inputs kept", "Outputs kept", "Error before", "Error after",
                        *(("Held-out before", "Held-out after") if heldout else ()), "Status"], rows)
        if len(rows) > MAX_GROUP_ROWS:
            table = [f"<details><summary>Reconstruction of {len(rows)} layers</summary>", "", *table, "",
                     "</details>"]
        lines += table
        if rec.skipped:
            lines += ["", f"Left as pruned ({len(rec.skipped)}): " + "; ".join(
                f"`{s.get('name')}` ({s.get('reason')})" for s in rec.skipped)]
        d = rec.distillation
        if d is not None and d.status == "skipped":
            lines += ["", f"Calibration distillation skipped: {d.reason}."]
        elif d is not None:
            outcome = ("kept" if d.status == "distilled" else
                       "not kept (the KL did not fall): the refit model stays")
            lines += ["", f"Then calibration distillation: {d.epochs} epochs ({d.steps} Adam steps, lr {d.lr}, "
                      f"T {d.temperature}) on the {d.samples} calibration images, {_secs(d.seconds)}. KL to the "
                      f"dense model {_fixed(d.kl_before, 4)} → {_fixed(d.kl_after, 4)}, top-1 agreement with it "
                      f"{_fixed(100 * d.agreement_before if d.agreement_before is not None else None, 1, ' %')} → "
                      f"{_fixed(100 * d.agreement_after if d.agreement_after is not None else None, 1, ' %')}; "
                      f"{outcome}."]
    if lines and "reconstruction" in plots:
        lines += ["", f"![Per-layer error before and after reconstruction]({plots['reconstruction'].name})"]
    return lines


def _finetune(report: Report, plots: Mapping[str, Path]) -> list[str]:
    lines = ["## Fine-tuning", ""]
    steps = report.finetune.steps
    if not steps:
        return lines + [NOT_RUN]
    rows = []
    for i, step in enumerate(steps, 1):
        top1 = [v for v in (_num(h.get("val_top1")) for h in step.history) if v is not None]
        rows.append([i, _fixed(step.keep, 3), len(step.history), _fixed(max(top1) if top1 else None),
                     _fixed(top1[-1] if top1 else None), _secs(sum(_num(h.get("seconds")) or 0 for h in step.history))])
    lines += _table(["Step", "Keep", "Epochs", "Best val top-1 (%)", "Last val top-1 (%)", "Time"], rows)
    if "finetune" in plots:
        lines += ["", f"![Validation top-1 during fine-tuning]({plots['finetune'].name})"]
    return lines


def _export(report: Report) -> list[str]:
    lines = ["## Export and parity", ""]
    export = report.export
    if export is None or not (export.files or export.parity):
        return lines + [NOT_RUN]
    if export.files:
        lines += _table(["File", "Path"], [[k, f"`{v}`"] for k, v in export.files.items()]) + [""]
    rows = []
    for model, parity in export.parity.items():
        for rt in parity.get("runtimes") or []:
            outputs = rt.get("outputs") or []
            max_abs = max((_num(o.get("max_abs_diff")) or 0.0 for o in outputs), default=None)
            max_rel = max((_num(o.get("max_rel_diff")) or 0.0 for o in outputs), default=None)
            within = rt.get("within_tolerance", all(o.get("within_tolerance") for o in outputs))
            agreement = _num(rt.get("top1_agreement"))
            rows.append([model, rt.get("runtime", "?"), "✅ within" if within else "⚠️ outside",
                         f"{max_abs:.3g}" if max_abs is not None else "—",
                         f"{max_rel:.3g}" if max_rel is not None else "—",
                         _fixed(100 * agreement if agreement is not None else None, 2, " %"),
                         f"atol {parity.get('atol', '—')}, rtol {parity.get('rtol', '—')}, "
                         f"{parity.get('samples', '—')} samples"])
    if rows:
        lines += _table(["Model", "Runtime", "Tolerance", "Max abs diff", "Max rel diff", "Top-1 agreement",
                         "Setting"], rows)
    elif not export.files:
        lines += [NOT_RUN]
    return lines


def _timings(report: Report) -> list[str]:
    lines = ["## Timings", ""]
    times = report.times
    if not times:
        return lines + [NOT_RUN]
    rows = [[stage, _secs(s)] for stage, s in times.items()]
    if "total" not in times:  # the pipeline may already give the wall-clock total
        rows.append(["**total**", f"**{_secs(sum(_num(s) or 0.0 for s in times.values()))}**"])
    return lines + _table(["Stage", "Time"], rows)


def _env(report: Report) -> list[str]:
    lines = ["## Environment", ""]
    if not report.env:
        return lines + [NOT_RUN]
    rows = []
    for key, value in report.env.items():
        if isinstance(value, Mapping):  # one level of nesting, e.g. {"versions": {...}}
            rows += [[f"{key}.{k}", v] for k, v in value.items()]
        else:
            rows.append([key, ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value])
    return lines + _table(["Key", "Value"], [[k, "—" if v is None else v] for k, v in rows])


def render_markdown(report: Report | Mapping, plots: Mapping[str, Path] | None = None,
                    warnings: Sequence[str] = ()) -> str:
    """The report.md text; `plots` maps plot names ("latency", "widths", "finetune") to files beside it."""
    report, plots = as_report(report), plots or {}
    sections = [_header(report, list(warnings)), _summary(report), _targets(report, plots), _checks(report),
                _pruning(report, plots), _finetune(report, plots), _export(report), _timings(report), _env(report)]
    return "\n\n".join("\n".join(s) for s in sections) + "\n"


# ----------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    """A matplotlib Figure with its own Agg canvas: no display, no pyplot global state, nothing to close.

    ImportError when matplotlib is missing (it is the optional `report` extra)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _save(fig, path: Path) -> Path:
    """Save `fig` as PNG atomically."""
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=PLOT_DPI)
    return path


DENSE_COLOR, PRUNED_COLOR = "#8c8c8c", "#1f77b4"


def plot_latency(targets: Sequence[TargetRow], path: str | os.PathLike) -> Path | None:
    """Grouped bars of dense vs pruned p50 per measured target, p90 as whiskers, speed-up annotated."""
    rows = [t for t in targets if t.dense is not None and _num(t.dense.p50_ms) is not None
            and t.pruned is not None and _num(t.pruned.p50_ms) is not None]
    if not rows:
        return None
    import numpy as np

    p50 = {k: np.array([getattr(r, k).p50_ms for r in rows], float) for k in ("dense", "pruned")}
    p90 = {k: np.array([_num(getattr(r, k).p90_ms) or getattr(r, k).p50_ms for r in rows], float)
           for k in ("dense", "pruned")}
    x, width = np.arange(len(rows)), 0.38
    fig, ax = _figure(max(6.0, 1.3 * len(rows) + 2), 4.5)
    for offset, key, color in ((-width / 2, "dense", DENSE_COLOR), (width / 2, "pruned", PRUNED_COLOR)):
        whisker = [np.zeros(len(rows)), np.maximum(p90[key] - p50[key], 0)]  # upward only: p50 -> p90
        ax.bar(x + offset, p50[key], width, color=color, label=f"{key} p50",
               yerr=whisker, capsize=4, error_kw={"elinewidth": 1, "ecolor": "#333333"})
    # A GPU target at 0.5 ms next to a CPU one at 50 ms would be invisible on a linear axis.
    top = max(p90["dense"].max(), p90["pruned"].max())
    log = top / max(min(p50["dense"].min(), p50["pruned"].min()), 1e-9) > 30
    if log:
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 20 rather than 2x10^1
    for i, row in enumerate(rows):
        speedup = _num(row.speedup)
        if speedup is not None:
            y = max(p90["dense"][i], p90["pruned"][i])
            ax.annotate(f"{speedup:.2f}×", (x[i], y), xytext=(0, 4), textcoords="offset points",
                        ha="center", va="bottom", fontsize=9, fontweight="bold")
    labels = [f"{r.name}\n{_target_where(r)}" + ("" if r.status == "passed" else f"\n({r.status})") for r in rows]
    ax.set_xticks(x, labels, fontsize=8, rotation=20 if len(rows) > 5 else 0,
                  ha="right" if len(rows) > 5 else "center")
    ax.set_ylabel("latency per batch (ms)" + (", log scale" if log else ""))
    ax.set_title("Dense vs pruned latency (bar: p50, whisker: p90; label: speed-up)", fontsize=10)
    ax.margins(y=0.15)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path))


def plot_widths(groups: Sequence[GroupWidth], path: str | os.PathLike) -> Path | None:
    """Channel width per prunable group before (grey) and after (blue) pruning, in network order."""
    rows = [g for g in groups if _num(g.width_before) is not None and _num(g.width_after) is not None]
    if not rows:
        return None
    import numpy as np

    before = np.array([g.width_before for g in rows], float)
    after = np.array([g.width_after for g in rows], float)
    names = [g.name for g in rows]
    if len(rows) <= MAX_BAR_LABELS:  # horizontal bars, every group named and annotated
        fig, ax = _figure(8, 0.28 * len(rows) + 1.5)
        y = np.arange(len(rows))
        ax.barh(y, before, color="#d9d9d9", label="before")
        ax.barh(y, after, height=0.5, color=PRUNED_COLOR, label="after")
        for i in range(len(rows)):
            ax.text(before[i], y[i], f" {after[i]:.0f}/{before[i]:.0f}", va="center", fontsize=7)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()  # first layer at the top
        ax.set_xlabel("channels")
        ax.set_xlim(0, before.max() * 1.18)  # room for the annotations
        ax.legend(fontsize=8, loc="best")
    else:  # 100+ groups: a width profile along the network, only every step-th group named
        fig, ax = _figure(11, 4.5)
        x = np.arange(len(rows))
        ax.bar(x, before, width=1.0, color="#d9d9d9", label="before")
        ax.bar(x, after, width=0.7, color=PRUNED_COLOR, label="after")
        step = math.ceil(len(rows) / 30)
        ax.set_xticks(x[::step], names[::step], rotation=90, fontsize=7)
        ax.set_xlim(-1, len(rows))
        ax.set_ylabel("channels")
        ax.set_xlabel(f"group in network order ({len(rows)} groups, every {step}th named)")
        ax.legend(fontsize=8, loc="upper left")
    kept = 100.0 * after.sum() / before.sum() if before.sum() else 0.0
    ax.set_title(f"Channel widths per group ({kept:.0f} % of channels kept)", fontsize=10)
    ax.grid(axis="x" if len(rows) <= MAX_BAR_LABELS else "y", alpha=0.3)
    return _save(fig, Path(path))


def plot_reconstruction(steps: Sequence[PruneStep], path: str | os.PathLike) -> Path | None:
    """The last step's per-layer relative calibration error before (grey) and after (blue) the refit."""
    layers = next((s.reconstruction.layers for s in reversed(steps)
                   if s.reconstruction is not None and s.reconstruction.layers), None)
    rows = [layer for layer in layers or [] if _num(layer.error_before) is not None
            and _num(layer.error_after) is not None]
    if not rows:
        return None
    import numpy as np

    before = np.array([layer.error_before for layer in rows], float)
    after = np.array([layer.error_after for layer in rows], float)
    x = np.arange(len(rows))
    fig, ax = _figure(max(6.0, 0.3 * len(rows) + 2), 4.0)
    ax.bar(x - 0.2, before, width=0.4, color="#d9d9d9", label="pruned")
    ax.bar(x + 0.2, after, width=0.4, color=PRUNED_COLOR, label="+ reconstruction")
    heldout = np.array([np.nan if layer.heldout_after is None else layer.heldout_after for layer in rows], float)
    if np.isfinite(heldout).any():  # the refit's result on images it never saw, through the whole model
        ax.plot(x + 0.2, heldout, "k_", markersize=10, markeredgewidth=2, label="+ reconstruction, held-out")
    step = math.ceil(len(rows) / 40)
    ax.set_xticks(x[::step], [layer.name for layer in rows][::step], rotation=90, fontsize=7)
    ax.set_ylabel("relative output error (calibration)")
    ax.set_title("Per-layer error before and after least-squares reconstruction", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path))


def plot_finetune(steps: Sequence[FinetuneStep], path: str | os.PathLike,
                  dense_top1: float | None = None) -> Path | None:
    """Validation top-1 per epoch, cascade steps one after another on one axis; dense top-1 dashed."""
    series, start = [], 0
    for i, step in enumerate(steps, 1):
        points = [_num(h.get("val_top1")) for h in step.history]
        if any(p is not None for p in points):
            series.append((i, step.keep, list(range(start + 1, start + len(points) + 1)), points))
        start += len(points)
    if not series:
        return None
    fig, ax = _figure(7, 4)
    for i, keep, epochs, points in series:
        keep_text = f"keep {_fixed(keep, 2)}" if keep is not None else ""
        ax.plot(epochs, [float("nan") if p is None else p for p in points], marker="o", markersize=4,
                label=f"step {i} {keep_text}".strip())
        if i > 1:
            ax.axvline(epochs[0] - 0.5, color="#bbbbbb", linewidth=0.8)
    if _num(dense_top1) is not None:
        ax.axhline(dense_top1, color="black", linestyle="--", linewidth=1, label=f"dense {dense_top1:.2f} %")
    ax.set_xlabel("epoch (cascade steps in order)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Fine-tuning: validation top-1 per epoch", fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, Path(path))


def plot_accuracy_vs_macs(rows: Sequence[Mapping], path: str | os.PathLike, title: str = "Top-1 vs MACs",
                          xlabel: str = "MACs ratio (dense ÷ pruned)") -> Path:
    """One line per `method` of top-1 (%) against `macs_ratio`, from dicts {method, macs_ratio, top1}."""
    methods: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        x, y = _num(row.get("macs_ratio")), _num(row.get("top1"))
        if x is not None and y is not None:
            methods.setdefault(str(row.get("method", "?")), []).append((x, y))
    fig, ax = _figure(6.5, 4.5)
    markers = "osD^vP*X"
    for i, (method, points) in enumerate(methods.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=markers[i % len(markers)],
                markersize=5, label=method)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if methods:
        ax.legend(fontsize=8)
    return _save(fig, Path(path))


# ----------------------------------------------------------------------------- report


PLOTS: dict[str, Callable[[Report, Path], Path | None]] = {
    "latency": lambda r, p: plot_latency(r.targets or [], p),
    "widths": lambda r, p: plot_widths(r.prune.groups, p),
    "reconstruction": lambda r, p: plot_reconstruction(r.prune.steps, p),
    "finetune": lambda r, p: plot_finetune(r.finetune.steps, p, r.accuracy.top1("dense")),
}


def write_report(report: Report | Mapping, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.md and the plots for the sections present into out_dir (atomically).

    Returns {"report": report.md, "latency"/"widths"/"finetune": png} for the files written. A plot that
    cannot be drawn (no matplotlib, odd data) becomes a warning in report.md instead of an exception."""
    report, out_dir = as_report(report), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    warnings: list[str] = []
    for name, draw in PLOTS.items():
        path = out_dir / f"{name}.png"
        try:
            written = draw(report, path)
        except ImportError:
            warnings.append("Plots skipped: matplotlib is not installed (install pfp-deploy[report]).")
            break
        except Exception as exc:  # a plotting bug must not lose the report of a long run
            warnings.append(f"{name} plot failed: {type(exc).__name__}: {exc}")
            written = None
        if written is not None:
            plots[name] = written
        else:  # a stale plot from an earlier run would contradict this report
            path.unlink(missing_ok=True)
    md_path = out_dir / "report.md"
    with atomic_open(md_path) as f:
        f.write(render_markdown(report, plots, warnings))
    return {"report": md_path, **plots}


# ----------------------------------------------------------------------------- terminal


def _clip(line: str, width: int = 100) -> str:
    return line if len(line) <= width else line[:width - 3] + "..."


def format_summary(report: Report | Mapping, run_dir: str | os.PathLike | None = None) -> str:
    """Plain-text summary of a run for the terminal (ASCII only, at most 30 lines)."""
    report = as_report(report)
    lines = [f"pfp-deploy {report.name}: {report.status.upper()} (exit code "
             f"{'?' if report.exit_code is None else report.exit_code})"]
    if report.message:
        lines.append("  " + " ".join(report.message.split()))
    model = report.model
    for label, dense, pruned in (("params", model.params_dense, model.params_pruned),
                                 ("MACs  ", model.macs_dense, model.macs_pruned)):
        if dense is not None:
            ratio, reduction = _ratio(dense, pruned)
            tail = f"  ({ratio:.2f}x, -{reduction:.1f} %)" if ratio else ""
            lines.append(f"  {label}  {_count(dense)} -> {_count(pruned)}{tail}")
    accuracy = report.accuracy
    dense_top1, final = accuracy.top1("dense"), accuracy.final_step()
    if dense_top1 is not None or final:
        final_top1 = accuracy.top1(final) if final else None
        drop = f"  (drop {dense_top1 - final_top1:.2f} pts)" \
            if dense_top1 is not None and final_top1 is not None else ""
        where = dict(ACCURACY_STEPS).get(final, "").lstrip("+ ").lower() if final else ""
        lines.append(f"  top-1   {_fixed(dense_top1)} % -> {_fixed(final_top1)} %{drop}"
                     + (f" after {where}" if where else ""))
    if report.data.meaningful_accuracy is False:
        lines.append("  WARNING: synthetic data, accuracy figures are not meaningful")
    targets = report.targets
    if targets:
        lines.append(f"targets ({len(targets)}): {_tally(t.status for t in targets)}")
        for t in targets[:MAX_SUMMARY_TARGETS]:
            speed = f"{t.speedup:.2f}x" if _num(t.speedup) else "-"
            efficiency = t.efficiency_or_derived()
            detail = (f"eff {efficiency:.2f}" if efficiency is not None else "") if t.status == "passed" else t.reason
            lines.append(_clip(f"  {t.status:<8} {t.name:<20} {speed:>7}  {detail}"))
        if len(targets) > MAX_SUMMARY_TARGETS:
            lines.append(f"  ... and {len(targets) - MAX_SUMMARY_TARGETS} more (see report.md)")
    checks = report.checks
    if checks:
        failed = [c.name for c in checks if c.status == "failed"]
        lines.append(_clip(f"checks ({len(checks)}): {_tally(c.status for c in checks)}"
                           + (f"; failed: {', '.join(failed)}" if failed else "")))
    run_dir = run_dir or report.run_dir
    if run_dir:
        lines.append(f"run dir: {run_dir}")
        lines.append(f"report:  {Path(run_dir) / 'report.md'}")
    return "\n".join(_clip(line, 120) for line in lines)  # at most 23 lines by construction


def _tally(statuses) -> str:
    counts: dict[str, int] = {}
    for s in statuses:
        counts[str(s)] = counts.get(str(s), 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def write_markdown(report: Mapping, run_dir: Path, plots: bool = True) -> None:
    """report.md in `run_dir`, with its plots unless plots=False."""
    if plots:
        write_report(report, run_dir)
    else:
        write_text_atomic(run_dir / "report.md", render_markdown(report))
