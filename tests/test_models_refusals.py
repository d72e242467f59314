"""Loading refuses clearly: unpinned or unreviewed remote code, pickled weights, points the
model lacks (before any weights load), checkpoints that must be converted first."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from test_models_vlm import CPU, loaded
from vlmprobe.models.base import WeightsUnavailable, code_revision
from vlmprobe.models.registry import RegistryError, adapter_for, get_entry, select_points
from vlmprobe.models.vlm import PACKAGE_DIR
from vlmprobe.params import ParamsError

ROOT = Path.cwd()


def variant(name: str, **weights) -> object:
    entry = get_entry(name)
    return adapter_for(dataclasses.replace(entry, weights={**entry.weights, **weights}))


def test_remote_code_needs_a_pinned_revision():
    with pytest.raises(WeightsUnavailable, match="revision must be pinned"):
        adapter_for(get_entry("cogvlm2")).model_config(ROOT)
    with pytest.raises(WeightsUnavailable, match="revision must be pinned"):
        variant("internvl2_tiny", revision=None).load(ROOT, CPU)


def test_remote_code_needs_the_entry_to_allow_it():
    with pytest.raises(WeightsUnavailable, match="does not allow it"):
        variant("internvl2_tiny", trust_remote_code=False).load(ROOT, CPU)


def test_changed_remote_code_is_refused(tmp_path):
    code = shutil.copytree(PACKAGE_DIR / "random_entry_code/cogvlm2", tmp_path / "cogvlm2")
    modeling = code / "modeling_cogvlm.py"
    modeling.write_text(modeling.read_text() + "\n# changed\n")
    with pytest.raises(WeightsUnavailable, match=code_revision(code)):
        variant("cogvlm2_tiny", code_dir=str(code)).load(ROOT, CPU)


def test_unknown_point_is_rejected_listing_the_valid_ones():
    with pytest.raises(ParamsError, match="valid choices: I1, I2, I3, I4, I5"):
        select_points(get_entry("internvl2_tiny"), ["I9"])


def test_layer_past_the_depth_is_rejected_before_weights_load(monkeypatch):
    entry = get_entry("qwen2_5_vl")
    adapter = adapter_for(dataclasses.replace(entry, points={"deep": {"kind": "llm", "layer": 40}}))
    # The full-size entry's config is not available offline; its random twin has the same shapes.
    monkeypatch.setattr(adapter, "model_config", adapter_for(
        get_entry("qwen2_5_vl_random")).model_config)
    monkeypatch.setattr(adapter, "load", lambda *a: pytest.fail("weights loaded"))
    with pytest.raises(RegistryError, match=r"has 28 llm layers \(valid: 1..28"):
        adapter.check_points(["deep"], ROOT)


def test_missing_weights_offline_name_checkpoint_revision_and_fix():
    with pytest.raises(WeightsUnavailable) as error:
        adapter_for(get_entry("qwen2_5_vl")).model_config(ROOT)
    message = str(error.value)
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in message and "cc594898137f" in message
    assert "HF_HUB_CACHE" in message and "source: local" in message


def test_checkpoint_in_another_layout_is_refused():
    with pytest.raises(WeightsUnavailable, match="original LLaVA layout"):
        adapter_for(get_entry("llava_next_14b")).model_config(ROOT)


@pytest.mark.parametrize("safe", [True, False])
def test_pretrained_remote_code_checkpoint_loads_safetensors_only(tmp_path, safe):
    """A saved checkpoint with its remote code loads through from_pretrained with
    trust_remote_code; pickled weights are refused unless the entry opts in."""
    tiny, model = loaded("internvl2_tiny")
    model.save_pretrained(tmp_path)  # safetensors (transformers 5 writes nothing else)
    tiny.tokenizer.save_pretrained(tmp_path)
    if not safe:  # the same weights as a pickle, the format that can run code on load
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    weights = {"source": "local", "path": str(tmp_path), "trust_remote_code": True,
               "revision": code_revision(tmp_path), "config": None}
    adapter = variant("internvl2_tiny", **weights)
    if not safe:
        with pytest.raises(WeightsUnavailable, match="Only safetensors"):
            adapter.load(ROOT, CPU)
        adapter = variant("internvl2_tiny", **weights, allow_pickle_weights=True)
    reloaded = adapter.load(ROOT, CPU)
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
