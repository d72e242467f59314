"""Grounding parsers on fixed strings per family, grounding scores, VQA questions and scoring."""

from __future__ import annotations

import numpy as np
import pytest

from vlmprobe.data.dataset import load_split
from vlmprobe.data.shapes import generate_shapes
from vlmprobe.probes.grounding import (
    grounding_prompt,
    grounding_scores,
    normalise_answer,
    object_colours,
    parse_box,
    unique_objects,
    vqa_accuracy,
    vqa_questions,
)

SIZE = (200, 400)  # h, w


@pytest.mark.parametrize(
    ("family", "text", "expected"),
    [
        ("cogvlm2", "The red circle is at [[100,200,500,750]].", [40, 40, 200, 150]),
        ("cogvlm2", "[[086,540,400,760]]", [34.4, 108, 160, 152]),
        ("internvl2", "<ref>red circle</ref><box>[[100, 200, 500, 750]]</box>", [40, 40, 200, 150]),
        ("qwen2_5_vl", '```json\n[{"bbox_2d": [10, 20, 110, 90], "label": "red circle"}]\n```',
         [10, 20, 110, 90]),
        ("qwen2_5_vl", 'Here: {"bbox_2d": [10.5, 20, 110, 90]}', [10.5, 20, 110, 90]),
        ("qwen2_5_vl", '[{"bbox_2d": [10, 20, 999, 90]}]', [10, 20, 400, 90]),  # clipped
    ],
)
def test_parse_box_reads_each_family_format(family, text, expected):
    np.testing.assert_allclose(parse_box(text, family, SIZE), expected)


@pytest.mark.parametrize(
    ("family", "text"),
    [
        ("cogvlm2", "I cannot see a red circle."),
        ("cogvlm2", "[[100,200,50,750]]"),  # x1 < x0
        ("internvl2", "<box>[[1, 2, 3]]</box>"),
        ("qwen2_5_vl", '```json\n[{"bbox_2d": [10, 20, 110'),  # truncated
        ("qwen2_5_vl", '{"bbox": [1, 2, 3, 4]}'),
        ("qwen2_5_vl", '[{"bbox_2d": ["a", 2, 3, 4]}]'),
        ("qwen2_5_vl", ""),
    ],
)
def test_malformed_output_is_a_miss_not_a_crash(family, text):
    assert parse_box(text, family, SIZE) is None


def test_parse_box_names_the_valid_families():
    with pytest.raises(ValueError, match="cogvlm2"):
        parse_box("[[1,2,3,4]]", "llava", SIZE)


def test_grounding_scores_count_failures_as_zero():
    truth = [np.array([0, 0, 10, 10]), np.array([0, 0, 10, 10])]
    result = grounding_scores([np.array([0, 0, 10, 5]), None], truth)
    assert result == {"grounding_iou": pytest.approx(0.25), "parse_failure_rate": 0.5}


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
    perfect = vqa_accuracy([q.answer.upper() + "." for q in questions], questions)
    assert perfect["vqa_acc"] == 1.0
    assert vqa_accuracy(["banana"] * len(questions), questions)["vqa_acc"] == 0.0


def test_unique_objects_are_named_once_per_image(split):
    for ref in unique_objects(split):
        prompt = grounding_prompt(ref)
        assert prompt == f"Find the location of the {ref.colour} {ref.shape}."
