"""H-P4's semantic half: a run's VQA accuracy against Qwen2.5-VL's, on the same questions.

H-P4 asks a candidate to keep spatial information *and* reach more than 95% of Qwen2.5-VL's
VQA accuracy. For every run whose ground stage asked the VQA questions (`vqa_outcomes` in
metrics/ground.json: image id, question, correct) beside a Qwen2.5-VL run (registry family
`qwen2_5_vl`) that answered the same questions, the ratio of their accuracies on the questions
both answered, with a paired bootstrap interval: images are resampled with replacement and an
image's questions go together, for both runs at once (the two answers to one question are not
independent; neither are one image's questions). Verdict: **pass** when the whole interval is
above 0.95, **fail** when it is at or below, **undecided** when it straddles 0.95, **not
measured** (with why) when nothing pairs or Qwen2.5-VL answered none of the shared questions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlmprobe.select.measure import Run

H_P4_MIN_RATIO = 0.95
QWEN_FAMILY = "qwen2_5_vl"
BOOTSTRAP = 2000
SEED = 0


def outcomes(ground: dict[str, Any] | None) -> dict[tuple[int, str], float]:
    """(image id, question) -> 1.0 / 0.0 from metrics/ground.json; empty where VQA did not run."""
    return {(int(image), str(question)): float(correct)
            for image, question, correct in (ground or {}).get("vqa_outcomes", [])}


def paired_ratio(mine: dict[tuple[int, str], float], theirs: dict[tuple[int, str], float],
                 n_boot: int = BOOTSTRAP, seed: int = SEED) -> dict[str, Any]:
    """Accuracy of `mine` over that of `theirs` on their shared questions, with its paired
    bootstrap 95% interval over images, and the H-P4 verdict (module docstring)."""
    shared = sorted(set(mine) & set(theirs))
    if not shared:
        return {"verdict": "not measured", "why": "no question answered by both runs"}
    images = sorted({image for image, _ in shared})
    row = {image: i for i, image in enumerate(images)}
    ours, base = np.zeros(len(images)), np.zeros(len(images))
    for key in shared:
        ours[row[key[0]]] += mine[key]
        base[row[key[0]]] += theirs[key]
    found = {"questions": len(shared), "images": len(images),
             "accuracy": float(ours.sum() / len(shared)),
             "baseline_accuracy": float(base.sum() / len(shared))}
    if base.sum() == 0:
        return {**found, "verdict": "not measured",
                "why": "Qwen2.5-VL answered none of the shared questions correctly: no ratio"}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(images), size=(n_boot, len(images)))
    denominators = base[idx].sum(axis=1)
    kept = denominators > 0  # a resample where Qwen2.5-VL got nothing right has no ratio
    if not kept.any():
        return {**found, "verdict": "not measured",
                "why": "no resample of the images has a correct Qwen2.5-VL answer"}
    lo, hi = np.quantile(ours[idx].sum(axis=1)[kept] / denominators[kept], [0.025, 0.975])
    verdict = ("pass" if lo > H_P4_MIN_RATIO else "fail" if hi <= H_P4_MIN_RATIO
               else "undecided")
    return {**found, "ratio": float(ours.sum() / base.sum()), "ratio_ci95": [float(lo), float(hi)],
            "resamples": int(kept.sum()), "verdict": verdict}


def vqa_against_qwen(runs: list[Run], grounds: dict[str, dict[str, Any] | None],
                     preferred: str) -> dict[str, Any]:
    """Every run with VQA outcomes against one Qwen2.5-VL run's (the `preferred` registry entry's
    if it ran, else the first Qwen2.5-VL run with outcomes): `{baseline, runs: {name: ratio}}`,
    or `{baseline: None, why}`."""
    answered = {r.name: outcomes(grounds.get(r.name)) for r in runs}
    qwen = sorted((r for r in runs if r.family == QWEN_FAMILY and answered[r.name]),
                  key=lambda r: r.vlm != preferred)
    if not qwen:
        return {"baseline": None,
                "why": "no Qwen2.5-VL run with VQA answers (`dvc exp run -S vlm=qwen2_5_vl` "
                       "with the same `ground` params)"}
    baseline = qwen[0].name
    return {"baseline": baseline,
            "runs": {r.name: paired_ratio(answered[r.name], answered[baseline])
                     for r in runs if r.name != baseline and answered[r.name]}}


def vqa_lines(found: dict[str, Any]) -> list[str]:
    """The H-P4 section of the documents."""
    lines = ["## H-P4: VQA accuracy against Qwen2.5-VL", ""]
    if found["baseline"] is None:
        return [*lines, f"Not decided: {found['why']}.", ""]
    lines += [f"Each run's exact-match VQA accuracy over `{found['baseline']}`'s on the "
              f"questions both answered; H-P4 needs more than {H_P4_MIN_RATIO:.0%} (paired "
              "bootstrap 95% interval over images; pass or fail only when the whole interval "
              "is on one side).", ""]
    if not found["runs"]:
        return [*lines, "No other run answered the VQA questions.", ""]
    lines += ["| run | accuracy | Qwen2.5-VL accuracy | ratio [95% CI] | questions (images) "
              "| H-P4 VQA condition |", "|---|---|---|---|---|---|"]
    for name, r in found["runs"].items():
        verdict = f"{r['verdict']}: {r['why']}" if "why" in r else r["verdict"]
        if "accuracy" not in r:
            lines.append(f"| `{name}` | - | - | - | 0 | {verdict} |")
            continue
        ratio = (f"{r['ratio']:.3f} [{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}]"
                 if "ratio" in r else "-")
        lines.append(f"| `{name}` | {r['accuracy']:.3f} | {r['baseline_accuracy']:.3f} | "
                     f"{ratio} | {r['questions']} ({r['images']}) | {verdict} |")
    return [*lines, ""]
