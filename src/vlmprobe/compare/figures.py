"""Comparison figures as PNG (no scripts, no CDN): weighted scores and per-quantity panels."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vlmprobe.io import atomic_path  # noqa: E402

COMPONENT_COLOURS = {"spatial_iou": "tab:blue", "bbox_iou": "tab:orange", "lpips": "tab:green",
                     "speed_ratio": "tab:purple", "integration_complexity": "tab:gray"}


def save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def score_bars(judged: dict[str, dict], weights: dict[str, float], path: Path) -> None:
    """Each run's weighted score as stacked weighted components; unmeasured weight hatched."""
    names = list(judged)
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.6), dpi=90)
    for y, name in enumerate(names):
        left = 0.0
        components = judged[name]["score"]["components"]
        for quantity, weight in weights.items():
            value = components.get(quantity)
            width = weight if value is None else weight * value
            ax.barh(y, width, left=left, color="none" if value is None else
                    COMPONENT_COLOURS.get(quantity, "black"),
                    hatch="//" if value is None else None, edgecolor="grey",
                    label=quantity if y == 0 else None)
            left += width
        ax.text(left + 0.01, y, f"{judged[name]['score']['score']:.3f}", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("E-P4.4 weighted score (hatched: not measured, could add up to that)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save(fig, path)


def quantity_panels(judged: dict[str, dict], rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per quantity: each run's value with its 95% interval, the target dashed."""
    cols = min(3, len(rows))
    n_rows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.6 * n_rows), dpi=90,
                             squeeze=False)
    names = list(judged)
    for ax, row in zip(axes.flat, rows, strict=False):
        for x, name in enumerate(names):
            m = judged[name]["measurements"].get(row["quantity"]) or {}
            if m.get("value") is None:
                ax.text(x, 0.03, "not measured", ha="center", fontsize=6, color="grey",
                        rotation=90, transform=ax.get_xaxis_transform())
                continue
            lo, hi = m.get("ci95", [m["value"], m["value"]])
            ax.errorbar(x, m["value"], yerr=[[m["value"] - lo], [hi - m["value"]]], fmt="o",
                        capsize=3, color="black" if judged[name]["kind"] == "baseline"
                        else "tab:blue")
        ax.axhline(row["threshold"], ls="--", color="tab:red", lw=1)
        ax.set_title(f"{row['label']} (target {row['op']} {row['threshold']})", fontsize=9)
        ax.set_xticks(range(len(names)), names, fontsize=7, rotation=30, ha="right")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
    save(fig, path)
