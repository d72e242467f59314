"""The model registry: one YAML data file per model in `entries/`, one adapter per family.

Adding a model is adding a YAML file. Adding a family is one adapter module plus a line in
`FAMILIES`; families import lazily, so one family's missing optional dependency never breaks
the others.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vlmprobe.entries import RegistryError, entry_name
from vlmprobe.params import resolve_names

if TYPE_CHECKING:
    from vlmprobe.models.base import ModelAdapter

ENTRIES_DIR = Path(__file__).parent / "entries"
# Users' own entries (e.g. their checkpoints), beside the package's, without editing the package.
ENTRIES_DIR_VARIABLE = "VLMPROBE_ENTRIES_DIR"
# Hub revisions pinned by `vlmprobe pin`, in the project (stages run in its root): the installed
# package's entry files stay as published.
PINS_FILE = "pins.yaml"
REVISION = re.compile(r"^[0-9a-f]{40}$")  # a hub commit sha (as vlmprobe.models.base checks)

FAMILIES: dict[str, str] = {
    "dinov2": "vlmprobe.models.dinov2:Dinov2Adapter",
    "pixels": "vlmprobe.models.pixels:PixelsAdapter",
    "qwen2_5_vl": "vlmprobe.models.qwen2_5_vl:Qwen25VLAdapter",
    "llava": "vlmprobe.models.llava:LlavaAdapter",
    "llava_next": "vlmprobe.models.llava_next:LlavaNextAdapter",
    "internvl2": "vlmprobe.models.internvl2:InternVL2Adapter",
    "cogvlm2": "vlmprobe.models.cogvlm2:CogVLM2Adapter",
    "kosmos2": "vlmprobe.models.kosmos2:Kosmos2Adapter",
    "florence2": "vlmprobe.models.florence2:Florence2Adapter",
    "hybrid": "vlmprobe.models.hybrid:HybridAdapter",
}


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
    # A hybrid's weights are its parts' (vlmprobe.models.hybrid).
    required = [k for k in _REQUIRED if not (k == "weights" and raw.get("family") == "hybrid")]
    missing = [k for k in required if k not in raw]
    if missing:
        raise RegistryError(f"{path}: missing keys {missing}; this entry needs {required}")
    if raw["family"] not in FAMILIES:
        raise RegistryError(
            f"{path}: family {raw['family']!r} is not one of {sorted(FAMILIES)}"
        )
    points = raw["points"]
    if not isinstance(points, dict) or not points:
        raise RegistryError(f"{path}: `points` must be a non-empty mapping of point id -> locator")
    options = {k: v for k, v in raw.items() if k not in (*_REQUIRED, "name")}
    return RegistryEntry(
        name=entry_name(path),
        family=raw["family"],
        display_name=raw["display_name"],
        points={str(k): dict(v or {}) for k, v in points.items()},
        weights=dict(raw.get("weights") or {}),
        options=options,
        path=path,
    )


def entry_dirs() -> list[Path]:
    """The package's entries folder, then the folder $VLMPROBE_ENTRIES_DIR names, if set."""
    extra = os.environ.get(ENTRIES_DIR_VARIABLE)
    if not extra:
        return [ENTRIES_DIR]
    folder = Path(extra).resolve()
    if not folder.is_dir():
        raise RegistryError(f"{ENTRIES_DIR_VARIABLE}={extra!r} is not a folder. Fix: point it at "
                            "a folder of entry YAML files, or unset it.")
    return [ENTRIES_DIR, folder]


def read_pins(pins_file: Path) -> dict[str, str]:
    """Entry name -> pinned 40-hex revision, from a pins file (`{name: {revision: sha}}`)."""
    if not pins_file.exists():
        return {}
    raw = yaml.safe_load(pins_file.read_text()) or {}
    pins = {}
    for name, pin in (raw.items() if isinstance(raw, dict) else [(None, raw)]):
        revision = pin.get("revision") if isinstance(pin, dict) else None
        if not isinstance(revision, str) or not REVISION.fullmatch(revision):
            raise RegistryError(
                f"{pins_file}: entry {name!r} must be `{{revision: <40-hex commit>}}`, got "
                f"{pin!r}. Fix: `vlmprobe pin {name}` where a hub is reachable, or delete it."
            )
        pins[str(name)] = revision
    return pins


def apply_pins(known: dict[str, RegistryEntry], pins: dict[str, str],
               pins_file: Path) -> dict[str, RegistryEntry]:
    """`known` with each pinned hub entry's `weights.revision` replaced by its pin; the weights
    record where the revision came from (`pinned_in`), so provenance shows it."""
    pinned = dict(known)
    for name, revision in pins.items():
        entry = known.get(name)
        if entry is None or entry.weights.get("source") != "hub":
            hub = sorted(n for n, e in known.items() if e.weights.get("source") == "hub")
            raise RegistryError(
                f"{pins_file}: pins {name!r}, which is not a hub entry. Hub entries: "
                f"{', '.join(hub)}. Fix: remove {name!r} from {pins_file}."
            )
        # The file name only: provenance must not differ between machines.
        weights = {**entry.weights, "revision": revision, "pinned_in": pins_file.name}
        pinned[name] = replace(entry, weights=weights)
    return pinned


@cache
def entries() -> dict[str, RegistryEntry]:
    """Every entry: the package's and $VLMPROBE_ENTRIES_DIR's, with the project's pins applied
    (from `pins.yaml` in the current directory, the project root where stages run)."""
    known: dict[str, RegistryEntry] = {}
    for folder in entry_dirs():
        for path in sorted(folder.glob("*.yaml")):
            if path.stem in known:
                raise RegistryError(
                    f"{path}: entry {path.stem!r} is already defined by {known[path.stem].path}. "
                    "Fix: rename the file."
                )
            known[path.stem] = _parse_entry(path)
    pins_file = Path.cwd() / PINS_FILE
    return apply_pins(known, read_pins(pins_file), pins_file)


def get_entry(name: str, key: str = "vlm") -> RegistryEntry:
    """The entry `name`, which the param `key` names (for the fix in the error)."""
    known = entries()
    if name not in known:
        raise RegistryError(
            f"unknown model {name!r}. Registered models: {', '.join(sorted(known))}. "
            f"Fix: `dvc exp run -S {key}=<one of those>`, or add {name}.yaml to "
            f"{ENTRIES_DIR} or to the folder ${ENTRIES_DIR_VARIABLE} names."
        )
    return known[name]


def select_points(entry: RegistryEntry, requested: str | list[str]) -> list[str]:
    """Resolve `extract.points` (`all`, `deepest` or a list of ids) against the entry, in
    depth order."""
    return resolve_names(requested, "extract.points", list(entry.points), ("all", "deepest"))


def adapter_for(entry: RegistryEntry) -> ModelAdapter:
    module_name, class_name = FAMILIES[entry.family].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(entry)
