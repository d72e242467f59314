"""The bbox probe's positive and negative controls on a dataset and a token grid, printed as JSON.

What a user asks before trusting the probe on new data or a new model's grid: can it read the
ground truth there (`oracle`, band >= 0.60) and does it fail without positions
(`oracle_shuffled`, band <= 0.20)? The controls are built as the probe stage builds them
(`probe.oracle` of params.yaml, `probe.seed`), on a single square grid of `--grid` tokens a side.

    python benchmarks/bbox_controls.py --shapes --image-size 224 --grid 8     # Qwen2.5-VL, 224 px
    python tests/realistic_coco.py --out /tmp/rc0 --seed 0 --images 300 --workers 2
    python benchmarks/bbox_controls.py --coco /tmp/rc0 --image-size 448 --grid 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from vlmprobe.data.coco import write_coco_subset
from vlmprobe.data.dataset import SPLITS, load_split
from vlmprobe.data.shapes import generate_shapes
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.probes.controls import OracleTokens, ShuffledTokens
from vlmprobe.probes.coverage import ProbeSettings, instance_targets, run_bbox_probe

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shapes", action="store_true",
                        help="the default synthetic shapes (params.yaml's data.shapes)")
    source.add_argument("--coco", type=Path, help="a COCO-format folder (val2017/, "
                        "annotations/instances_val2017.json)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--grid", type=int, required=True, help="tokens a side")
    parser.add_argument("--images", type=int, nargs=3, default=(200, 40, 60),
                        metavar=("TRAIN", "VAL", "TEST"), help="for --coco")
    args = parser.parse_args()

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    probe = params["probe"]
    settings = ProbeSettings(alphas=probe["ridge_alphas"], thresholds=probe["thresholds"],
                             min_component_px=probe["min_component_px"],
                             bootstrap=probe["bootstrap"], seed=probe["seed"])
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        if args.shapes:
            shapes = dict(params["data"]["shapes"])
            scale = args.image_size / 224
            shapes["min_size"] = round(shapes["min_size"] * scale)
            shapes["max_size"] = round(shapes["max_size"] * scale)
            generate_shapes(root, seed=params["data"]["seed"], image_size=args.image_size,
                            **shapes)
        else:
            n_train, n_val, n_test = args.images
            write_coco_subset(root, images_dir=args.coco / "val2017",
                              annotations=args.coco / "annotations" / "instances_val2017.json",
                              seed=params["data"]["seed"], image_size=args.image_size,
                              n_train=n_train, n_val=n_val, n_test=n_test, on_bad_sample="fail",
                              workers=2, max_pixels=40_000_000, allow_outside_paths=False)
        splits = {name: load_split(root, name) for name in SPLITS}
        geometry = TokenGeometry.single_grid((args.image_size,) * 2, args.grid, args.grid)
        start = time.perf_counter()
        targets = {name: instance_targets(split, geometry) for name, split in splits.items()}
        targets_s = time.perf_counter() - start
        oracle = {name: OracleTokens(t, probe["oracle"]["dim"], probe["oracle"]["noise"],
                                     probe["seed"], stream)
                  for stream, (name, t) in enumerate(targets.items())}
        controls = {"oracle": oracle,
                    "oracle_shuffled": {name: ShuffledTokens(tokens, probe["seed"], stream)
                                        for stream, (name, tokens) in enumerate(oracle.items())}}
        results = {}
        for name, features in controls.items():
            start = time.perf_counter()
            metrics = run_bbox_probe(features, targets, splits, geometry, settings)
            results[name] = {**metrics, "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps({
        "data": "shapes" if args.shapes else str(args.coco), "image_size": args.image_size,
        "grid": args.grid, "images": {n: len(s.image_ids) for n, s in splits.items()},
        "targets_seconds": round(targets_s, 1), **results}))


if __name__ == "__main__":
    main()
