"""The engine writes a complete sharded store; the stage writes images, clips and metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run, set_params, stage_command
from test_models_vlm import CPU, TINY, images, loaded
from vlmprobe.extract.engine import choose_batch_size, extract_to_store
from vlmprobe.extract.store import FeatureStore
from vlmprobe.extract.synchronous import extract_synchronously
from vlmprobe.io import read_json
from vlmprobe.params import ParamsError
from vlmprobe.stages.extract import clip_points

# Tiny data: 10 images and 3 clips of 2 frames.
TINY_DATA = {
    "data.shapes.n_train": 6, "data.shapes.n_val": 2, "data.shapes.n_test": 2,
    "data.moving_shapes.n_train": 1, "data.moving_shapes.n_val": 1,
    "data.moving_shapes.n_test": 1, "data.moving_shapes.n_frames": 2,
}


def stage_project(dest: Path, vlm: str, data: bool = True, **extract) -> Path:
    """A directory with params.yaml (and generated data) for the extract stage."""
    dest.mkdir(parents=True)
    (dest / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(dest / "params.yaml", {**TINY_DATA, "vlm": vlm,
                                      **{f"extract.{k}": v for k, v in extract.items()}})
    if data:
        run(stage_command("data"), dest)
    return dest


def test_store_holds_every_point_shard_and_geometry(tmp_path):
    adapter, model = loaded("llava_next_tiny")
    batch = images(5)
    timing = {}
    manifest = extract_to_store(
        adapter, model, batch, [10, 11, 12, 13, 14], ["L1", "L5"], tmp_path,
        batch_size=2, shard_size=3, device=CPU, manifest_extra={"vlm": "x"}, timing=timing,
    )
    store = FeatureStore.open(tmp_path)
    assert store.points == ["L1", "L5"] and manifest["points"]["L1"]["shards"] == [
        "shard-00000.safetensors", "shard-00001.safetensors"]
    assert store.load("L5").shape == (5, 80, 64)
    assert store.load("L1", [14, 10]).shape == (2, 80, 32)
    assert store.geometry("L1").n_tokens == 80 and len(store.geometry("L1").grids) == 2
    assert timing["images"] == 5 and timing["seconds"] > 0
    # A second call finds every shard complete and computes nothing.
    extract_to_store(adapter, model, batch, [10, 11, 12, 13, 14], ["L1", "L5"], tmp_path,
                     batch_size=2, shard_size=3, device=CPU, manifest_extra={}, timing=timing)
    assert timing["images"] == 0


def store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("name", TINY)
def test_pipelined_engine_stores_the_bytes_of_the_synchronous_loop(name, tmp_path):
    """Prefetch, cast before the copy, the assembly and writer threads: none of it changes a
    byte. 7 images in shards of 3 and batches of 2: batches end before and at shard ends."""
    adapter, model = loaded(name)
    batch, ids, points = images(7), [5, 6, 7, 8, 9, 10, 11], list(adapter.entry.points)
    settings = {"batch_size": 2, "shard_size": 3, "device": CPU, "manifest_extra": {"vlm": name}}
    extract_to_store(adapter, model, batch, ids, points, tmp_path / "engine", **settings)
    extract_synchronously(adapter, model, batch, ids, points, tmp_path / "plain", **settings)
    engine, plain = store_files(tmp_path / "engine"), store_files(tmp_path / "plain")
    assert len(engine) == len(points) * 3 + 1 and engine == plain


def test_auto_batch_size_on_cpu_is_the_fixed_default():
    adapter, model = loaded("qwen2_5_vl_tiny")
    size, how = choose_batch_size(adapter, model, images(2), ["Q1"], CPU, limit=100)
    assert size == 16 and "CPU" in how


def test_stage_writes_image_and_clip_stores_and_metrics(tmp_path):
    project = stage_project(tmp_path / "p", "cogvlm2_tiny", batch_size=4, shard_size=4)
    run(stage_command("extract"), project)
    images_store = FeatureStore.open(project / "data/features")
    clips = FeatureStore.open(project / "data/clip_features")
    assert images_store.points == ["C1", "C2", "C3", "C4"]
    assert clips.points == ["C4"]  # extract.clip_points: deepest
    assert clips.manifest["n_frames"] == 2 and clips.manifest["clip_ids"] == [0, 1, 2]
    assert clips.image_ids == [0, 1, 2, 3, 4, 5]  # clip_id * n_frames + t
    with np.load(project / "data/clips/clips.npz") as data:
        assert data["frames"].shape[:2] == (3, 2)
    metrics = read_json(project / "metrics/extract.json")
    assert metrics["points"]["C1"] == {"n_tokens": 16, "dim": 32}
    assert metrics["images"] == 10 and metrics["clip_frames"] == 6
    assert metrics["device"] == "cpu" and metrics["dtype"] == "float32"
    assert metrics["seconds_per_image"] > 0
    assert "RANDOM" in metrics["weights"]["label"]
    assert not list((project / ".vlmprobe").glob("extract-*"))  # scratch moved into place


def test_stage_rejects_a_bad_point_before_loading(tmp_path):
    project = stage_project(tmp_path / "p", "qwen2_5_vl_tiny", data=False, points=["Q9"])
    result = run(stage_command("extract"), project, check=False)
    assert result.returncode != 0
    assert "extract.points names 'Q9'; valid choices: Q1, Q2, Q3, Q4, Q5" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_stage_refuses_a_missing_gpu(tmp_path):
    project = stage_project(tmp_path / "p", "qwen2_5_vl_tiny", data=False, device="cuda")
    result = run(stage_command("extract"), project, check=False)
    assert result.returncode != 0 and "no CUDA device" in result.stderr


def test_clip_points_default_to_the_deepest_and_reject_unknown_ones():
    points = ["a", "b", "c"]
    assert clip_points(points, "deepest") == ["c"]
    assert clip_points(points, "all") == points
    assert clip_points(points, ["c", "a"]) == ["a", "c"]
    with pytest.raises(ParamsError, match="extract.clip_points names 'z'; valid choices: a, b"):
        clip_points(points, ["z"])


def test_streamed_shard_has_the_bytes_of_safetensors_save_file(tmp_path):
    from safetensors.torch import load_file, save_file

    from vlmprobe.extract.store import ShardFile, remove_unfinished_shards, shard_path

    features = torch.randn(5, 3, 7).half()
    shard = ShardFile(tmp_path, "P", 0, [9, 8, 7, 6, 5], (3, 7))
    assert not shard_path(tmp_path, "P", 0).exists()  # a hidden temporary until complete
    shard.write(features[:2])
    shard.write(features[2:])
    shard.close()
    save_file({"features": features, "image_ids": torch.tensor([9, 8, 7, 6, 5])},
              str(tmp_path / "reference.safetensors"))
    assert shard_path(tmp_path, "P", 0).read_bytes() == (
        tmp_path / "reference.safetensors").read_bytes()
    assert torch.equal(load_file(str(shard_path(tmp_path, "P", 0)))["features"], features)
    short = ShardFile(tmp_path, "P", 1, [1, 2], (3, 7))
    short.write(features[:1])
    with pytest.raises(ValueError, match="1 of 2 rows"):
        short.close()
    assert not shard_path(tmp_path, "P", 1).exists()
    ShardFile(tmp_path, "P", 2, [1], (3, 7))  # as a kill -9 leaves it
    assert list((tmp_path / "P").glob(".shard-00002*"))
    remove_unfinished_shards(tmp_path)
    assert not list((tmp_path / "P").glob(".shard-*")) and shard_path(tmp_path, "P", 0).exists()
