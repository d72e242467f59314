"""The model registry: entries are data files, errors name the valid choices."""

from __future__ import annotations

import pytest

from vlmprobe.models import registry
from vlmprobe.models.registry import RegistryError, adapter_for, entries, get_entry, select_points
from vlmprobe.params import ParamsError


def test_every_entry_parses_and_its_family_adapter_imports():
    for name, entry in entries().items():
        assert entry.name == name and entry.points
        assert adapter_for(entry).entry is entry


def test_unknown_model_lists_the_registered_ones():
    with pytest.raises(RegistryError) as e:
        get_entry("qwen_forty")
    assert "'qwen_forty'" in str(e.value)
    for name in entries():
        assert name in str(e.value)


def test_points_resolve_in_depth_order_and_unknown_points_are_named():
    entry = get_entry("dinov2_small")
    assert select_points(entry, "all") == list(entry.points)
    assert select_points(entry, ["final", "layer3"]) == ["layer3", "final"]
    assert select_points(entry, "deepest") == ["final"]
    with pytest.raises(ParamsError, match=r"extract.points names 'layer99'; valid choices: layer3"):
        select_points(entry, ["layer99"])


def test_adding_a_model_is_adding_a_data_file(tmp_path, monkeypatch):
    (tmp_path / "dinov2_mine.yaml").write_text(
        "family: dinov2\ndisplay_name: My DINOv2\n"
        "weights: {source: local, path: /models/dinov2}\n"
        "points: {last: {module: layernorm}}\n"
    )
    monkeypatch.setattr(registry, "ENTRIES_DIR", tmp_path)
    entries.cache_clear()
    try:
        assert get_entry("dinov2_mine").display_name == "My DINOv2"
    finally:
        monkeypatch.undo()
        entries.cache_clear()


def test_malformed_entry_is_rejected_with_its_path(tmp_path, monkeypatch):
    (tmp_path / "broken.yaml").write_text("family: no_such_family\ndisplay_name: x\n"
                                          "weights: {}\npoints: {a: {}}\n")
    monkeypatch.setattr(registry, "ENTRIES_DIR", tmp_path)
    entries.cache_clear()
    try:
        with pytest.raises(RegistryError, match="broken.yaml.*no_such_family"):
            entries()
    finally:
        monkeypatch.undo()
        entries.cache_clear()
