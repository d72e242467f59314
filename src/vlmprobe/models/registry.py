"""The model registry: one YAML data file per model in `entries/`, one adapter per family.

Adding a model is adding a YAML file. Adding a family is one adapter module plus a line in
`FAMILIES`; families import lazily, so one family's missing optional dependency never breaks
the others.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from vlmprobe.models.base import ModelAdapter

ENTRIES_DIR = Path(__file__).parent / "entries"

FAMILIES: dict[str, str] = {
    "dinov2": "vlmprobe.models.dinov2:Dinov2Adapter",
    "pixels": "vlmprobe.models.pixels:PixelsAdapter",
    "qwen2_5_vl": "vlmprobe.models.qwen2_5_vl:Qwen25VLAdapter",
    "llava_next": "vlmprobe.models.llava_next:LlavaNextAdapter",
    "internvl2": "vlmprobe.models.internvl2:InternVL2Adapter",
    "cogvlm2": "vlmprobe.models.cogvlm2:CogVLM2Adapter",
}


class RegistryError(ValueError):
    """An unknown model or point, or a malformed registry entry."""


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    family: str
    display_name: str
    points: dict[str, dict[str, Any]]  # point id -> family-specific locator, in depth order
    weights: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)  # everything else the family reads
    path: Path | None = None


_REQUIRED = ("family", "display_name", "points", "weights")


def _parse_entry(path: Path) -> RegistryEntry:
    raw = yaml.safe_load(path.read_text()) or {}
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise RegistryError(f"{path}: missing keys {missing}; every entry needs {list(_REQUIRED)}")
    if raw["family"] not in FAMILIES:
        raise RegistryError(
            f"{path}: family {raw['family']!r} is not one of {sorted(FAMILIES)}"
        )
    points = raw["points"]
    if not isinstance(points, dict) or not points:
        raise RegistryError(f"{path}: `points` must be a non-empty mapping of point id -> locator")
    options = {k: v for k, v in raw.items() if k not in (*_REQUIRED, "name")}
    return RegistryEntry(
        name=path.stem,
        family=raw["family"],
        display_name=raw["display_name"],
        points={str(k): dict(v or {}) for k, v in points.items()},
        weights=dict(raw["weights"]),
        options=options,
        path=path,
    )


@cache
def entries() -> dict[str, RegistryEntry]:
    return {p.stem: _parse_entry(p) for p in sorted(ENTRIES_DIR.glob("*.yaml"))}


def get_entry(name: str) -> RegistryEntry:
    known = entries()
    if name not in known:
        raise RegistryError(
            f"unknown model {name!r}. Registered models: {', '.join(sorted(known))}. "
            f"Fix: `dvc exp run -S vlm=<one of those>`, or add {ENTRIES_DIR}/{name}.yaml."
        )
    return known[name]


def select_points(entry: RegistryEntry, requested: str | list[str]) -> list[str]:
    """Resolve `extract.points` ("all" or a list of ids) against the entry, in depth order."""
    if requested == "all":
        return list(entry.points)
    if not isinstance(requested, list) or not requested:
        raise RegistryError(
            f"extract.points must be 'all' or a list of point ids; got {requested!r}"
        )
    unknown = [p for p in requested if p not in entry.points]
    if unknown:
        raise RegistryError(
            f"unknown point(s) {unknown} for model {entry.name!r}; valid points: "
            f"{', '.join(entry.points)}. Fix: `dvc exp run -S extract.points=all`."
        )
    return [p for p in entry.points if p in requested]


def adapter_for(entry: RegistryEntry) -> ModelAdapter:
    module_name, class_name = FAMILIES[entry.family].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(entry)
