"""Peak resident memory of the probe stage against the number of images, at a fixed width.

For each N: synthetic shapes (70/10/20 train/val/test), a one-point feature store of float16
tokens on a 16x16 grid of `--dim` dims, like DINOv2-S/14 at 224 px (each token its patch's
pixels through a fixed random map, plus noise: tokens that locate the shapes, so the probes
find as many objects as on real features, not the flood of noise boxes), random LPIPS
weights, and the project's params with the trained probes cut to a few steps and one ridge
penalty and threshold (what is held does not depend on them); then dvc.yaml's probe command
in a child process, whose peak RSS (`ru_maxrss` from wait4) is printed beside the sizes of the
feature store and of the split's decoded images and masks. `--src` runs another checkout's
code (e.g. the previous commit's) on the same inputs.

    python benchmarks/probe_memory.py --sizes 500 4000 --workdir /tmp/probe-memory
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from vlmprobe.assets.lpips_weights import build_lpips
from vlmprobe.data.dataset import SPLITS, load_split
from vlmprobe.data.shapes import generate_shapes
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.extract.store import write_manifest, write_shard
from vlmprobe.probes.controls import pixel_tokens

ROOT = Path(__file__).resolve().parents[1]
GRID, PATCH = 16, 14
SHARD = 100


def build_inputs(root: Path, n: int, dim: int) -> int:
    """Shapes, store and LPIPS weights for `n` images under `root`; the bytes of the splits'
    images and masks, decoded."""
    size = GRID * PATCH
    generate_shapes(root / "data/images", seed=0, image_size=size, n_train=n * 7 // 10,
                    n_val=n // 10, n_test=n - n * 7 // 10 - n // 10, min_objects=1,
                    max_objects=4, min_size=20, max_size=90)
    geometry = TokenGeometry.single_grid((size, size), GRID, GRID)
    rng = np.random.default_rng(0)
    projection = rng.standard_normal((3 * PATCH**2, dim)) / PATCH
    held, ids, names = 0, [], []
    for name in SPLITS:
        split = load_split(root / "data/images", name)
        held += np.asarray(split.images).nbytes + sum(m.nbytes for m in split.masks)
        ids += split.image_ids
        for start in range(0, len(split.image_ids), SHARD):
            pixels = pixel_tokens(split.images[start : start + SHARD], geometry, PATCH)
            tokens = pixels @ projection + 0.1 * rng.standard_normal((*pixels.shape[:2], dim))
            write_shard(root / "data/features", "final", len(names),
                        torch.from_numpy(tokens.astype(np.float32)),
                        split.image_ids[start : start + SHARD])
            names.append(f"shard-{len(names):05d}.safetensors")
    write_manifest(root / "data/features", {
        "vlm": "synthetic", "display_name": "synthetic", "weights": {"source": "random"},
        "image_ids": ids,
        "points": {"final": {"dim": dim, "geometry": geometry.to_dict(), "shards": names}}})
    (root / "data/assets/lpips").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(build_lpips("alex").state_dict(), root / "data/assets/lpips/alex.pth")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # Fewer steps, penalties, thresholds and resamples: time, not memory (none is held per step)
    for probe in ("dense", "detr", "reconstruction"):
        params["probe"][probe].update(steps=20, eval_every=10)
    params["probe"].update(seeds=1, bootstrap=100, ridge_alphas=[1.0], thresholds=[0.5])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return held


def peak_rss(root: Path, src: Path) -> tuple[float, float]:
    """The probe stage's peak RSS (bytes) and wall time (s), run in `root` with code `src`."""
    cmd = shlex.split(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["probe"]["cmd"])
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, *cmd[1:]], cwd=root, env=env,
                             stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"the probe stage failed in {root} (status {status})")
    return usage.ru_maxrss * 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 4000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the code to measure")
    args = parser.parse_args()
    mib = 2**20
    print(f"code: {args.src}; width {GRID * GRID} tokens x {args.dim} dims; threads "
          f"{torch.get_num_threads()}", flush=True)
    for n in args.sizes:
        root = args.workdir / str(n)
        if not (root / "params.yaml").exists():
            held = build_inputs(root, n, args.dim)
            (root / "held_bytes").write_text(str(held))
        held = int((root / "held_bytes").read_text())
        store = sum(p.stat().st_size for p in (root / "data/features").rglob("*.safetensors"))
        rss, seconds = peak_rss(root, args.src)
        print(f"N={n}: peak RSS {rss / mib:.0f} MiB; feature store {store / mib:.0f} MiB on "
              f"disk; images + masks {held / mib:.0f} MiB decoded; {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
