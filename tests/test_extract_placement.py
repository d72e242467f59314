"""A model split over devices (`extract.device_map: auto`): on the CPU, half of each tiny
model in memory and the rest offloaded to disk gives the tokens of the model in one piece, and
the stage stores the same bytes that way."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, run, set_params, stage_command
from test_extract_engine import stage_project
from test_extract_resume import store_bytes
from test_models_vlm import CPU, TINY, images, loaded
from vlmprobe.extract import placement
from vlmprobe.extract.engine import extract_points
from vlmprobe.models.registry import adapter_for, get_entry
from vlmprobe.params import ParamsError
from vlmprobe.stages import extract


def half_of(model: torch.nn.Module) -> str:
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return f"{size / 2 / 1e6:.3f}MB"


@pytest.mark.parametrize("name", [*TINY, "llava_tiny", "kosmos2_tiny"])
def test_half_in_memory_half_on_disk_gives_the_same_tokens(name, tmp_path):
    adapter, model = loaded(name)
    points, batch = list(adapter.entry.points), images(2)
    whole = extract_points(adapter, model, batch, points, CPU)
    split_adapter = adapter_for(get_entry(name))
    split, device_map = placement.dispatch(
        split_adapter.load(Path.cwd(), CPU), {"cpu": half_of(model)}, tmp_path,
        split_adapter.dtype, split_adapter.preload_modules)
    assert {"cpu", "disk"} <= set(placement.devices_used(device_map))
    tokens = extract_points(split_adapter, split, batch, points, CPU)
    assert all(torch.equal(whole[p], tokens[p]) for p in points)


def test_max_memory_is_checked():
    assert placement.require_max_memory({0: "40GiB", "cpu": "1.5TB"}) == {0: "40GiB",
                                                                          "cpu": "1.5TB"}
    with pytest.raises(ParamsError, match="devices are GPU indices"):
        placement.require_max_memory({"gpu0": "40GiB"})
    with pytest.raises(ParamsError, match="not a size such as 40GiB"):
        placement.require_max_memory({0: 40})


@pytest.mark.slow
def test_stage_with_a_split_model_stores_the_same_bytes(tmp_path):
    project = stage_project(tmp_path / "project", "qwen2_5_vl_tiny", batch_size=2, shard_size=4)
    stage = stage_command("extract")
    run(stage, project)
    whole = store_bytes(project)
    for out in ("data/features", "data/clip_features"):
        shutil.rmtree(project / out)
    set_params(project / "params.yaml", {"extract.device_map": "auto",
                                         "extract.max_memory": {"cpu": "0.3MB"}})
    result = run(stage, project)
    assert "split over {'cpu'" in result.stdout and "'disk'" in result.stdout
    assert store_bytes(project) == whole


@pytest.mark.parametrize("name", ["dinov2_small", "hybrid_qwen2_5_vl_tiny_dinov2"])
def test_only_a_vlm_is_split_over_devices(name):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["vlm"] = name
    params["extract"]["device_map"] = "auto"
    with pytest.raises(ParamsError, match=rf"{name}' is not one .*extract.device_map=none"):
        extract.validate(params)
