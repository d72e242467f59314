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

from vlmprobe.errors import CorruptInput, MissingInput
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.extract.tokens import every_row
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

    def tokens(self, point: str, image_ids: list[int] | None = None) -> StoredTokens:
        """Features of `point` for `image_ids` (default: all, in shard order), read on demand."""
        return StoredTokens.open(self.root / point, self.manifest["points"][point]["shards"],
                                 image_ids)

    def load(self, point: str, image_ids: list[int] | None = None) -> np.ndarray:
        """Features of `point` as float32 (N, T, D), for `image_ids` in that order (default all)."""
        return every_row(self.tokens(point, image_ids))


@dataclass(frozen=True)
class ShardLayout:
    """Where a shard's feature rows lie in its file (from its safetensors header)."""

    path: Path
    image_ids: list[int]
    row_shape: tuple[int, int]
    start: int  # byte offset of the first feature row

    @classmethod
    def read(cls, path: Path) -> ShardLayout:
        def corrupt(why: str) -> CorruptInput:
            return CorruptInput(f"{path}: {why}; the shard is damaged. Fix: delete the feature "
                                f"store and `dvc repro extract` (or `dvc checkout`).")

        try:
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > 1 << 20:
                    raise corrupt(f"header of {length} bytes")
                header = json.loads(f.read(length))
                begin = 8 + length
                ids, features = header["image_ids"], header["features"]
                f.seek(begin + ids["data_offsets"][0])
                image_ids = np.frombuffer(f.read(8 * ids["shape"][0]), dtype="<i8").tolist()
        except (struct.error, ValueError, KeyError, TypeError) as e:
            raise corrupt(f"unreadable header ({e})") from e
        n, *row_shape = features["shape"]
        if features["dtype"] != SAFETENSORS_DTYPES[STORED_DTYPE] or len(row_shape) != 2:
            raise corrupt(f"features of {features['dtype']} {features['shape']}, expected "
                          f"{SAFETENSORS_DTYPES[STORED_DTYPE]} (n, T, D)")
        start, end = (begin + o for o in features["data_offsets"])
        if len(image_ids) != n or end - start != n * math.prod(row_shape) * 2:
            raise corrupt("the header's shapes and offsets disagree")
        if path.stat().st_size < end:
            raise corrupt(f"{path.stat().st_size} bytes, its header says {end}")
        return cls(path, image_ids, tuple(row_shape), start)


@dataclass(frozen=True)
class StoredTokens:
    """A point's features for some images, read from the shards a batch at a time (positioned
    reads, not a memory map: pages of a map that were read count towards the process's
    resident memory, so a probe's memory would grow with the store it has read)."""

    shards: list[ShardLayout]
    where: np.ndarray  # (N, 2): shard number and row of each requested image

    @classmethod
    def open(cls, directory: Path, names: list[str],
             image_ids: list[int] | None = None) -> StoredTokens:
        shards = [ShardLayout.read(directory / name) for name in names]
        if len({s.row_shape for s in shards}) > 1:
            raise CorruptInput(f"{directory}: shards of different token shapes "
                               f"{sorted({s.row_shape for s in shards})}. Fix: delete the "
                               f"feature store and `dvc repro extract`.")
        found = {image_id: (k, row) for k, s in enumerate(shards)
                 for row, image_id in enumerate(s.image_ids)}
        wanted = list(found) if image_ids is None else image_ids
        missing = [i for i in wanted if i not in found]
        if missing:
            raise KeyError(f"image ids {missing[:5]} not in the feature store at "
                           f"{directory.parent}")
        return cls(shards, np.array([found[i] for i in wanted], dtype=np.int64).reshape(-1, 2))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.where), *self.shards[0].row_shape)

    def rows(self, index: np.ndarray) -> np.ndarray:
        t, d = self.shards[0].row_shape
        row_bytes = t * d * STORED_DTYPE.itemsize
        out = np.empty((len(index), t, d), dtype=np.float32)
        where = self.where[np.asarray(index, dtype=np.int64)]
        # Runs of consecutive rows of one shard are read with one call.
        breaks = np.flatnonzero((np.diff(where[:, 0]) != 0) | (np.diff(where[:, 1]) != 1)) + 1
        for run in np.split(np.arange(len(where)), breaks):
            if not len(run):
                continue
            shard = self.shards[where[run[0], 0]]
            offset = shard.start + int(where[run[0], 1]) * row_bytes
            with shard.path.open("rb") as f:
                data = os.pread(f.fileno(), len(run) * row_bytes, offset)
            if len(data) != len(run) * row_bytes:
                raise CorruptInput(f"{shard.path}: ends early (read {len(data)} of "
                                   f"{len(run) * row_bytes} bytes at {offset}). Fix: delete "
                                   f"the feature store and `dvc repro extract`.")
            out[run] = np.frombuffer(data, dtype=np.float16).reshape(len(run), t, d)
        return out


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_json(root / MANIFEST, manifest)
