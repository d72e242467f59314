"""Qwen2.5-VL (transformers Qwen2_5_VLForConditionalGeneration): the baseline.

Point kinds: `vision` (a vision block's output at patch resolution, `layer` 1-based or -1),
`merger` (after the 2x2 patch merger, the LLM's token grid) and `llm`. The vision tower runs
blocks on window-permuted merge units; both vision kinds are restored to row-major order.
Asked to ground an object it writes JSON with `bbox_2d` in absolute pixels of its input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.models.vlm import (
    ProcessorVLMAdapter,
    offline_tokenizer,
    prompt_words,
    token_positions,
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
TEMPLATE = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n")


class Qwen25VLAdapter(ProcessorVLMAdapter):
    template = TEMPLATE
    point_kinds = ("vision", "merger", "llm")
    box_format = "pixels-json"
    grounding_template = ("Find the location of the {object}. Output its bbox coordinates in "
                          "JSON format.")

    def model_class(self) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def layer_counts(self, config: Any) -> dict[str, int]:
        return {"vision": config.vision_config.depth, "llm": config.text_config.num_hidden_layers}

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.language_model.layers

    def setup(self, model: nn.Module, pretrained: tuple[str, dict[str, Any]] | None) -> None:
        from transformers import (
            AutoProcessor,
            Qwen2_5_VLProcessor,
            Qwen2VLImageProcessor,
            Qwen2VLVideoProcessor,
        )

        config = model.config
        self.vision_config = config.vision_config
        self.image_token_id = config.image_token_id
        if pretrained is not None:
            location, kwargs = pretrained
            self.processor = AutoProcessor.from_pretrained(
                location, revision=kwargs.get("revision")
            )
            return
        ids = {"<|image_pad|>": config.image_token_id, "<|video_pad|>": config.video_token_id,
               "<|vision_start|>": config.vision_start_token_id}
        free = iter(i for i in range(64) if i not in ids.values())
        ids.update({t: next(free) for t in SPECIAL_TOKENS if t not in ids})
        tokenizer = offline_tokenizer(ids, prompt_words(self.prompt), pad_token="<|endoftext|>")
        self.processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(**self.entry.options.get("image_processor", {})),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(),
        )

    def image_token_index(self, inputs: dict[str, Any]) -> torch.Tensor:
        return token_positions(inputs["input_ids"] == self.image_token_id)

    def patch_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of vision patches for an image of `image_size` (H, W)."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        processor = self.processor.image_processor
        factor = processor.patch_size * processor.merge_size
        h, w = smart_resize(*image_size, factor=factor, min_pixels=processor.size["shortest_edge"],
                            max_pixels=processor.size["longest_edge"])
        return h // processor.patch_size, w // processor.patch_size

    def point_module(self, model: nn.Module, point: str) -> nn.Module:
        spec = self.entry.points[point]
        visual = model.model.visual
        if spec["kind"] == "vision":
            return visual.blocks[-1] if spec["layer"] == -1 else visual.blocks[spec["layer"] - 1]
        if spec["kind"] == "merger":
            return visual.merger
        return self.llm_module(model, point)

    def _unpermute_units(self, x: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """(N * unit, D) window-ordered rows -> (B, units per image, unit, D), row-major units."""
        from transformers.vision_utils import get_vision_window_index

        cfg = self.vision_config
        grid_thw = inputs["image_grid_thw"]
        window_index, _ = get_vision_window_index(
            grid_thw, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size
        )
        n_units = len(window_index)
        units = x.reshape(n_units, -1, x.shape[-1])[torch.argsort(window_index.to(x.device))]
        return units.reshape(len(grid_thw), n_units // len(grid_thw), units.shape[1], -1)

    def encoder_tokens(self, point: str, output: Any, inputs: dict[str, Any]) -> torch.Tensor:
        units = self._unpermute_units(output, inputs)  # (B, U, unit, D)
        if self.entry.points[point]["kind"] == "merger":
            return units[:, :, 0]
        # Patches inside a merge unit are a 2x2 block: interleave them back into patch rows.
        _, rows, cols = (int(v) for v in inputs["image_grid_thw"][0])
        m = self.vision_config.spatial_merge_size
        b, _, _, d = units.shape
        grid = units.reshape(b, rows // m, cols // m, m, m, d).permute(0, 1, 3, 2, 4, 5)
        return grid.reshape(b, rows * cols, d)

    def geometry(self, point: str, image_size: tuple[int, int]) -> TokenGeometry:
        rows, cols = self.patch_grid(image_size)
        if self.entry.points[point]["kind"] != "vision":
            m = self.vision_config.spatial_merge_size
            rows, cols = rows // m, cols // m
        return TokenGeometry.single_grid(image_size, rows, cols)
