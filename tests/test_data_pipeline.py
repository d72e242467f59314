"""The whole pipeline on fixture datasets in COCO and SSv2 format, run offline with the README's
own commands: a corrupt file stops it before extraction, then `skip` runs it to the report."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from conftest import QUICK_PARAMS, ROOT, make_project, run
from fixture_datasets import ANNOTATIONS, corrupt_coco, corrupt_video, make_coco, make_ssv2
from vlmprobe.data.coco import candidate_order

pytestmark = pytest.mark.slow


def readme_command(marker: str) -> str:
    """The README's bash block containing `marker`, as one command line (variables set by the
    test's environment, not the block's `NAME=/path/to/...` lines)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    block = next(b for b in blocks if marker in b)
    lines = [line for line in block.replace("\\\n", " ").splitlines()
             if line.strip() and not re.match(r"^[A-Z0-9_]+=/path/to/", line)]
    return "; ".join(lines)


def fails_before_extraction(project: Path, command: str, env: dict, expected: str) -> None:
    failed = run(["bash", "-c", command], project, check=False, env=env)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert expected in output and "Traceback" not in output
    assert "Running stage 'extract'" not in output


def skipped_and_reported(project: Path, vlm: str, expected: str) -> dict:
    data = json.loads((project / "metrics/data.json").read_text())
    assert data["skipped"]["count"] == 1 and expected in data["skipped"]["samples"][0]
    report = (project / f"results/p4/{vlm}-spatial.md").read_text()
    assert "## Skipped samples" in report and expected.split(": ")[0] in report
    return data


def test_coco_fixture(tmp_path):
    source = make_coco(tmp_path / "coco")
    victim = candidate_order(json.loads((source / ANNOTATIONS).read_text()), 0)[0]
    expected = corrupt_coco(source, victim, "truncated")
    project = make_project(tmp_path / "project", {
        "data.coco.n_train": 24, "data.coco.n_val": 8, "data.coco.n_test": 8,
        "data.coco.image_size": 224, "vlm": "pixels"})
    env = {**os.environ, "COCO": str(source)}
    fails_before_extraction(project, readme_command("data.dataset=coco"), env, expected)

    run(["bash", "-c", readme_command("data.on_bad_sample=skip")], project, env=env)
    data = skipped_and_reported(project, "pixels", expected)
    assert data["dataset"] == "coco"
    assert data["images"]["images"] == {"train": 24, "val": 8, "test": 8}
    probe = json.loads((project / "metrics/probe.json").read_text())
    bands = yaml.safe_load((project / "params.yaml").read_text())["probe"]["bands"]["bbox"]
    controls = probe["controls"]
    # pycocotools on the fixture's own ground truth: the oracle clears the band, its shuffle not.
    assert controls["oracle"]["bbox"]["iou"] >= bands["positive_min"]
    assert controls["oracle_shuffled"]["bbox"]["iou"] <= bands["negative_max"]
    assert controls["oracle"]["bbox"]["map50"] > 0.5 > controls["oracle_shuffled"]["bbox"]["map50"]
    assert probe["validity"]["bbox"]["valid"] is True


def test_ssv2_fixture(tmp_path):
    source = make_ssv2(tmp_path / "ssv2", n_videos=45)  # 36 directional: room to skip
    expected = corrupt_video(source, "50000", "truncated")
    # The images stay the synthetic shapes, which test_pipeline.py's `px` experiment (the same
    # shapes and model) runs every trained probe on: here they are off (QUICK_PARAMS); the clips,
    # the temporal probe and its controls are this test's.
    project = make_project(tmp_path / "project", {
        **QUICK_PARAMS,
        "data.ssv2.n_train": 16, "data.ssv2.n_val": 8, "data.ssv2.n_test": 8,
        "data.ssv2.image_size": 112, "data.ssv2.n_frames": 6, "vlm": "pixels"})
    env = {**os.environ, "SSV2": str(source)}
    fails_before_extraction(project, readme_command("data.dataset=ssv2"), env, expected)

    run(["bash", "-c", readme_command("data.on_bad_sample=skip")], project, env=env)
    data = skipped_and_reported(project, "pixels", expected)
    assert data["dataset"] == "ssv2" and data["clips"]["clips"] == {
        "train": 16, "val": 8, "test": 8}
    probe = json.loads((project / "metrics/probe.json").read_text())
    assert all("direction_acc" in m["temporal"] for m in probe["points"].values())
    assert "direction_acc" in probe["controls"]["shuffled"]["temporal"]
    assert "temporal" not in probe["controls"]["oracle"]  # needs boxes: not run
    assert probe["validity"]["temporal"]["valid"] is None  # unknown, not passing
