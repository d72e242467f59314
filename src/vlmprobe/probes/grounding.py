"""Grounding test (E-P4.3) and semantic check (H-P4), as pure functions: questions and prompts
from the synthetic ground truth and the scores with seeded bootstrap intervals over images.

The `ground` stage asks the model (each family adapter names its `grounding_template` and parses
its answer, `parse_grounding`, vlmprobe.models.box_text); malformed output is a miss, never a
crash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from vlmprobe.data.dataset import Split
from vlmprobe.data.shapes import PALETTE
from vlmprobe.metrics.boxes import bootstrap_ci, box_iou_matrix
from vlmprobe.metrics.finite import require_finite

# Names of the shapes dataset's palette colours, in PALETTE order.
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple")
assert len(COLOUR_NAMES) == len(PALETTE), "name every palette colour"
NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
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


def grounding_prompt(ref: ObjectRef, template: str) -> str:
    """The family's grounding request (`{object}` in `template`) for the plan's object."""
    return template.format(object=f"{ref.colour} {ref.shape}")


def grouped_ratio(values: list[float], images: list[int], n_boot: int, seed: int,
                  name: str) -> dict:
    """`name`: the mean of `values`; `name_ci95`: its bootstrap interval resampling images (the
    questions about one image are not independent)."""
    require_finite(f"grouped_ratio({name} values)", values)
    values_arr = np.asarray(values, dtype=float)
    _, group = np.unique(np.asarray(images), return_inverse=True)
    sums = np.bincount(group, weights=values_arr) if len(values_arr) else np.zeros(0)
    counts = np.bincount(group).astype(float) if len(values_arr) else np.zeros(0)
    mean = float(values_arr.mean()) if len(values_arr) else 0.0
    return {name: mean, f"{name}_ci95": list(bootstrap_ci(sums, counts, n_boot, seed))}


def grounding_scores(predicted: list[np.ndarray | None], truth: list[np.ndarray],
                     images: list[int], n_boot: int = 1000, seed: int = 0) -> dict:
    """`grounding_iou`: mean IoU with the named object, a missing box counting 0, with its
    interval; `grounding_parse_failure_rate`: the fraction of answers with no usable box."""
    ious = [0.0 if p is None else float(box_iou_matrix(p, t)[0, 0])
            for p, t in zip(predicted, truth, strict=True)]
    failures = sum(p is None for p in predicted)
    return {**grouped_ratio(ious, images, n_boot, seed, "grounding_iou"),
            "grounding_parse_failure_rate": failures / max(len(truth), 1),
            "grounding_questions": len(truth)}


def vqa_questions(split: Split) -> list[Question]:
    """Count, colour and left-of questions with exact answers from the ground truth."""
    shape_of = {c["id"]: c["name"] for c in split.categories}
    refs = unique_objects(split)
    colours_of = object_colours(split)
    questions = []
    for i, labels in enumerate(split.labels):
        questions.append(Question(i, "count", "How many shapes are in the image? Answer with a "
                                  "number.", str(len(labels))))
        shapes = [shape_of[int(label)] for label in labels]
        colours = colours_of[i]
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


def answers_correct(answers: list[str], questions: list[Question]) -> list[float]:
    """1.0 where an answer matches its question's after `normalise_answer`, else 0.0."""
    return [float(normalise_answer(a) == q.answer)
            for a, q in zip(answers, questions, strict=True)]


def vqa_accuracy(answers: list[str], questions: list[Question], n_boot: int = 1000,
                 seed: int = 0) -> dict:
    """Exact-match accuracy after `normalise_answer`, overall (`vqa_acc`) and per kind
    (`vqa_acc_<kind>`), each with its interval over images and its number of questions."""
    correct = answers_correct(answers, questions)
    result = {**grouped_ratio(correct, [q.image for q in questions], n_boot, seed, "vqa_acc"),
              "vqa_questions": len(questions)}
    for kind in sorted({q.kind for q in questions}):
        mine = [(c, q.image) for c, q in zip(correct, questions, strict=True) if q.kind == kind]
        hits, images = zip(*mine, strict=True)
        result.update(grouped_ratio(list(hits), list(images), n_boot, seed, f"vqa_acc_{kind}"))
        result[f"vqa_questions_{kind}"] = len(mine)
    return result


def first_images(split: Split, n: int) -> Split:
    """The split cut to its first `n` images."""
    return replace(split, image_ids=split.image_ids[:n], images=split.images[:n],
                   boxes=split.boxes[:n], labels=split.labels[:n], masks=split.masks[:n])
