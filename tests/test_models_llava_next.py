"""LLaVA-NeXT tiny: anyres base grid + unpadded high-res grid, newline tokens excluded."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_models_vlm import CPU, images, loaded
from vlmprobe.models.registry import adapter_for, get_entry


@pytest.mark.parametrize(("size", "high_res"), [((224, 224), (8, 8)), ((224, 448), (4, 8))])
def test_grids_follow_the_processor(size, high_res):
    adapter, _ = loaded("llava_next_tiny")
    inputs = adapter.prepare(images(1, size), CPU)
    n_prompt_tokens = int((inputs["input_ids"] == adapter.config.image_token_id).sum())
    geometry = adapter.geometry("L3", size)
    base, high = geometry.grids
    assert (base.rows, base.cols) == (4, 4)
    assert (high.rows, high.cols) == high_res
    # The processor's image tokens = base + one newline per high-res row.
    assert n_prompt_tokens == geometry.n_tokens + high.rows
    assert adapter.image_token_index(inputs).shape[1] == geometry.n_tokens


def test_full_size_random_entry_has_the_real_shapes():
    adapter = adapter_for(get_entry("llava_next_random"))
    config = adapter.model_config(Path.cwd())
    assert adapter.layer_counts(config) == {"vision": 24, "llm": 32}
    assert config.vision_config.image_size == 336
