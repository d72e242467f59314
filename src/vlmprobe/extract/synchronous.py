"""The extraction done one step after another: prepare, forward, copy to the host, write.

The plain hook loop (hooks, batching, early exit, synchronous copies) that the pipelined engine
(`vlmprobe.extract.engine`) must equal: the tests compare both stores byte for byte, and
`benchmarks/extract_throughput.py` times it as the baseline of what the pipeline adds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmprobe.extract.engine import extract_points, write_store_manifest
from vlmprobe.extract.store import write_shard
from vlmprobe.models.base import ModelAdapter


def extract_synchronously(adapter: ModelAdapter, model: torch.nn.Module, images: np.ndarray,
                          image_ids: list[int], points: list[str], root: Path, *,
                          batch_size: int, shard_size: int, device: torch.device,
                          manifest_extra: dict[str, Any]) -> dict[str, Any]:
    """The store `extract_to_store` writes (same shards, same manifest), without overlap or
    resume."""
    n_shards = math.ceil(len(image_ids) / shard_size)
    for index in range(n_shards):
        lo, hi = index * shard_size, min((index + 1) * shard_size, len(image_ids))
        chunks: dict[str, list[torch.Tensor]] = {p: [] for p in points}
        for start in range(lo, hi, batch_size):
            batch = images[start:min(start + batch_size, hi)]
            for p, tokens in extract_points(adapter, model, batch, points, device).items():
                chunks[p].append(tokens)
        for p in points:
            write_shard(root, p, index, torch.cat(chunks[p]), image_ids[lo:hi])
    return write_store_manifest(adapter, root, points, image_ids, n_shards,
                                tuple(images.shape[1:3]), manifest_extra)
