"""Hybrid entries (plan section 10.1): the tokens at a point are the parts' own tokens, resampled
onto one grid by area, balanced and concatenated; the geometry maps each token to its cell.

The parts are real: the random tiny Qwen2.5-VL and a small random DINOv2 saved as a local
checkpoint, loaded through the user's entries folder ($VLMPROBE_ENTRIES_DIR)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vlmprobe.extract.engine import extract_points
from vlmprobe.models import registry
from vlmprobe.models.hybrid import balanced
from vlmprobe.models.registry import RegistryError, adapter_for, get_entry

CPU = torch.device("cpu")
SIZE = 224  # Qwen2.5-VL tiny: an 8x8 LLM grid of 28-px tokens; DINOv2: 16x16 of 14 px


def write_entry(folder: Path, name: str, entry: dict) -> None:
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(entry))


def hybrid_entry(grid: str = "vlm", **changes) -> dict:
    return {"family": "hybrid", "display_name": "test hybrid", "kind": "hybrid",
            "parts": {"vlm": "qwen2_5_vl_tiny", "spatial": "dino_tiny"}, "grid": grid,
            "points": {"H2": {"vlm": "Q2", "spatial": "final"},
                       "H5": {"vlm": "Q5", "spatial": "layer1"}}, **changes}


@pytest.fixture(scope="module")
def entries_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("entries")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=48, patch_size=14, image_size=SIZE)
                ).save_pretrained(folder / "dino_tiny_weights")
    write_entry(folder, "dino_tiny", {
        "family": "dinov2", "display_name": "DINOv2 tiny, random", "kind": "spatial_encoder",
        "weights": {"source": "local", "path": str(folder / "dino_tiny_weights")},
        "points": {"layer1": {"module": "encoder.layer.0"}, "final": {"module": "layernorm"}}})
    write_entry(folder, "hybrid_test", hybrid_entry())
    write_entry(folder, "hybrid_on_spatial", hybrid_entry(grid="spatial"))
    return folder


@pytest.fixture
def user_entries(entries_dir, monkeypatch):
    monkeypatch.setenv(registry.ENTRIES_DIR_VARIABLE, str(entries_dir))
    registry.entries.cache_clear()
    yield entries_dir
    registry.entries.cache_clear()


def images(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def tokens_of(name: str, points: list[str], batch: np.ndarray) -> dict[str, torch.Tensor]:
    adapter = adapter_for(get_entry(name))
    model = adapter.load(Path.cwd(), CPU)
    return extract_points(adapter, model, batch, points, CPU)


def test_tokens_are_the_parts_tokens_resampled_balanced_and_concatenated(user_entries):
    batch = images()
    hybrid = tokens_of("hybrid_test", ["H2", "H5"], batch)
    qwen = tokens_of("qwen2_5_vl_tiny", ["Q2", "Q5"], batch)
    dino = tokens_of("dino_tiny", ["layer1", "final"], batch)
    for point, vlm, spatial in (("H2", "Q2", "final"), ("H5", "Q5", "layer1")):
        # Each 28-px Qwen token covers a 2x2 block of 14-px DINOv2 tokens: their mean.
        blocks = dino[spatial].reshape(2, 8, 2, 8, 2, -1).mean(dim=(2, 4)).reshape(2, 64, -1)
        width = qwen[vlm].shape[-1] + blocks.shape[-1]
        expected = torch.cat([balanced(qwen[vlm], width), balanced(blocks, width)], dim=-1)
        assert hybrid[point].shape == (2, 64, width)
        torch.testing.assert_close(hybrid[point], expected, rtol=1e-4, atol=1e-5)


def test_neither_part_dominates_by_scale_and_each_image_stands_alone(user_entries):
    batch = images(3)
    together = tokens_of("hybrid_test", ["H2"], batch)["H2"]
    width = together.shape[-1]
    d_vlm = 64  # Qwen2.5-VL tiny's LLM width (out_hidden_size)
    for part in (together[..., :d_vlm], together[..., d_vlm:]):
        energy = part.square().sum(-1).mean(-1)  # per image: mean squared token norm
        torch.testing.assert_close(energy, torch.full((3,), width / 2), rtol=1e-4, atol=1e-4)
    alone = tokens_of("hybrid_test", ["H2"], batch[1:2])["H2"]  # no statistic crosses images
    torch.testing.assert_close(alone[0], together[1], rtol=1e-4, atol=1e-5)


def test_geometry_is_the_grid_parts_and_maps_each_token_to_its_cell(user_entries):
    on_vlm = adapter_for(get_entry("hybrid_test"))
    on_spatial = adapter_for(get_entry("hybrid_on_spatial"))
    for adapter in (on_vlm, on_spatial):
        adapter.load(Path.cwd(), CPU)  # Qwen2.5-VL's grid comes from its processor
    batch = images(1)
    assert on_vlm.geometry("H2", (SIZE, SIZE)).token_boxes()[9].tolist() == [28, 28, 56, 56]
    spatial_geometry = on_spatial.geometry("H2", (SIZE, SIZE))
    assert spatial_geometry.n_tokens == 256
    assert spatial_geometry.token_boxes()[17].tolist() == [14, 14, 28, 28]
    # On DINOv2's grid, every 14-px cell lies inside one 28-px Qwen token: that token's value.
    on_grid = tokens_of("hybrid_on_spatial", ["H2"], batch)["H2"]
    qwen = tokens_of("qwen2_5_vl_tiny", ["Q2"], batch)["Q2"]
    vlm_part = on_grid[..., :64].reshape(1, 8, 2, 8, 2, 64)
    expected = balanced(qwen, on_grid.shape[-1]).reshape(1, 8, 1, 8, 1, 64).expand_as(vlm_part)
    # Replicating each token four times keeps the mean squared norm: the same scale.
    torch.testing.assert_close(vlm_part, expected, rtol=1e-4, atol=1e-5)


def test_provenance_names_both_parts_and_generation_is_the_vlms(user_entries):
    adapter = adapter_for(get_entry("hybrid_test"))
    model = adapter.load(Path.cwd(), CPU)
    record = adapter.weights_provenance(Path.cwd())
    assert {p["entry"] for p in record["parts"].values()} == {"qwen2_5_vl_tiny", "dino_tiny"}
    assert record["label"].startswith("vlm part: RANDOM WEIGHTS")
    assert adapter.generates and adapter.box_format == "pixels-json"
    answers = adapter.generate(model, images(), ["Describe the image."] * 2, 2, CPU)
    assert len(answers) == 2


@pytest.mark.parametrize(("changes", "message"), [
    ({"parts": {"vlm": "qwen2_5_vl_tiny"}}, r"needs `parts: \{vlm: <entry>, spatial: <entry>\}`"),
    ({"parts": {"vlm": "qwen2_5_vl_tiny", "spatial": "nope"}},
     r"parts.spatial = 'nope' is not a registered model"),
    ({"parts": {"vlm": "qwen2_5_vl_tiny", "spatial": "hybrid_test"}},
     r"parts.spatial = 'hybrid_test' is a hybrid: a hybrid's parts are plain entries"),
    ({"points": {"H9": {"vlm": "Q9", "spatial": "final"}}},
     r"point 'H9' takes vlm point 'Q9'; qwen2_5_vl_tiny has points Q1, Q2"),
    ({"grid": "both"}, r"grid 'both' is not one of vlm, spatial"),
])
def test_a_malformed_hybrid_entry_is_refused_with_the_fix(user_entries, changes, message):
    write_entry(user_entries, "hybrid_bad", hybrid_entry(**changes))
    registry.entries.cache_clear()
    try:
        with pytest.raises(RegistryError, match=message):
            adapter_for(get_entry("hybrid_bad"))
    finally:
        (user_entries / "hybrid_bad.yaml").unlink()


def test_the_registered_hybrids_pair_points_their_parts_have():
    for name in ("hybrid_qwen2_5_vl_dinov2", "hybrid_qwen2_5_vl_tiny_dinov2"):
        adapter = adapter_for(get_entry(name))
        assert adapter.part_entries["spatial"].name == "dinov2_small"
        assert adapter.part_points("vlm", list(adapter.entry.points))[-1] == "Q5"
