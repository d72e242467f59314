"""InternVL2 tiny: the real trust_remote_code path, dynamic tiles plus the thumbnail."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_models_vlm import CPU, images, loaded
from vlmprobe.models.registry import adapter_for, get_entry


@pytest.mark.parametrize(("size", "canvas"), [((224, 224), (2, 2)), ((224, 448), (1, 2))])
def test_tiles_and_thumbnail_follow_the_processor(size, canvas):
    adapter, model = loaded("internvl2_tiny")
    inputs = adapter.prepare(images(1, size), CPU)
    rows, cols = canvas
    assert adapter.tiles(size) == canvas
    assert inputs["pixel_values"].shape[0] == rows * cols + 1  # + thumbnail
    geometry = adapter.geometry("I4", size)
    assert len(geometry.grids) == rows * cols + 1
    h, w = size
    assert geometry.grids[0].box == (0.0, 0.0, w / cols, h / rows)
    assert geometry.grids[-1].box == (0.0, 0.0, float(w), float(h))  # thumbnail last
    context = int((inputs["input_ids"] == model.img_context_token_id).sum())
    assert context == geometry.n_tokens == (rows * cols + 1) * model.num_image_token
    assert adapter.geometry("I1", size).n_tokens == (rows * cols + 1) * 64


def test_model_comes_from_the_fixture_through_remote_code():
    _, model = loaded("internvl2_tiny")
    assert type(model).__module__.startswith("transformers_modules.")
    assert type(model).__name__ == "InternVLChatModel"


def test_full_size_random_entry_has_the_real_shapes():
    adapter = adapter_for(get_entry("internvl2_random"))
    config = adapter.model_config(Path.cwd())
    assert adapter.layer_counts(config) == {"vision": 24, "llm": 32}
    assert config.force_image_size == 448
