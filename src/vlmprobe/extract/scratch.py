"""Scratch stores of the extract stage, keyed by everything that determines their shards.

An interrupted extraction resumes from the shards in its scratch store, so that store must
belong to exactly this code, these weights and these pixels. Each store keeps its key in
`key.json`; a rerun with another key removes the stale store of the same name prefix and prints
one line naming what changed, so a resumed store never mixes shards of two setups.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from vlmprobe.extract.store import remove_unfinished_shards
from vlmprobe.io import read_json, write_json

KEY_FILE = "key.json"


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def changed_parts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The key parts that differ, with the changed sub-parts (a module, a file) in brackets."""
    changed = []
    for part in sorted(old.keys() | new.keys()):
        before, after = old.get(part), new.get(part)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            inner = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            changed.append(f"{part} ({', '.join(inner)})")
        else:
            changed.append(part)
    return changed


def scratch_path(work: Path, prefix: str, key: dict[str, Any]) -> Path:
    return work / f"{prefix}-{key_digest(key)}"


def scratch_store(work: Path, prefix: str, key: dict[str, Any]) -> Path:
    """The scratch store `work/<prefix>-<digest of key>`, after removing stale `<prefix>-*` ones
    and the unfinished shards a killed run left in it."""
    root = scratch_path(work, prefix, key)
    for stale in sorted(p for p in work.glob(f"{prefix}-*") if p.is_dir() and p != root):
        old_key = stale / KEY_FILE
        changed = (", ".join(changed_parts(read_json(old_key), key)) if old_key.is_file()
                   else "unknown (it has no key.json)")
        print(f"{prefix}: an interrupted run's scratch store is stale (changed: {changed}); "
              "starting clean")
        shutil.rmtree(stale)
    if not (root / KEY_FILE).is_file():
        write_json(root / KEY_FILE, key)
    remove_unfinished_shards(root)
    return root


def finish(root: Path) -> None:
    """Drop the key from a finished store, so the published store holds only features."""
    (root / KEY_FILE).unlink(missing_ok=True)
