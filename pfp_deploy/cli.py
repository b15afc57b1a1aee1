"""`pfp-deploy`: the command line over pfp_deploy.pipeline. `main(argv) -> exit code` (see pfp_deploy.errors)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from pfp_deploy.errors import EXIT_CHECK_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_STAGE_FAILED, PFPDeployError

DESCRIPTION = """\
Prune a PyTorch CNN with Provable Filter Pruning, fine-tune it, export it to ONNX / OpenVINO and
check accuracy and latency gates on the deployment targets, all driven by one YAML recipe.
Outputs go to <output-dir>/<recipe name>/ (report.json, report.md, model.pt, model.onnx, ...)."""

EPILOG = """\
examples:
  # the 15-minute quickstart: train ResNet-20 on Fashion-MNIST, prune 50% of its MACs, gate it
  pfp-deploy optimize --recipe recipes/fashion_mnist_quickstart.yaml

  # change any recipe key from the command line (values are YAML)
  pfp-deploy optimize --recipe recipes/resnet50_edge.yaml --set data.root=/data/imagenet \\
      --set finetune.epochs=2 --set 'prune.schedule=[0.7, 0.5]'

  # check a recipe without running it: prints the resolved recipe or every problem (exit 2)
  pfp-deploy validate recipes/resnet50_edge.yaml

  # continue an interrupted run, or start it over
  pfp-deploy optimize --recipe R --resume      |   pfp-deploy optimize --recipe R --overwrite

  # on the edge box: benchmark a run directory made elsewhere, then gate its report in CI
  pfp-deploy benchmark --run-dir runs/resnet50_edge --target openvino-cpu
  pfp-deploy check --report runs/resnet50_edge/report.json

  # one-shot pruning without a recipe
  pfp-deploy prune --model resnet20 --data synthetic --keep 0.5

  # distributed (one process per GPU; only rank 0 writes)
  torchrun --nproc_per_node=4 -m pfp_deploy.cli optimize --recipe R

exit codes: 0 all checks passed, 1 a check failed (report written), 2 invalid recipe or usage,
            3 a stage failed (report written up to it), 130 interrupted (continue with --resume)"""

log = logging.getLogger("pfp_deploy")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error, already printed by argparse (2)
        return int(exc.code or 0)
    _log_to_stderr(quiet=args.quiet)
    try:
        return args.command(args)
    except KeyboardInterrupt:
        print("\ninterrupted (exit 130); rerun with --resume to continue from the last finished step",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except PFPDeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - a bug: keep the traceback, show one line
        log_file = _crash_log(args, exc)
        print(f"error: unexpected {type(exc).__name__}: {exc} (traceback in {log_file})", file=sys.stderr)
        return EXIT_STAGE_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfp-deploy", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final summary")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(name: str, run: Callable, help: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="only warnings and the final summary")
        p.set_defaults(command=run)
        return p

    p = command("optimize", cmd_optimize, "run a recipe: prune, fine-tune, export, benchmark, check, report",
                "pfp-deploy optimize --recipe recipes/fashion_mnist_quickstart.yaml --set finetune.epochs=1")
    _recipe_args(p, positional=False)
    _run_args(p)
    p.add_argument("--json", action="store_true", help="print report.json to stdout (logs stay on stderr)")

    p = command("validate", cmd_validate, "check a recipe; print it with every default filled in",
                "pfp-deploy validate recipes/resnet50_edge.yaml --set prune.keep=0.4")
    _recipe_args(p, positional=True)

    p = command("prune", cmd_prune, "prune only (no fine-tuning, export or benchmarks): from a recipe, or "
                "one-shot from --model/--data/--keep", "pfp-deploy prune --model resnet20 --data synthetic --keep 0.5")
    p.add_argument("--recipe", help="recipe to run up to pruning (its schedule without fine-tuning); "
                   "--keep, --name and --data-root then override its prune.keep, name and data.root, and "
                   "--model/--weights/--data are refused (use --set model.name=... etc.)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe key (repeatable; wins over --keep/--name/--data-root)")
    p.add_argument("--model", help="builtin (resnet20, vgg_small) or torchvision name, e.g. resnet18 "
                   "(one-shot only)")
    p.add_argument("--weights", help="torchvision weights tag or a state_dict file for --model (one-shot only)")
    p.add_argument("--data", metavar="FORMAT", help="calibration data format (one-shot only): synthetic, "
                   "fashion_mnist, imagefolder, or one registered in pfp_deploy.data_formats")
    p.add_argument("--data-root", help="dataset directory (imagefolder; fashion_mnist has a default); "
                   "with --recipe: data.root")
    p.add_argument("--keep", type=float, help="fraction of the MACs to keep, e.g. 0.5; with --recipe: prune.keep")
    p.add_argument("--name", help="run name (default: <model>_keep<keep>); with --recipe: the recipe's name")
    _run_args(p)

    p = command("export", cmd_export, "re-export a run's dense and pruned models to ONNX / OpenVINO",
                "pfp-deploy export --run-dir runs/fashion_mnist_quickstart")
    p.add_argument("--run-dir", required=True, help="a run directory written by `pfp-deploy optimize`")
    _factory_arg(p)

    p = command("benchmark", cmd_benchmark, "measure a run directory's targets on this host and update its "
                "report (exit 1 when a gate fails)", "pfp-deploy benchmark --run-dir runs/resnet50_edge "
                "--target openvino-cpu")
    p.add_argument("--run-dir", required=True, help="a run directory (may come from another machine)")
    p.add_argument("--target", action="append", metavar="NAME", help="only this recipe target (repeatable)")
    _factory_arg(p)
    p.add_argument("--json", action="store_true", help="print the updated report.json to stdout")

    p = command("check", cmd_check, "re-check the gates of a report.json (no runtimes needed; exit 1 when a "
                "gate fails or the run did not pass, e.g. was interrupted; 2 for a malformed report)",
                "pfp-deploy check --report runs/resnet50_edge/report.json")
    p.add_argument("--report", required=True, help="report.json of a run")

    p = command("env", cmd_env, "show versions, CPU, GPU, ONNX Runtime providers and OpenVINO devices",
                "pfp-deploy env --json")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _recipe_args(p: argparse.ArgumentParser, positional: bool) -> None:
    if positional:
        p.add_argument("recipe", help="recipe YAML file")
    else:
        p.add_argument("--recipe", required=True, help="recipe YAML file (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe key, e.g. --set finetune.epochs=2 (repeatable; values are YAML)")


def _factory_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--factory", metavar="MODULE:CALLABLE",
                   help="for a run made from a factory model: the code that builds its architecture. A run "
                   "directory never makes pfp-deploy import code by itself; this imports and runs it.")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="runs", help="parent of the run directory (default: runs)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished step")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory of that name first")


# ---------------------------------------------------------------------------------------- commands

def cmd_optimize(args: argparse.Namespace) -> int:
    from pfp_deploy.pipeline import optimize

    result = optimize(args.recipe, args.overrides, output_dir=args.output_dir, resume=args.resume,
                      overwrite=args.overwrite, progress=not args.quiet and sys.stderr.isatty())
    return _finish(result, args.json)


def cmd_validate(args: argparse.Namespace) -> int:
    from pfp_deploy.recipe import load_recipe

    print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    from pfp_deploy.errors import UsageError
    from pfp_deploy.pipeline import optimize

    flags = {"--model": args.model, "--data": args.data, "--keep": args.keep}
    if args.recipe:
        recipe, overrides = args.recipe, recipe_flag_overrides(args) + list(args.overrides)
    elif all(v is not None for v in flags.values()):
        recipe, overrides = one_shot_recipe(args), args.overrides
    else:
        missing = ", ".join(k for k, v in flags.items() if v is None)
        raise UsageError(f"prune needs --recipe R, or --model, --data and --keep (missing: {missing}). "
                         "Example: pfp-deploy prune --model resnet20 --data synthetic --keep 0.5")
    result = optimize(recipe, overrides, output_dir=args.output_dir, resume=args.resume,
                      overwrite=args.overwrite, progress=not args.quiet and sys.stderr.isatty(),
                      stop_after="prune")
    return _finish(result, False)


def recipe_flag_overrides(args: argparse.Namespace) -> list[str]:
    """`prune --recipe R` flags as recipe overrides: --keep -> prune.keep, --name -> name, --data-root ->
    data.root (applied before --set, so an explicit --set wins). --model/--weights/--data choose what a
    one-shot prune builds and do not map onto a recipe's model/data sections: rejected with --recipe."""
    from pfp_deploy.errors import UsageError

    rejected = [flag for flag, value in (("--model", args.model), ("--weights", args.weights),
                                         ("--data", args.data)) if value is not None]
    if rejected:
        raise UsageError(f"{'/'.join(rejected)} cannot be combined with --recipe: they describe a one-shot "
                         "prune without a recipe. Change the recipe's model/data sections, or override them, "
                         "e.g. --set model.name=resnet18 --set data.format=synthetic")
    mapped = (("prune.keep", args.keep), ("name", args.name), ("data.root", args.data_root))
    return [f"{key}={json.dumps(value)}" for key, value in mapped if value is not None]


def one_shot_recipe(args: argparse.Namespace) -> dict:
    """The recipe behind `prune --model M --data D --keep K`: prune and save, nothing else."""
    from pfp_deploy.models import BUILTIN_MODELS

    model = {"source": "builtin" if args.model in BUILTIN_MODELS else "torchvision", "name": args.model}
    if args.weights:
        model["weights"] = args.weights
    data = {"format": args.data, **({"root": args.data_root} if args.data_root else {})}
    return {"version": 1, "name": args.name or f"{args.model}_keep{args.keep:g}", "model": model, "data": data,
            "prune": {"keep": args.keep}, "finetune": {"epochs": 0}, "export": {"formats": []},
            "checks": {"accuracy": {"max_drop": None}}}


def cmd_export(args: argparse.Namespace) -> int:
    from pfp_deploy.pipeline import export_run

    result = export_run(args.run_dir, factory=args.factory)
    for name, path in (result.report.get("export") or {}).get("files", {}).items():
        print(f"{name:16} {Path(args.run_dir) / path}")
    return EXIT_OK


def cmd_benchmark(args: argparse.Namespace) -> int:
    from pfp_deploy.pipeline import benchmark_run

    return _finish(benchmark_run(args.run_dir, args.target, factory=args.factory), args.json)


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 only when the run passed (status "passed", exit_code 0) and every gate holds on the stored
    numbers; 1 otherwise (e.g. an interrupted or failed run); 2 for a missing or malformed report."""
    from pfp_deploy.artifacts import load_report_json
    from pfp_deploy.checks import check_report

    path = Path(args.report)
    verdict = check_report(load_report_json(path), origin=str(path))
    for r in verdict.results:
        print(f"{r.status:8} {r.name:20} {r.reason}")
    for c in verdict.failed_checks:
        print(f"{'failed':8} {c['name']:20} {c.get('detail') or ''}")
    for problem in verdict.run_problems:
        print(f"{'failed':8} {'run':20} {problem}")
    print(f"{'PASSED' if verdict.passed else 'FAILED'}: {path}")
    return EXIT_OK if verdict.passed else EXIT_CHECK_FAILED


def cmd_env(args: argparse.Namespace) -> int:
    from pfp_deploy.environment import environment

    info = environment()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return EXIT_OK
    for key, value in info.items():
        if isinstance(value, dict):
            for k, v in value.items():
                print(f"{key}.{k:14} {v}")
        else:
            print(f"{key:22} {', '.join(map(str, value)) if isinstance(value, list) else value}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------- helpers

def _finish(result, as_json: bool) -> int:
    """Print the summary (stderr with --json, which prints the report on stdout) and return the exit code."""
    from pfp_deploy.report import format_summary

    if as_json:
        print(result.to_json())
    print(format_summary(result.report, result.run_dir), file=sys.stderr if as_json else sys.stdout)
    return result.exit_code


class _CurrentStderr(logging.StreamHandler):
    """Writes to sys.stderr as it is when a line is logged, not as it was when main() first ran: a
    caller that swaps stderr (a test runner's capture, an embedding tool) never leaves the handler
    pointing at a closed stream."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _log_to_stderr(quiet: bool) -> None:
    """pfp-deploy's own progress lines on stderr; other libraries' INFO chatter stays hidden."""
    if not log.handlers:
        handler = _CurrentStderr(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def _crash_log(args: argparse.Namespace, exc: BaseException) -> Path:
    """Write the traceback into the run directory when there is one, else into a fresh temp file.

    Atomic and never through a symlink (fileio): a planted error.log link is replaced, not followed,
    and a full disk leaves no empty file."""
    from pfp_deploy.fileio import write_text_atomic

    text = "".join(traceback.format_exception(exc))
    run_dir = Path(getattr(args, "run_dir", None) or "")
    if not getattr(args, "run_dir", None):
        recipe_name = _recipe_name(args)
        run_dir = Path(getattr(args, "output_dir", "runs")) / recipe_name if recipe_name else Path()
    try:
        if run_dir != Path() and run_dir.is_dir() and not run_dir.is_symlink():
            return write_text_atomic(run_dir / "error.log", text)
    except OSError:
        pass
    try:  # mkstemp: a new file (O_EXCL), so nothing planted in the temp dir is followed
        fd, name = tempfile.mkstemp(prefix="pfp-deploy-error-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return Path(name)
    except OSError:
        return Path("(not written: no writable directory)")


def _recipe_name(args: argparse.Namespace) -> str | None:
    try:
        from pfp_deploy.recipe import load_recipe

        return load_recipe(args.recipe, args.overrides).name if getattr(args, "recipe", None) else None
    except Exception:  # noqa: BLE001 - best effort while reporting another error
        return None


if __name__ == "__main__":  # torchrun -m pfp_deploy.cli ...
    sys.exit(main())
