"""The interface every model family implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.models.registry import RegistryEntry


class WeightsUnavailable(RuntimeError):
    """The entry's weights cannot be found; the message says what to supply."""


class ModelAdapter(ABC):
    """Loads one family's model, prepares its inputs and locates its extraction points.

    The extractor only calls these methods; it knows nothing family-specific.
    """

    def __init__(self, entry: RegistryEntry):
        self.entry = entry

    @abstractmethod
    def load(self, project_root: Path, device: torch.device) -> nn.Module:
        """Build the model in eval mode on `device`; raise WeightsUnavailable if it cannot."""

    @abstractmethod
    def prepare(self, images: np.ndarray, device: torch.device) -> dict[str, Any]:
        """Model inputs for a batch of (B, H, W, 3) uint8 images."""

    @abstractmethod
    def point_module(self, model: nn.Module, point: str) -> nn.Module:
        """The module whose forward output holds `point`."""

    @abstractmethod
    def point_tokens(self, point: str, output: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """The spatial tokens (B, T, D) of `point` from its module's output, in geometry order."""

    @abstractmethod
    def geometry(self, point: str, image_size: tuple[int, int]) -> TokenGeometry:
        """Where each of the point's tokens lies on an image of `image_size` (H, W)."""

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        return model(**inputs)

    def weights_provenance(self, project_root: Path) -> dict[str, Any]:
        """What produced the weights, recorded beside every result."""
        return dict(self.entry.weights)


def resolve_pretrained(entry: RegistryEntry, project_root: Path) -> tuple[str, dict[str, Any]]:
    """Where `from_pretrained` should load the entry's weights from, and with which kwargs.

    `weights.source`: `asset` (converted by the `assets` stage, under the project),
    `local` (a directory the user supplies) or `hub` (a hub id at a pinned revision; with
    HF_HUB_OFFLINE=1 only a local hub cache can satisfy it).
    """
    weights = entry.weights
    source = weights.get("source")
    if source in ("asset", "local"):
        path = Path(weights["path"])
        path = path if path.is_absolute() else project_root / path
        if not (path / "config.json").exists():
            fix = (
                "run `dvc repro assets`"
                if source == "asset"
                else f"put the checkpoint there or edit weights.path in {entry.path}"
            )
            raise WeightsUnavailable(
                f"model {entry.name!r}: no weights at {path} (config.json missing). Fix: {fix}."
            )
        return str(path), {}
    if source == "hub":
        return weights["repo_id"], {"revision": weights["revision"]}
    raise WeightsUnavailable(
        f"{entry.path}: weights.source {source!r} is not one of asset, local, hub"
    )


def load_pretrained(loader: Any, entry: RegistryEntry, project_root: Path, **kwargs: Any) -> Any:
    """`loader.from_pretrained` with a clear error when the weights cannot be had."""
    location, extra = resolve_pretrained(entry, project_root)
    try:
        return loader.from_pretrained(location, **extra, **kwargs)
    except OSError as e:
        raise WeightsUnavailable(
            f"model {entry.name!r}: cannot load weights from {location!r} ({e.__class__.__name__}:"
            f" {str(e).splitlines()[0] if str(e) else ''}). No model hub is reachable offline: "
            f"download the checkpoint where a hub is reachable, then point weights.path of a "
            f"`source: local` entry at it (see README, 'Real checkpoints')."
        ) from e
