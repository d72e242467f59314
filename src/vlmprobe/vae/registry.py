"""The video-VAE registry: one YAML data file per target in `entries/`, one module per family.

Adding a target is adding a YAML file; families import lazily, so a missing optional dependency
of one (diffusers for LTX-Video) never breaks the others.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vlmprobe.entries import RegistryError, entry_name

if TYPE_CHECKING:
    from vlmprobe.vae.base import VideoVAE

ENTRIES_DIR = Path(__file__).parent / "entries"

FAMILIES: dict[str, str] = {
    "pixels": "vlmprobe.vae.pixels:PixelPatchVAE",
    "ltx_video": "vlmprobe.vae.ltx:LtxVideoVAE",
}
WEIGHT_SOURCES = ("none", "random", "hub")
_REQUIRED = ("family", "display_name", "weights")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class VaeError(RegistryError):
    """An unknown target, a malformed entry, or weights that cannot be had (a RegistryError,
    so `vlmprobe validate` reports it like an unknown model)."""


@dataclass(frozen=True)
class VaeEntry:
    name: str
    family: str
    display_name: str
    weights: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)  # everything else the family reads
    path: Path | None = None


def _parse_entry(path: Path) -> VaeEntry:
    raw = yaml.safe_load(path.read_text()) or {}
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise VaeError(f"{path}: missing keys {missing}; every entry needs {list(_REQUIRED)}")
    if raw["family"] not in FAMILIES:
        raise VaeError(f"{path}: family {raw['family']!r} is not one of {sorted(FAMILIES)}")
    if raw["weights"].get("source") not in WEIGHT_SOURCES:
        raise VaeError(f"{path}: weights.source must be one of {list(WEIGHT_SOURCES)}")
    return VaeEntry(
        name=entry_name(path),
        family=raw["family"],
        display_name=raw["display_name"],
        weights=dict(raw["weights"]),
        options={k: v for k, v in raw.items() if k not in (*_REQUIRED, "name")},
        path=path,
    )


@cache
def entries() -> dict[str, VaeEntry]:
    return {p.stem: _parse_entry(p) for p in sorted(ENTRIES_DIR.glob("*.yaml"))}


def get_entry(name: str) -> VaeEntry:
    """The entry named `name`, with its weights checked to be obtainable, before any loading."""
    known = entries()
    if name not in known:
        raise VaeError(
            f"unknown video_vae {name!r}. Registered targets: {', '.join(sorted(known))}. "
            f"Fix: `dvc exp run -S video_vae=<one of those>`, or add {ENTRIES_DIR}/{name}.yaml."
        )
    entry = known[name]
    weights = entry.weights
    if weights["source"] == "hub" and not weights.get("path"):
        revision = weights.get("revision")
        if not (isinstance(revision, str) and _COMMIT.fullmatch(revision)):
            raise VaeError(
                f"video_vae {name!r} needs real weights and has no pinned revision "
                f"(weights.revision = {revision!r}). VAE weights differ between releases, so "
                f"loading refuses an unpinned hub repo. Fix: in {entry.path}, set "
                f"weights.revision to a 40-hex commit of {weights.get('repo')} (and have it in "
                f"the Hugging Face cache, since runs are offline), or set weights.path to a "
                f"local copy of its `{weights.get('subfolder', 'vae')}` folder; or run "
                f"`dvc exp run -S video_vae=pixels32` (offline default)."
            )
    return entry


def load_vae(name: str) -> VideoVAE:
    entry = get_entry(name)
    module_name, class_name = FAMILIES[entry.family].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(entry)
