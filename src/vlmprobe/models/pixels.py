"""Raw pixels as tokens: the information ceiling, on the same 14-px grid as DINOv2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmprobe.extract.geometry import TokenGeometry, patchify
from vlmprobe.models.base import ModelAdapter


class PixelPatches(nn.Module):
    """(B, H, W, 3) uint8 images -> (B, T, 3 * p * p) patch tokens, as a module to hook."""

    def __init__(self, geometry_for: Any, patch_px: int):
        super().__init__()
        self.geometry_for = geometry_for
        self.patch_px = patch_px

    def forward(self, images: np.ndarray) -> torch.Tensor:
        geometry = self.geometry_for(tuple(images.shape[1:3]))
        return torch.from_numpy(patchify(images, geometry, self.patch_px))


class PixelsAdapter(ModelAdapter):
    @property
    def patch_size(self) -> int:
        return int(self.entry.options.get("patch_size", 14))

    @property
    def input_size(self) -> int:
        return int(self.entry.options.get("image_size", 224))

    def load(self, project_root: Path, device: torch.device) -> nn.Module:
        return PixelPatches(lambda size: self.geometry("patches", size), self.patch_size)

    def prepare(self, images: np.ndarray, device: torch.device) -> dict[str, Any]:
        return {"images": images}

    def point_module(self, model: nn.Module, point: str) -> nn.Module:
        return model

    def point_tokens(self, point: str, output: Any, inputs: dict[str, Any]) -> torch.Tensor:
        return output

    def geometry(self, point: str, image_size: tuple[int, int]) -> TokenGeometry:
        side = self.input_size // self.patch_size
        return TokenGeometry.single_grid(image_size, side, side)
