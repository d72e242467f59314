"""`dvc exp run -S vlm=<family>_tiny` runs the whole pipeline offline on CPU for each family;
one family bridges into the random LTX-Video VAE (`-S video_vae=ltx_video_tiny`), the others
into the default `pixels32`. What differs per family is the extract and ground stages: the
trained probes run at the deepest point only, without their controls (conftest.FAMILY_PARAMS)."""

from __future__ import annotations

import json

import pytest

from conftest import FAMILY_PARAMS, make_project, run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("vlm", "video_vae"), [
    ("qwen2_5_vl_tiny", "ltx_video_tiny"),
    ("llava_next_tiny", "pixels32"),
    ("llava_tiny", "pixels32"),
    ("internvl2_tiny", "pixels32"),
    ("cogvlm2_tiny", "pixels32"),
    ("kosmos2_tiny", "pixels32"),
    ("florence2_tiny", "pixels32"),
])
def test_tiny_family_runs_the_whole_pipeline(tmp_path, vlm, video_vae):
    project = make_project(tmp_path / "project", FAMILY_PARAMS)
    run(["dvc", "exp", "run", "-S", f"vlm={vlm}", "-S", f"video_vae={video_vae}"], project)
    extract = json.loads((project / "metrics/extract.json").read_text())
    assert extract["vlm"] == vlm and "RANDOM" in extract["weights"]["label"]
    probe = json.loads((project / "metrics/probe.json").read_text())
    assert set(probe["points"]) == set(extract["points"])
    # Each trained probe trained on the family's tokens at the deepest point.
    deepest = probe["points"][probe["meta"]["reference_point"]]
    assert {"dense", "detr", "reconstruction"} <= set(deepest)
    assert "spatial_iou" in deepest["reconstruction"] and "map50" in deepest["detr"]
    assert (project / "data/clip_features/manifest.json").exists()
    assert (project / f"results/p4/{vlm}-spatial.yaml").exists()
    for stage in ("align", "reconstruct"):
        meta = json.loads((project / f"metrics/{stage}.json").read_text())["meta"]
        assert (meta["vlm"], meta["target"]) == (vlm, video_vae)
    reconstruct = json.loads((project / "metrics/reconstruct.json").read_text())
    scored = [*reconstruct["points"].values(), *reconstruct["controls"].values(),
              reconstruct["detector"]["originals"]]
    assert all(0.0 <= r["map50"] <= 1.0 and len(r["map50_ci95"]) == 2 for r in scored)
    assert (project / "plots/reconstruct/samples.png").exists()
    assert (project / "results/p4" / f"{vlm}-alignment.md").exists()
    ground = json.loads((project / "metrics/ground.json").read_text())
    assert "vqa_acc" in ground and "vqa" not in ground["not_applicable"]
    if vlm.startswith(("kosmos2", "florence2")):  # native location tokens, their own parsers
        assert ground["meta"]["box_format"].endswith("-locations")
    if "grounding" not in ground["not_applicable"]:
        assert 0.0 <= ground["grounding_parse_failure_rate"] <= 1.0
        assert 0.0 <= ground["grounding_iou"] <= 1.0
