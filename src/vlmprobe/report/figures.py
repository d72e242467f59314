"""Figures rendered to PNG (no scripts, no CDN: they show anywhere, CI comments included)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from vlmprobe.data.dataset import Split  # noqa: E402
from vlmprobe.io import atomic_path  # noqa: E402

CONTROL_COLOURS = {"oracle": "tab:green", "oracle_shuffled": "tab:olive",
                   "shuffled": "tab:red", "pixels": "tab:gray"}
BOX_SCORE_MIN = 0.3  # predicted boxes drawn on the sample images score at least this


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def metrics_by_point(metrics: dict, panels: dict[tuple[str, str], str], title: str,
                     path: Path) -> None:
    """One panel per (probe, metric) of metrics/probe.json: value with its 95% interval across
    extraction points (where the probe ran), the controls as horizontal reference lines."""
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=90, squeeze=False)
    points = metrics["points"]
    for ax, ((probe, metric), label) in zip(axes.flat, panels.items(), strict=False):
        found = {n: r[probe] for n, r in points.items() if metric in r.get(probe, {})}
        if found:
            names = list(found)
            values = np.array([found[n][metric] for n in names])
            ci = np.array([found[n].get(f"{metric}_ci95", [v, v])
                           for n, v in zip(names, values, strict=True)])
            ax.errorbar(names, values, yerr=[values - ci[:, 0], ci[:, 1] - values], fmt="o-",
                        capsize=3, label="model")
        else:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
        for name, m in metrics["controls"].items():
            if metric in m.get(probe, {}):
                ax.axhline(m[probe][metric], ls="--", lw=1,
                           color=CONTROL_COLOURS.get(name, "black"), label=name)
        ax.set_ylim(0, 1)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def box_samples(split: Split, detections: dict[str, list], point: str, n: int, path: Path) -> None:
    """Ground-truth boxes (green) and each detection probe's boxes (scores >= BOX_SCORE_MIN) on
    the first `n` test images, one row per probe."""
    probes = sorted(detections) or ["(no detection probe ran)"]
    n = min(n, len(split.images))
    fig, axes = plt.subplots(len(probes), n, figsize=(2.2 * n, 2.4 * len(probes)), dpi=90,
                             squeeze=False)
    for r, probe in enumerate(probes):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(split.images[c])
            for x0, y0, x1, y1 in split.boxes[c]:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1.5))
            found = detections.get(probe, [None] * n)[c]
            if found is not None:
                for (x0, y0, x1, y1), score in zip(found.boxes, found.scores, strict=True):
                    if score >= BOX_SCORE_MIN:
                        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                               ec="magenta", lw=1, ls="--"))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(probe, fontsize=9)
    fig.suptitle(f"test images at {point}: ground truth (green), predictions (magenta)",
                 fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def reconstruction_samples(originals: np.ndarray, rows: dict[str, np.ndarray | None], n: int,
                           path: Path) -> None:
    """Originals in the first row, then one row per set of reconstructions (rows that are None,
    where the decoder did not run, are left out)."""
    shown = {"original": originals, **{k: v for k, v in rows.items() if v is not None}}
    n = min(n, len(originals))
    fig, axes = plt.subplots(len(shown), n, figsize=(1.8 * n, 1.9 * len(shown)), dpi=90,
                             squeeze=False)
    for r, (label, images) in enumerate(shown.items()):
        for c in range(n):
            axes[r, c].imshow(images[c])
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle("test images and their reconstructions", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
