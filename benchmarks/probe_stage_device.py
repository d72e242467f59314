"""The probe stage on a device: wall time per probe and peak GPU memory, through the stages.

Builds a scratch project (this repository's params.yaml with the overrides below), runs the
`data`, `extract` and `probe` stages in this process with dvc.yaml's own command lines, and
prints one JSON line per probe run: the stage's wall time, each probe's time (the stage's own
`probe: <probe>/<tokens> N s` lines) and, on CUDA, the peak GPU memory of the probe stage alone.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/probe_stage_device.py \
        --vlm llava_next_random --image-size 448 --images 140 20 40 --device cuda \
        --assets data/assets --out /tmp/probe-bench

`--steps-scale 0.1` shortens every trained probe (for a CPU comparison on a subset); extraction
runs on `--extract-device` (cuda by default: only the probes are compared). Where the data
stage cannot run (the GPU machine lacks PyAV), run it here with `--data-only` and pass its
`data/` folder with `--data`. Only the deepest
extraction point is extracted and probed. `--assets` is a folder holding `lpips/alex.pth` (the
`assets` stage's output).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import sys
import time
from importlib import import_module
from pathlib import Path

import torch
import yaml

from vlmprobe.models.registry import get_entry

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ("dense", "detr", "reconstruction")


def stage(name: str, project: Path) -> float:
    """Run stage `name` with dvc.yaml's arguments in `project`; its wall time in seconds."""
    args = shlex.split(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]["cmd"])[3:]
    previous = Path.cwd()
    os.chdir(project)
    start = time.perf_counter()
    try:
        import_module(f"vlmprobe.stages.{name}").main(args)
    finally:
        os.chdir(previous)
    return time.perf_counter() - start


def set_key(params: dict, dotted: str, value: object) -> None:
    *path, last = dotted.split(".")
    node = params
    for key in path:
        node = node[key]
    node[last] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vlm", required=True)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--images", type=int, nargs=3, default=(140, 20, 40),
                        metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--device", default="cuda", help="the probes' device")
    parser.add_argument("--extract-device", default="cuda")
    parser.add_argument("--threads", type=int, default=1, help="probe.threads")
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--no-controls", action="store_true",
                        help="the trained probes at the point only (bbox still runs on every "
                             "control)")
    parser.add_argument("--assets", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="scratch project folder")
    parser.add_argument("--coco", type=Path,
                        help="a COCO-format folder (val2017/ and annotations/"
                             "instances_val2017.json, as tests/realistic_coco.py writes): its "
                             "images are probed instead of the synthetic shapes")
    parser.add_argument("--data-only", action="store_true",
                        help="stop after the data stage (to carry its output to a machine "
                             "that lacks its decoders)")
    parser.add_argument("--data", type=Path,
                        help="a data stage's output (images/, clips/) made with the same "
                             "arguments and --data-only: the data stage is skipped")
    args = parser.parse_args()

    project = args.out
    shutil.rmtree(project, ignore_errors=True)
    (project / "data").mkdir(parents=True)
    shutil.copytree(args.assets, project / "data" / "assets")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    deepest = list(get_entry(args.vlm).points)[-1]
    n_train, n_val, n_test = args.images
    overrides = {
        "vlm": args.vlm,
        "data.image_size": args.image_size,
        "data.shapes.n_train": n_train, "data.shapes.n_val": n_val, "data.shapes.n_test": n_test,
        "data.moving_shapes.n_train": 14, "data.moving_shapes.n_val": 4,
        "data.moving_shapes.n_test": 4,
        "data.shapes.max_size": args.image_size * 90 // 224,
        "data.shapes.min_size": args.image_size * 20 // 224,
        "extract.points": [deepest], "extract.device": args.extract_device,
        "extract.batch_size": 8,
        "probe.device": args.device, "probe.threads": args.threads,
    }
    if args.coco is not None:
        overrides.update({
            "data.dataset": "coco", "data.coco.image_size": args.image_size,
            "data.coco.images": str((args.coco / "val2017").resolve()),
            "data.coco.annotations": str(
                (args.coco / "annotations" / "instances_val2017.json").resolve()),
            "data.coco.n_train": n_train, "data.coco.n_val": n_val, "data.coco.n_test": n_test,
        })
    for probe in TRAINED:
        steps = params["probe"][probe]["steps"]
        scaled = max(1, round(steps * args.steps_scale))
        overrides[f"probe.{probe}.steps"] = scaled
        overrides[f"probe.{probe}.eval_every"] = min(params["probe"][probe]["eval_every"], scaled)
    if args.no_controls:
        for probe in (*TRAINED, "temporal"):
            overrides[f"probe.{probe}.controls"] = "none"
    for key, value in overrides.items():
        set_key(params, key, value)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    seconds = {}
    if args.data is not None:
        for part in ("images", "clips"):
            shutil.copytree(args.data / part, project / "data" / part)
    else:
        seconds["data"] = stage("data", project)
    if args.data_only:
        return
    seconds["extract"] = stage("extract", project)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    log = io.StringIO()
    with contextlib.redirect_stdout(Tee(sys.stdout, log)):
        seconds["probe"] = stage("probe", project)
    timings = {m[1]: float(m[2]) for m in re.finditer(r"^probe: (\S+/\S+) ([\d.]+) s\b",
                                                       log.getvalue(), re.M)}
    metrics = json.loads((project / "metrics" / "probe.json").read_text())
    print(json.dumps({
        "vlm": args.vlm, "dataset": "coco" if args.coco else "shapes", "point": deepest,
        "image_size": args.image_size,
        "images": list(args.images), "probe_device": args.device, "threads": args.threads,
        "steps": {p: overrides[f"probe.{p}.steps"] for p in TRAINED},
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "stage_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "probe_seconds": timings,
        "probe_peak_gpu_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                               if torch.cuda.is_available() else None),
        "validity": {p: v["valid"] for p, v in metrics["validity"].items()},
        "deepest": metrics["points"][deepest],
        "controls": metrics.get("controls", {}),
    }))


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


if __name__ == "__main__":
    main()
