"""`vlmprobe`: check params, list models, compare runs and report on pull requests.

    vlmprobe validate   every stage's params, in seconds, before `dvc repro` loads anything
    vlmprobe models     the registered models and their extraction points
    vlmprobe compare    every run (workspace, experiments) decided on together: results/p4/*.md
    vlmprobe pr-report  metrics, params and plots against a base revision, offline: report/
    vlmprobe doctor     a checkpoint's own code, shrunk, through a real load: every point, CPU
    vlmprobe pin        pin a hub entry to its repo's current commit, in the project's pins.yaml
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

import yaml

from vlmprobe.models.registry import RegistryError, entries
from vlmprobe.params import (
    ParamsError,
    check_keys,
    committed_params,
    get,
    load_params,
    read_params_file,
)


def stage_modules(dvc_yaml: Path) -> dict[str, str]:
    """Stage name -> the `vlmprobe.stages` module its command runs."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {
        name: stage["cmd"].split("-m ", 1)[1].split()[0]
        for name, stage in stages.items()
        if "-m vlmprobe.stages." in stage["cmd"]
    }


def validate(params_file: Path, dvc_yaml: Path) -> list[str]:
    """Every check a stage makes on its params, without loading a model; the error messages.

    First the file (YAML, unknown and missing keys against the committed params.yaml), as each
    stage's `load_params` refuses those before anything else; then each stage's `validate`.
    Stages that name extraction points (their `validate` takes `points`) are checked against
    the points the extract stage will write, as they are against its feature store when run.
    """
    from vlmprobe.data.coco import SourceError
    from vlmprobe.models.base import WeightsUnavailable

    schema = committed_params(dvc_yaml.parent.resolve())
    try:
        check_keys(read_params_file(params_file), schema)
    except ParamsError as e:
        return str(e).splitlines()
    errors, configs = [], {}
    for stage, module_name in stage_modules(dvc_yaml).items():
        module = importlib.import_module(module_name)
        upstream = {}
        if "points" in inspect.signature(module.validate).parameters:
            upstream["points"] = configs.get("extract", {}).get("points")
        try:
            params = load_params(module.PARAMS, params_file, schema)
            configs[stage] = module.validate(params, **upstream)
        except (ParamsError, RegistryError, WeightsUnavailable, SourceError) as e:
            errors.append(f"{stage}: {e}")
    return errors


def list_models() -> str:
    lines = []
    for name, entry in entries().items():
        lines.append(f"{name:24s} {entry.family:12s} {entry.display_name}")
        lines.append(f"{'':24s} points: {', '.join(entry.points)}")
    return "\n".join(lines)


def compare(args: argparse.Namespace) -> int:
    # Imported here: these load matplotlib, and `validate` must stay quick.
    from vlmprobe.compare.deliverables import DOCUMENTS, write_deliverables
    from vlmprobe.compare.gather import exp_show, git_reader
    from vlmprobe.dvc_run import DvcError

    try:
        baseline = args.speed_baseline or get(load_params(["select"], args.params),
                                              "select.speed_baseline")
        result = write_deliverables(exp_show(Path.cwd()), git_reader(Path.cwd()), args.out,
                                    args.kinds, baseline)
    except (DvcError, ParamsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name in DOCUMENTS:
        print(args.out / name)
    decision = result["recommendation"]
    print(f"E-P4.7: {decision.get('action') or decision['status']}")
    return 0


def pr_report(args: argparse.Namespace) -> int:
    from vlmprobe.dvc_run import DvcError
    from vlmprobe.pr_report import report

    try:
        report(Path.cwd(), args.base, args.out, args.figure_url)
    except DvcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(args.out / "report.md")
    return 0


def doctor(args: argparse.Namespace) -> int:
    from vlmprobe.models.base import WeightsUnavailable
    from vlmprobe.models.doctor import CannotShrink, run_doctor

    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    try:
        return run_doctor(args.entry, args.local, dtypes, Path.cwd())
    except (RegistryError, WeightsUnavailable, CannotShrink) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def pin(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from vlmprobe.models.pins import HubUnreachable, pin_entry

    try:
        print(pin_entry(args.entry, Path.cwd()))
    except HubUnreachable as e:
        print(f"vlmprobe pin: {e}", file=sys.stderr)  # one line: the usual case, not a crash
        return 3
    except (RegistryError, HfHubHTTPError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmprobe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("validate", help="check params.yaml against every stage")
    check.add_argument("--params", type=Path, default=Path("params.yaml"))
    check.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"))
    sub.add_parser("models", help="list registered models and their points")
    cmp = sub.add_parser("compare", help="decide across all runs; write results/p4/*.md")
    cmp.add_argument("--out", type=Path, default=Path("results/p4"))
    cmp.add_argument("--kinds", nargs="+", default=["vlm"],
                     help="registry kinds that are candidates (default: vlm)")
    cmp.add_argument("--speed-baseline", help="registry entry for inference speed "
                     "(default: params.yaml select.speed_baseline)")
    cmp.add_argument("--params", type=Path, default=Path("params.yaml"))
    pr = sub.add_parser("pr-report", help="metrics/params/plots diff against a base, offline")
    pr.add_argument("--base", default="main", help="git revision to compare with")
    pr.add_argument("--out", type=Path, default=Path("report"))
    pr.add_argument("--figure-url", help="prefix for figure links (CI); default figures/")
    doc = sub.add_parser("doctor", help="check a checkpoint's own code on CPU before GPU hours")
    doc.add_argument("entry", help="registry entry (its family and points)")
    doc.add_argument("--local", type=Path, help="checkpoint folder (default: the entry's own)")
    doc.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    pins = sub.add_parser("pin", help="pin a hub entry's revision to its repo's current commit")
    pins.add_argument("entry", help="registry entry with weights.source: hub")
    args = parser.parse_args(argv)
    if args.command == "pin":
        return pin(args)
    if args.command == "doctor":
        return doctor(args)
    if args.command == "models":
        print(list_models())
        return 0
    if args.command == "compare":
        return compare(args)
    if args.command == "pr-report":
        return pr_report(args)
    errors = validate(args.params, args.dvc_yaml)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if not errors:
        print("params.yaml is valid for every stage")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
