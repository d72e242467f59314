"""InternVL2 (remote code `InternVLChatModel`), dynamic tiles plus a thumbnail.

Point kinds: `vision` (an InternViT layer's output, CLS dropped, `layer` 1-based or -1),
`projector` (after pixel shuffle and the `mlp1` projector: the LLM's image tokens) and `llm`.
An image is cut into a rows x cols canvas of square tiles (the native InternVL image
processor's tiling) plus, when there is more than one tile, a whole-image thumbnail last; each
tile, and the thumbnail, is one grid of the point's geometry, in the model's tile order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from vlmprobe.extract.geometry import Grid, TokenGeometry
from vlmprobe.models.vlm import VLMAdapter, offline_tokenizer, prompt_words, token_positions

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SPECIAL_TOKENS = ("<pad>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>")
TEMPLATE = "<|im_start|>user\n<img>{image}</img>\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


class InternVL2Adapter(VLMAdapter):
    remote_code = True
    point_kinds = ("vision", "projector", "llm")
    box_format = "0-1000"
    grounding_template = "Find the location of the <ref>{object}</ref>."

    def model_class(self) -> type:
        from transformers import AutoModel

        return AutoModel

    def layer_counts(self, config: Any) -> dict[str, int]:
        return {"vision": config.vision_config.num_hidden_layers,
                "llm": config.llm_config.num_hidden_layers}

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.language_model.model.layers

    def setup(self, model: nn.Module, pretrained: tuple[str, dict[str, Any]] | None) -> None:
        from transformers import AutoTokenizer, GotOcr2ImageProcessor

        config = model.config
        self.tile = config.force_image_size
        self.max_tiles = config.max_dynamic_patch
        self.use_thumbnail = config.use_thumbnail
        self.vision_side = self.tile // config.vision_config.patch_size
        self.tokens_per_tile = model.num_image_token
        if pretrained is not None:
            location, kwargs = pretrained
            self.tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        else:
            self.tokenizer = offline_tokenizer(
                {t: i for i, t in enumerate(SPECIAL_TOKENS)},
                prompt_words(self.prompt) + ["user", "assistant"],
                pad_token="<pad>",
            )
        model.img_context_token_id = self.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        self.image_processor = GotOcr2ImageProcessor(
            crop_to_patches=True, min_patches=1, max_patches=self.max_tiles,
            size={"height": self.tile, "width": self.tile},
            image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
        )

    def tiles(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the tile canvas for an image of `image_size` (H, W)."""
        from transformers.models.got_ocr2.image_processing_got_ocr2 import (
            get_optimal_tiled_canvas,
        )

        cols, rows = get_optimal_tiled_canvas(
            image_size, (self.tile, self.tile), 1, self.max_tiles
        )
        return rows, cols

    def n_tiles(self, image_size: tuple[int, int]) -> int:
        rows, cols = self.tiles(image_size)
        return rows * cols + (1 if self.use_thumbnail and rows * cols > 1 else 0)

    def tile_pixels(self, images: np.ndarray) -> tuple[torch.Tensor, int]:
        """Every image's tiles (thumbnail last), image after image, and the tiles per image."""
        processed = self.image_processor(list(images), return_tensors="pt")
        n_tiles = self.n_tiles(tuple(images.shape[1:3]))
        if processed["pixel_values"].shape[0] != n_tiles * len(images):
            raise ValueError(
                f"the image processor made {processed['pixel_values'].shape[0]} tiles for "
                f"{len(images)} images; vlmprobe's tiling expects {n_tiles} per image"
            )
        return processed["pixel_values"], n_tiles

    def prepare(self, images: np.ndarray, device: torch.device) -> dict[str, Any]:
        pixel_values, n_tiles = self.tile_pixels(images)
        image = "<IMG_CONTEXT>" * (self.tokens_per_tile * n_tiles)
        text = TEMPLATE.format(image=image, prompt=self.prompt)
        tokens = self.tokenizer([text] * len(images), return_tensors="pt", padding=True)
        return {
            "pixel_values": pixel_values.to(device),
            "input_ids": tokens["input_ids"].to(device),
            "attention_mask": tokens["attention_mask"].to(device),
            "image_flags": torch.ones(len(pixel_values), dtype=torch.long, device=device),
        }

    def answer(self, model: nn.Module, images: np.ndarray, prompts: list[str],
               max_new_tokens: int, device: torch.device) -> list[str]:
        # The remote code's own `batch_chat` applies the checkpoint's chat template and expands
        # `<image>` into <img>, the IMG_CONTEXT tokens of every tile, </img>.
        pixel_values, n_tiles = self.tile_pixels(images)
        return model.batch_chat(
            self.tokenizer, pixel_values.to(device, model.dtype),
            [f"<image>\n{p}" for p in prompts],
            {"max_new_tokens": max_new_tokens, "do_sample": False},
            num_patches_list=[n_tiles] * len(images),
        )

    def image_token_index(self, inputs: dict[str, Any]) -> torch.Tensor:
        context_id = self.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        return token_positions(inputs["input_ids"] == context_id)

    def point_module(self, model: nn.Module, point: str) -> nn.Module:
        spec = self.entry.points[point]
        if spec["kind"] == "vision":
            layers = model.vision_model.encoder.layers
            return layers[-1] if spec["layer"] == -1 else layers[spec["layer"] - 1]
        if spec["kind"] == "projector":
            return model.mlp1
        return self.llm_module(model, point)

    def encoder_tokens(self, point: str, output: Any, inputs: dict[str, Any]) -> torch.Tensor:
        tiles = output[0] if isinstance(output, tuple | list) else output
        if self.entry.points[point]["kind"] == "vision":
            tiles = tiles[:, 1:]  # CLS
        batch = inputs["input_ids"].shape[0]
        return tiles.reshape(batch, -1, tiles.shape[-1])

    def geometry(self, point: str, image_size: tuple[int, int]) -> TokenGeometry:
        side = self.vision_side
        if self.entry.points[point]["kind"] != "vision":
            side = int(round((self.tokens_per_tile) ** 0.5))
        rows, cols = self.tiles(image_size)
        h, w = image_size
        grids = [
            Grid(side, side, (c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows))
            for r in range(rows) for c in range(cols)
        ]
        if self.n_tiles(image_size) > rows * cols:
            grids.append(Grid(side, side, (0.0, 0.0, float(w), float(h))))
        return TokenGeometry(image_size=(h, w), grids=tuple(grids))
