"""`dvc exp run -S vlm=<family>_tiny` runs the whole pipeline offline on CPU for each family."""

from __future__ import annotations

import json

import pytest

from conftest import make_project, run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("vlm", ["qwen2_5_vl_tiny", "llava_next_tiny", "internvl2_tiny",
                                 "cogvlm2_tiny"])
def test_tiny_family_runs_the_whole_pipeline(tmp_path, vlm):
    project = make_project(tmp_path / "project")
    run(["dvc", "exp", "run", "-S", f"vlm={vlm}"], project)
    extract = json.loads((project / "metrics/extract.json").read_text())
    assert extract["vlm"] == vlm and "RANDOM" in extract["weights"]["label"]
    probe = json.loads((project / "metrics/probe.json").read_text())
    assert set(probe["points"]) == set(extract["points"])
    assert (project / "data/clip_features/manifest.json").exists()
    assert (project / f"results/p4/{vlm}-spatial.yaml").exists()
