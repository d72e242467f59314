"""Grounding test (E-P4.3) and semantic check (H-P4), as pure functions: questions and prompts
from the synthetic ground truth, parsers for each family's output, and the scores.

The generating models' adapters call these; malformed output is a miss, never a crash.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from vlmprobe.data.dataset import Split
from vlmprobe.data.shapes import PALETTE
from vlmprobe.metrics.boxes import box_iou_matrix

# Names of the shapes dataset's palette colours, in PALETTE order.
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple")
assert len(COLOUR_NAMES) == len(PALETTE), "name every palette colour"
# Box coordinate conventions of each family's grounding output.
FAMILY_FORMATS = {"cogvlm2": "0-1000", "internvl2": "0-1000", "qwen2_5_vl": "pixels-json"}
NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_NUMBER = r"-?\d+(?:\.\d+)?"
_BRACKETED_BOX = re.compile(
    rf"\[\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]"
)


@dataclass(frozen=True)
class ObjectRef:
    image: int  # index into the split
    obj: int  # index into the image's objects
    colour: str
    shape: str


@dataclass(frozen=True)
class Question:
    image: int
    kind: str  # count, colour or left_of
    text: str
    answer: str


def object_colours(split: Split) -> list[list[str]]:
    """Per image, each object's colour name: the palette colour nearest its median pixel."""
    out = []
    for image, masks in zip(split.images, split.masks, strict=True):
        names = []
        for mask in masks:
            median = np.median(image[mask].astype(float), axis=0)
            names.append(COLOUR_NAMES[int(np.argmin(((PALETTE - median) ** 2).sum(axis=1)))])
        out.append(names)
    return out


def unique_objects(split: Split) -> list[ObjectRef]:
    """Objects that "the <colour> <shape>" names unambiguously within their image."""
    shape_of = {c["id"]: c["name"] for c in split.categories}
    refs = []
    for i, (colours, labels) in enumerate(zip(object_colours(split), split.labels, strict=True)):
        described = [(c, shape_of[int(label)]) for c, label in zip(colours, labels, strict=True)]
        for k, d in enumerate(described):
            if described.count(d) == 1:
                refs.append(ObjectRef(i, k, *d))
    return refs


def grounding_prompt(ref: ObjectRef) -> str:
    return f"Find the location of the {ref.colour} {ref.shape}."


def parse_box(text: str, family: str, image_size: tuple[int, int]) -> np.ndarray | None:
    """The first box in a model's answer as xyxy pixels, or None if there is none usable.

    CogVLM2 and InternVL2 write `[[x0,y0,x1,y1]]` in 0-1000 coordinates (InternVL inside
    `<box>...</box>`); Qwen2.5-VL writes JSON with `bbox_2d` in absolute pixels, often fenced.
    """
    if family not in FAMILY_FORMATS:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILY_FORMATS)}")
    h, w = image_size
    if FAMILY_FORMATS[family] == "0-1000":
        match = _BRACKETED_BOX.search(text)
        if match is None:
            return None
        box = np.array([float(v) for v in match.groups()]) / 1000.0 * np.array([w, h, w, h])
    else:
        box = _json_bbox(text)
        if box is None:
            return None
    box = np.clip(box, 0, [w, h, w, h])
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    return box


def _json_bbox(text: str) -> np.ndarray | None:
    start = min((i for i in (text.find("["), text.find("{")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        data, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    items = data if isinstance(data, list) else [data]
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("bbox_2d"), list):
            values = item["bbox_2d"]
            if len(values) == 4 and all(isinstance(v, int | float) for v in values):
                return np.array(values, dtype=float)
    return None


def grounding_scores(predicted: list[np.ndarray | None], truth: list[np.ndarray]) -> dict:
    """`grounding_iou`: mean IoU with the named object, a missing box counting 0;
    `parse_failure_rate`: the fraction of answers with no usable box."""
    ious = [0.0 if p is None else float(box_iou_matrix(p, t)[0, 0])
            for p, t in zip(predicted, truth, strict=True)]
    failures = sum(p is None for p in predicted)
    n = max(len(truth), 1)
    return {"grounding_iou": float(np.sum(ious) / n), "parse_failure_rate": failures / n}


def vqa_questions(split: Split) -> list[Question]:
    """Count, colour and left-of questions with exact answers from the ground truth."""
    shape_of = {c["id"]: c["name"] for c in split.categories}
    refs = unique_objects(split)
    questions = []
    for i, labels in enumerate(split.labels):
        questions.append(Question(i, "count", "How many shapes are in the image? Answer with a "
                                  "number.", str(len(labels))))
        shapes = [shape_of[int(label)] for label in labels]
        colours = object_colours(split)[i] if len(labels) else []
        for k, shape in enumerate(shapes):
            if shapes.count(shape) == 1:
                questions.append(Question(i, "colour", f"What colour is the {shape}? Answer with "
                                          "one word.", colours[k]))
        mine = [r for r in refs if r.image == i]
        for a in mine:
            for b in mine:
                box_a, box_b = split.boxes[i][a.obj], split.boxes[i][b.obj]
                if a.obj < b.obj and (box_a[2] <= box_b[0] or box_b[2] <= box_a[0]):
                    answer = "yes" if box_a[2] <= box_b[0] else "no"
                    questions.append(Question(
                        i, "left_of", f"Is the {a.colour} {a.shape} to the left of the "
                        f"{b.colour} {b.shape}? Answer yes or no.", answer))
    return questions


def normalise_answer(text: str) -> str:
    """Lower case, first word, punctuation stripped, number words as digits."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    if not words:
        return ""
    return NUMBER_WORDS.get(words[0], words[0])


def vqa_accuracy(answers: list[str], questions: list[Question]) -> dict:
    """Exact-match accuracy after `normalise_answer`, overall (`vqa_acc`) and per kind."""
    correct = [normalise_answer(a) == q.answer for a, q in zip(answers, questions, strict=True)]
    result = {"vqa_acc": float(np.mean(correct)) if correct else 0.0}
    for kind in sorted({q.kind for q in questions}):
        hits = [c for c, q in zip(correct, questions, strict=True) if q.kind == kind]
        result[f"vqa_acc_{kind}"] = float(np.mean(hits))
    return result
