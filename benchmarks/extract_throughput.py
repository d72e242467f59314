"""Throughput of vlmprobe's extraction engine against the naive loop, in the same run.

Naive loop: what a researcher would write first: one image at a time, the full forward pass
with `output_hidden_states=True`, every hidden state saved (torch.save, the model's dtype).
Engine: batched, early exit after the deepest requested point, image tokens only, float16
shards. Two point sets: `all` (the deepest point is the last LLM layer) and `mid` (points up to
half the LLM's depth, e.g. InternVL2's layer 16 of 32). Both write to a temporary directory,
so storage I/O is part of both timings.

    python benchmarks/extract_throughput.py --vlm qwen2_5_vl_tiny --device cpu
    python benchmarks/extract_throughput.py --vlm internvl2_random --device cuda --images 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vlmprobe.extract.engine import extract_to_store
from vlmprobe.models.registry import adapter_for, get_entry


def point_sets(adapter, model) -> dict[str, list[str]]:
    """`all` points, and `mid`: those no deeper than half the LLM."""
    half = len(adapter.decoder_layers(model)) // 2
    points = adapter.entry.points
    mid = [p for p, s in points.items()
           if s["kind"] != "llm" or (s["layer"] != -1 and s["layer"] <= half)]
    return {"all": list(points), "mid": mid}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def naive_loop(adapter, model, images: np.ndarray, device: torch.device, out: Path) -> dict:
    out.mkdir(parents=True)
    synchronize(device)
    started = time.perf_counter()
    for i, image in enumerate(images):
        inputs = adapter.prepare(image[None], device)
        with torch.no_grad():
            hidden = adapter.forward(model, {**inputs, "output_hidden_states": True}).hidden_states
        torch.save([h.cpu() for h in hidden], out / f"{i:05d}.pt")
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"images_per_s": len(images) / seconds, "bytes_per_image": dir_bytes(out) / len(images)}


def engine(adapter, model, images, points, device, batch_size, out: Path) -> dict:
    synchronize(device)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        extract_to_store(adapter, model, images, list(range(len(images))), points, out,
                         batch_size=batch_size, shard_size=len(images), device=device,
                         manifest_extra={})
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"images_per_s": len(images) / seconds, "bytes_per_image": dir_bytes(out) / len(images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vlm", default="qwen2_5_vl_tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16],
                        help="engine images per forward pass; several values: one timing each")
    parser.add_argument("--size", type=int, default=224, help="image side, px")
    args = parser.parse_args()

    device = torch.device(args.device)
    adapter = adapter_for(get_entry(args.vlm))
    model = adapter.load(Path.cwd(), device)
    images = np.random.default_rng(0).integers(
        0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8
    )
    # Warm-up (lazy imports, kernel selection) outside the timings.
    engine(adapter, model, images[:2], list(adapter.entry.points), device, 2,
           Path(tempfile.mkdtemp()) / "warm")
    results = {
        "vlm": args.vlm,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
        "images": args.images,
    }
    with tempfile.TemporaryDirectory() as tmp:
        results["naive"] = naive_loop(adapter, model, images, device, Path(tmp) / "naive")
        for batch_size in args.batch_size:
            for name, points in point_sets(adapter, model).items():
                timing = engine(adapter, model, images, points, device, batch_size,
                                Path(tmp) / f"{name}-{batch_size}")
                timing["points"] = points
                timing["batch_size"] = batch_size
                timing["speedup"] = timing["images_per_s"] / results["naive"]["images_per_s"]
                results[f"engine_{name}_batch{batch_size}"] = timing
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
