"""Sharded feature store: per point, float16 safetensors shards of `shard_size` images.

Layout of a store directory:
    manifest.json                    model, weights, image ids, per-point dim and geometry
    <point>/shard-00000.safetensors  {"features": (n, T, D) float16, "image_ids": (n,) int64}
Shards are written atomically, so a shard file that exists is complete; an interrupted
extraction resumes from the shards already written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.io import atomic_path, read_json, write_json

MANIFEST = "manifest.json"
STORED_DTYPE = torch.float16  # what shards hold; finite values beyond +-65504 become inf


def shard_path(root: Path, point: str, index: int) -> Path:
    return root / point / f"shard-{index:05d}.safetensors"


def write_shard(root: Path, point: str, index: int, features: torch.Tensor, ids: list[int]) -> None:
    path = shard_path(root, point, index)
    with atomic_path(path) as tmp:
        save_file(
            {
                "features": features.to(STORED_DTYPE).contiguous().cpu(),
                "image_ids": torch.tensor(ids, dtype=torch.int64),
            },
            str(tmp),
        )


@dataclass(frozen=True)
class FeatureStore:
    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: Path | str) -> FeatureStore:
        root = Path(root)
        if not (root / MANIFEST).exists():
            raise FileNotFoundError(
                f"no feature store at {root} ({MANIFEST} missing). Fix: `dvc repro extract`."
            )
        return cls(root, read_json(root / MANIFEST))

    @property
    def points(self) -> list[str]:
        return list(self.manifest["points"])

    @property
    def image_ids(self) -> list[int]:
        return list(self.manifest["image_ids"])

    def geometry(self, point: str) -> TokenGeometry:
        return TokenGeometry.from_dict(self.manifest["points"][point]["geometry"])

    def load(self, point: str, image_ids: list[int] | None = None) -> np.ndarray:
        """Features of `point` as float32 (N, T, D), for `image_ids` in that order (default all)."""
        info = self.manifest["points"][point]
        feats, ids = [], []
        for name in info["shards"]:
            shard = load_file(str(self.root / point / name))
            feats.append(shard["features"].float().numpy())
            ids.extend(shard["image_ids"].tolist())
        stacked = np.concatenate(feats, axis=0)
        if image_ids is None:
            return stacked
        row = {image_id: i for i, image_id in enumerate(ids)}
        missing = [i for i in image_ids if i not in row]
        if missing:
            raise KeyError(f"image ids {missing[:5]} not in the feature store at {self.root}")
        return stacked[[row[i] for i in image_ids]]


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_json(root / MANIFEST, manifest)
