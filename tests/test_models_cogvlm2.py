"""CogVLM2 tiny: the real trust_remote_code path; boi/eoi are not spatial tokens."""

from __future__ import annotations

import sys
from pathlib import Path

from test_models_vlm import CPU, images, loaded
from vlmprobe.models.registry import adapter_for, get_entry


def test_vision_tokens_exclude_boi_and_eoi():
    adapter, model = loaded("cogvlm2_tiny")
    inputs = adapter.prepare(images(), CPU)
    vision = (inputs["token_type_ids"] == 1).sum(1)
    geometry = adapter.geometry("C2", (224, 224))
    assert vision.tolist() == [geometry.n_tokens + 2] * 2 == [18, 18]
    index = adapter.image_token_index(inputs)
    assert index[0].tolist() == list(range(2, 2 + geometry.n_tokens))  # BOS 0, boi 1
    assert type(model).__module__.startswith("transformers_modules.")


def test_full_size_random_entry_has_the_real_shapes():
    adapter = adapter_for(get_entry("cogvlm2_random"))
    config = adapter.model_config(Path.cwd())
    assert adapter.layer_counts(config) == {"vision": 63, "llm": 32}
    assert config.vision_config["image_size"] // config.vision_config["patch_size"] // 2 == 48


def test_stand_in_experts_run_only_on_their_own_tokens():
    """Routing each token to its own expert equals running both experts on every token and
    keeping one (the old path) in fp32; eoi goes to the language expert, as published."""
    import torch

    from test_models_vlm import loaded

    _, model = loaded("cogvlm2_tiny")
    code = sys.modules[type(model.model.layers[0].mlp).__module__]
    types = torch.tensor([[0, 1, 1, 1, 1, 0, 0]])
    mask = code.expert_mask(types)
    assert mask.tolist() == [[False, True, True, True, False, False, False]]
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 7, model.config.hidden_size)
    both = torch.where(mask[..., None], mlp.vision_mlp(x), mlp.language_mlp(x))
    assert torch.allclose(code.by_expert(mask, x, mlp.vision_mlp, mlp.language_mlp), both,
                          atol=1e-5)
