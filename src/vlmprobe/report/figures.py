"""Figures rendered to PNG (no scripts, no CDN: they show anywhere, CI comments included)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vlmprobe.io import atomic_path  # noqa: E402

CONTROL_COLOURS = {"oracle": "tab:green", "shuffled": "tab:red", "pixels": "tab:gray"}


def bbox_iou_by_point(metrics: dict, title: str, path: Path) -> None:
    """Bbox IoU with 95% intervals across extraction points, controls as reference lines."""
    points = metrics["points"]
    names = list(points)
    values = [points[n]["bbox_iou"] for n in names]
    lower = [points[n]["bbox_iou"] - points[n]["bbox_iou_ci95"][0] for n in names]
    upper = [points[n]["bbox_iou_ci95"][1] - points[n]["bbox_iou"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.errorbar(names, values, yerr=[lower, upper], fmt="o-", capsize=4, label="model")
    for name, m in metrics["controls"].items():
        ax.axhline(m["bbox_iou"], ls="--", color=CONTROL_COLOURS.get(name, "black"),
                   label=f"{name} control")
    ax.set_ylim(0, 1)
    ax.set_xlabel("extraction point (shallow to deep)")
    ax.set_ylabel("bbox IoU (test, 95% CI)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
