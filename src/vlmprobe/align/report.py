"""The alignment study's outputs beside `metrics/align.json`: the CKA heatmap (representations
x target channel groups) and the markdown report that names the optimal extraction layer."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vlmprobe.io import atomic_path, write_text  # noqa: E402

TABLE_METRICS = ("cka_linear", "cka_linear_biased", "cka_rbf", "cka_rbf_biased",
                 "cka_minibatch", "r2", "spearman", "recall_at_10")


def cka_heatmap(rows: dict[str, list[float]], group_labels: list[str], title: str,
                path: Path) -> None:
    values = np.array(list(rows.values()))
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(group_labels), 1.0 + 0.4 * len(rows)),
                           dpi=100)
    image = ax.imshow(values, cmap="viridis", vmin=min(0.0, values.min()), vmax=1.0,
                      aspect="auto")
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xticks(range(len(group_labels)), group_labels, rotation=45, ha="right", fontsize=7)
    for (r, c), v in np.ndenumerate(values):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                color="white" if v < 0.6 else "black")
    ax.set_xlabel("target latent channels")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="debiased linear CKA")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _cell(scores: dict, metric: str) -> str:
    if metric not in scores:
        return "-"
    ci = scores.get(f"{metric}_ci95")
    return f"{scores[metric]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def markdown(metrics: dict, heatmap: str) -> str:
    meta, verdicts = metrics["meta"], metrics["bands"]
    lines = [
        f"# Latent alignment (E-P4.5): {meta['display_name']} vs {meta['target_display_name']}",
        "",
        f"Model `{meta['vlm']}` (weights: {meta['weights_source']}), target `{meta['target']}`; "
        f"{meta['n_images']} images (train/val/test {meta['n_train']}/{meta['n_val']}/"
        f"{meta['n_test']}) of `{meta['dataset']}`, latent grid {meta['latent_grid']} x "
        f"{meta['latent_channels']} channels. Written by the `align` stage; this file is per "
        "model (`results/p4/<vlm>-alignment.md`), beside the comparison that `vlmprobe compare` "
        "writes to `results/p4/alignment-study.md`.",
        "",
        f"**Optimal extraction layer: `{meta['optimal_point']}`** (highest debiased linear CKA; "
        f"best by each metric: "
        + ", ".join(f"{m} `{p}`" for m, p in meta["best_point_by_metric"].items()) + ").",
        "",
        "## Plan bands (best extraction point)",
        "",
        "| metric | best point | value | target | acceptable | fail below | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for metric, v in verdicts.items():
        lines.append(f"| {metric} | `{v['point']}` | {v['value']:.3f} | > {v['target']} | "
                     f"> {v['acceptable']} | {v['fail']} | {v['verdict']} |")
    lines += ["", "## Every point and control (95% intervals)", "",
              "| representation | " + " | ".join(TABLE_METRICS) + " |",
              "|---|" + "---|" * len(TABLE_METRICS)]
    rows = [(f"point `{p}`", s) for p, s in metrics["points"].items()]
    rows += [(f"control `{c}`", s) for c, s in metrics["controls"].items()]
    for name, scores in rows:
        lines.append(f"| {name} | " + " | ".join(_cell(scores, m) for m in TABLE_METRICS) + " |")
    lines += [
        "",
        "Controls: `pixels` (raw 14-px patches on the model's token grid: how far raw layout "
        "and colour go), `shuffled` (the deepest point's tokens permuted per image: layout "
        "destroyed, content kept). No `oracle` control here: the target's own latents score 1 "
        "on every metric by construction, so it would test nothing (a rotated, noisy copy "
        "measured 1.00 on every CKA and Spearman, 0.997 recall@10, 0.996 R^2 while this stage "
        "was built); for `pixels32`, `pixels` is the informative ceiling.",
        "",
        "## How each metric sees the tokens",
        "",
        "- Tokens are pooled onto the target's latent grid by area overlap (a latent cell's "
        "pooled token averages the model tokens it covers, weighted by area).",
        "- CKA (linear and RBF; debiased = unbiased HSIC, biased = tr(KHLH)/(n-1)^2), distance "
        "Spearman and recall@10: one vector per image, the pooled tokens flattened position by "
        "position against the latents flattened the same way; every image of every split. "
        f"RBF bandwidth {meta['rbf_sigma']} x the median pairwise distance. Minibatch CKA: "
        f"linear, unbiased HSIC summed over batches of {meta['minibatch_size']} images.",
        "- R^2: one ridge map from a pooled token to the latent at the same position, shared "
        "across positions; fit on train, penalty chosen on val, variance-weighted R^2 on test.",
        "- Intervals: half-sampling for CKA and Spearman, bootstrap over images for recall@10 "
        "and R^2.",
        "",
        f"![CKA by extraction point and target channel group]({heatmap})",
        "",
    ]
    return "\n".join(lines)


def write_report(metrics: dict, path: Path, heatmap_path: Path) -> None:
    write_text(path, markdown(metrics, Path(os.path.relpath(heatmap_path, path.parent)).as_posix()))
