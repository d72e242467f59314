"""What the model and video-VAE registries share: an entry is a YAML data file whose name is a
plain identifier; the error an unknown or malformed entry raises; and the rule that only
safetensors weights load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmprobe.errors import VlmprobeError
from vlmprobe.params import NAME


class RegistryError(VlmprobeError, ValueError):
    """An unknown model or target, or a malformed registry entry."""


def entry_name(path: Path) -> str:
    """An entry's name, its file's stem: a plain identifier, as params name entries and the
    names become parts of output paths (see `vlmprobe.params.NAME`)."""
    if not NAME.fullmatch(path.stem):
        raise RegistryError(f"{path}: an entry's file name must be a plain identifier (letters, "
                            "digits, _). Fix: rename the file.")
    return path.stem


def safetensors_kwargs(entry: Any) -> dict[str, Any]:
    """Only safetensors weights load (pickled weights can run code) unless the entry opts in."""
    return {"use_safetensors": not entry.weights.get("allow_pickle_weights", False)}
