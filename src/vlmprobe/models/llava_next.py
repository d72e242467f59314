"""LLaVA-NeXT (transformers LlavaNextForConditionalGeneration), anyres.

Point kinds: `vision` (the CLIP layer the model feeds its projector, `vision_feature_layer`),
`projector` (after the MLP projector) and `llm`. Every point stores two grids: the base image
(one crop resized whole) and the high-resolution crops stitched and unpadded exactly as the
model packs them. The LLM's `image_newline` tokens (one after each high-res row) are not image
regions and are dropped. It answers questions but has no grounding output format. Point
modules, layer checks and loading are the llava family's (llava.py).
"""

from __future__ import annotations

from typing import Any

import torch

from vlmprobe.extract.geometry import Grid, TokenGeometry
from vlmprobe.models.llava import LlavaAdapter
from vlmprobe.models.vlm import offline_tokenizer, prompt_words, token_positions

TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


class LlavaNextAdapter(LlavaAdapter):
    template = TEMPLATE
    feature_select_strategy = "default"  # CLIP's CLS token dropped

    def model_class(self) -> type:
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def offline_processor(self) -> Any:
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        vision = self.config.vision_config
        side = vision.image_size
        tokenizer = offline_tokenizer(
            {"<image>": self.config.image_token_id, "<pad>": 0},
            prompt_words(TEMPLATE.format(prompt=self.prompt).replace("<image>", "")),
            pad_token="<pad>",
        )
        return LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(
                size={"shortest_edge": side},
                crop_size={"height": side, "width": side},
                image_grid_pinpoints=self.config.image_grid_pinpoints,
            ),
            tokenizer=tokenizer,
            patch_size=vision.patch_size,
            vision_feature_select_strategy=self.feature_select_strategy,
            num_additional_image_tokens=1,  # the CLS token the model drops
        )

    def _grids(self, image_size: tuple[int, int]) -> tuple[int, tuple[int, int], tuple[int, int]]:
        """Base grid side, the crop layout (rows, cols) and the unpadded high-res grid shape."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        vision = self.config.vision_config
        side = self.grid_side()
        rows, cols = get_anyres_image_grid_shape(
            list(image_size), self.config.image_grid_pinpoints, vision.image_size
        )
        unpadded = unpad_image(torch.empty(0, rows * side, cols * side), list(image_size))
        return side, (rows, cols), tuple(unpadded.shape[1:])

    def geometry(self, point: str, image_size: tuple[int, int]) -> TokenGeometry:
        side, _, (rows, cols) = self._grids(image_size)
        h, w = image_size
        whole = (0.0, 0.0, float(w), float(h))
        return TokenGeometry(image_size=(h, w), grids=(Grid(side, side, whole),
                                                       Grid(rows, cols, whole)))

    def encoder_tokens(self, point: str, output: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """Per-crop tokens (B * crops, [CLS +] side^2, D) -> base grid + unpadded high-res grid."""
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        crops = output[0] if isinstance(output, tuple | list) else output
        batch = inputs["pixel_values"].shape[0]
        image_size = tuple(int(v) for v in inputs["image_sizes"][0])
        side, (rows, cols), _ = self._grids(image_size)
        crops = crops[:, -side * side :]  # drop CLS (vision layers); projector has none
        crops = crops.reshape(batch, -1, side, side, crops.shape[-1])
        base = crops[:, 0].flatten(1, 2)
        tiles = crops[:, 1 : 1 + rows * cols].reshape(batch, rows, cols, side, side, -1)
        stitched = tiles.permute(0, 5, 1, 3, 2, 4).reshape(batch, -1, rows * side, cols * side)
        high = torch.stack([unpad_image(x, list(image_size)) for x in stitched])
        return torch.cat([base, high.flatten(2).transpose(1, 2)], dim=1)

    def image_token_index(self, inputs: dict[str, Any]) -> torch.Tensor:
        positions = token_positions(inputs["input_ids"] == self.config.image_token_id)
        image_size = tuple(int(v) for v in inputs["image_sizes"][0])
        side, _, (rows, cols) = self._grids(image_size)
        n_base = side * side
        # High-res tokens come row by row, each row followed by one newline token.
        row_major = torch.arange(rows * (cols + 1)).reshape(rows, cols + 1)[:, :cols].flatten()
        keep = torch.cat([torch.arange(n_base), n_base + row_major])
        if positions.shape[1] != n_base + rows * (cols + 1):
            raise ValueError(
                f"{positions.shape[1]} image tokens in the prompt, expected "
                f"{n_base} + {rows}x({cols}+1) for an image of {image_size}"
            )
        return positions[:, keep.to(positions.device)]
