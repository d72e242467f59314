"""The llava family (LlavaForConditionalGeneration, SigLIP, `full`): the interleave layout.

Every point is the tower's patch grid, in the order the model itself computes and packs it; a
checkpoint shaped like llava-hf/llava-interleave-qwen-7b-hf, saved and loaded back through a
`source: local` entry, gives the same features in fp32 and bf16.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from test_models_vlm import CPU, full_pass, images, loaded
from vlmprobe.extract.engine import extract_points
from vlmprobe.models.base import WeightsUnavailable
from vlmprobe.models.llava import CHAT_TOKENS, TEMPLATE
from vlmprobe.models.registry import RegistryError, adapter_for, get_entry
from vlmprobe.models.vlm import offline_tokenizer

ROOT = Path.cwd()
TINY = "llava_tiny"
SIDE = 8  # llava_tiny: 116-px input, 14-px patches

# The interleave checkpoints' chat template as their processor renders it (role, images, text).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' }}"
    "{% for c in m['content'] if c['type'] == 'image' %}{{ '<image>' }}{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ '\n' + c['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def own_features(model, adapter, inputs) -> dict[str, torch.Tensor]:
    """What the model itself computes for each point kind, in its own order: the tower's
    `hidden_states[vision_feature_layer]`, the projected image features, the LLM's hidden states
    at the image-token positions."""
    config = model.config
    with torch.inference_mode():
        tower = model.model.vision_tower(inputs["pixel_values"].to(model.dtype),
                                         output_hidden_states=True)
        projected = model.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(model.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    index = adapter.image_token_index(inputs)
    at_images = [torch.stack([h[b, index[b]] for b in range(len(index))]) for h in hidden]
    return {"vision": tower.hidden_states[config.vision_feature_layer],
            "projector": torch.stack(list(projected)), "llm": at_images}


def assert_points_are_the_models_own(adapter, model, batch) -> dict[str, torch.Tensor]:
    early = extract_points(adapter, model, batch, list(adapter.entry.points), CPU)
    full, _, inputs = full_pass(adapter, model, batch, list(adapter.entry.points))
    own = own_features(model, adapter, inputs)
    n_layers = len(adapter.decoder_layers(model))
    for point, spec in adapter.entry.points.items():
        assert early[point].shape[:2] == (len(batch), SIDE * SIDE), point
        assert torch.isfinite(early[point]).all(), point
        torch.testing.assert_close(early[point], full[point].float(), rtol=0, atol=0)
        if spec["kind"] == "llm":
            layer = n_layers if spec["layer"] == -1 else spec["layer"]
            if layer == n_layers:  # hidden_states[-1] is after the final norm: no equal
                continue
            expected = own["llm"][layer]
        else:
            expected = own[spec["kind"]]
        torch.testing.assert_close(early[point], expected.float(), rtol=0, atol=0)
    # The LLM's input at the image positions is the projector point: the grid order is the
    # model's packing order.
    torch.testing.assert_close(own["llm"][0].float(), early["L2"], rtol=0, atol=0)
    return early


@pytest.mark.parametrize("size", [(224, 224), (224, 448)])
def test_every_point_is_the_towers_patch_grid(size):
    adapter, _ = loaded(TINY)
    inputs = adapter.prepare(images(1, size), CPU)
    n_image_tokens = int((inputs["input_ids"] == adapter.config.image_token_id).sum())
    for point in adapter.entry.points:
        (grid,) = adapter.geometry(point, size).grids  # the image resized whole: one grid
        assert (grid.rows, grid.cols) == (SIDE, SIDE)
        assert grid.box == (0.0, 0.0, float(size[1]), float(size[0]))
    assert n_image_tokens == SIDE * SIDE  # no CLS, no newline tokens
    assert adapter.image_token_index(inputs).shape == (1, SIDE * SIDE)


def test_points_equal_the_models_own_features_and_the_full_pass():
    adapter, model = loaded(TINY)
    assert_points_are_the_models_own(adapter, model, images(2))


def test_early_exit_skips_later_layers():
    adapter, model = loaded(TINY)
    calls = []
    handle = adapter.decoder_layers(model)[-1].register_forward_hook(lambda *_: calls.append(1))
    try:
        extract_points(adapter, model, images(1), ["L2"], CPU)
    finally:
        handle.remove()
    assert calls == []


def test_answers_one_prompt_per_image_in_the_interleave_chat_format():
    adapter, model = loaded(TINY)
    seen = []
    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, args: seen.append(args[0][0].tolist()))
    try:
        answers = adapter.generate(model, images(2), ["describe the image .", "image"], 3, CPU)
    finally:
        hook.remove()
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    tokens = adapter.processor.tokenizer.convert_ids_to_tokens(seen[0])
    assert tokens == ["<|im_start|>", "user", *["<image>"] * SIDE * SIDE, "describe", "the",
                      "image", ".", "<|im_end|>", "<|im_start|>", "assistant"]


def test_other_strategies_are_refused_before_weights_load():
    entry = get_entry(TINY)
    config = {**entry.weights["config"], "vision_feature_select_strategy": "default"}
    adapter = adapter_for(dataclasses.replace(entry, weights={**entry.weights, "config": config}))
    with pytest.raises(RegistryError, match=r"'default'.*handles 'full'.*Fix"):
        adapter.check_points(list(entry.points), ROOT)


def test_the_plans_entry_is_the_pinned_llava_hf_conversion():
    entry = get_entry("llava_next")
    assert entry.family == "llava"
    assert entry.weights["repo_id"] == "llava-hf/llava-interleave-qwen-7b-hf"
    assert entry.weights["revision"] == "e55f9503798a0e4be76a067abcab943eec23f90e"
    random = adapter_for(get_entry("llava_random"))
    config = random.model_config(ROOT)
    assert random.layer_counts(config) == {"vision": 26, "llm": 32}
    assert config.vision_config.image_size // config.vision_config.patch_size == 27


def test_the_14b_refusal_says_how_to_convert():
    with pytest.raises(WeightsUnavailable, match="convert_llava_weights_to_hf.py") as error:
        adapter_for(get_entry("llava_next_14b")).model_config(ROOT)
    assert "lmms-lab/llava-next-interleave-qwen-14b" in str(error.value)
    assert "source: local" in str(error.value)


def interleave_shaped_checkpoint(directory: Path) -> torch.nn.Module:
    """llava-hf/llava-interleave-qwen-7b-hf's config (e55f950) with every size shrunk and every
    id kept, random weights and an offline tokenizer with Qwen's ids, saved as the hub has it;
    returns the model as it was before saving."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    config = LlavaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            image_size=116, patch_size=14, hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6, vision_use_head=False),
        text_config=Qwen2Config(
            hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=152000, max_position_embeddings=32768,
            bos_token_id=151643, eos_token_id=151645, use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        image_token_index=151646, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(directory)  # safetensors
    ids = dict(zip(CHAT_TOKENS, (151643, 151644, 151645), strict=True)) | {"<image>": 151646}
    tokenizer = offline_tokenizer(ids, ["user", "assistant", "describe", "the", "image", "."],
                                  pad_token="<|endoftext|>")
    LlavaProcessor(
        image_processor=SiglipImageProcessor(size={"height": 116, "width": 116}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def interleave_checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    directory = tmp_path_factory.mktemp("llava-interleave-shaped")
    return directory, interleave_shaped_checkpoint(directory)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_interleave_shaped_checkpoint_loads_through_a_local_entry(interleave_checkpoint, dtype):
    directory, saved = interleave_checkpoint
    entry = dataclasses.replace(get_entry(TINY),
                                weights={"source": "local", "path": str(directory)})
    adapter = adapter_for(entry)
    adapter.check_points(list(entry.points), ROOT)
    model = adapter.load(ROOT, CPU, dtype=dtype)
    assert model.dtype == dtype
    batch = images(2)
    early = assert_points_are_the_models_own(adapter, model, batch)
    # Loading initialised everything: a model built fresh in this dtype (its rotary buffers
    # computed in fp32, as from_pretrained keeps them) with the saved weights gives the same.
    reference = type(saved)._from_config(saved.config, dtype=dtype).eval()
    reference.load_state_dict(saved.state_dict())
    for point, tokens in extract_points(adapter, reference, batch, list(entry.points),
                                        CPU).items():
        torch.testing.assert_close(early[point], tokens, rtol=0, atol=0, msg=point)
    assert adapter.processor.chat_template  # the checkpoint's template, not the family's
    prompt = adapter.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
        add_generation_prompt=True)
    assert prompt == TEMPLATE.format(prompt="x")
    answers = adapter.generate(model, batch, ["describe the image .", "image"], 3, CPU)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
