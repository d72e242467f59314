"""Stage `report`: the plan's spatial deliverable, a markdown report and the figure, with the
grounding and VQA results of the `ground` stage. It reads no params: the model is the one
`metrics/probe.json` is of."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from vlmprobe.errors import StaleInput, stage_main
from vlmprobe.io import read_json, recorded_model, write_text
from vlmprobe.report.figures import metrics_by_point
from vlmprobe.report.spatial import PANELS, spatial_markdown, spatial_summary

PARAMS = ()


def validate(params: dict) -> None:
    """Nothing to check: the stage reads no params (`vlmprobe validate` calls every stage's)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", type=Path, required=True, help="the probe stage's")
    parser.add_argument("--data-metrics", type=Path, required=True)
    parser.add_argument("--ground", type=Path, required=True)
    parser.add_argument("--probe-plots", type=Path, required=True,
                        help="the probe stage's figures, linked from the report")
    parser.add_argument("--results", type=Path, required=True,
                        help="directory of the <vlm>-spatial.{yaml,md} deliverables")
    parser.add_argument("--figure", type=Path, required=True)
    args = parser.parse_args(argv)
    metrics = read_json(args.metrics)
    vlm = recorded_model(metrics.get("meta"), args.metrics)
    ground = read_json(args.ground) if args.ground.exists() else None
    if ground is not None and recorded_model(ground.get("meta"), args.ground) != vlm:
        raise StaleInput(f"{args.ground} is for {ground['meta']['vlm']!r}, {args.metrics} for "
                         f"{vlm!r}. Fix: `dvc repro` (it re-runs the stale stage first).")
    summary = spatial_summary(metrics, ground)
    metrics_by_point(metrics, PANELS, f"{summary['model']}: spatial probes by point", args.figure)
    figures = {
        "metrics by extraction point": args.figure,
        "predicted vs ground-truth boxes": args.probe_plots / "boxes.png",
        "reconstructions": args.probe_plots / "reconstructions.png",
    }
    links = {label: os.path.relpath(path, args.results) for label, path in figures.items()}
    write_text(args.results / f"{vlm}-spatial.yaml", yaml.safe_dump(summary, sort_keys=False))
    data = read_json(args.data_metrics) if args.data_metrics.exists() else None
    write_text(args.results / f"{vlm}-spatial.md",
               spatial_markdown(summary, metrics, links, data))


if __name__ == "__main__":
    sys.exit(stage_main(main))
