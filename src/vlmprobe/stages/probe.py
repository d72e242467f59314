"""Stage `probe`: the bbox probe at every extraction point, beside its three controls."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np

from vlmprobe.data.dataset import SPLITS, Split, load_split
from vlmprobe.extract.store import FeatureStore
from vlmprobe.io import write_json, write_text
from vlmprobe.params import (
    ParamsError,
    load_params,
    require_float,
    require_float_list,
    require_int,
)
from vlmprobe.probes.controls import oracle_tokens, pixel_tokens, shuffled_tokens
from vlmprobe.probes.coverage import ProbeSettings, coverage_targets, run_bbox_probe

PARAMS = ("probe",)
ROUND = 4  # digits kept in metrics: float noise below this never shows up in a diff


def validate(params: dict) -> dict:
    return {
        "settings": ProbeSettings(
            alphas=require_float_list(params, "probe.ridge_alphas", 1e-9, 1e6),
            thresholds=require_float_list(params, "probe.thresholds", 0.01, 0.99),
            min_component_px=require_int(params, "probe.min_component_px", 1, 100_000),
            bootstrap=require_int(params, "probe.bootstrap", 100, 100_000),
            seed=require_int(params, "probe.seed", 0, 2**31 - 1),
        ),
        "oracle_dim": require_int(params, "probe.oracle.dim", 2, 8192),
        "oracle_noise": require_float(params, "probe.oracle.noise", 0.0, 10.0),
        "oracle_min": require_float(params, "probe.bands.oracle_min", 0.0, 1.0),
        "shuffled_max": require_float(params, "probe.bands.shuffled_max", 0.0, 1.0),
    }


def rounded(obj):
    if isinstance(obj, float):
        return round(obj, ROUND)
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


def per_split(fn, splits: dict[str, Split]) -> dict[str, np.ndarray]:
    return {name: fn(i, split) for i, (name, split) in enumerate(splits.items())}


def points_csv(points: dict, controls: dict) -> str:
    """The layer-by-layer table as a DVC plot source: one row per point or control."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["order", "name", "kind", "bbox_iou", "ci95_lo", "ci95_hi", "bbox_map50"])
    rows = [(name, "point", m) for name, m in points.items()]
    rows += [(name, "control", m) for name, m in controls.items()]
    for order, (name, kind, m) in enumerate(rows):
        lo, hi = m["bbox_iou_ci95"]
        writer.writerow([order, name, kind, m["bbox_iou"], lo, hi, m["bbox_map50"]])
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--features", type=Path, default=Path("data/features"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/probe.json"))
    parser.add_argument("--plots", type=Path, default=Path("plots/probe"))
    args = parser.parse_args(argv)
    try:
        config = validate(load_params(PARAMS))
    except ParamsError as e:
        raise SystemExit(f"error: {e}") from None
    settings: ProbeSettings = config["settings"]

    store = FeatureStore.open(args.features)
    splits = {name: load_split(args.data, name) for name in SPLITS}
    reference = store.points[-1]  # the deepest point: the controls use its grid and tokens
    geometry = store.geometry(reference)
    targets = per_split(lambda _, s: coverage_targets(s, geometry), splits)

    points = {}
    for point in store.points:
        print(f"probe: {point}", flush=True)
        point_geometry = store.geometry(point)
        point_targets = (
            targets
            if point_geometry == geometry
            else per_split(lambda _, s, g=point_geometry: coverage_targets(s, g), splits)
        )
        features = {name: store.load(point, s.image_ids) for name, s in splits.items()}
        points[point] = run_bbox_probe(features, point_targets, splits, point_geometry, settings)

    seed = settings.seed
    control_features = {
        "oracle": per_split(
            lambda i, _: oracle_tokens(
                targets[SPLITS[i]], config["oracle_dim"], config["oracle_noise"], seed, i
            ),
            splits,
        ),
        "shuffled": per_split(
            lambda i, s: shuffled_tokens(store.load(reference, s.image_ids), seed, i), splits
        ),
        "pixels": per_split(lambda _, s: pixel_tokens(s.images, geometry), splits),
    }
    controls = {}
    for name, features in control_features.items():
        print(f"probe: control {name}", flush=True)
        controls[name] = run_bbox_probe(features, targets, splits, geometry, settings)

    oracle_pass = controls["oracle"]["bbox_iou"] >= config["oracle_min"]
    shuffled_pass = controls["shuffled"]["bbox_iou"] <= config["shuffled_max"]
    metrics = {
        "meta": {
            "vlm": store.manifest["vlm"],
            "display_name": store.manifest["display_name"],
            "weights_source": store.manifest["weights"].get("source"),
            "reference_point": reference,
            "n_train": len(splits["train"].image_ids),
            "n_val": len(splits["val"].image_ids),
            "n_test": len(splits["test"].image_ids),
        },
        "points": points,
        "controls": controls,
        "validity": {
            "oracle_min": config["oracle_min"],
            "oracle_pass": oracle_pass,
            "shuffled_max": config["shuffled_max"],
            "shuffled_pass": shuffled_pass,
            "valid": oracle_pass and shuffled_pass,
        },
    }
    metrics = rounded(metrics)
    write_json(args.metrics, metrics)
    write_text(args.plots / "points.csv", points_csv(metrics["points"], metrics["controls"]))
    if not metrics["validity"]["valid"]:
        print("warning: a control missed its band; the probe's results are not valid", flush=True)


if __name__ == "__main__":
    sys.exit(main())
