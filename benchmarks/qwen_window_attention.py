"""Qwen2.5-VL's vision attention: transformers' per-window SDPA path against vlmprobe's
packed one (`vlmprobe.models.qwen2_5_vl.packed_window_attention`), same model, same batch:
are the vision and merger points bitwise equal, and how long does the forward pass take?

    python benchmarks/qwen_window_attention.py --vlm qwen2_5_vl_random --device cuda --size 448
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from vlmprobe.extract.engine import device_points
from vlmprobe.models.qwen2_5_vl import PACKED_ATTENTION
from vlmprobe.models.registry import adapter_for, get_entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vlm", default="qwen2_5_vl_tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, nargs="+", default=[448])
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    device = torch.device(args.device)
    adapter = adapter_for(get_entry(args.vlm))
    model = adapter.load(Path.cwd(), device)
    config = model.model.visual.config
    points = [p for p, s in adapter.entry.points.items() if s["kind"] != "llm"]
    results = []
    for side in args.size:
        images = np.random.default_rng(0).integers(0, 256, (args.batch_size, side, side, 3),
                                                   dtype=np.uint8)
        inputs = adapter.prepare(images, device)
        run = {"size": side, "batch_size": args.batch_size, "points": points}
        tokens = {}
        for implementation in ("sdpa", PACKED_ATTENTION):
            config._attn_implementation = implementation
            seconds = []
            for _ in range(4):  # the first is a warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                tokens[implementation] = device_points(adapter, model, inputs, points,
                                                       (side, side))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - started)
            run[f"{implementation}_forward_s"] = statistics.median(seconds[1:])
        run["bitwise_equal"] = all(torch.equal(tokens["sdpa"][p], tokens[PACKED_ATTENTION][p])
                                   for p in points)
        run["max_abs_difference"] = max(
            float((tokens["sdpa"][p].float() - tokens[PACKED_ATTENTION][p].float()).abs().max())
            for p in points)
        run["speedup"] = run["sdpa_forward_s"] / run[f"{PACKED_ATTENTION}_forward_s"]
        results.append(run)
    print(json.dumps({"vlm": args.vlm, "device": torch.cuda.get_device_name(device)
                      if device.type == "cuda" else "cpu", "runs": results}, indent=2))


if __name__ == "__main__":
    main()
