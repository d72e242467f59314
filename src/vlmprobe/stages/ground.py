"""Stage `ground`: the grounding test (E-P4.3) and the semantic check (H-P4) -> metrics/ground.json.

On the first `ground.images` test images, a model that generates text is asked to find each
object that its colour and shape name uniquely (its family's grounding request; the box is
parsed from the family's format, a malformed answer counting as a miss) and answers count,
colour and left-of questions (exact match). A model that does not generate (a vision encoder,
raw pixels) gets "not applicable" at once, without loading it; so does grounding for a family
with no grounding output format. Capability comes from the family adapter, never from this stage.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlmprobe.data.dataset import Split, coco_path, load_split
from vlmprobe.data.shapes import CATEGORIES
from vlmprobe.errors import MissingInput, stage_main
from vlmprobe.gpus import claim_device, require_device
from vlmprobe.io import read_json, rounded, write_json
from vlmprobe.models.base import ModelAdapter
from vlmprobe.models.registry import RegistryEntry, adapter_for, get_entry
from vlmprobe.params import load_params, require_int, require_name
from vlmprobe.probes.grounding import (
    answers_correct,
    first_images,
    grounding_prompt,
    grounding_scores,
    unique_objects,
    vqa_accuracy,
    vqa_questions,
)

PARAMS = ("vlm", "ground")
SAMPLES = 5  # raw answers of each test kept in the metrics, to see what the model wrote


def validate(params: dict) -> dict:
    return {
        "entry": get_entry(require_name(params, "vlm")),
        "seed": require_int(params, "ground.seed", 0, 2**31 - 1),
        "images": require_int(params, "ground.images", 1, 100_000),
        "grounding_max_new_tokens": require_int(params, "ground.grounding_max_new_tokens", 1,
                                                4096),
        "vqa_max_new_tokens": require_int(params, "ground.vqa_max_new_tokens", 1, 4096),
        "batch_size": require_int(params, "ground.batch_size", 1, 4096),
        "threads": require_int(params, "ground.threads", 1, 1024),
        "bootstrap": require_int(params, "ground.bootstrap", 10, 1_000_000),
        "device": require_device(params, "ground.device"),
    }


def not_applicable(entry: RegistryEntry, adapter: ModelAdapter, data: Path) -> dict[str, str]:
    """Test -> why it does not apply to this model or dataset (empty when both run)."""
    if not shapes_dataset(data):
        why = ("not applicable: the questions are about the synthetic shapes "
               "(data.dataset: shapes), not this dataset")
        return {"grounding": why, "vqa": why}
    if not adapter.generates:
        why = f"not applicable: {entry.name} does not generate text"
        return {"grounding": why, "vqa": why}
    if adapter.box_format is None:
        return {"grounding": f"not applicable: {entry.name} ({entry.family}) has no grounding "
                             "output format"}
    return {}


def shapes_dataset(data: Path) -> bool:
    """Whether `data` holds the synthetic shapes (their categories), which the questions need."""
    path = coco_path(data, "test")
    if not path.is_file():
        raise MissingInput(f"{path} not found; run `dvc repro data` first.")
    return [c["name"] for c in read_json(path)["categories"]] == [c["name"] for c in CATEGORIES]


def answer_all(adapter: ModelAdapter, model: torch.nn.Module, images: np.ndarray,
               prompts: list[str], max_new_tokens: int, config: dict, device: torch.device,
               desc: str) -> list[str]:
    """The model's answer to prompts[i] about images[i], in batches."""
    answers: list[str] = []
    size = config["batch_size"]
    for start in tqdm(range(0, len(prompts), size), desc=desc, unit="batch"):
        answers += adapter.generate(model, images[start:start + size],
                                    prompts[start:start + size], max_new_tokens, device)
    return answers


def run_grounding(adapter: ModelAdapter, model: torch.nn.Module, split: Split, config: dict,
                  device: torch.device) -> dict:
    refs = unique_objects(split)
    prompts = [grounding_prompt(r, adapter.grounding_template) for r in refs]
    images = split.images[[r.image for r in refs]]
    answers = answer_all(adapter, model, images, prompts, config["grounding_max_new_tokens"],
                         config, device, "grounding")
    size = tuple(split.images.shape[1:3])
    boxes = [adapter.parse_grounding(a, size) for a in answers]
    truth = [split.boxes[r.image][r.obj] for r in refs]
    result = grounding_scores(boxes, truth, [r.image for r in refs], config["bootstrap"],
                              config["seed"])
    result["grounding_samples"] = [
        {"prompt": p, "answer": a, "box": None if b is None else b.tolist(), "truth": t.tolist()}
        for p, a, b, t in list(zip(prompts, answers, boxes, truth, strict=True))[:SAMPLES]
    ]
    return result


def run_vqa(adapter: ModelAdapter, model: torch.nn.Module, split: Split, config: dict,
            device: torch.device) -> dict:
    questions = vqa_questions(split)
    answers = answer_all(adapter, model, split.images[[q.image for q in questions]],
                         [q.text for q in questions], config["vqa_max_new_tokens"], config,
                         device, "vqa")
    result = vqa_accuracy(answers, questions, config["bootstrap"], config["seed"])
    result["vqa_samples"] = [{"question": q.text, "answer": a, "expected": q.answer}
                             for q, a in list(zip(questions, answers, strict=True))[:SAMPLES]]
    # Every question's outcome, [image id, question, 1/0]: what pairs two runs' answers to the
    # same questions (vlmprobe.compare.vqa, H-P4's ratio to Qwen2.5-VL).
    result["vqa_outcomes"] = [
        [split.image_ids[q.image], q.text, int(c)]
        for q, c in zip(questions, answers_correct(answers, questions), strict=True)]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    config = validate(load_params(PARAMS))
    entry = config["entry"]
    adapter = adapter_for(entry)
    skipped = not_applicable(entry, adapter, args.data)
    meta = {"vlm": entry.name, "display_name": entry.display_name, "family": entry.family,
            "box_format": adapter.box_format}
    if "vqa" in skipped:
        print(skipped["vqa"])
        write_json(args.metrics, {"not_applicable": skipped, "meta": meta})
        return

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config["threads"])
    try:
        started = time.perf_counter()
        result, measured = ground_model(adapter, args.data, config, skipped)
        print(f"ground: {entry.name} answered in {time.perf_counter() - started:.1f} s")
    finally:
        torch.set_num_threads(previous_threads)
    write_json(args.metrics, rounded({**result, "not_applicable": skipped,
                                      "meta": {**meta, **measured}}))


def ground_model(adapter: ModelAdapter, data: Path, config: dict, skipped: dict[str, str]
                 ) -> tuple[dict, dict]:
    """The tests that apply, on the first `images` test images; and what the meta records."""
    device = claim_device(config["device"])
    split = first_images(load_split(data, "test"), config["images"])
    torch.manual_seed(config["seed"])
    model = adapter.load(Path.cwd(), device)
    provenance = adapter.weights_provenance(Path.cwd())
    result: dict = {}
    if "grounding" not in skipped:
        result.update(run_grounding(adapter, model, split, config, device))
    result.update(run_vqa(adapter, model, split, config, device))
    return result, {"weights": provenance, "device": str(device), "n_images": len(split.images),
                    "threads": config["threads"]}

if __name__ == "__main__":
    sys.exit(stage_main(main))
