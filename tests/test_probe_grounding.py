"""Grounding parsers on fixed strings per box format (the families' own outputs), grounding
scores, VQA questions and scoring."""

from __future__ import annotations

import numpy as np
import pytest

from vlmprobe.data.dataset import load_split
from vlmprobe.data.shapes import generate_shapes
from vlmprobe.models.box_text import parse_box
from vlmprobe.probes.grounding import (
    first_images,
    grounding_prompt,
    grounding_scores,
    normalise_answer,
    object_colours,
    unique_objects,
    vqa_accuracy,
    vqa_questions,
)

SIZE = (200, 400)  # h, w


@pytest.mark.parametrize(
    ("box_format", "text", "expected"),
    [
        ("0-1000", "The red circle is at [[100,200,500,750]].", [40, 40, 200, 150]),  # CogVLM2
        ("0-1000", "[[086,540,400,760]]", [34.4, 108, 160, 152]),
        ("0-1000", "<ref>red circle</ref><box>[[100, 200, 500, 750]]</box>",  # InternVL2
         [40, 40, 200, 150]),
        ("pixels-json",  # Qwen2.5-VL
         '```json\n[{"bbox_2d": [10, 20, 110, 90], "label": "red circle"}]\n```',
         [10, 20, 110, 90]),
        ("pixels-json", 'Here: {"bbox_2d": [10.5, 20, 110, 90]}', [10.5, 20, 110, 90]),
        ("pixels-json", '[{"bbox_2d": [10, 20, 999, 90]}]', [10, 20, 400, 90]),  # clipped
    ],
)
def test_parse_box_reads_each_family_format(box_format, text, expected):
    np.testing.assert_allclose(parse_box(text, box_format, SIZE), expected)


@pytest.mark.parametrize(
    ("box_format", "text"),
    [
        ("0-1000", "I cannot see a red circle."),
        ("0-1000", "[[100,200,50,750]]"),  # x1 < x0
        ("0-1000", "<box>[[1, 2, 3]]</box>"),
        ("0-1000", "assistant: assistant: [UNK]"),  # what a tiny random model writes
        ("pixels-json", '```json\n[{"bbox_2d": [10, 20, 110'),  # truncated
        ("pixels-json", '{"bbox": [1, 2, 3, 4]}'),
        ("pixels-json", '[{"bbox_2d": ["a", 2, 3, 4]}]'),
        ("pixels-json", ""),
    ],
)
def test_malformed_output_is_a_miss_not_a_crash(box_format, text):
    assert parse_box(text, box_format, SIZE) is None


def test_parse_box_names_the_valid_formats():
    with pytest.raises(ValueError, match="0-1000, pixels-json"):
        parse_box("[[1,2,3,4]]", "llava", SIZE)


def test_grounding_scores_count_failures_as_zero():
    truth = [np.array([0, 0, 10, 10])] * 3
    result = grounding_scores([np.array([0, 0, 10, 5]), None, np.array([0, 0, 10, 10])], truth,
                              images=[0, 0, 1], n_boot=200, seed=0)
    assert result["grounding_iou"] == pytest.approx(0.5)
    assert result["grounding_parse_failure_rate"] == pytest.approx(1 / 3)
    assert result["grounding_questions"] == 3
    lo, hi = result["grounding_iou_ci95"]
    # Resampling images: image 0 alone scores 0.25, image 1 alone 1.0.
    assert 0.25 <= lo <= 0.5 <= hi <= 1.0 and lo < hi
    again = grounding_scores([np.array([0, 0, 10, 5]), None, np.array([0, 0, 10, 10])], truth,
                             images=[0, 0, 1], n_boot=200, seed=0)
    assert again == result  # seeded


@pytest.mark.parametrize(("text", "normal"), [("Three.", "3"), (" Yes, it is", "yes"),
                                               ("RED", "red"), ("", "")])
def test_normalise_answer(text, normal):
    assert normalise_answer(text) == normal


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("g") / "shapes"
    generate_shapes(root, seed=0, image_size=96, n_train=4, n_val=2, n_test=8, min_objects=2,
                    max_objects=4, min_size=14, max_size=28)
    return load_split(root, "test")


def test_questions_have_ground_truth_answers(split):
    questions = vqa_questions(split)
    kinds = {q.kind for q in questions}
    assert {"count", "colour"} <= kinds
    counts = [q for q in questions if q.kind == "count"]
    assert [q.answer for q in counts] == [str(len(b)) for b in split.boxes]
    colours = object_colours(split)
    for q in questions:
        if q.kind == "colour":
            assert q.answer in colours[q.image]
        if q.kind == "left_of":
            assert q.answer in {"yes", "no"}
    perfect = vqa_accuracy([q.answer.upper() + "." for q in questions], questions, 100, 0)
    assert perfect["vqa_acc"] == 1.0 and perfect["vqa_acc_ci95"] == [1.0, 1.0]
    assert perfect["vqa_questions"] == len(questions)
    for kind in kinds:
        assert perfect[f"vqa_acc_{kind}"] == 1.0
        assert perfect[f"vqa_questions_{kind}"] == sum(q.kind == kind for q in questions)
    assert vqa_accuracy(["banana"] * len(questions), questions, 100, 0)["vqa_acc"] == 0.0


def test_unique_objects_are_named_once_per_image(split):
    for ref in unique_objects(split):
        prompt = grounding_prompt(ref, "Find the location of the {object}.")
        assert prompt == f"Find the location of the {ref.colour} {ref.shape}."


def test_first_images_cuts_every_field(split):
    head = first_images(split, 3)
    assert len(head.images) == len(head.boxes) == len(head.masks) == len(head.image_ids) == 3
    assert head.boxes[2] is split.boxes[2] and head.categories == split.categories
