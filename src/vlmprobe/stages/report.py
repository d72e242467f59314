"""Stage `report`: the plan's spatial deliverable, a markdown report and the figure."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from vlmprobe.io import read_json, write_text
from vlmprobe.models.registry import RegistryError, get_entry
from vlmprobe.params import ParamsError, get, load_params
from vlmprobe.report.figures import bbox_iou_by_point
from vlmprobe.report.spatial import spatial_markdown, spatial_summary

PARAMS = ("vlm",)


def validate(params: dict) -> dict:
    return {"vlm": get_entry(get(params, "vlm")).name}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", type=Path, default=Path("metrics/probe.json"))
    parser.add_argument("--results", type=Path, default=Path("results/p4"))
    parser.add_argument("--figure", type=Path, default=Path("plots/report/bbox_iou_by_point.png"))
    args = parser.parse_args(argv)
    try:
        vlm = validate(load_params(PARAMS))["vlm"]
    except (ParamsError, RegistryError) as e:
        raise SystemExit(f"error: {e}") from None
    metrics = read_json(args.metrics)
    if metrics["meta"]["vlm"] != vlm:
        raise SystemExit(
            f"error: {args.metrics} is for {metrics['meta']['vlm']!r}, params say {vlm!r}. "
            "Fix: `dvc repro` (it re-runs extract and probe first)."
        )
    summary = spatial_summary(metrics)
    bbox_iou_by_point(metrics, f"{summary['model']}: bbox probe", args.figure)
    figure_link = os.path.relpath(args.figure, args.results)
    write_text(args.results / f"{vlm}-spatial.yaml", yaml.safe_dump(summary, sort_keys=False))
    write_text(args.results / f"{vlm}-spatial.md", spatial_markdown(summary, metrics, figure_link))


if __name__ == "__main__":
    sys.exit(main())
