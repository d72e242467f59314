"""DINOv2 (transformers Dinov2Model): a spatial encoder, the offline default model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmprobe.entries import safetensors_kwargs
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.models.base import (
    ModelAdapter,
    WeightsUnavailable,
    load_pretrained,
    resolve_pretrained,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Dinov2Adapter(ModelAdapter):
    """Points name modules (`encoder.layer.3`, `layernorm`); tokens drop CLS and registers."""

    @property
    def input_size(self) -> int:
        return int(self.entry.options.get("image_size", 224))

    @property
    def patch_size(self) -> int:
        return int(self.entry.options.get("patch_size", 14))

    def load(self, project_root: Path, device: torch.device) -> nn.Module:
        from transformers import Dinov2Model

        safetensors_only = safetensors_kwargs(self.entry)
        try:
            model = load_pretrained(Dinov2Model, self.entry, project_root, **safetensors_only)
        except WeightsUnavailable as e:
            if not (safetensors_only["use_safetensors"] and isinstance(e.__cause__, OSError)):
                raise
            # from_pretrained found no safetensors file: a pickled one beside it is refused.
            raise WeightsUnavailable(
                f"{e} Only safetensors weights load (pickled ones, such as pytorch_model.bin, "
                f"can run code on load) unless {self.entry.path} sets "
                f"weights.allow_pickle_weights: true, after you have reviewed them."
            ) from e
        self._prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        return model.eval().to(device)

    def prepare(self, images: np.ndarray, device: torch.device) -> dict[str, Any]:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bicubic", antialias=True)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return {"pixel_values": ((x - mean) / std).to(device)}

    def point_module(self, model: nn.Module, point: str) -> nn.Module:
        return model.get_submodule(self.entry.points[point]["module"])

    def point_tokens(self, point: str, output: Any, inputs: dict[str, Any]) -> torch.Tensor:
        hidden = output[0] if isinstance(output, tuple | list) else output
        return hidden[:, self._prefix_tokens :]

    def geometry(self, point: str, image_size: tuple[int, int]) -> TokenGeometry:
        side = self.input_size // self.patch_size
        return TokenGeometry.single_grid(image_size, side, side)

    def weights_provenance(self, project_root: Path) -> dict[str, Any]:
        location, extra = resolve_pretrained(self.entry, project_root)
        record = {**self.entry.weights, "loaded_from": location, **extra}
        provenance = Path(location) / "provenance.json"
        if provenance.exists():
            record["provenance"] = json.loads(provenance.read_text())
        return record
