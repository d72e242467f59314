"""Generation through the family adapters: each tiny VLM answers one prompt per image in its own
chat format (image tokens in place, prompt after them), batched with left padding, decoded to
text; entries that do not generate say so."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from test_models_vlm import CPU, TINY, images, loaded
from vlmprobe.models.base import NotGenerating
from vlmprobe.models.box_text import BOX_FORMATS
from vlmprobe.models.registry import adapter_for, get_entry
from vlmprobe.models.vlm import chat_text
from vlmprobe.probes.grounding import ObjectRef, grounding_prompt

KNOWN = "describe the image ."


def embedding_layer(name: str, model: torch.nn.Module) -> torch.nn.Module:
    if name.startswith("internvl2"):
        return model.language_model.get_input_embeddings()
    if name.startswith("cogvlm2"):
        return model.model.embed_tokens
    return model.get_input_embeddings()


def image_block(name: str) -> tuple[str | None, str, int]:
    """(token right before the image tokens if the format has one, the image token, how many)
    for a 224x224 image."""
    if name.startswith("qwen2_5_vl"):
        return "<|vision_start|>", "<|image_pad|>", 64
    if name.startswith("llava_next"):
        return None, "<image>", 16 + 8 * (8 + 1)  # base + high-res rows with newlines
    if name.startswith("internvl2"):
        return "<img>", "<IMG_CONTEXT>", 5 * 16  # 2x2 tiles + thumbnail
    return "<bos>", "<pad>", 4 * 4 + 2  # boi, patches, eoi: pad ids marked as vision tokens


def tokenizer_of(adapter):
    return adapter.processor.tokenizer if hasattr(adapter, "processor") else adapter.tokenizer


@pytest.mark.parametrize("name", TINY)
def test_prompt_reaches_the_model_after_the_image_tokens(name):
    adapter, model = loaded(name)
    seen = []
    hook = embedding_layer(name, model).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].clone()))
    try:
        # Words of the offline vocabulary (built from the entry's prompt), so they decode back;
        # the second, shorter prompt is padded on the left.
        answers = adapter.generate(model, images(2), [KNOWN, "unknown"], 3, CPU)
    finally:
        hook.remove()
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    tokens = tokenizer_of(adapter).convert_ids_to_tokens(seen[0][0].tolist())
    before, image, count = image_block(name)
    start = tokens.index(image)
    assert before is None or tokens[start - 1] == before
    assert tokens[start:start + count] == [image] * count
    assert tokens.count(image) == count
    after = [t.lower() for t in tokens[start + count:]]
    words = KNOWN.split()
    first = after.index(words[0])
    assert after[first:first + len(words)] == words


@pytest.mark.parametrize("name", TINY)
def test_batched_answers_equal_one_at_a_time(name):
    adapter, model = loaded(name)
    batch = images(2)
    prompts = [KNOWN, "image"]
    together = adapter.generate(model, batch, prompts, 4, CPU)
    alone = [adapter.generate(model, batch[i:i + 1], prompts[i:i + 1], 4, CPU)[0]
             for i in range(2)]
    assert together == alone


def test_one_prompt_per_image():
    adapter, model = loaded("qwen2_5_vl_tiny")
    with pytest.raises(ValueError, match="one per image"):
        adapter.generate(model, images(2), ["a"], 2, CPU)


@pytest.mark.parametrize("name", ["dinov2_small", "pixels"])
def test_entries_that_do_not_generate_say_so(name):
    adapter = adapter_for(get_entry(name))
    assert not adapter.generates and adapter.box_format is None
    with pytest.raises(NotGenerating, match=f"{name}.*does not generate"):
        adapter.generate(None, images(1), ["a"], 2, CPU)


@pytest.mark.parametrize("name", TINY)
def test_grounding_capability_comes_from_the_family(name):
    adapter = adapter_for(get_entry(name))
    assert adapter.generates
    if adapter.box_format is None:  # LLaVA-NeXT: questions only
        assert name.startswith("llava_next")
        return
    assert adapter.box_format in BOX_FORMATS
    prompt = grounding_prompt(ObjectRef(0, 0, "red", "circle"), adapter.grounding_template)
    assert prompt.replace("<ref>", "").replace("</ref>", "").startswith(
        "Find the location of the red circle")


def test_a_checkpoint_chat_template_is_used_where_the_processor_has_one():
    adapter, _ = loaded("qwen2_5_vl_tiny")
    processor = copy.copy(adapter.processor)
    processor.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }} {% for c in m.content %}"
        "{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% else %}{{ c.text }}{% endif %}{% endfor %}<|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
    text = chat_text(processor, "How many?", "unused {prompt}")
    assert text == ("<|im_start|>user <|vision_start|><|image_pad|><|vision_end|>How many?"
                    "<|im_end|> <|im_start|>assistant")
    assert chat_text(adapter.processor, "How many?", "T: {prompt}") == "T: How many?"


def test_generation_is_deterministic():
    adapter, model = loaded("cogvlm2_tiny")
    batch = np.ascontiguousarray(images(2)[:, ::-1])
    first = adapter.generate(model, batch, ["describe", "the"], 3, CPU)
    assert adapter.generate(model, batch, ["describe", "the"], 3, CPU) == first
