"""Throughput and MFU of vlmprobe's extraction engine against two baselines, in the same run.

Naive loop: what a researcher would write first: one image at a time, the full forward pass
with `output_hidden_states=True`, every hidden state saved (torch.save, the model's dtype).
Plain hook loop (`vlmprobe.extract.synchronous`): the obvious fix: hooks, batching and early
exit, but every step after the other (prepare, forward, `.float().cpu()`, write).
Engine (`vlmprobe.extract.engine`): the same work pipelined: next batch prepared on a thread,
tokens cast to float16 on the device and copied into reused pinned buffers on a side stream
while the next batch runs, shards assembled and written on threads.

Point sets: `all` (the deepest point is the last LLM layer) and `mid` (points up to half the
LLM's depth). Everything writes to a temporary directory, so storage I/O is in every timing.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one real engine batch (early exit
included, so only what runs is counted), attention counted as a full square by this file's own
formula for every SDPA kernel (grouped-query attention included, which some torch versions'
formula rejects). MFU = FLOPs per image x images per second / the card's peak, measured here as
a bf16 (CUDA) or fp32 (CPU) 8192^3 matmul. End-to-end MFU uses the engine's wall time;
forward-only MFU the synchronised time of the forward pass of that same batch alone.

    python benchmarks/extract_throughput.py --vlm qwen2_5_vl_tiny --device cpu
    python benchmarks/extract_throughput.py --vlm llava_next_random --device cuda --size 448 \
        --images 64 --batch-size 8 auto --out docs/bench/x.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmprobe.extract.engine import choose_batch_size, device_points, extract_to_store
from vlmprobe.extract.synchronous import extract_synchronously
from vlmprobe.models.registry import adapter_for, get_entry

aten = torch.ops.aten
SDPA_KERNELS = [getattr(aten, name) for name in (
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
) if hasattr(aten, name)]


def attention_square_flops(query_shape, key_shape, value_shape, *_args, **_kwargs) -> int:
    """QK^T and AV of (B, H_q, S_q, D) queries over S_k keys, every pair counted (no causal
    halving), key/value heads broadcast to the query heads."""
    b, h_q, s_q, d = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h_q * s_q * s_k * d + 2 * b * h_q * s_q * s_k * d_v


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of an 8192^3 matmul in the card's dtype (bf16 on CUDA, fp32 on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, repeats = (8192, 20) if device.type == "cuda" else (2048, 3)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def point_sets(adapter, model) -> dict[str, list[str]]:
    """`all` points, and `mid`: those no deeper than half the LLM."""
    half = len(adapter.decoder_layers(model)) // 2
    points = adapter.entry.points
    mid = [p for p, s in points.items()
           if s["kind"] != "llm" or (s["layer"] != -1 and s["layer"] <= half)]
    return {"all": list(points), "mid": mid}


def forward_cost(adapter, model, images, points, device) -> dict:
    """FLOPs per image of one engine batch, and the forward pass's synchronised time."""
    inputs = adapter.prepare(images, device)
    size = tuple(images.shape[1:3])
    counter = FlopCounterMode(display=False,
                              custom_mapping=dict.fromkeys(SDPA_KERNELS, attention_square_flops))
    with counter:
        device_points(adapter, model, inputs, points, size)
    seconds = []
    for _ in range(3):
        synchronize(device)
        started = time.perf_counter()
        device_points(adapter, model, inputs, points, size)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    ids = inputs.get("input_ids")
    return {"flops_per_image": counter.get_total_flops() / len(images),
            "forward_seconds_per_image": statistics.median(seconds) / len(images),
            "llm_tokens_per_image": int(ids.shape[1]) if ids is not None else None}


def naive_loop(adapter, model, images: np.ndarray, device: torch.device, out: Path) -> dict:
    out.mkdir(parents=True)
    synchronize(device)
    started = time.perf_counter()
    for i, image in enumerate(images):
        inputs = adapter.prepare(image[None], device)
        with torch.no_grad():
            output = adapter.forward(model, {**inputs, "output_hidden_states": True})
        hidden = getattr(output, adapter.llm_hidden_states)  # the layers `llm` points index
        torch.save([h.cpu() for h in hidden], out / f"{i:05d}.pt")
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"images_per_s": len(images) / seconds, "bytes_per_image": dir_bytes(out) / len(images)}


def timed(extract, adapter, model, images, points, device, batch_size, shard_size,
          out: Path) -> dict:
    """One extraction into `out` by `extract` (the engine or the plain loop), timed."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    timing = {"timing": {}} if extract is extract_to_store else {}
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        extract(adapter, model, images, list(range(len(images))), points, out,
                batch_size=batch_size, shard_size=shard_size, device=device, manifest_extra={},
                **timing)
    synchronize(device)
    seconds = time.perf_counter() - started
    result = {"images_per_s": len(images) / seconds,
              "bytes_per_image": dir_bytes(out) / len(images)}
    if timing:
        result["busy_seconds"] = timing["timing"]["busy_seconds"]
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def same_bytes(plain: Path, engine: Path) -> bool:
    """Every shard of the plain loop's store equals the engine's shard of that name."""
    files = sorted(p.relative_to(plain) for p in plain.rglob("*.safetensors"))
    return bool(files) and all(
        (engine / f).is_file() and (plain / f).read_bytes() == (engine / f).read_bytes()
        for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vlm", default="qwen2_5_vl_tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--naive-images", type=int, default=None,
                        help="images for the naive loop (default: --images)")
    parser.add_argument("--plain-images", type=int, default=None,
                        help="images for the plain hook loop (default: --images); its shards are "
                             "compared with the engine's first ones")
    parser.add_argument("--batch-size", nargs="+", default=["16"],
                        help="engine images per forward pass (an integer or auto); several: "
                             "one timing each")
    parser.add_argument("--shard-size", type=int, default=32,
                        help="images per shard (the stage's default is 100)")
    parser.add_argument("--size", type=int, nargs="+", default=[224], help="image side, px")
    parser.add_argument("--point-sets", nargs="+", default=["all", "mid"])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    device = torch.device(args.device)
    adapter = adapter_for(get_entry(args.vlm))
    # Inference only; and FlopCounterMode's module tracker fails on a parameter that requires
    # grad passed into a submodule under inference mode (Kosmos-2's latent queries).
    model = adapter.load(Path.cwd(), device).requires_grad_(False)
    peak = matmul_peak(device)
    results = {
        "vlm": args.vlm,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "dtype": str(adapter.dtype).removeprefix("torch."),
        "matmul_peak_tflops": peak / 1e12,
        "images": args.images,
        "runs": [],
    }
    sets = point_sets(adapter, model)
    for side in args.size:
        images = np.random.default_rng(0).integers(0, 256, (args.images, side, side, 3),
                                                   dtype=np.uint8)
        # Warm-up (lazy imports, kernel selection) outside the timings.
        timed(extract_to_store, adapter, model, images[:2], sets["all"], device, 2, 2,
              Path(tempfile.mkdtemp()) / "warm")
        with tempfile.TemporaryDirectory() as tmp:
            naive = naive_loop(adapter, model, images[:args.naive_images], device,
                               Path(tmp) / "naive")
            for name in args.point_sets:
                points = sets[name]
                for requested in args.batch_size:
                    if requested == "auto":
                        batch_size, how = choose_batch_size(adapter, model, images, points,
                                                            device, len(images))
                    else:
                        batch_size, how = int(requested), "given"
                    cost = forward_cost(adapter, model, images[:batch_size], points, device)
                    run = {"size": side, "points_set": name, "points": points,
                           "batch_size": batch_size, "shard_size": args.shard_size,
                           "batch_size_choice": how, **cost,
                           "naive": naive}
                    for label, extract, n in (
                            ("plain_hook_loop", extract_synchronously, args.plain_images),
                            ("engine", extract_to_store, None)):
                        out = Path(tmp) / f"{label}-{side}-{name}-{batch_size}"
                        run[label] = timed(extract, adapter, model, images[:n], points, device,
                                           batch_size, args.shard_size, out)
                        run[label]["mfu"] = cost["flops_per_image"] * run[label][
                            "images_per_s"] / peak
                    run["engine_equals_plain_loop_bytes"] = same_bytes(
                        Path(tmp) / f"plain_hook_loop-{side}-{name}-{batch_size}",
                        Path(tmp) / f"engine-{side}-{name}-{batch_size}")
                    run["forward_only_mfu"] = (cost["flops_per_image"]
                                               / cost["forward_seconds_per_image"] / peak)
                    run["engine_speedup_over_naive"] = (run["engine"]["images_per_s"]
                                                        / naive["images_per_s"])
                    results["runs"].append(run)
                    print(json.dumps({k: v for k, v in run.items() if k != "points"}),
                          file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
