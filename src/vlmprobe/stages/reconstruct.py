"""Stage `reconstruct` (E-P4.6): adapters from one extraction point's tokens into the video
VAE's latents, trained through its frozen decoder, beside the pixels (positive) and shuffled
(negative) controls.

Writes `metrics/reconstruct.json` (points.<id>, controls.<name>: lpips, ssim, edge_f1,
spatial_iou, and map50 / map of an image-domain detector applied to the reconstructions, with
95% intervals; `detector`: that detector and its ceiling on the original test images; validity
of the controls' bands; meta with the model, the target and the training budget), training
curves (dvclive) and a side-by-side figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vlmprobe.data.dataset import SPLITS, load_split
from vlmprobe.errors import MissingInput, StaleInput, stage_main
from vlmprobe.extract.store import FeatureStore
from vlmprobe.gpus import require_device
from vlmprobe.io import read_json, rounded, write_json
from vlmprobe.metrics.image import Lpips
from vlmprobe.params import (
    ParamsError,
    get,
    load_params,
    require_choice,
    require_float,
    require_int,
    require_name,
)
from vlmprobe.probes.controls import pixel_tokens, shuffled_tokens
from vlmprobe.probes.dense import DenseSettings
from vlmprobe.probes.reconstruction import ScoreSettings, image_scores
from vlmprobe.probes.training import FitSettings
from vlmprobe.probes.validity import probe_validity, require_band
from vlmprobe.reconstruct.adapters import ADAPTERS
from vlmprobe.reconstruct.detector import DetectorSettings, ImageDetector
from vlmprobe.reconstruct.training import TrainSettings, train_adapter
from vlmprobe.report.figures import reconstruction_samples
from vlmprobe.vae.registry import get_entry, load_vae

PARAMS = ("video_vae", "reconstruct", "probe.bands.reconstruction")
CONTROLS = ("pixels", "shuffled")
LPIPS_NETS = ("alex", "vgg")


def validate(params: dict, points: list[str] | None = None) -> dict:
    """Every param checked, and the target's weights known to be obtainable, before loading;
    `reconstruct.point` against `points` (the feature store's) when given."""
    target = require_name(params, "video_vae")
    get_entry(target)
    r = "reconstruct"
    point = get(params, f"{r}.point")
    named = isinstance(point, str) and bool(point)
    if not named or points is not None and point not in ("best", *points):
        extracted = f": {', '.join(points)}" if points is not None else ""
        raise ParamsError(f"params.yaml: {r}.point = {point!r} is invalid; expected `best` (the "
                          f"align stage's optimal layer) or an extracted point id{extracted}. "
                          f"Fix: `dvc exp run -S {r}.point=best`.")
    controls = get(params, f"{r}.controls")
    if not isinstance(controls, list) or not controls or any(c not in CONTROLS for c in controls):
        raise ParamsError(f"params.yaml: {r}.controls = {controls!r} is invalid; expected a "
                          f"non-empty list of: {', '.join(CONTROLS)} (the controls tell a lost "
                          f"signal from a broken decoder). Fix: `dvc exp run -S "
                          f"'{r}.controls=[{', '.join(CONTROLS)}]'`.")
    warmup_epochs = require_int(params, f"{r}.warmup_epochs", 0, 100_000)
    epochs = require_int(params, f"{r}.epochs", 0, 100_000)
    if warmup_epochs + epochs == 0:
        raise ParamsError(f"params.yaml: {r}.warmup_epochs = 0 and {r}.epochs = 0 train the "
                          f"adapter not at all. Fix: `dvc exp run -S {r}.warmup_epochs=8` (or "
                          f"set {r}.epochs).")
    seed = require_int(params, f"{r}.seed", 0, 2**31 - 1)
    threads = require_int(params, f"{r}.threads", 1, 256)
    device = require_device(params, f"{r}.device")
    bootstrap = require_int(params, f"{r}.bootstrap", 100, 100_000)
    d = f"{r}.detector"
    steps = require_int(params, f"{d}.steps", 1, 1_000_000)
    return {
        "target": target,
        "point": point,
        "controls": [c for c in CONTROLS if c in controls],
        "train": TrainSettings(
            adapter=require_choice(params, f"{r}.adapter", ADAPTERS),
            adapter_params=require_int(params, f"{r}.adapter_params", 10_000, 1_000_000_000),
            warmup_epochs=warmup_epochs,
            epochs=epochs,
            train_samples=require_int(params, f"{r}.train_samples", 8, 10_000_000),
            batch_size=require_int(params, f"{r}.batch_size", 1, 4096),
            lr=require_float(params, f"{r}.lr", 1e-7, 1.0),
            l2_weight=require_float(params, f"{r}.l2_weight", 0.0, 1000.0),
            threads=threads,
            seed=seed,
            device=device,
        ),
        "scores": ScoreSettings(
            edge_threshold=require_float(params, f"{r}.edge_threshold", 0.001, 1.0),
            edge_tolerance=require_int(params, f"{r}.edge_tolerance", 0, 32),
            bootstrap=bootstrap,
            seed=seed,
        ),
        "detector": DetectorSettings(
            train_samples=require_int(params, f"{d}.train_samples", 8, 10_000_000),
            dense=DenseSettings(
                fit=FitSettings(
                    steps=steps,
                    batch_size=require_int(params, f"{d}.batch_size", 1, 4096),
                    lr=require_float(params, f"{d}.lr", 1e-7, 1.0),
                    eval_every=require_int(params, f"{d}.eval_every", 1, steps),
                    threads=require_int(params, f"{d}.threads", 1, 256),
                    seed=seed,
                    device=device,
                ),
                width=require_int(params, f"{d}.width", 8, 4096),
                depth=require_int(params, f"{d}.depth", 1, 16),
                flip=True,  # mirror augmentation, as the probe stage's default
                bootstrap=bootstrap,
            ),
        ),
        "lpips_net": require_choice(params, f"{r}.lpips_net", LPIPS_NETS),
        "samples": require_int(params, f"{r}.samples", 1, 32),
        "band": require_band(params, "reconstruction"),
    }


def resolve_point(requested: str, store: FeatureStore, target: str, align_metrics: Path) -> str:
    """`best` -> the align stage's optimal layer for this model and target; else the id (one
    of the store's points: `validate` checked it)."""
    if requested != "best":
        return requested
    if not align_metrics.exists():
        raise MissingInput(f"reconstruct.point = best needs {align_metrics}: run "
                         "`dvc repro align` first, or name a point.")
    meta = read_json(align_metrics)["meta"]
    # Two inputs of this stage (and the target it is asked for) must agree.
    if (meta["vlm"], meta["target"]) != (store.manifest["vlm"], target):
        raise StaleInput(f"{align_metrics} is for {meta['vlm']} vs {meta['target']}, not "
                         f"{store.manifest['vlm']} vs {target} (the feature store's model and "
                         "video_vae): run `dvc repro align`.")
    return meta["optimal_point"]




def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--assets", type=Path, required=True, help="LPIPS weights directory")
    parser.add_argument("--align-metrics", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    args = parser.parse_args(argv)
    store = FeatureStore.open(args.features)
    config = validate(load_params(PARAMS), store.points)
    point = resolve_point(config["point"], store, config["target"], args.align_metrics)
    start = time.perf_counter()

    splits = {name: load_split(args.data, name) for name in SPLITS}
    images = {name: s.images for name, s in splits.items()}
    geometry = store.geometry(point)
    features = {name: store.load(point, s.image_ids) for name, s in splits.items()}
    inputs = {
        "pixels": lambda: {n: pixel_tokens(s.images, geometry) for n, s in splits.items()},
        "shuffled": lambda: {n: shuffled_tokens(features[n], config["train"].seed, i)
                             for i, n in enumerate(splits)},
    }
    device = config["train"].device
    vae = load_vae(config["target"]).to(device)
    lpips = Lpips(config["lpips_net"], args.assets, device)
    print("reconstruct: training the image detector on the original images", flush=True)
    detector_start = time.perf_counter()
    detector = ImageDetector(config["detector"])
    detector_info = detector.train(splits, args.plots / "curves" / "detector")
    detector_info["originals"] = detector.score(splits["test"].images, splits["test"],
                                                "test originals")
    detector_seconds = time.perf_counter() - detector_start

    results, reconstructions, summaries = {}, {}, {}
    runs = [(f"point {point}", point, lambda: features)]
    runs += [(f"control {c}", c, inputs[c]) for c in config["controls"]]
    for label, name, make in runs:
        print(f"reconstruct: {label}", flush=True)
        tokens = make()
        trained, summaries[name] = train_adapter(tokens, images, geometry, vae, lpips.model,
                                                 config["train"], args.plots / "curves", name)
        reconstructions[label] = trained.reconstruct(tokens["test"])
        results[name] = image_scores([reconstructions[label]], splits["test"], lpips,
                                     config["scores"])
        detector_start = time.perf_counter()
        results[name].update(detector.score(reconstructions[label], splits["test"],
                                            f"test {label}"))
        detector_seconds += time.perf_counter() - detector_start

    controls = {c: results[c] for c in config["controls"]}
    train: TrainSettings = config["train"]
    target_info = vae.describe()
    metrics = rounded({
        "meta": {
            "vlm": store.manifest["vlm"],
            "display_name": store.manifest["display_name"],
            "weights_source": store.manifest["weights"].get("source"),
            "target": target_info["target"],
            "target_display_name": target_info["display_name"],
            "target_weights": target_info["weights"],
            "point": point,
            "point_requested": config["point"],
            **summaries[point],
            "adapter_params_budget": train.adapter_params,
            "warmup_epochs": train.warmup_epochs,
            "epochs": train.epochs,
            "batch_size": train.batch_size,
            "lr": train.lr,
            "loss": f"LPIPS({config['lpips_net']}) + {train.l2_weight} * MSE; warm-up epochs "
                    f"MSE term only",
            "plan_budget": "5000 samples x 50 epochs, no warm-up (this run is smaller)",
            "n_train": len(splits["train"].image_ids),
            "n_val": len(splits["val"].image_ids),
            "n_test": len(splits["test"].image_ids),
        },
        "detector": detector_info,
        "points": {point: results[point]},
        "controls": controls,
        "validity": {"reconstruction": probe_validity("reconstruction", controls,
                                                      config["band"])},
    })
    write_json(args.metrics, metrics)
    reconstruction_samples(splits["test"].images, reconstructions, config["samples"],
                           args.plots / "samples.png")
    # Wall time is printed, not stored: metrics must repeat exactly from run to run.
    print(f"reconstruct: {time.perf_counter() - start:.1f} s (of which the image detector "
          f"{detector_seconds:.1f} s); validity {metrics['validity']}", flush=True)
    if metrics["validity"]["reconstruction"]["valid"] is False:
        print("warning: the reconstruction controls missed their bands; this run's "
              "reconstruction results are not valid", flush=True)


if __name__ == "__main__":
    sys.exit(stage_main(main))
