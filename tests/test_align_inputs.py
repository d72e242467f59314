"""The alignment study's inputs: the probed images, or evenly spaced frames of the clips."""

from __future__ import annotations

import json

import pytest

from conftest import make_project, run
from vlmprobe.align.inputs import frame_indices
from vlmprobe.params import ParamsError


def test_frames_are_evenly_spaced_and_keep_both_ends():
    assert frame_indices(8, 2) == [0, 7]
    assert frame_indices(8, 3) == [0, 4, 7]  # 3.5 rounds to even
    assert frame_indices(8, 8) == list(range(8))
    assert frame_indices(5, 1) == [0]


def test_more_frames_than_a_clip_has_names_the_key_and_the_fix():
    with pytest.raises(ParamsError, match=r"align.frames_per_clip = 9 .* 8 frames.*Fix"):
        frame_indices(8, 9)


@pytest.mark.slow
def test_align_on_clip_frames(tmp_path):
    project = make_project(tmp_path / "project", {
        "vlm": "pixels", "align.source": "clip_frames", "align.frames_per_clip": 2})
    run(["dvc", "repro", "align"], project)
    meta = json.loads((project / "metrics/align.json").read_text())["meta"]
    # conftest's small moving-shapes splits: 16 / 8 / 8 clips, two frames each.
    assert (meta["source"], meta["n_train"], meta["n_val"], meta["n_test"]) == (
        "clip_frames", 32, 16, 16)
    assert meta["dataset"] == "data/clips (frames 0, 7 of each clip)"
