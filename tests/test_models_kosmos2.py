"""The kosmos2 family (Kosmos2ForConditionalGeneration): the tower's patch grid, then latent
queries that cover the whole image; grounding answers in Kosmos-2's location tokens, parsed by its
processor's own post-processing; `vlmprobe doctor` on a config shaped like the published one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import stage_args
from test_models_vlm import CPU, full_pass, images, loaded
from vlmprobe.data.dataset import load_split
from vlmprobe.data.shapes import generate_shapes
from vlmprobe.extract.engine import extract_points
from vlmprobe.extract.geometry import Grid
from vlmprobe.models import doctor
from vlmprobe.models.kosmos2 import Kosmos2Adapter
from vlmprobe.models.registry import RegistryError, adapter_for, get_entry
from vlmprobe.models.vlm import gather_positions
from vlmprobe.probes.grounding import ObjectRef, grounding_prompt, unique_objects
from vlmprobe.stages import ground

ROOT = Path.cwd()
TINY = "kosmos2_tiny"
SIDE = 8  # kosmos2_tiny: 112-px input, 14-px patches
QUERIES = 16  # kosmos2_tiny's latent_query_num
KNOWN = "describe the image ."  # words of the offline vocabulary
# The ground stage's request for an object, in words of the offline vocabulary.
REQUEST = grounding_prompt(ObjectRef(0, 0, "describe", "image"), Kosmos2Adapter.grounding_template)


def whole(size: tuple[int, int]) -> tuple[float, float, float, float]:
    return (0.0, 0.0, float(size[1]), float(size[0]))


@pytest.mark.parametrize("size", [(224, 224), (224, 448)])
def test_point_tokens_match_their_geometry(size):
    adapter, model = loaded(TINY)
    batch = images(2, size)
    tokens = extract_points(adapter, model, batch, list(adapter.entry.points), CPU)
    for point, spec in adapter.entry.points.items():
        geometry = adapter.geometry(point, size)
        assert tokens[point].shape[:2] == (2, geometry.n_tokens), point
        assert torch.isfinite(tokens[point]).all(), point
        if spec["kind"] == "vision":  # the image resized whole: one patch grid
            assert geometry.grids == (Grid(SIDE, SIDE, whole(size)),)
        else:  # latent queries: each one pooled from the whole image
            assert geometry.grids == (Grid(1, 1, whole(size)),) * QUERIES
    inputs = adapter.prepare(batch, CPU)
    assert adapter.image_token_index(inputs).shape == (2, QUERIES)


def test_points_equal_the_models_own_features_and_the_full_pass():
    adapter, model = loaded(TINY)
    points, batch = list(adapter.entry.points), images(2)
    early = extract_points(adapter, model, batch, points, CPU)
    full, hidden, inputs = full_pass(adapter, model, batch, points)
    with torch.inference_mode():
        tower = model.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True)
        queries = model.get_image_features(inputs["pixel_values"]).pooler_output
    index = adapter.image_token_index(inputs)
    depth = len(adapter.decoder_layers(model))
    compared = []
    for point, spec in adapter.entry.points.items():
        torch.testing.assert_close(early[point], full[point].float(), rtol=0, atol=0)
        layer = spec.get("layer")
        if spec["kind"] == "vision":
            expected = tower.hidden_states[layer][:, 1:]  # CLS dropped
        elif spec["kind"] == "connector":
            expected = queries
        elif layer not in (-1, depth):  # hidden_states[-1] is after the final norm
            expected = gather_positions(hidden[layer], index)
        else:
            continue
        torch.testing.assert_close(early[point], expected, rtol=0, atol=0, msg=point)
        compared.append(point)
    assert compared == ["K1", "K2", "K3", "K4"]


def test_the_llm_reads_the_connector_tokens_at_the_image_positions():
    """The decoder's input at the image positions is the connector point in the same order
    (scaled by the embedding scale, plus each position's sinusoidal embedding)."""
    adapter, model = loaded(TINY)
    batch = images(2)
    connector = extract_points(adapter, model, batch, ["K2"], CPU)["K2"]
    _, hidden, inputs = full_pass(adapter, model, batch, [])
    text = model.text_model.model
    with torch.inference_mode():
        positions = text.embed_positions(input_ids=inputs["input_ids"])
    index = adapter.image_token_index(inputs)
    expected = connector * text.embed_scale + gather_positions(positions, index)
    torch.testing.assert_close(gather_positions(hidden[0], index), expected)


def test_the_latent_queries_are_not_tied_to_patch_positions():
    """Why the connector has no grid: reordering the tower's tokens leaves its output unchanged."""
    _, model = loaded(TINY)
    torch.manual_seed(0)
    features = torch.randn(2, 1 + SIDE * SIDE, model.config.vision_config.hidden_size)
    order = torch.randperm(features.shape[1])
    with torch.inference_mode():
        pooled = model.image_to_text_projection(features)[0]
        reordered = model.image_to_text_projection(features[:, order])[0]
    assert pooled.shape == (2, QUERIES, model.config.text_config.embed_dim)
    torch.testing.assert_close(reordered, pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("point", "unused"), [("K1", "connector"), ("K2", "last decoder layer")])
def test_early_exit_skips_later_modules(point, unused):
    adapter, model = loaded(TINY)
    module = (model.image_to_text_projection if unused == "connector"
              else adapter.decoder_layers(model)[-1])
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    try:
        extract_points(adapter, model, images(1), [point], CPU)
    finally:
        handle.remove()
    assert calls == []


def test_answers_one_prompt_per_image_in_kosmos2s_formats():
    adapter, model = loaded(TINY)
    prefills = []
    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, args: prefills.append(args[0].clone()) if args[0].shape[1] > 1 else None)
    try:
        answers = adapter.generate(model, images(2), [REQUEST, KNOWN], 3, CPU)
    finally:
        hook.remove()
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # The image block first, then the request as it is or the question in Kosmos-2's format.
    tokenizer = adapter.processor.tokenizer
    texts = [tokenizer.convert_ids_to_tokens(row.tolist()) for ids in prefills for row in ids]
    assert [t[:2] for t in texts] == [["<s>", "<image>"]] * 2
    assert [t[2 + QUERIES] for t in texts] == ["</image>"] * 2
    assert texts[0][3 + QUERIES:] == ["<grounding>", "<phrase>", "▁the", "▁describe", "▁image",
                                      "</phrase>"]
    assert texts[1][3 + QUERIES:] == ["▁Question:", "▁describe", "▁the", "▁image", "▁.",
                                      "▁Answer:"]
    with pytest.raises(ValueError, match="one per image"):
        adapter.generate(model, images(2), [KNOWN], 2, CPU)


def test_batched_answers_equal_one_at_a_time():
    """Prompts of equal token length go in one batch, others in their own (no padding)."""
    adapter, model = loaded(TINY)
    batch = images(3)
    prompts = [REQUEST, "image", KNOWN]
    prefills = []
    hook = model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, args: prefills.append(args[0].shape) if args[0].shape[1] > 1 else None)
    try:
        adapter.generate(model, batch, prompts, 1, CPU)
    finally:
        hook.remove()
    assert [shape[0] for shape in prefills] == [2, 1]
    together = adapter.generate(model, batch, prompts, 4, CPU)
    alone = [adapter.generate(model, batch[i:i + 1], prompts[i:i + 1], 4, CPU)[0]
             for i in range(3)]
    assert together == alone


def test_grounding_answers_keep_their_location_tokens_and_questions_come_out_clean():
    adapter, _ = loaded(TINY)
    generated = adapter.processor.tokenizer.convert_tokens_to_ids(
        ["<object>", "<patch_index_0044>", "<patch_index_0863>", "</object>", "▁the", "▁image",
         "</s>", "<pad>"])
    answer = adapter.decode(generated, grounding=True)
    assert answer == "<object><patch_index_0044><patch_index_0863></object> the image"
    assert adapter.decode(generated, grounding=False) == "the image"
    np.testing.assert_allclose(adapter.parse_grounding(answer, (100, 200)),
                               [78.125, 4.6875, 196.875, 82.8125])


H, W = 100, 200  # a non-square image: x scales with the width, y with the height
SNOWMAN = [0.390625 * W, 0.046875 * H, 0.984375 * W, 0.828125 * H]  # cells 44 and 863


@pytest.mark.parametrize(("answer", "box"), [
    # A phrase and its object, as post_process_generation documents it; the first entity counts.
    ("<phrase> the red circle</phrase><object><patch_index_0044><patch_index_0863></object> is "
     "left of<phrase> a square</phrase><object><patch_index_0005><patch_index_0911></object>.",
     SNOWMAN),
    # The continuation of a referring-expression request: the object alone.
    ("<object><patch_index_0044><patch_index_0863></object> is in the middle", SNOWMAN),
    # Two boxes for one phrase: the first; its corners in different rows and columns are cell
    # centres.
    ("<phrase> circles</phrase><object><patch_index_0000><patch_index_0033>"
     "</delimiter_of_multi_objects/><patch_index_0500><patch_index_0600></object>",
     [W / 64, H / 64, 3 * W / 64, 3 * H / 64]),
    # Both corners in one cell: the cell's edges.
    ("<object><patch_index_1023><patch_index_1023></object>", [31 * W / 32, 31 * H / 32, W, H]),
])
def test_grounding_answers_parse_to_pixel_boxes(answer, box):
    adapter, _ = loaded(TINY)
    np.testing.assert_allclose(adapter.parse_grounding(answer, (H, W)), box)


@pytest.mark.parametrize("answer", [
    "",
    "the red circle is in the middle",
    "<phrase> the red circle</phrase>",  # no location
    "<object><patch_index_0044></object>",  # one corner
    "<object><patch_index_0044><patch_index_0863>",  # not closed
    "<object> <patch_index_0044> <patch_index_0863> </object>",  # not the model's spelling
    "<object><patch_index_0863><patch_index_0044></object>",  # corners reversed: empty box
    "<object><patch_index_5000><patch_index_6000></object>",  # past the grid: nothing left
    "[[100, 200, 300, 400]]",  # another family's format
])
def test_answers_without_a_usable_location_are_none(answer):
    adapter, _ = loaded(TINY)
    assert adapter.parse_grounding(answer, (H, W)) is None


def test_a_processor_that_crops_is_refused():
    adapter, _ = loaded(TINY)
    cropping = copy.copy(adapter)
    cropping.processor = copy.deepcopy(adapter.processor)
    cropping.processor.image_processor.do_center_crop = True
    with pytest.raises(RegistryError, match=r"whole image.*Fix: set size"):
        cropping.check_image_processor()


def test_entries_have_the_published_shapes():
    hub = get_entry("kosmos2")
    assert hub.weights["repo_id"] == "microsoft/kosmos-2-patch14-224"
    assert len(hub.weights["revision"]) == 40
    assert adapter_for(hub).box_format == "kosmos2-locations"
    random = adapter_for(get_entry("kosmos2_random"))
    config = random.model_config(ROOT)
    assert random.layer_counts(config) == {"vision": 24, "llm": 24}
    assert config.vision_config.image_size // config.vision_config.patch_size == 16
    assert config.latent_query_num == 64 and config.text_config.vocab_size == 65037
    random.check_points(list(random.entry.points), ROOT)
    adapter, _ = loaded(TINY)
    assert len(adapter.processor.tokenizer) <= adapter.config.text_config.vocab_size


@pytest.fixture(scope="module")
def doctored(tmp_path_factory):
    """A checkpoint folder holding only the config.json of Kosmos2Config's defaults (which
    mirror microsoft/kosmos-2-patch14-224), shrunk by the doctor: the local entry it loads."""
    folder = tmp_path_factory.mktemp("kosmos2-doctor")
    from transformers import Kosmos2Config

    Kosmos2Config().save_pretrained(folder / "source")
    return doctor.build_tiny_checkpoint(get_entry("kosmos2"), folder / "source",
                                        folder / "checkpoint")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_doctor_passes_on_the_published_config(doctored, dtype):
    report = doctor.check_checkpoint(doctored, dtype, ROOT)
    assert report.ok, doctor.format_report(report)
    assert [(p.point, p.tokens) for p in report.points] == [
        ("K1", 256), ("K2", 64), ("K3", 64), ("K4", 64), ("K5", 64)]
    assert [p.equals_reference for p in report.points] == [None, None, True, True, None]
    assert len(report.generation) == 2


def test_the_ground_stage_parses_the_tiny_models_answers(tmp_path, monkeypatch):
    generate_shapes(tmp_path / "data/images", seed=0, image_size=112, n_train=2, n_val=1,
                    n_test=2, min_objects=2, max_objects=3, min_size=16, max_size=36)
    monkeypatch.chdir(tmp_path)
    settings = {"seed": 0, "images": 2, "grounding_max_new_tokens": 6, "vqa_max_new_tokens": 2,
                "batch_size": 4, "threads": 1, "bootstrap": 50, "device": "cpu"}
    Path("params.yaml").write_text(yaml.safe_dump({"vlm": TINY, "ground": settings}))
    ground.main(stage_args("ground"))
    metrics = json.loads(Path("metrics/ground.json").read_text())
    asked = unique_objects(load_split(tmp_path / "data/images", "test"))
    assert metrics["grounding_questions"] == len(asked) > 0
    assert 0.0 <= metrics["grounding_parse_failure_rate"] <= 1.0
    assert metrics["meta"]["box_format"] == "kosmos2-locations"
    assert metrics["grounding_samples"][0]["prompt"].startswith("<grounding><phrase> the ")
    assert "vqa_acc" in metrics and metrics["not_applicable"] == {}
