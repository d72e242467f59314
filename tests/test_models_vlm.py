"""What every VLM family's tiny entry must do: each point's tokens match its geometry and the
model's own hidden states, and the early-exit pass equals a full pass."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmprobe.extract.engine import extract_points
from vlmprobe.models.registry import adapter_for, get_entry

TINY = ["qwen2_5_vl_tiny", "llava_next_tiny", "internvl2_tiny", "cogvlm2_tiny"]
CPU = torch.device("cpu")


@cache
def loaded(name: str):
    adapter = adapter_for(get_entry(name))
    return adapter, adapter.load(Path.cwd(), CPU)


def images(n: int = 2, size: tuple[int, int] = (224, 224)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def full_pass(adapter, model, batch: np.ndarray, points: list[str]):
    """Every point's tokens from a forward pass that runs to the end (plain hooks, no exit)."""
    inputs = adapter.prepare(batch, CPU)
    seen = {}
    handles = [
        adapter.point_module(model, p).register_forward_hook(
            lambda _m, _i, out, p=p: seen.setdefault(p, out)
        )
        for p in points
    ]
    try:
        with torch.inference_mode():
            outputs = adapter.forward(model, {**inputs, "output_hidden_states": True})
    finally:
        for h in handles:
            h.remove()
    tokens = {p: adapter.point_tokens(p, seen[p], inputs) for p in points}
    return tokens, outputs.hidden_states, inputs


@pytest.mark.parametrize("name", TINY)
def test_points_match_geometry_and_full_pass(name):
    adapter, model = loaded(name)
    entry = adapter.entry
    points = list(entry.points)
    batch = images()
    early = extract_points(adapter, model, batch, points, CPU)
    full, hidden_states, inputs = full_pass(adapter, model, batch, points)
    n_layers = len(adapter.decoder_layers(model))
    for p in points:
        geometry = adapter.geometry(p, (224, 224))
        assert early[p].shape[:2] == (2, geometry.n_tokens), p
        assert geometry.token_boxes().shape == (geometry.n_tokens, 4)
        torch.testing.assert_close(early[p], full[p].float(), rtol=0, atol=0)
        spec = entry.points[p]
        if spec["kind"] == "llm" and spec["layer"] != -1 and spec["layer"] < n_layers:
            # hidden_states[k] is decoder layer k's output (the last one is after the norm).
            expected = hidden_states[spec["layer"]]
            index = adapter.image_token_index(inputs)
            gathered = torch.stack([expected[b, index[b]] for b in range(len(batch))])
            torch.testing.assert_close(early[p], gathered.float(), rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY)
def test_early_exit_skips_later_layers(name):
    adapter, model = loaded(name)
    first = next(iter(adapter.entry.points))
    last_layer = adapter.decoder_layers(model)[-1]
    calls = []
    handle = last_layer.register_forward_hook(lambda *_: calls.append(1))
    try:
        extract_points(adapter, model, images(1), [first], CPU)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("name", TINY)
def test_seeded_random_weights_are_reproducible(name):
    adapter, model = loaded(name)
    again = adapter_for(get_entry(name)).load(Path.cwd(), CPU)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", TINY)
def test_other_aspect_ratio(name):
    """A 224x448 image works: its token count matches the geometry for that size."""
    adapter, model = loaded(name)
    for p, tokens in extract_points(adapter, model, images(1, (224, 448)), list(
            adapter.entry.points), CPU).items():
        assert tokens.shape[1] == adapter.geometry(p, (224, 448)).n_tokens


PROJECTED = {"qwen2_5_vl_tiny": "Q2", "llava_next_tiny": "L2", "internvl2_tiny": "I3"}


@pytest.mark.parametrize("name", TINY)
def test_llm_input_at_image_tokens_is_the_projected_point(name):
    """The LLM's input embeddings at the kept image positions are the vision features in the
    same order: the grid order of the encoder points matches the model's own packing."""
    adapter, model = loaded(name)
    batch = images()
    _, hidden_states, inputs = full_pass(adapter, model, batch, [])
    index = adapter.image_token_index(inputs)
    embedded = torch.stack([hidden_states[0][b, index[b]] for b in range(len(batch))])
    if name in PROJECTED:
        projected = extract_points(adapter, model, batch, [PROJECTED[name]], CPU)
        torch.testing.assert_close(embedded, projected[PROJECTED[name]], rtol=0, atol=0)
    else:  # CogVLM2: the projection is the GLU after the EVA-CLIP point C1
        c1 = extract_points(adapter, model, batch, ["C1"], CPU)["C1"]
        with torch.inference_mode():
            projected = model.model.vision.linear_proj(c1)
        torch.testing.assert_close(embedded, projected, rtol=1e-5, atol=1e-6)
