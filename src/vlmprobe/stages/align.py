"""Stage `align` (E-P4.5): every extraction point's tokens against the video VAE's latents.

Writes `metrics/align.json` (points.<id>.<metric>, controls, the plan's bands, meta with the
model and the target), the CKA heatmap and `results/p4/<vlm>-alignment.md`, which names the
optimal extraction layer. The model is the feature store's (its manifest's `vlm`).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

from vlmprobe.align.inputs import SOURCES, clip_frame_inputs, image_inputs
from vlmprobe.align.pooling import pool_tokens
from vlmprobe.align.report import TABLE_METRICS, cka_heatmap, write_report
from vlmprobe.align.study import (
    AlignSettings,
    Kernels,
    alignment_scores,
    channel_group_grams,
    channel_groups,
)
from vlmprobe.errors import stage_main
from vlmprobe.extract.geometry import area_weights
from vlmprobe.extract.store import MANIFEST
from vlmprobe.extract.tokens import Tokens
from vlmprobe.io import recorded_model, rounded, write_json, write_text
from vlmprobe.params import (
    ParamsError,
    load_params,
    require_choice,
    require_float,
    require_float_list,
    require_int,
    require_name,
)
from vlmprobe.probes.controls import PixelTokens, ShuffledTokens
from vlmprobe.vae.registry import get_entry, load_vae

PARAMS = ("video_vae", "align")
BANDED = ("cka_linear", "r2", "spearman", "recall_at_10")
HEADLINE = "cka_linear"


def validate(params: dict) -> dict:
    """Every param checked, and the target's weights known to be obtainable, before loading."""
    target = require_name(params, "video_vae")
    get_entry(target)
    bands = {}
    for metric in BANDED:
        key = f"align.bands.{metric}"
        band = {level: require_float(params, f"{key}.{level}", -1.0, 1.0)
                for level in ("target", "acceptable", "fail")}
        if not band["target"] >= band["acceptable"] >= band["fail"]:
            raise ParamsError(f"params.yaml: {key} needs target >= acceptable >= fail, got "
                              f"{band}. Fix: edit params.yaml.")
        bands[metric] = band
    return {
        "target": target,
        "source": require_choice(params, "align.source", SOURCES),
        "frames_per_clip": require_int(params, "align.frames_per_clip", 1, 1024),
        "settings": AlignSettings(
            rbf_sigma=require_float(params, "align.rbf_sigma", 0.01, 100.0),
            ridge_alphas=require_float_list(params, "align.ridge_alphas", 1e-9, 1e6),
            minibatch_size=require_int(params, "align.minibatch_size", 4, 100_000),
            interval_rounds=require_int(params, "align.interval_rounds", 20, 100_000),
            seed=require_int(params, "align.seed", 0, 2**31 - 1),
        ),
        "channel_groups": require_int(params, "align.channel_groups", 1, 1024),
        "encode_batch_size": require_int(params, "align.encode_batch_size", 1, 1024),
        "bands": bands,
    }




def verdict(value: float, band: dict) -> str:
    if value > band["target"]:
        return "target"
    if value > band["acceptable"]:
        return "acceptable"
    return "marginal" if value >= band["fail"] else "fail"


def band_verdicts(points: dict, bands: dict) -> dict:
    out = {}
    for metric, band in bands.items():
        best = max(points, key=lambda p: points[p][metric])
        value = points[best][metric]
        out[metric] = {"point": best, "value": value, **band, "verdict": verdict(value, band)}
    return out


def points_csv(metrics: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["order", "name", "kind", *TABLE_METRICS])
    rows = [(n, "point", s) for n, s in metrics["points"].items()]
    rows += [(n, "control", s) for n, s in metrics["controls"].items()]
    for order, (name, kind, scores) in enumerate(rows):
        writer.writerow([order, name, kind, *(scores[m] for m in TABLE_METRICS)])
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--clips", type=Path, required=True)
    parser.add_argument("--clip-features", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True,
                        help="directory of the <vlm>-alignment.md report")
    args = parser.parse_args(argv)
    config = validate(load_params(PARAMS))
    inputs = (image_inputs(args.data, args.features) if config["source"] == "images" else
              clip_frame_inputs(args.clips, args.clip_features, config["frames_per_clip"]))
    store, image_ids, images, split_of = (inputs.store, inputs.image_ids, inputs.images,
                                          inputs.split_of)
    vlm = recorded_model(store.manifest, store.root / MANIFEST)
    settings: AlignSettings = config["settings"]
    start = time.perf_counter()

    vae = load_vae(config["target"])
    latent_geometry = vae.latent_geometry(images.shape[1:3])
    target = vae.encode(images, config["encode_batch_size"])  # (n, P, C)
    target_kernels = Kernels.of(target.reshape(len(target), -1), settings.rbf_sigma)
    group_grams = channel_group_grams(target, config["channel_groups"])

    def score(tokens: Tokens, geometry) -> tuple[dict, list[float]]:
        pooled = pool_tokens(tokens, area_weights(geometry, latent_geometry))
        return alignment_scores(pooled, target, target_kernels, group_grams, split_of, settings)

    points, heat = {}, {}
    for point in store.points:
        print(f"align: {point}", flush=True)
        points[point], heat[point] = score(store.tokens(point, image_ids),
                                           store.geometry(point))

    reference = store.points[-1]
    reference_geometry = store.geometry(reference)
    controls = {}
    control_tokens = {
        "pixels": lambda: PixelTokens(images, reference_geometry),
        "shuffled": lambda: ShuffledTokens(store.tokens(reference, image_ids), settings.seed, 0),
    }
    for name, make in control_tokens.items():
        print(f"align: control {name}", flush=True)
        controls[name], heat[f"control {name}"] = score(make(), reference_geometry)

    optimal = max(points, key=lambda p: points[p][HEADLINE])
    target_info = vae.describe()
    metrics = rounded({
        "meta": {
            "vlm": vlm,
            "display_name": store.manifest["display_name"],
            "weights_source": store.manifest["weights"].get("source"),
            "target": target_info["target"],
            "target_display_name": target_info["display_name"],
            "target_weights": target_info["weights"],
            "latent_grid": f"{latent_geometry.grids[0].rows}x{latent_geometry.grids[0].cols}",
            "latent_channels": vae.latent_channels,
            "source": config["source"],
            "dataset": inputs.dataset,
            "n_images": len(image_ids),
            "n_train": len(split_of["train"]),
            "n_val": len(split_of["val"]),
            "n_test": len(split_of["test"]),
            "reference_point": reference,
            "optimal_point": optimal,
            "best_point_by_metric": {m: max(points, key=lambda p, m=m: points[p][m])
                                     for m in BANDED},
            "rbf_sigma": settings.rbf_sigma,
            "minibatch_size": settings.minibatch_size,
        },
        "points": points,
        "controls": controls,
        "bands": band_verdicts(points, config["bands"]),
    })
    write_json(args.metrics, metrics)
    write_text(args.plots / "points.csv", points_csv(metrics))
    groups = channel_groups(vae.latent_channels, config["channel_groups"])
    heatmap = args.plots / "cka_heatmap.png"
    cka_heatmap(heat, [f"{g[0]}-{g[-1]}" for g in groups],
                f"{store.manifest['display_name']} vs {target_info['display_name']}", heatmap)
    write_report(metrics, args.results / f"{vlm}-alignment.md", heatmap)
    # Wall time is printed, not stored: metrics must repeat exactly from run to run.
    print(f"align: optimal point {optimal}; {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(stage_main(main))
