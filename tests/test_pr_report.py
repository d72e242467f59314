"""`vlmprobe pr-report` in a temporary git repository with two commits: the markdown has the
metrics and params diffs and links every rendered figure, all offline."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from conftest import run

STAGE = '''
import json, os, yaml
v = yaml.safe_load(open("params.yaml"))["score"]
os.makedirs("metrics", exist_ok=True); os.makedirs("plots", exist_ok=True)
json.dump({"points": {"a": {"bbox_iou": v}}}, open("metrics/probe.json", "w"))
open("plots/points.csv", "w").write(f"name,bbox_iou\\na,{v}\\nb,{v / 2}\\n")
open("plots/curve.csv", "w").write(f"step,loss\\n0,1.0\\n1,{1 - v}\\n")
open("plots/figure.png", "wb").write(b"\\x89PNG\\r\\n\\x1a\\n" + str(v).encode())
'''
DVC_YAML = {"stages": {"probe": {
    "cmd": "python stage.py", "deps": ["stage.py"], "params": ["score"],
    "metrics": [{"metrics/probe.json": {"cache": False}}],
    "plots": [{"plots/points.csv": {"cache": False, "template": "bar_horizontal",
                                    "x": "bbox_iou", "y": "name"}},
              {"plots/curve.csv": {"cache": False, "x": "step", "y": "loss"}},
              {"plots/figure.png": {"cache": False}}],
}}}


def test_report_against_main_has_diffs_and_figures(tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["dvc", "init", "-q"], repo)
    (repo / "stage.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (repo / "params.yaml").write_text("score: 0.25\n")
    run(["dvc", "repro", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "base"], repo)
    run(["git", "checkout", "-qb", "change"], repo)
    (repo / "params.yaml").write_text("score: 0.5\n")
    run(["dvc", "repro", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "change"], repo)

    run(["vlmprobe", "pr-report", "--base", "main", "--out", "report"], repo)
    markdown = (repo / "report/report.md").read_text()
    metric_row = r"\| metrics/probe\.json\s*\| points\.a\.bbox_iou\s*\| 0\.25\s*\| 0\.5"
    assert re.search(metric_row, markdown)
    assert re.search(r"\| params\.yaml\s*\| score\s*\| 0\.25\s*\| 0\.5", markdown)
    links = re.findall(r"!\[[^]]*\]\((figures/[^)]+)\)", markdown)
    assert len(links) == 4  # two data plots, the image plot at both revisions
    for link in links:
        assert (repo / "report" / link).stat().st_size > 0
    assert (repo / "report/figures/plots_points.csv.png").read_bytes()[:4] == b"\x89PNG"
