"""Stage `probe`: the spatial probe protocol at the extraction points, beside its controls.

bbox runs at every point; dense, DETR-style and reconstruction probes at the points their
params name (`probe.<probe>.points`: a list or `all`); the temporal direction probe at every
point of the clip feature store when `data/clip_features` exists.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

import torch

from vlmprobe.data.dataset import SPLITS, Split, load_split
from vlmprobe.errors import stage_main
from vlmprobe.extract.store import FeatureStore
from vlmprobe.gpus import require_device
from vlmprobe.io import rounded, write_json, write_text
from vlmprobe.params import (
    ParamsError,
    get,
    load_params,
    require_bool,
    require_choice,
    require_float,
    require_float_list,
    require_int,
    resolve_names,
)
from vlmprobe.probes.controls import OracleTokens, PixelTokens, ShuffledTokens
from vlmprobe.probes.coverage import ProbeSettings, instance_targets
from vlmprobe.probes.dense import DenseSettings
from vlmprobe.probes.detr import DetrSettings
from vlmprobe.probes.reconstruction import ReconstructionSettings, ScoreSettings
from vlmprobe.probes.registry import CONTROLS, PROBES, TRAINED, column_name
from vlmprobe.probes.suite import Suite, SuiteSettings
from vlmprobe.probes.temporal import ClipData, TemporalSettings, run_temporal
from vlmprobe.probes.training import FitSettings
from vlmprobe.probes.validity import require_band
from vlmprobe.report.figures import box_samples, reconstruction_samples

PARAMS = ("probe",)
LPIPS_NETS = ("alex", "vgg")


def require_names(params: dict, key: str, valid: list[str] | None) -> list[str] | str:
    """`key`'s points or controls, resolved against `valid` (see `resolve_names`)."""
    return resolve_names(get(params, key), key, valid)


def fit_settings(params: dict, probe: str, seed: int, threads: int, device: torch.device,
                 **loop: object) -> FitSettings:
    """The fit loop's settings of one trained probe, `probe.<probe>.*`."""
    p = f"probe.{probe}"
    return FitSettings(
        steps=require_int(params, f"{p}.steps", 1, 1_000_000),
        batch_size=require_int(params, f"{p}.batch_size", 1, 4096),
        lr=require_float(params, f"{p}.lr", 1e-6, 1.0),
        eval_every=require_int(params, f"{p}.eval_every", 1, 1_000_000),
        seed=seed, threads=threads, device=device, **loop,
    )


def validate(params: dict, points: list[str] | None = None) -> dict:
    """Every param checked before any heavy work; named points are resolved against `points`
    (the feature store's) when given."""
    seed = require_int(params, "probe.seed", 0, 2**31 - 1)
    bootstrap = require_int(params, "probe.bootstrap", 100, 100_000)
    threads = require_int(params, "probe.threads", 1, 256)
    device = require_device(params, "probe.device")
    detr_width = require_int(params, "probe.detr.width", 8, 4096)
    heads = require_int(params, "probe.detr.heads", 1, 64)
    if detr_width % (4 * heads):
        raise ParamsError(f"params.yaml: probe.detr.width = {detr_width} must be a multiple of "
                          f"4 x probe.detr.heads = {4 * heads}. Fix: edit params.yaml.")
    rec = "probe.reconstruction"
    settings = SuiteSettings(
        bbox=ProbeSettings(
            alphas=require_float_list(params, "probe.ridge_alphas", 1e-9, 1e6),
            thresholds=require_float_list(params, "probe.thresholds", 0.01, 0.99),
            min_component_px=require_int(params, "probe.min_component_px", 1, 100_000),
            bootstrap=bootstrap,
            seed=seed,
            device=device,
        ),
        dense=DenseSettings(
            fit=fit_settings(params, "dense", seed, threads, device),
            width=require_int(params, "probe.dense.width", 8, 4096),
            bootstrap=bootstrap,
            depth=require_int(params, "probe.dense.depth", 1, 16),
            flip=require_bool(params, "probe.dense.flip"),
        ),
        detr=DetrSettings(
            fit=fit_settings(params, "detr", seed, threads, device),
            width=detr_width,
            bootstrap=bootstrap,
            layers=require_int(params, "probe.detr.layers", 1, 16),
            queries=require_int(params, "probe.detr.queries", 1, 1000),
            heads=heads,
            flip=require_bool(params, "probe.detr.flip"),
        ),
        reconstruction=ReconstructionSettings(
            fit=fit_settings(params, "reconstruction", seed, threads, device, clip_norm=None,
                             higher_is_better=False),
            width=require_int(params, f"{rec}.width", 8, 4096),
            depth=require_int(params, f"{rec}.depth", 0, 16),
            patch_px=require_int(params, f"{rec}.patch_px", 1, 64),
            scores=ScoreSettings(
                edge_threshold=require_float(params, f"{rec}.edge_threshold", 0.001, 1.0),
                edge_tolerance=require_int(params, f"{rec}.edge_tolerance", 0, 32),
                bootstrap=bootstrap,
                seed=seed,
            ),
        ),
        bands={probe: require_band(params, probe) for probe in PROBES},
        lpips_net=require_choice(params, f"{rec}.lpips_net", LPIPS_NETS),
    )
    return {
        "settings": settings,
        "points": {p: require_names(params, f"probe.{p}.points", points) for p in TRAINED},
        "controls": {p: require_names(params, f"probe.{p}.controls", list(CONTROLS))
                     for p in TRAINED},
        "temporal": TemporalSettings(
            ridge_alphas=require_float_list(params, "probe.temporal.ridge_alphas", 1e-9, 1e6),
            penalties=require_float_list(params, "probe.temporal.penalties", 1e-6, 1e6),
            readout_frames=require_int(params, "probe.temporal.readout_frames", 1, 1000),
            bootstrap=bootstrap, seed=seed,
        ),
        "temporal_oracle_noise": require_float(params, "probe.temporal.oracle_noise", 0.0, 10.0),
        "temporal_controls": require_names(params, "probe.temporal.controls", list(CONTROLS)),
        "oracle_dim": require_int(params, "probe.oracle.dim", 2, 8192),
        "oracle_noise": require_float(params, "probe.oracle.noise", 0.0, 10.0),
        "samples": require_int(params, "probe.figures.samples", 1, 32),
        "seeds": require_int(params, "probe.seeds", 1, 100),
        "seed": seed,
    }




def per_split(fn, splits: dict[str, Split]) -> dict:
    return {name: fn(i, split) for i, (name, split) in enumerate(splits.items())}


def points_csv(points: dict, controls: dict) -> str:
    """The layer-by-layer table as a DVC plot source: one row per point or control, a column
    per probe metric (`<probe>_<metric>`, registry order) and the bbox IoU's interval; empty
    cells where a probe did not run."""
    columns = [(p.name, metric) for p in PROBES.values() for metric in p.columns]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["order", "name", "kind", *(column_name(*c) for c in columns),
                     "ci95_lo", "ci95_hi"])
    rows = [(name, "point", m) for name, m in points.items()]
    rows += [(name, "control", m) for name, m in controls.items()]
    for order, (name, kind, m) in enumerate(rows):
        values = [m.get(probe, {}).get(metric, "") for probe, metric in columns]
        lo, hi = m.get("bbox", {}).get("iou_ci95", ("", ""))  # absent where bbox failed
        writer.writerow([order, name, kind, *values, lo, hi])
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--clips", type=Path, required=True)
    parser.add_argument("--clip-features", type=Path, required=True)
    parser.add_argument("--assets", type=Path, required=True, help="LPIPS weights directory")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    args = parser.parse_args(argv)
    store = FeatureStore.open(args.features)
    config = validate(load_params(PARAMS), store.points)
    settings = config["settings"]
    seed = config["seed"]

    splits = {name: load_split(args.data, name) for name in SPLITS}
    reference = store.points[-1]  # the deepest point: the controls use its grid and tokens
    geometry = store.geometry(reference)
    targets = per_split(lambda _, s: instance_targets(s, geometry), splits)
    suite = Suite(splits, settings, args.assets, args.plots / "curves")

    points, point_artifacts = {}, {}
    for point in store.points:
        print(f"probe: {point}", flush=True)
        point_geometry = store.geometry(point)
        point_targets = (
            targets
            if point_geometry == geometry
            else per_split(lambda _, s, g=point_geometry: instance_targets(s, g), splits)
        )
        features = {name: store.tokens(point, s.image_ids) for name, s in splits.items()}
        probes = {"bbox"} | {p for p in TRAINED if point in config["points"][p]}
        points[point], point_artifacts[point] = suite.run(
            point, features, point_targets, point_geometry, probes,
            seeds=config["seeds"] if point == reference else 1)

    # Built lazily: each is read a batch of images at a time, like a point's features.
    oracle = per_split(lambda i, _: OracleTokens(
        targets[SPLITS[i]], config["oracle_dim"], config["oracle_noise"], seed, i), splits)
    control_features = {
        "oracle": lambda: oracle,
        "oracle_shuffled": lambda: {n: ShuffledTokens(f, seed, i)
                                    for i, (n, f) in enumerate(oracle.items())},
        "shuffled": lambda: per_split(
            lambda i, s: ShuffledTokens(store.tokens(reference, s.image_ids), seed, i), splits),
        "pixels": lambda: per_split(lambda _, s: PixelTokens(s.images, geometry), splits),
    }
    controls, control_artifacts = {}, {}
    for name, make in control_features.items():
        print(f"probe: control {name}", flush=True)
        probes = {"bbox"} | {p for p in TRAINED if name in config["controls"][p]}
        controls[name], control_artifacts[name] = suite.run(
            name, make(), targets, geometry, probes)

    probes_run = {"bbox"} | {p for p in TRAINED if config["points"][p]}
    temporal_note = "ran"
    if (args.clip_features / "manifest.json").exists():
        clips = ClipData.load(args.clips, FeatureStore.open(args.clip_features))
        start = time.perf_counter()
        by_point, by_control = run_temporal(
            clips, config["temporal"], config["temporal_controls"], config["oracle_dim"],
            config["temporal_oracle_noise"])
        for records, found in ((points, by_point), (controls, by_control)):
            for name, record in found.items():
                records.setdefault(name, {})["temporal"] = record
        suite.timings["temporal"] = time.perf_counter() - start
        probes_run.add("temporal")
    else:
        temporal_note = f"not run: no clip feature store at {args.clip_features}"
        print(f"probe: temporal direction {temporal_note}", flush=True)

    metrics = {
        "meta": {
            "vlm": store.manifest["vlm"],
            "display_name": store.manifest["display_name"],
            "weights_source": store.manifest["weights"].get("source"),
            "reference_point": reference,
            "n_train": len(splits["train"].image_ids),
            "n_val": len(splits["val"].image_ids),
            "n_test": len(splits["test"].image_ids),
            "temporal": temporal_note,
        },
        "points": points,
        "controls": controls,
        "validity": suite.validity(controls, probes_run),
    }
    metrics = rounded(metrics)
    write_json(args.metrics, metrics)
    write_text(args.plots / "points.csv", points_csv(metrics["points"], metrics["controls"]))
    figure_point = next(iter(config["points"]["detr"] + config["points"]["dense"]), reference)
    box_samples(splits["test"], point_artifacts[figure_point].detections, figure_point,
                config["samples"], args.plots / "boxes.png")
    rows = {f"point {p}": a.reconstructions for p, a in point_artifacts.items()}
    rows |= {f"control {c}": a.reconstructions for c, a in control_artifacts.items()}
    reconstruction_samples(splits["test"].images, rows, config["samples"],
                           args.plots / "reconstructions.png")
    print("probe: timings (s) " + json.dumps({k: round(v, 1) for k, v in suite.timings.items()}),
          flush=True)
    invalid = [p for p, v in metrics["validity"].items() if v["valid"] is False]
    if invalid:
        print(f"warning: controls missed their bands for {', '.join(invalid)}; those probes' "
              "results are not valid for this run", flush=True)
    unknown = [p for p, v in metrics["validity"].items() if v["valid"] is None]
    if unknown:
        print(f"note: validity unknown for {', '.join(unknown)} (a control was not run)",
              flush=True)


if __name__ == "__main__":
    sys.exit(stage_main(main))
