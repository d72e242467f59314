"""Stage `select`: the plan's decisions (E-P4.4, E-P4.7, section 5.3) for this run alone ->
`metrics/select.json`. Decisions across runs (experiments) are `vlmprobe compare`'s.

Reads exactly the metrics files named on the command line (dvc.yaml lists the same as deps);
the model is the one `metrics/probe.json` is of (its `meta.vlm`), not the `vlm` param.
Inference speed is relative to the Qwen2.5-VL baseline measured on the same machine; a single
run has no baseline unless it is one, so its speed is "not measured" here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlmprobe.errors import MissingInput, stage_main
from vlmprobe.io import read_json, recorded_model, write_json
from vlmprobe.models.registry import RegistryEntry, get_entry
from vlmprobe.params import load_params, require_name
from vlmprobe.report.spatial import plan
from vlmprobe.select.criteria import Measurement
from vlmprobe.select.decide import decide
from vlmprobe.select.measure import METRICS_FILES, build_run, declared_complexity

PARAMS = ("select",)
FILE_NAMES = {Path(path).name: name for name, path in METRICS_FILES.items()}


def validate(params: dict) -> dict:
    baseline = require_name(params, "select.speed_baseline")
    return {"speed_baseline": get_entry(baseline, "select.speed_baseline")}


def measured_entry(files: dict[str, dict | None], paths: list[Path]) -> RegistryEntry:
    """The registry entry of the model the probe metrics are of."""
    if files["probe"] is None:
        raise MissingInput(f"no {METRICS_FILES['probe']} among {', '.join(map(str, paths))}: "
                           "it names the model this stage decides on. Fix: the select stage "
                           "in dvc.yaml.")
    probe = [p for p in paths if FILE_NAMES[p.name] == "probe"][-1]  # the one read_metrics kept
    entry = get_entry(recorded_model(files["probe"].get("meta"), probe))
    declared_complexity(entry)  # a malformed declaration fails here, before any decision
    return entry


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
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    config = validate(load_params(PARAMS))
    files = read_metrics(args.metrics)
    entry = measured_entry(files, args.metrics)
    run = build_run(entry.name, entry.name, entry, files,
                    own_speed(entry, config["speed_baseline"], files))
    write_json(args.out, decide([run], [run.name], plan(),
                                scope=f"this run alone ({entry.name}, kind {run.kind})"))


if __name__ == "__main__":
    sys.exit(stage_main(main))
