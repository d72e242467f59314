"""`vlmprobe`: check params, list models, compare runs and report on pull requests.

    vlmprobe validate   every stage's params, in seconds, before `dvc repro` loads anything
    vlmprobe models     the registered models and their extraction points
    vlmprobe compare    every run (workspace, experiments) decided on together: results/p4/*.md
    vlmprobe pr-report  metrics, params and plots against a base revision, offline: report/
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import yaml

from vlmprobe.models.registry import RegistryError, entries
from vlmprobe.params import ParamsError, get, load_params


def stage_modules(dvc_yaml: Path) -> dict[str, str]:
    """Stage name -> the `vlmprobe.stages` module its command runs."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {
        name: stage["cmd"].split("-m ", 1)[1].split()[0]
        for name, stage in stages.items()
        if "-m vlmprobe.stages." in stage["cmd"]
    }


def validate(params_file: Path, dvc_yaml: Path) -> list[str]:
    """Run every stage's own param validation; return the error messages."""
    errors = []
    for stage, module_name in stage_modules(dvc_yaml).items():
        module = importlib.import_module(module_name)
        try:
            module.validate(load_params(module.PARAMS, params_file))
        except (ParamsError, RegistryError) as e:
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
    args = parser.parse_args(argv)
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
