"""Sharded feature store: per point, float16 safetensors shards of `shard_size` images.

Layout of a store directory:
    manifest.json                    model, weights, image ids, per-point dim and geometry
    <point>/shard-00000.safetensors  {"features": (n, T, D) float16, "image_ids": (n,) int64}
Shards are written as their rows arrive, into a hidden temporary renamed into place when
complete, so a shard file that exists is complete; an interrupted extraction resumes from the
shards already written (and deletes the temporaries a killed one left).
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from vlmprobe.errors import MissingInput
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.io import read_json, umask, write_json

MANIFEST = "manifest.json"
STORED_DTYPE = torch.float16  # what shards hold; finite values beyond +-65504 become inf


def shard_path(root: Path, point: str, index: int) -> Path:
    return root / point / f"shard-{index:05d}.safetensors"


SAFETENSORS_DTYPES = {torch.float16: "F16", torch.int64: "I64"}
TMP_SUFFIX = ".tmp"
SHARD_MODE = 0o666 & ~umask()  # read once, at import: setting the umask to read it races threads


class ShardFile:
    """One shard written as its rows arrive, so no shard is ever held whole in memory.

    The bytes are exactly those of `safetensors.torch.save_file({"features": ..., "image_ids":
    ...})` (tested): the header (both shapes are known from the first rows), the image ids,
    then the features row block by row block. The file is a hidden temporary beside the shard
    until every row is in, then renamed onto it: a shard file that exists is complete.
    """

    def __init__(self, root: Path, point: str, index: int, ids: list[int],
                 row_shape: tuple[int, ...]):
        self.path = shard_path(root, point, index)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.shape = (len(ids), *row_shape)
        self.rows = 0
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=TMP_SUFFIX,
                                   dir=self.path.parent)
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb")
        id_bytes = 8 * len(ids)
        feature_bytes = math.prod(self.shape) * STORED_DTYPE.itemsize
        header = json.dumps({
            "image_ids": {"dtype": "I64", "shape": [len(ids)], "data_offsets": [0, id_bytes]},
            "features": {"dtype": SAFETENSORS_DTYPES[STORED_DTYPE], "shape": list(self.shape),
                         "data_offsets": [id_bytes, id_bytes + feature_bytes]},
        }, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        self.file.write(struct.pack("<Q", len(header)) + header)
        self.file.write(np.asarray(ids, dtype="<i8").tobytes())

    def write(self, features: torch.Tensor) -> None:
        """Append the next rows: a contiguous STORED_DTYPE host tensor of (n, *row_shape)."""
        if features.dtype != STORED_DTYPE or tuple(features.shape[1:]) != self.shape[1:]:
            raise ValueError(f"{self.path}: rows of {features.dtype} {tuple(features.shape)} "
                             f"for a shard of {STORED_DTYPE} {self.shape}")
        if self.rows + len(features) > self.shape[0]:
            raise ValueError(f"{self.path}: more than its {self.shape[0]} rows")
        self.file.write(memoryview(features.contiguous().numpy()).cast("B"))  # no GIL held
        self.rows += len(features)

    def close(self) -> None:
        """Rename the complete shard into place."""
        if self.rows != self.shape[0]:
            self.abort()
            raise ValueError(f"{self.path}: {self.rows} of {self.shape[0]} rows written")
        self.file.close()
        self.tmp.chmod(SHARD_MODE)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop an unfinished shard: close and delete its temporary."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)



def remove_unfinished_shards(root: Path) -> None:
    """Delete the temporaries a killed extraction left under `root` (complete shards stay)."""
    for tmp in root.glob(f"*/.shard-*{TMP_SUFFIX}"):
        tmp.unlink()


def write_shard(root: Path, point: str, index: int, features: torch.Tensor, ids: list[int]) -> None:
    shard = ShardFile(root, point, index, ids, tuple(features.shape[1:]))
    try:
        shard.write(features.to(STORED_DTYPE).cpu())
    except BaseException:
        shard.abort()
        raise
    shard.close()


@dataclass(frozen=True)
class FeatureStore:
    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: Path | str) -> FeatureStore:
        root = Path(root)
        if not (root / MANIFEST).exists():
            raise MissingInput(
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
