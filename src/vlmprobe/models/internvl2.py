"""InternVL2 (remote code `InternVLChatModel`), dynamic tiles plus a thumbnail.

Point kinds: `vision` (an InternViT layer's output, CLS dropped, `layer` 1-based or -1),
`projector` (after pixel shuffle and the `mlp1` projector: the LLM's image tokens) and `llm`.
An image is cut into a rows x cols canvas of square tiles (the native InternVL image
processor's tiling) plus, when there is more than one tile, a whole-image thumbnail last; each
tile, and the thumbnail, is one grid of the point's geometry, in the model's tile order.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmprobe.extract.geometry import Grid, TokenGeometry
from vlmprobe.models.published_code import GENERATION_MEND, add_legacy_generation
from vlmprobe.models.vlm import VLMAdapter, offline_tokenizer, prompt_words, token_positions

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SPECIAL_TOKENS = ("<pad>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>")
# The prompt where the model has no conversation template of its own (the stand-in code of the
# random entries); published checkpoints use theirs, system turn included.
TEMPLATE = "<|im_start|>user\n<image>\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
ROTARY_MEND = ("InternLM2 rotary buffers (inv_freq, cos_cached, sin_cached) recomputed after "
               "loading: transformers 5.x leaves these non-persistent buffers uninitialised")


def restore_rotary_buffers(model: nn.Module, dtype: torch.dtype) -> int:
    """Recompute InternLM2's rotary buffers as its constructor does; the number mended.

    They are non-persistent (not in the checkpoint), so `from_pretrained` on transformers 5.x,
    which builds the model on the meta device, leaves them as uninitialised memory: LLM-layer
    features come out as garbage in fp32 and NaN in bf16, and differ between two loads. The
    published `_set_cos_sin_cache` rebuilds the caches from `inv_freq`; `inv_freq` itself is
    the formula the published constructor uses.
    """
    mended = 0
    for module in model.modules():
        if not (hasattr(module, "_set_cos_sin_cache") and hasattr(module, "inv_freq")):
            continue
        device = module.inv_freq.device
        exponents = torch.arange(0, module.dim, 2, device=device).float() / module.dim
        module.register_buffer("inv_freq", 1.0 / (module.base ** exponents), persistent=False)
        module._set_cos_sin_cache(seq_len=module.max_position_embeddings, device=device,
                                  dtype=dtype)
        mended += 1
    return mended


class InternVL2Adapter(VLMAdapter):
    remote_code = True
    point_kinds = ("vision", "projector", "llm")
    box_format = "0-1000"
    grounding_template = "Find the location of the <ref>{object}</ref>."
    vocab_size_key = ("llm_config", "vocab_size")
    tiny_config = {
        "force_image_size": 112, "max_dynamic_patch": 6,
        "vision_config": {"image_size": 112, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 4, "num_attention_heads": 2,
                          "use_flash_attn": False},
        "llm_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                       "num_attention_heads": 4, "num_key_value_heads": 2,
                       "attn_implementation": "eager"},  # flash-attn has no CPU kernel
    }

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
        self.conversation = self.own_conversation(model)
        if pretrained is not None and restore_rotary_buffers(model, self.dtype):
            self.mends.append(ROTARY_MEND)
        if add_legacy_generation(model.language_model):
            self.mends.append(GENERATION_MEND)
        self.image_processor = GotOcr2ImageProcessor(
            crop_to_patches=True, min_patches=1, max_patches=self.max_tiles,
            size={"height": self.tile, "width": self.tile},
            image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
        )

    @staticmethod
    def own_conversation(model: nn.Module) -> Any:
        """The checkpoint's conversation template with its default system message (what
        `chat` uses), or None for code without one."""
        template = getattr(model, "conv_template", None)
        if template is None:
            return None
        template = copy.deepcopy(template)
        template.system_message = model.system_message
        return template

    def prompt_text(self, prompt: str) -> str:
        """The model's prompt for one image and `prompt`, with `<image>` where the tiles go."""
        if self.conversation is None:
            return TEMPLATE.format(prompt=prompt)
        template = copy.deepcopy(self.conversation)
        template.append_message(template.roles[0], f"<image>\n{prompt}")
        template.append_message(template.roles[1], None)
        return template.get_prompt()

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
        image = "<img>" + "<IMG_CONTEXT>" * (self.tokens_per_tile * n_tiles) + "</img>"
        text = self.prompt_text(self.prompt).replace("<image>", image, 1)
        tokens = self.tokenizer([text] * len(images), return_tensors="pt", padding=True)
        return {
            # The published vision embeddings do not cast: pixels come in the model's dtype.
            "pixel_values": pixel_values.to(device, self.dtype),
            "input_ids": tokens["input_ids"].to(device),
            "attention_mask": tokens["attention_mask"].to(device),
            "image_flags": torch.ones(len(pixel_values), dtype=torch.long, device=device),
        }

    def answer(self, model: nn.Module, images: np.ndarray, prompts: list[str],
               max_new_tokens: int, device: torch.device) -> list[str]:
        # What the published `batch_chat` does (the checkpoint's conversation template, the
        # IMG_CONTEXT tokens of every tile, the model's own `generate`, stop at the template's
        # separator), without its hard-coded `.cuda()` (release-period code), so it runs on
        # any device.
        pixel_values, n_tiles = self.tile_pixels(images)
        image = "<img>" + "<IMG_CONTEXT>" * (self.tokens_per_tile * n_tiles) + "</img>"
        queries = [self.prompt_text(p).replace("<image>", image, 1) for p in prompts]
        tokens = self.tokenizer(queries, return_tensors="pt", padding=True,
                                padding_side="left")
        separator = (self.conversation.sep if self.conversation is not None
                     else "<|im_end|>").strip()
        output = model.generate(
            pixel_values=pixel_values.to(device, self.dtype),
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=self.tokenizer.convert_tokens_to_ids(separator),
        )
        answers = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [a.split(separator)[0] for a in answers]

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
