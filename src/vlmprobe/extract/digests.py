"""sha256 of files' bytes, remembered across runs so a big checkpoint is not re-read each time.

A remembered digest is reused only while the file's size, mtime, ctime and inode are all
unchanged: an edit that keeps the size and restores the mtime still changes the ctime (which no
user call can set back), so it is hashed again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from vlmprobe.io import read_json, write_json

CHUNK = 1 << 20


def _stat_key(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(paths: Iterable[Path], cache_file: Path | None = None) -> dict[Path, str]:
    """sha256 hex digest of every file in `paths`, reusing those remembered in `cache_file`."""
    cache = read_json(cache_file) if cache_file is not None and cache_file.is_file() else {}
    digests, hashed = {}, False
    for path in paths:
        name, stat_key = os.path.abspath(path), _stat_key(path)
        remembered = cache.get(name)
        if remembered is None or remembered["stat"] != stat_key:
            remembered = cache[name] = {"stat": stat_key, "sha256": _sha256(path)}
            hashed = True
        digests[path] = remembered["sha256"]
    if cache_file is not None and hashed:
        write_json(cache_file, cache)
    return digests
