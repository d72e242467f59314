"""`vlmprobe`: check params and list models without running the pipeline.

    vlmprobe validate   every stage's params, in seconds, before `dvc repro` loads anything
    vlmprobe models     the registered models and their extraction points
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import yaml

from vlmprobe.models.registry import RegistryError, entries
from vlmprobe.params import ParamsError, load_params


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmprobe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("validate", help="check params.yaml against every stage")
    check.add_argument("--params", type=Path, default=Path("params.yaml"))
    check.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"))
    sub.add_parser("models", help="list registered models and their points")
    args = parser.parse_args(argv)
    if args.command == "models":
        print(list_models())
        return 0
    errors = validate(args.params, args.dvc_yaml)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if not errors:
        print("params.yaml is valid for every stage")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
