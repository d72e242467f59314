"""The probe stage end to end on a tiny feature store, then the report stage on its metrics;
param validation before any heavy work."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import stage_args
from vlmprobe.assets.lpips_weights import build_lpips
from vlmprobe.data.dataset import load_all_images
from vlmprobe.data.moving_shapes import generate_moving_shapes
from vlmprobe.data.shapes import generate_shapes
from vlmprobe.errors import MissingInput, StaleInput
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.extract.store import write_manifest, write_shard
from vlmprobe.io import read_json, write_json
from vlmprobe.params import ParamsError
from vlmprobe.probes.controls import pixel_tokens
from vlmprobe.probes.registry import PROBES, TRAINED
from vlmprobe.stages import probe as probe_stage
from vlmprobe.stages import report as report_stage

ROOT = Path(__file__).resolve().parents[1]
SIZE, GRID = 64, 4


def _tiny_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = params["probe"]
    p["bootstrap"] = 100
    for name, steps in (("dense", 6), ("detr", 4), ("reconstruction", 4)):
        p[name].update(steps=steps, eval_every=steps, width=16, batch_size=4)
    p["detr"].update(heads=2, queries=4)
    p["dense"]["depth"] = 1
    p["reconstruction"].update(depth=1, patch_px=4)
    p["detr"]["points"] = ["b"]
    p["reconstruction"]["points"] = ["b"]
    p["temporal"]["penalties"] = [1.0]
    p["figures"]["samples"] = 2
    return params


def _store(root: Path, ids: list[int], images: np.ndarray, extra: dict) -> None:
    geometry = TokenGeometry.single_grid((SIZE, SIZE), GRID, GRID)
    points = {}
    for point in ("a", "b"):
        # Point "b" is the pixels themselves; "a" the pixels with noise.
        tokens = pixel_tokens(images, geometry, 4)
        if point == "a":
            tokens = tokens + np.random.default_rng(0).normal(0, 0.2, tokens.shape)
        write_shard(root, point, 0, torch.from_numpy(tokens), ids)
        points[point] = {"dim": tokens.shape[-1], "geometry": geometry.to_dict(),
                         "shards": ["shard-00000.safetensors"]}
    write_manifest(root, {"vlm": "tiny", "display_name": "Tiny", "weights": {"source": "test"},
                          "image_ids": ids, "points": points, **extra})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project directory with params, tiny shapes, clips, both stores and LPIPS weights."""
    root = tmp_path_factory.mktemp("stage")
    generate_shapes(root / "data/images", seed=0, image_size=SIZE, n_train=16, n_val=6, n_test=6,
                    min_objects=1, max_objects=2, min_size=12, max_size=24)
    ids, images = load_all_images(root / "data/images")
    _store(root / "data/features", ids, images, {})
    generate_moving_shapes(root / "data/clips", seed=0, image_size=SIZE, n_train=16,
                           n_val=8, n_test=8, n_frames=3, speed=3)
    with np.load(root / "data/clips/clips.npz") as z:
        frames = z["frames"]
    clip_ids = list(range(len(frames)))
    frame_ids = [c * 3 + t for c in clip_ids for t in range(3)]
    _store(root / "data/clip_features", frame_ids, frames.reshape(-1, SIZE, SIZE, 3),
           {"n_frames": 3, "clip_ids": clip_ids})
    (root / "data/assets/lpips").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_lpips("alex").state_dict(), root / "data/assets/lpips/alex.pth")
    (root / "params.yaml").write_text(yaml.safe_dump({**_tiny_params(), "vlm": "tiny"}))
    return root


def test_probe_and_report_stages_end_to_end(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    probe_stage.main(stage_args("probe"))
    metrics = read_json(workdir / "metrics/probe.json")
    assert set(metrics["points"]) == {"a", "b"}
    assert "detr" in metrics["points"]["b"] and "detr" not in metrics["points"]["a"]
    assert "spatial_iou" in metrics["points"]["b"]["reconstruction"]
    for point in ("a", "b"):  # nested by probe, in registry order
        record = metrics["points"][point]
        assert {"iou", "iou_ci95"} <= set(record["bbox"]) and "map50" in record["dense"]
        assert "direction_acc" in record["temporal"]
        assert list(record) == [p for p in PROBES if p in record]
    for probe in TRAINED:  # the same keys of the fit loop for every trained probe
        assert {"selected_step"} <= set(metrics["points"]["b"][probe])
        assert any(k.startswith("val_") for k in metrics["points"]["b"][probe])
    assert set(metrics["controls"]) == {"oracle", "oracle_shuffled", "shuffled", "pixels"}
    assert "direction_acc" in metrics["controls"]["oracle_shuffled"]["temporal"]
    assert set(metrics["validity"]) == {"bbox", "dense", "detr", "reconstruction", "temporal"}
    for name in ("boxes.png", "reconstructions.png", "points.csv"):
        assert (workdir / "plots/probe" / name).stat().st_size > 0
    assert (workdir / "plots/probe/curves/detr/b/plots/metrics/val_map50.tsv").exists()
    # Training noise: every trained probe at the deepest point, trained again with seed + 1
    deepest = metrics["points"]["b"]
    for probe in TRAINED:
        record, metric = deepest[probe], PROBES[probe].headline
        seeds = record[f"{metric}_seeds"]
        assert len(seeds) == 2 and seeds[0] == record[metric]
        assert record[f"{metric}_seed_range"] == pytest.approx(max(seeds) - min(seeds), abs=1e-4)
    assert "map50_seeds" not in metrics["points"]["a"]["dense"]
    header = (workdir / "plots/probe/points.csv").read_text().splitlines()[0].split(",")
    assert {"bbox_iou", "dense_map50", "detr_map50", "reconstruction_spatial_iou",
            "temporal_direction_acc"} <= set(header)
    assert (workdir / "plots/probe/curves/detr/b-seed1/plots/metrics/val_map50.tsv").exists()

    report_stage.main(stage_args("report"))
    summary = yaml.safe_load((workdir / "results/p4/tiny-spatial.yaml").read_text())
    assert summary["go_no_go"]["verdict"] in {"GO", "NO-GO", "NO DECISION"}
    markdown = (workdir / "results/p4/tiny-spatial.md").read_text()
    assert "Go/no-go" in markdown and "plan figure" in markdown
    assert (workdir / "plots/report/metrics_by_point.png").exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("detr.points", ["final"], "names 'final'; valid choices: a, b"),
        ("dense.controls", ["oracle", "nope"], "valid choices: oracle, oracle_shuffled"),
        ("detr.width", 30, "multiple of"),
        ("reconstruction.lpips_net", "squeeze", "not one of: alex, vgg"),
        ("bands.detr.positive_min", 2.0, "expected a number in [0.0, 1.0]"),
    ],
)
def test_bad_params_fail_naming_the_value_and_the_choices(key, value, message):
    params = copy.deepcopy(_tiny_params())
    node = params["probe"]
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    with pytest.raises(ParamsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        probe_stage.validate(params, ["a", "b"])


def test_report_takes_the_model_from_the_probe_metrics_and_refuses_another_models_grounding(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml: the report reads none
    write_json("metrics/probe.json", {"meta": {}})
    with pytest.raises(MissingInput, match="metrics/probe.json names no model"):
        report_stage.main(stage_args("report"))
    write_json("metrics/probe.json", {"meta": {"vlm": "tiny"}})
    write_json("metrics/ground.json", {"meta": {"vlm": "pixels"}})
    with pytest.raises(StaleInput, match="ground.json is for 'pixels', metrics/probe.json for"):
        report_stage.main(stage_args("report"))
