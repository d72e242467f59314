"""The florence2 family (Florence2ForConditionalGeneration: DaViT + BART encoder-decoder).

Every point is one row-major grid covering the image, in the order the model itself lays out
and packs it; `llm` points are the BART encoder's layers at the image positions (the pooled
token dropped); generation decodes location tokens, not the sequence's framing; grounding
answers are parsed by the processor's own post-processing; `vlmprobe doctor` passes on a
default Florence-2 config (Florence2Config with the conversions' vocabulary).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from test_models_vlm import CPU, images, loaded
from vlmprobe.extract.engine import extract_points
from vlmprobe.models.doctor import build_tiny_checkpoint, check_checkpoint, format_report
from vlmprobe.models.registry import RegistryError, adapter_for, get_entry
from vlmprobe.probes.grounding import ObjectRef, grounding_prompt

ROOT = Path.cwd()
TINY = "florence2_tiny"
SIDE = 8  # florence2_tiny: 256-px input, DaViT strides 4, 2, 2, 2
BLOCK_SIDES = [64, 32, 16, 16, 8]  # grid after each of the 5 blocks (depths 1, 1, 2, 1)


def bound(points: dict[str, dict]) -> tuple:
    """An adapter of the tiny entry with other points, bound to the already loaded model."""
    adapter, model = loaded(TINY)
    other = adapter_for(dataclasses.replace(adapter.entry, points=points))
    other.dtype, other.mends = torch.float32, []
    other.setup(model, None)
    return other, model


def hooked_full_pass(adapter, model, inputs, points):
    """Every point's tokens from a forward pass run to the end (plain hooks, no early exit), and
    the model's own output with hidden states."""
    seen = {}
    handles = [adapter.point_module(model, p).register_forward_hook(
        lambda _m, _i, out, p=p: seen.setdefault(p, out)) for p in points]
    try:
        with torch.inference_mode():
            output = adapter.forward(model, {**inputs, "output_hidden_states": True})
    finally:
        for handle in handles:
            handle.remove()
    return {p: adapter.point_tokens(p, seen[p], inputs) for p in points}, output


def at_positions(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.stack([hidden[b, index[b]] for b in range(len(index))])


@pytest.mark.parametrize("size", [(224, 224), (224, 448)])
def test_every_point_is_one_grid_covering_the_image(size):
    adapter, model = loaded(TINY)
    inputs = adapter.prepare(images(1, size), CPU)
    ids = inputs["input_ids"][0]
    image = ids == adapter.config.image_token_id
    # Image tokens first: the pooled token, then the grid; then <s> and the prompt.
    assert int(image.sum()) == 1 + SIDE * SIDE and bool(image[:1 + SIDE * SIDE].all())
    assert adapter.image_token_index(inputs).tolist() == [list(range(1, 1 + SIDE * SIDE))]
    for point, tokens in extract_points(adapter, model, images(1, size), list(adapter.entry.points),
                                        CPU).items():
        (grid,) = adapter.geometry(point, size).grids  # resized whole to the square input
        assert (grid.rows, grid.cols) == (SIDE, SIDE)
        assert grid.box == (0.0, 0.0, float(size[1]), float(size[0]))
        assert tokens.shape[:2] == (1, SIDE * SIDE), point


def test_points_equal_the_models_own_features_and_the_full_pass():
    adapter, model = loaded(TINY)
    batch = images(2)
    points = list(adapter.entry.points)
    early = extract_points(adapter, model, batch, points, CPU)
    inputs = adapter.prepare(batch, CPU)
    full, output = hooked_full_pass(adapter, model, inputs, points)
    with torch.inference_mode():
        tower = model.model.vision_tower(inputs["pixel_values"])
        projected = model.get_image_features(inputs["pixel_values"]).pooler_output
        own = model(**inputs, output_hidden_states=True)  # the model's own decoder default
    index = adapter.image_token_index(inputs)
    assert tower.last_hidden_state.shape[-2:] == (SIDE, SIDE)
    expected = {"F1": tower.last_hidden_state.flatten(2).transpose(1, 2),  # (B, C, H, W) rows
                "F2": projected[:, 1:]}  # the grid's mean first, then the grid
    depth = len(adapter.decoder_layers(model))
    assert len(own.encoder_hidden_states) == depth + 1  # embeddings, then every encoder layer
    for point, spec in adapter.entry.points.items():
        if spec["kind"] == "llm":
            # BART's encoder has no final norm: its last hidden state is the last layer's output.
            layer = depth if spec["layer"] == -1 else spec["layer"]
            expected[point] = at_positions(own.encoder_hidden_states[layer], index)
        assert early[point].shape == (2, SIDE * SIDE, 32), point
        torch.testing.assert_close(early[point], full[point], rtol=0, atol=0, msg=point)
        torch.testing.assert_close(early[point], expected[point], rtol=0, atol=0, msg=point)
    # The encoder pass the extractor's forward runs is the model's own.
    for mine, theirs in zip(output.encoder_hidden_states, own.encoder_hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_encoder_input_at_image_positions_is_the_projector_point():
    """The grid order of the points is the model's packing order: what the encoder is fed at
    the kept image positions is the projector point, token for token."""
    adapter, model = loaded(TINY)
    batch = images(2)
    inputs = adapter.prepare(batch, CPU)
    fed = []
    hook = model.model.language_model.encoder.register_forward_pre_hook(
        lambda _m, _a, kwargs: fed.append(kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.inference_mode():
            adapter.forward(model, inputs)
    finally:
        hook.remove()
    projector = extract_points(adapter, model, batch, ["F2"], CPU)["F2"]
    torch.testing.assert_close(at_positions(fed[0], adapter.image_token_index(inputs)), projector,
                               rtol=0, atol=0)


def test_projector_tokens_are_row_major_by_their_position_embeddings():
    """Fed a zero feature map, the projector's tokens depend on position only (its learned row
    and column embeddings): token r * cols + c is row r, column c."""
    adapter, model = loaded(TINY)
    projector = model.model.multi_modal_projector
    rows, cols = SIDE, SIDE  # row and column embeddings differ: a transpose would show
    with torch.inference_mode():
        tokens = adapter.encoder_tokens("F2", projector(torch.zeros(1, 32, rows, cols)), {})[0]
        position = projector.image_position_embed
        temporal = projector.visual_temporal_embed.pos_idx_to_embed[0]
        for r in range(rows):
            for c in range(cols):
                # The 2-D embedding is (column half, row half), as the projector concatenates it.
                embedding = torch.cat([position.column_embeddings.weight[c],
                                       position.row_embeddings.weight[r]]) + temporal
                expected = projector.image_proj_norm(projector.image_projection(embedding))
                torch.testing.assert_close(tokens[r * cols + c], expected)


def test_vision_layers_are_davit_blocks_on_their_stage_grid():
    points = {f"V{k}": {"kind": "vision", "layer": k} for k in range(1, 6)}
    adapter, model = bound({**points, "last": {"kind": "vision", "layer": -1}})
    adapter.check_points(list(adapter.entry.points), ROOT)
    batch = images(1, (224, 448))
    early = extract_points(adapter, model, batch, list(adapter.entry.points), CPU)
    inputs = adapter.prepare(batch, CPU)
    with torch.inference_mode():
        hidden = model.model.vision_tower(inputs["pixel_values"],
                                          output_hidden_states=True).hidden_states
    for k, side in enumerate(BLOCK_SIDES, start=1):
        (grid,) = adapter.geometry(f"V{k}", (224, 448)).grids
        assert (grid.rows, grid.cols) == (side, side)
        # hidden_states[0] is the first patch embedding; [k] is block k's output.
        torch.testing.assert_close(early[f"V{k}"], hidden[k].flatten(2).transpose(1, 2),
                                   rtol=0, atol=0)
    torch.testing.assert_close(early["last"], early["V5"], rtol=0, atol=0)
    beyond = bound({"V6": {"kind": "vision", "layer": 6}})[0]
    with pytest.raises(RegistryError, match=r"vision layer 6.*5 vision layers"):
        beyond.check_points(["V6"], ROOT)


def test_early_exit_runs_neither_later_layers_nor_the_decoder():
    adapter, model = loaded(TINY)
    calls = []
    encoder, decoder = adapter.decoder_layers(model), model.model.language_model.decoder
    handles = [encoder[-1].register_forward_hook(lambda *_: calls.append("encoder")),
               decoder.register_forward_hook(lambda *_: calls.append("decoder"))]
    try:
        extract_points(adapter, model, images(1), ["F2"], CPU)
        assert calls == []
        extract_points(adapter, model, images(1), ["F5"], CPU)  # the deepest point
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["encoder"]


def test_answers_one_prompt_per_image_in_florence2_prompts():
    adapter, model = loaded(TINY)
    batch = images(2)
    request = grounding_prompt(ObjectRef(0, 0, "red", "circle"), adapter.grounding_template)
    assert request == "<CAPTION_TO_PHRASE_GROUNDING>red circle"
    prompts = [request, "what colour is the circle?"]
    inputs = adapter.processor_inputs(batch, prompts, CPU)
    image = "<image>" * (1 + SIDE * SIDE)
    texts = adapter.processor.tokenizer.batch_decode(inputs["input_ids"],
                                                     skip_special_tokens=False)
    # The task token becomes the processor's sentence; a question is passed as it is.
    assert texts[0] == f"{image}<s>Locate the phrases in the caption: red circle</s>"
    assert texts[1].removesuffix("<pad>" * texts[1].count("<pad>")) == (
        f"{image}<s>what colour is the circle?</s>")
    answers = adapter.generate(model, batch, prompts, 6, CPU)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert not any(t in a for a in answers for t in ("<s>", "</s>", "<pad>"))
    alone = [adapter.generate(model, batch[i:i + 1], prompts[i:i + 1], 6, CPU)[0]
             for i in range(2)]
    assert answers == alone
    with pytest.raises(ValueError, match="one per image"):
        adapter.generate(model, batch, prompts[:1], 2, CPU)


def test_location_tokens_survive_decoding_and_the_framing_does_not():
    adapter, _ = loaded(TINY)
    tokenizer = adapter.processor.tokenizer
    answer = "red circle<loc_100><loc_200><loc_300><loc_400>"
    ids = tokenizer(f"</s><s>{answer}</s><pad><pad>", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[-7:-3]) == [
        "<loc_100>", "<loc_200>", "<loc_300>", "<loc_400>"]  # one token each
    assert adapter.decode(ids) == answer


def test_grounding_answers_parse_through_the_processor():
    adapter, _ = loaded(TINY)
    h, w = 224, 448

    def pixel(bin_: int, side: int) -> int:  # the centre of a thousandth, truncated
        return int((bin_ + 0.5) * side / 1000)

    box = adapter.parse_grounding(
        "red circle<loc_100><loc_200><loc_300><loc_400>blue square<loc_0><loc_0><loc_9><loc_9>",
        (h, w))
    np.testing.assert_array_equal(box, [pixel(100, w), pixel(200, h), pixel(300, w),
                                        pixel(400, h)])
    full = adapter.parse_grounding("red circle<loc_0><loc_0><loc_999><loc_999>", (h, w))
    np.testing.assert_array_equal(full, [0, 0, w - 1, h - 1])
    for malformed in ["", "red circle", "red circle<loc_1><loc_2><loc_3>",
                      "<loc_100><loc_200><loc_300><loc_400>",  # no phrase: not a grounding
                      "red circle<loc_500><loc_500><loc_400><loc_600>"]:  # x1 < x0
        assert adapter.parse_grounding(malformed, (h, w)) is None, malformed


def test_inconsistent_vocabularies_are_refused_before_weights_load():
    from transformers import Florence2Config

    adapter = adapter_for(get_entry(TINY))
    # Florence2Config() pairs image_token_id 51289 with BART's 50265-token vocabulary.
    with pytest.raises(RegistryError, match=r"image_token_id 51289.*vocab_size 50265.*Fix"):
        adapter.layer_counts(Florence2Config())


def test_doctor_passes_on_a_default_florence2_config(tmp_path):
    from transformers import Florence2Config

    # Florence2Config's defaults, with the vocabulary the florence-community conversions have.
    Florence2Config(text_config={"vocab_size": 51328}).save_pretrained(tmp_path / "source")
    entry = build_tiny_checkpoint(get_entry("florence2"), tmp_path / "source",
                                  tmp_path / "checkpoint")
    report = check_checkpoint(entry, torch.float32, ROOT)
    assert report.ok, format_report(report)
    assert [p.equals_reference for p in report.points] == [None, None, True, True, None]
    assert {p.grids for p in report.points} == {"24x24"}  # 768-px input, stride 32
    assert report.generation is not None and len(report.generation) == 2


def test_the_plans_entry_is_the_pinned_community_conversion():
    entry = get_entry("florence2")
    assert entry.family == "florence2" and entry.weights["source"] == "hub"
    assert entry.weights["repo_id"] == "florence-community/Florence-2-large"
    assert entry.weights["revision"] == "4271c66b88cdbc05735372ec13b2360108de5317"
    random = adapter_for(get_entry("florence2_random"))
    config = random.model_config(ROOT)
    assert random.layer_counts(config) == {"vision": 12, "llm": 12}
    random.config = config
    assert random.stage_grid(-1, (768, 768)) == (24, 24)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in random.model_class()(config).parameters())
    assert parameters == 776_505_344  # as measured on the pinned checkpoint (florence2.yaml)


def test_seeded_random_weights_are_reproducible():
    _, model = loaded(TINY)
    again = adapter_for(get_entry(TINY)).load(ROOT, CPU)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_a_processor_that_crops_is_refused():
    adapter, model = loaded(TINY)
    other = adapter_for(adapter.entry)
    other.dtype, other.mends = torch.float32, []
    other.offline_processor = lambda: type(adapter.processor)(
        image_processor=type(adapter.processor.image_processor)(
            size={"height": 288, "width": 288}, crop_size={"height": 256, "width": 256},
            do_center_crop=True, image_seq_length=65),
        tokenizer=adapter.processor.tokenizer, post_processor_config={})
    with pytest.raises(RegistryError, match=r"crops to \{'height': 256, 'width': 256\}.*Fix"):
        other.setup(model, None)
