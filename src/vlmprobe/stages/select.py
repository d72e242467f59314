"""Stage `select`: the plan's decisions (E-P4.4, E-P4.7, section 5.3) for this run alone ->
`metrics/select.json`. Decisions across runs (experiments) are `vlmprobe compare`'s.

Reads exactly the metrics files named on the command line (dvc.yaml lists the same as deps).
Inference speed is relative to the Qwen2.5-VL baseline measured on the same machine; a single
run has no baseline unless it is one, so its speed is "not measured" here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlmprobe.errors import stage_main
from vlmprobe.io import read_json, write_json
from vlmprobe.models.registry import RegistryEntry, get_entry
from vlmprobe.params import load_params, require_name
from vlmprobe.report.spatial import plan
from vlmprobe.select.criteria import Measurement
from vlmprobe.select.decide import decide
from vlmprobe.select.measure import METRICS_FILES, build_run, declared_complexity

PARAMS = ("vlm", "select")
FILE_NAMES = {Path(path).name: name for name, path in METRICS_FILES.items()}


def validate(params: dict) -> dict:
    entry = get_entry(require_name(params, "vlm"))
    declared_complexity(entry)  # a malformed declaration fails here, before any work
    baseline = require_name(params, "select.speed_baseline")
    return {"entry": entry, "speed_baseline": get_entry(baseline, "select.speed_baseline")}


def read_metrics(paths: list[Path]) -> dict[str, dict | None]:
    """Metrics file kind (probe, align, ...) -> content; None for a kind not given."""
    files: dict[str, dict | None] = dict.fromkeys(METRICS_FILES)
    for path in paths:
        if path.name not in FILE_NAMES:
            raise SystemExit(f"error: {path} is not a metrics file this stage reads; expected "
                             f"one of {', '.join(FILE_NAMES)}. Fix: the select stage in dvc.yaml.")
        files[FILE_NAMES[path.name]] = read_json(path)
    return files


def own_speed(entry: RegistryEntry, baseline: RegistryEntry, files: dict) -> tuple:
    if entry.name == baseline.name and files["extract"] is not None:
        return Measurement(1.0, None, f"this run is the {baseline.name} baseline"), ""
    return None, (f"no {baseline.name} baseline in a single run: `vlmprobe compare` relates it "
                  "to a baseline experiment on the same machine")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("metrics", type=Path, nargs="+", help="metrics files to decide from")
    parser.add_argument("--out", type=Path, default=Path("metrics/select.json"))
    args = parser.parse_args(argv)
    config = validate(load_params(PARAMS))
    entry = config["entry"]
    files = read_metrics(args.metrics)
    measured = (files["probe"] or {}).get("meta", {}).get("vlm")
    if measured not in (None, entry.name):
        raise SystemExit(f"error: metrics/probe.json is for {measured!r}, params say "
                         f"{entry.name!r}. Fix: `dvc repro` (it re-runs extract and probe first).")
    run = build_run(entry.name, entry.name, entry, files,
                    own_speed(entry, config["speed_baseline"], files))
    write_json(args.out, decide([run], [run.name], plan(),
                                scope=f"this run alone ({entry.name}, kind {run.kind})"))


if __name__ == "__main__":
    sys.exit(stage_main(main))
