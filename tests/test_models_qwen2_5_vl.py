"""Qwen2.5-VL tiny: the processor's grid, and row-major order restored from window order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AttentionInterface

from test_models_vlm import CPU, images, loaded
from vlmprobe.extract.engine import extract_points
from vlmprobe.models import qwen2_5_vl
from vlmprobe.models.registry import adapter_for, get_entry


def test_token_counts_follow_the_processor():
    adapter, _ = loaded("qwen2_5_vl_tiny")
    inputs = adapter.prepare(images(), CPU)
    _, rows, cols = inputs["image_grid_thw"][0].tolist()
    assert adapter.patch_grid((224, 224)) == (rows, cols) == (16, 16)
    n_image_tokens = (inputs["input_ids"] == adapter.image_token_id).sum(1)
    assert n_image_tokens.tolist() == [adapter.geometry("Q2", (224, 224)).n_tokens] * 2 == [64, 64]
    assert adapter.geometry("Q1", (224, 224)).n_tokens == rows * cols


def test_vision_output_is_row_major():
    """Q1 regrouped into 2x2 units in row-major order and merged gives Q2: the patches are
    in true row-major order (the window permutation undone)."""
    adapter, model = loaded("qwen2_5_vl_tiny")
    tokens = extract_points(adapter, model, images(), ["Q1", "Q2"], CPU)
    b, _, d = tokens["Q1"].shape
    units = tokens["Q1"].reshape(b, 8, 2, 8, 2, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, d)
    with torch.inference_mode():
        merged = model.model.visual.merger(units).reshape(b, 64, -1)
    torch.testing.assert_close(merged, tokens["Q2"], rtol=1e-5, atol=1e-6)


def test_full_size_random_entry_has_the_real_shapes():
    """The _random entry is never instantiated in tests: its config alone is checked."""
    adapter = adapter_for(get_entry("qwen2_5_vl_random"))
    config = adapter.model_config(Path.cwd())  # no weights
    assert adapter.layer_counts(config) == {"vision": 32, "llm": 28}
    assert config.text_config.hidden_size == 3584
    adapter.check_points(list(adapter.entry.points), Path.cwd())


@pytest.mark.parametrize("size", [(224, 224), (224, 308)])  # 308 px: windows of two lengths
def test_packed_window_attention_equals_the_stock_per_window_path(size, monkeypatch):
    adapter, model = loaded("qwen2_5_vl_tiny")
    config = model.model.visual.config
    assert config._attn_implementation == qwen2_5_vl.PACKED_ATTENTION
    calls = []
    packed = qwen2_5_vl.packed_window_attention
    monkeypatch.setitem(AttentionInterface._global_mapping, qwen2_5_vl.PACKED_ATTENTION,
                        lambda *a, **k: calls.append(1) or packed(*a, **k))
    points = list(adapter.entry.points)
    batch = images(3, size)
    fast = extract_points(adapter, model, batch, points, CPU)
    monkeypatch.setattr(config, "_attn_implementation", "sdpa")
    stock = extract_points(adapter, model, batch, points, CPU)
    assert len(calls) == len(model.model.visual.blocks)
    assert all(torch.equal(fast[p], stock[p]) for p in points)
    if size[1] == 308:  # the windows of unequal lengths were exercised
        assert any(len(set(lengths)) > 1 for _, lengths in qwen2_5_vl.window_lengths.seen)
