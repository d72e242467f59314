"""Stage `report`: the plan's spatial deliverable, a markdown report and the figure, with the
grounding and VQA results of the `ground` stage."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from vlmprobe.errors import stage_main
from vlmprobe.io import read_json, write_text
from vlmprobe.params import load_params, require_name
from vlmprobe.report.figures import metrics_by_point
from vlmprobe.report.spatial import COLUMNS, spatial_markdown, spatial_summary

PARAMS = ("vlm",)
PROBE_PLOTS = Path("plots/probe")  # the probe stage's figures, linked from the report


def validate(params: dict) -> str:
    """The registry entry name; whether it exists is the extract stage's check."""
    return require_name(params, "vlm")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", type=Path, default=Path("metrics/probe.json"))
    parser.add_argument("--data-metrics", type=Path, default=Path("metrics/data.json"))
    parser.add_argument("--ground", type=Path, default=Path("metrics/ground.json"))
    parser.add_argument("--results", type=Path, default=Path("results/p4"))
    parser.add_argument("--figure", type=Path, default=Path("plots/report/metrics_by_point.png"))
    args = parser.parse_args(argv)
    vlm = validate(load_params(PARAMS))
    metrics = read_json(args.metrics)
    if metrics["meta"]["vlm"] != vlm:
        raise SystemExit(
            f"error: {args.metrics} is for {metrics['meta']['vlm']!r}, params say {vlm!r}. "
            "Fix: `dvc repro` (it re-runs extract and probe first)."
        )
    ground = read_json(args.ground) if args.ground.exists() else None
    if ground is not None and ground["meta"]["vlm"] != vlm:
        raise SystemExit(f"error: {args.ground} is for {ground['meta']['vlm']!r}, params say "
                         f"{vlm!r}. Fix: `dvc repro` (it re-runs the ground stage first).")
    summary = spatial_summary(metrics, ground)
    panels = {k: label for k, (label, _) in COLUMNS.items() if k != "map"}
    metrics_by_point(metrics, panels, f"{summary['model']}: spatial probes by point", args.figure)
    figures = {
        "metrics by extraction point": args.figure,
        "predicted vs ground-truth boxes": PROBE_PLOTS / "boxes.png",
        "reconstructions": PROBE_PLOTS / "reconstructions.png",
    }
    links = {label: os.path.relpath(path, args.results) for label, path in figures.items()}
    write_text(args.results / f"{vlm}-spatial.yaml", yaml.safe_dump(summary, sort_keys=False))
    data = read_json(args.data_metrics) if args.data_metrics.exists() else None
    write_text(args.results / f"{vlm}-spatial.md",
               spatial_markdown(summary, metrics, links, data))


if __name__ == "__main__":
    sys.exit(stage_main(main))
