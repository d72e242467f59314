"""The extractor: one forward pass per batch captures every requested point."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vlmprobe.extract.hooks import capture_outputs
from vlmprobe.extract.store import STORED_DTYPE, shard_path, write_manifest, write_shard
from vlmprobe.metrics.finite import describe_nonfinite, nonfinite_counts
from vlmprobe.models.base import ModelAdapter


class NonFiniteFeatures(RuntimeError):
    """A point's features hold NaN or inf: stored, they would become plausible-looking metrics
    (one NaN makes every CKA 0.0), so the batch is refused before any shard is written."""


def require_finite_features(
    point: str, tokens: torch.Tensor, image_ids: list[int], first_index: int
) -> None:
    """Raise NonFiniteFeatures if the (B, T, D) `tokens` of `point`, as the store would hold
    them (STORED_DTYPE), have a NaN or inf, naming the counts, the images (ids and indices in
    the extraction order) and the likely causes."""
    stored = tokens.to(STORED_DTYPE)  # checked as stored: float16 overflows past 65504
    n_nan, n_inf, total = nonfinite_counts(stored)
    if not (n_nan or n_inf):
        return
    overflowed = n_inf - nonfinite_counts(tokens)[1]
    bad_rows = (~torch.isfinite(stored)).flatten(1).any(dim=1).nonzero().flatten().tolist()
    shown = bad_rows[:10]
    more = f" and {len(bad_rows) - len(shown)} more" if len(bad_rows) > len(shown) else ""
    overflow_note = (
        f" ({overflowed} of the inf are finite values beyond {STORED_DTYPE}'s range +-65504, "
        "which the store cannot hold)" if overflowed else ""
    )
    raise NonFiniteFeatures(
        f"point {point!r}: {describe_nonfinite(n_nan, n_inf, total)}{overflow_note} in a batch "
        f"of {len(tokens)} images; non-finite in images {[image_ids[r] for r in shown]}{more} "
        f"(indices {[first_index + r for r in shown]} of the extraction order). No shard of "
        "this batch was written. Likely causes: a dtype too narrow for the activations (bf16 "
        "or fp16 overflow, or pixels not cast to the model's dtype); non-persistent buffers "
        "left uninitialised by from_pretrained (e.g. rotary inv_freq / cos_cached: they differ "
        "between two loads); diverged or corrupt weights. Fix: rerun on CPU in fp32 "
        "(`dvc exp run -S extract.device=cpu`) to tell overflow from garbage, and make the "
        "adapter's load() recompute non-persistent buffers from the config."
    )


def extract_points(
    adapter: ModelAdapter,
    model: torch.nn.Module,
    images: np.ndarray,
    points: list[str],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Tokens (B, T, D) of every point for one batch of (B, H, W, 3) uint8 images."""
    inputs = adapter.prepare(images, device)
    modules = {p: adapter.point_module(model, p) for p in points}
    with torch.inference_mode():
        outputs = capture_outputs(modules, lambda: adapter.forward(model, inputs))
        tokens = {p: adapter.point_tokens(p, outputs[p], inputs).float().cpu() for p in points}
    image_size = tuple(images.shape[1:3])
    for p, t in tokens.items():
        expected = adapter.geometry(p, image_size).n_tokens
        if t.shape[1] != expected:
            raise RuntimeError(
                f"point {p!r}: the model gave {t.shape[1]} tokens per {image_size} image, its "
                f"geometry has {expected}: the adapter's token layout is wrong for this input"
            )
    return tokens


def extract_to_store(
    adapter: ModelAdapter,
    model: torch.nn.Module,
    images: np.ndarray,
    image_ids: list[int],
    points: list[str],
    root: Path,
    *,
    batch_size: int,
    shard_size: int,
    device: torch.device,
    manifest_extra: dict[str, Any],
    timing: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Extract every point for every image into a sharded store at `root`; resumable.

    Shards already complete under `root` (from an interrupted run with the same settings)
    are kept and skipped; batches start at shard boundaries, so a resumed run computes
    exactly the batches an uninterrupted one would. Returns the manifest. If `timing` is
    given, it receives `images` (extracted by this call, not skipped) and `seconds`.
    """
    n_shards = math.ceil(len(image_ids) / shard_size)
    image_size = tuple(images.shape[1:3])
    dims: dict[str, int] = {}
    started = time.perf_counter()
    done_images = 0
    with tqdm(total=len(image_ids), desc="extract", unit="img") as bar:
        for index in range(n_shards):
            lo, hi = index * shard_size, min((index + 1) * shard_size, len(image_ids))
            if all(shard_path(root, p, index).exists() for p in points):
                bar.update(hi - lo)
                continue
            chunks: dict[str, list[torch.Tensor]] = {p: [] for p in points}
            for start in range(lo, hi, batch_size):
                batch = images[start : min(start + batch_size, hi)]
                batch_ids = image_ids[start : start + len(batch)]
                for p, tokens in extract_points(adapter, model, batch, points, device).items():
                    require_finite_features(p, tokens, batch_ids, start)
                    chunks[p].append(tokens)
                bar.update(len(batch))
                done_images += len(batch)
            for p in points:
                write_shard(root, p, index, torch.cat(chunks[p]), image_ids[lo:hi])
    elapsed = time.perf_counter() - started
    if timing is not None:
        timing.update(images=done_images, seconds=elapsed)
    if done_images:
        print(f"extracted {done_images} images in {elapsed:.1f} s "
              f"({done_images / elapsed:.1f} img/s on {device})")
    from safetensors import safe_open

    for p in points:
        with safe_open(str(shard_path(root, p, 0)), framework="pt") as f:
            shape = f.get_slice("features").get_shape()
        dims[p] = {"n_tokens": int(shape[1]), "dim": int(shape[2])}
    manifest = {
        **manifest_extra,
        "image_ids": list(image_ids),
        "dtype": "float16",
        "points": {
            p: {
                **dims[p],
                "geometry": adapter.geometry(p, image_size).to_dict(),
                "shards": [shard_path(root, p, i).name for i in range(n_shards)],
            }
            for p in points
        },
    }
    write_manifest(root, manifest)
    return manifest
