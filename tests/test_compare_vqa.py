"""H-P4's VQA condition: a run's accuracy over Qwen2.5-VL's on the same questions, paired."""

from __future__ import annotations

import numpy as np
import pytest

from vlmprobe.compare.vqa import outcomes, paired_ratio, vqa_against_qwen, vqa_lines
from vlmprobe.select.measure import Run


def answered(correct: dict[int, list[int]]) -> dict:
    """metrics/ground.json's outcomes: per image id, its questions' 1/0 in order."""
    return {"vqa_outcomes": [[image, f"q{k}", c] for image, hits in correct.items()
                             for k, c in enumerate(hits)]}


def run(name: str, family: str, vlm: str | None = None) -> Run:
    return Run(name=name, vlm=vlm or name, display_name=name, family=family, kind="vlm",
               weights="random", measurements={})


def test_the_ratio_pairs_the_same_questions_and_resamples_images_together():
    rng = np.random.default_rng(0)
    base = {i: list(rng.integers(0, 2, 3)) for i in range(200)}
    same = outcomes(answered(base))
    found = paired_ratio(same, same)
    # Identical answers: every resample's ratio is exactly 1, so the interval is [1, 1].
    assert found["ratio"] == 1.0 and found["ratio_ci95"] == [1.0, 1.0]
    assert found["verdict"] == "pass" and (found["questions"], found["images"]) == (600, 200)
    # Questions only one run answered are left out of both accuracies.
    extra = outcomes(answered({**base, 999: [1, 1, 1]}))
    assert paired_ratio(extra, same)["questions"] == 600


def test_verdicts_follow_the_interval_against_095():
    rng = np.random.default_rng(1)
    base = {i: [int(v) for v in rng.random(4) < 0.8] for i in range(300)}
    qwen = outcomes(answered(base))

    def degraded(p: float) -> dict:
        drop = np.random.default_rng(2)
        return {k: (v if drop.random() > p else 0.0) for k, v in qwen.items()}

    assert paired_ratio(degraded(0.5), qwen)["verdict"] == "fail"  # about half: clearly below
    close = paired_ratio(degraded(0.05), qwen)  # about 0.95: the interval straddles it
    lo, hi = close["ratio_ci95"]
    assert lo < 0.95 < hi and close["verdict"] == "undecided"
    assert lo <= close["ratio"] <= hi


def test_no_ratio_without_pairs_or_without_a_correct_qwen_answer():
    mine = outcomes(answered({1: [1, 0]}))
    assert paired_ratio(mine, {})["verdict"] == "not measured"
    none_right = paired_ratio(mine, outcomes(answered({1: [0, 0]})))
    assert none_right["verdict"] == "not measured" and "none" in none_right["why"]
    assert "ratio" not in none_right


def test_every_run_against_the_preferred_qwen_run():
    grounds = {"q-tiny": answered({1: [1, 1]}), "q-real": answered({1: [1, 0]}),
               "llava": answered({1: [1, 0]}), "dino": None}
    runs = [run("q-tiny", "qwen2_5_vl", "qwen2_5_vl_tiny"), run("llava", "llava_next"),
            run("q-real", "qwen2_5_vl", "qwen2_5_vl"), run("dino", "dinov2")]
    found = vqa_against_qwen(runs, grounds, preferred="qwen2_5_vl")
    assert found["baseline"] == "q-real" and set(found["runs"]) == {"q-tiny", "llava"}
    assert found["runs"]["q-tiny"]["ratio"] == pytest.approx(2.0)
    text = "\n".join(vqa_lines(found))
    assert "| `llava` | 0.500 | 0.500 | 1.000 [1.000, 1.000] | 2 (1) | pass |" in text
    missing = vqa_against_qwen([run("llava", "llava_next")], grounds, preferred="qwen2_5_vl")
    assert missing["baseline"] is None and "-S vlm=qwen2_5_vl" in vqa_lines(missing)[2]
