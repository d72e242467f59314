"""Something-Something v2 source: directional templates, decoding, bad videos, the clip format,
and the direction probe on clips without boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fixture_datasets import SSV2_LABELS, SSV2_VIDEOS, corrupt_video, make_ssv2
from vlmprobe.data.bad_samples import BadSampleError
from vlmprobe.data.moving_shapes import DIRECTIONS
from vlmprobe.data.ssv2 import template_direction, write_ssv2_subset
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.extract.tokens import ArrayTokens
from vlmprobe.probes.temporal import (
    ClipData,
    TemporalSettings,
    pooled_clips,
    run_temporal,
)

SUBSET = dict(seed=0, image_size=32, n_frames=6, n_train=16, n_val=8, n_test=8, workers=2)


def test_only_directional_templates_map_to_directions():
    assert template_direction("Pushing [something] from left to right") == "E"
    assert template_direction("pulling  something from right to left") == "W"
    assert template_direction("Moving [something] up") == "N"
    assert template_direction("Moving [something] down") == "S"
    assert template_direction("Moving [something] towards the camera") is None
    assert template_direction("Holding [something]") is None


@pytest.fixture(scope="module")
def ssv2_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ssv2(tmp_path_factory.mktemp("ssv2"))


def _write(source: Path, out: Path, policy: str = "fail") -> dict:
    return write_ssv2_subset(out, videos_dir=source / SSV2_VIDEOS, labels=source / SSV2_LABELS,
                             on_bad_sample=policy, **SUBSET)


def test_subset_is_deterministic_in_the_clip_format(ssv2_source, tmp_path):
    summary = _write(ssv2_source, tmp_path / "a")
    _write(ssv2_source, tmp_path / "b")
    for name in ("clips.npz", "clips.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    labels = json.loads((tmp_path / "a" / "clips.json").read_text())
    with np.load(tmp_path / "a" / "clips.npz") as z:
        frames, direction = z["frames"], z["direction"]
    assert frames.shape == (32, 6, 32, 32, 3) and frames.dtype == np.uint8
    assert labels["directions"] == list(DIRECTIONS) and "boxes" not in labels
    assert [len(labels["splits"][s]) for s in ("train", "val", "test")] == [16, 8, 8]
    assert all("Holding" not in t for t in labels["templates"])
    # Each clip's label is its template's direction.
    for template, d in zip(labels["templates"], direction, strict=True):
        assert DIRECTIONS[d] == template_direction(template)
    assert set(summary["per_direction"]) == {"E", "N", "W", "S"}
    # Letterboxed: the fixture's 96x72 frames leave grey bars above and below.
    assert (frames[:, :, 0] == 114).all() and (frames[:, :, -1] == 114).all()
    # The square moves the way the label says: its centre of mass over the clip.
    sample = frames[0].astype(float).sum(axis=-1)
    mass = sample > 450  # the bright yellow square
    xs = [np.nonzero(m)[1].mean() for m in mass]
    ys = [np.nonzero(m)[0].mean() for m in mass]
    step = {"E": (1, 0), "W": (-1, 0), "N": (0, -1), "S": (0, 1)}[DIRECTIONS[direction[0]]]
    assert np.sign(round(xs[-1] - xs[0])) == step[0] and np.sign(round(ys[-1] - ys[0])) == step[1]


@pytest.mark.parametrize("kind", ["truncated", "missing", "not_a_video"])
def test_bad_video_fails_naming_file_or_is_skipped_and_recorded(tmp_path, kind):
    source = make_ssv2(tmp_path / "ssv2", n_videos=45)
    expected = corrupt_video(source, "50000", kind)  # the first video: directional (E)
    out = tmp_path / "out" / "clips"
    with pytest.raises(BadSampleError, match="data.on_bad_sample=skip") as failure:
        _write(source, out)
    assert expected in str(failure.value)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []

    summary = _write(source, out, policy="skip")
    assert summary["skipped"]["count"] == 1 and expected in summary["skipped"]["samples"][0]
    assert "50000" not in json.loads((out / "clips.json").read_text())["video_ids"]


class _Store:
    """A clip feature store stand-in: the frames' pixels as 4x4 tokens of one point."""

    def __init__(self, frames: np.ndarray, grid: int = 4):
        n, f, h, w, _ = frames.shape
        self.geometry_ = TokenGeometry.single_grid((h, w), grid, grid)
        cells = frames.reshape(n * f, grid, h // grid, grid, w // grid, 3).mean(axis=(2, 4))
        self.features = cells.reshape(n * f, grid * grid, 3).astype(np.float32) / 255
        self.points = ["p"]
        self.image_ids = list(range(n * f))
        self.manifest = {"n_frames": f}

    def tokens(self, point: str, image_ids: list[int]) -> ArrayTokens:
        return ArrayTokens(self.features[image_ids])

    def geometry(self, point: str) -> TokenGeometry:
        return self.geometry_


def test_direction_probe_on_clips_without_boxes(ssv2_source, tmp_path):
    _write(ssv2_source, tmp_path / "clips")
    with np.load(tmp_path / "clips" / "clips.npz") as z:
        store = _Store(z["frames"])
    clips = ClipData.load(tmp_path / "clips", store)
    settings = TemporalSettings(ridge_alphas=[0.01], penalties=[1.0, 100.0], readout_frames=2,
                                bootstrap=50, seed=0)
    points, controls = run_temporal(clips, settings, ["oracle", "oracle_shuffled", "shuffled"],
                                    oracle_dim=16, oracle_noise=0.01)
    assert points["p"]["selected"]["pca_components"] in (8, 32)
    assert points["p"]["direction_acc"] >= 0.75  # the fixture's squares move plainly
    assert set(controls) == {"shuffled"}  # the oracles need boxes: not run
    assert pooled_clips(clips.tokens("p"), clips.splits["test"], store.geometry_).shape[1] == 3
