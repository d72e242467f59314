"""The `ground` stage: metrics/ground.json for a generating tiny model, "not applicable" for a
model that does not generate (without loading it), and malformed answers counted as misses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import stage_args
from vlmprobe.data.dataset import load_split
from vlmprobe.data.shapes import generate_shapes
from vlmprobe.gpus import require_device
from vlmprobe.models.box_text import parse_box
from vlmprobe.params import ParamsError
from vlmprobe.probes.grounding import unique_objects
from vlmprobe.stages import ground

GROUND = {"seed": 0, "images": 2, "grounding_max_new_tokens": 4, "vqa_max_new_tokens": 2,
          "batch_size": 4, "threads": 1, "bootstrap": 50, "device": "cpu"}


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A project directory with a small shapes dataset and no model assets."""
    generate_shapes(tmp_path / "data/images", seed=0, image_size=112, n_train=2, n_val=1,
                    n_test=3, min_objects=2, max_objects=3, min_size=16, max_size=36)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_stage(vlm: str, **overrides) -> dict:
    Path("params.yaml").write_text(yaml.safe_dump({"vlm": vlm, "ground": {**GROUND,
                                                                          **overrides}}))
    ground.main(stage_args("ground"))
    return json.loads(Path("metrics/ground.json").read_text())


def test_a_model_that_does_not_generate_is_not_applicable(workspace):
    # dinov2_small's weights are an asset this workspace lacks: nothing may load.
    metrics = run_stage("dinov2_small")
    why = "not applicable: dinov2_small does not generate text"
    assert metrics["not_applicable"] == {"grounding": why, "vqa": why}
    assert metrics["meta"]["vlm"] == "dinov2_small"
    assert "grounding_iou" not in metrics and "vqa_acc" not in metrics


def test_another_dataset_is_not_applicable(workspace):
    # The questions name the synthetic shapes' colours and classes: COCO images have neither.
    path = workspace / "data/images/instances_test.json"
    coco = json.loads(path.read_text())
    coco["categories"] = [{"id": 1, "name": "person", "supercategory": "person"}]
    path.write_text(json.dumps(coco))
    metrics = run_stage("cogvlm2_tiny")
    assert set(metrics["not_applicable"]) == {"grounding", "vqa"}
    assert "data.dataset: shapes" in metrics["not_applicable"]["vqa"]
    assert "vqa_acc" not in metrics


def test_tiny_model_grounds_and_answers_end_to_end(workspace):
    metrics = run_stage("cogvlm2_tiny")
    split = load_split(workspace / "data/images", "test")
    asked = [r for r in unique_objects(split) if r.image < GROUND["images"]]
    assert metrics["grounding_questions"] == len(asked) > 0
    # A random model writes no box: every answer is a counted parse failure, scored 0.
    assert metrics["grounding_parse_failure_rate"] == 1.0
    assert metrics["grounding_iou"] == 0.0 and metrics["grounding_iou_ci95"] == [0.0, 0.0]
    lo, hi = metrics["vqa_acc_ci95"]
    assert 0.0 <= lo <= metrics["vqa_acc"] <= hi <= 1.0
    assert metrics["vqa_questions_count"] == GROUND["images"]
    assert metrics["grounding_samples"][0]["prompt"].startswith("Find the location of the ")
    assert metrics["meta"]["weights"]["label"].startswith("RANDOM")
    assert metrics["meta"]["box_format"] == "0-1000" and metrics["not_applicable"] == {}


def test_a_family_without_a_box_format_answers_questions_only(workspace):
    metrics = run_stage("llava_next_tiny")
    assert "has no grounding output format" in metrics["not_applicable"]["grounding"]
    assert "grounding_iou" not in metrics and "vqa_acc" in metrics


class FixedAnswers:
    """An adapter stand-in that answers from a script: the stage's scoring on known text."""

    generates, box_format, grounding_template = True, "0-1000", "Find the {object}."

    def __init__(self, answer_for):
        self.answer_for = answer_for

    def generate(self, model, images, prompts, max_new_tokens, device):
        return [self.answer_for(p) for p in prompts]

    def parse_grounding(self, answer, image_size):  # as every text-format family parses
        return parse_box(answer, self.box_format, image_size)


def test_malformed_answers_are_misses_and_good_boxes_score(workspace):
    split = load_split(workspace / "data/images", "test")
    refs = unique_objects(split)
    first = refs[0]
    x0, y0, x1, y1 = split.boxes[first.image][first.obj] / 112 * 1000

    def answer_for(prompt: str) -> str:
        if prompt == f"Find the {first.colour} {first.shape}.":
            return f"It is at [[{x0:.0f},{y0:.0f},{x1:.0f},{y1:.0f}]]."
        return "[[1, 2, 3"  # truncated

    config = {**ground.validate({"vlm": "cogvlm2_tiny", "ground": GROUND}), "images": 3}
    result = ground.run_grounding(FixedAnswers(answer_for), None, split, config, "cpu")
    n = len(refs)
    assert result["grounding_parse_failure_rate"] == pytest.approx((n - 1) / n)
    assert result["grounding_iou"] == pytest.approx(1 / n, abs=0.01)
    assert result["grounding_samples"][0]["box"] is not None


@pytest.mark.parametrize(("key", "value", "message"), [
    ("device", "tpu", "auto, cpu, cuda"),
    ("images", 0, "ground.images"),
    ("batch_size", 0, "ground.batch_size"),
])
def test_bad_params_are_refused_before_any_model_loads(key, value, message):
    with pytest.raises(ParamsError, match=message):
        ground.validate({"vlm": "qwen2_5_vl_tiny", "ground": {**GROUND, key: value}})



@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_with_the_fix():
    with pytest.raises(ParamsError, match="ground.device=cpu"):
        require_device({"ground": {"device": "cuda"}}, "ground.device")
