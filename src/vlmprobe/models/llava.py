"""LLaVA (transformers LlavaForConditionalGeneration): one image, one fixed patch grid.

The family of the plan's LLaVA-NeXT-Interleave as llava-hf converted it: a SigLIP tower whose
every token the projector reads (`vision_feature_select_strategy: full`; SigLIP has no CLS
token), a Qwen LLM. The processor resizes each image whole to the tower's square input, so every
point holds one row-major grid of (image_size // patch_size)^2 tokens covering the image
(27x27 = 729 for so400m-patch14-384).

Point kinds: `vision` (the tower layer the model feeds its projector, `vision_feature_layer`),
`projector` (after the MLP projector) and `llm`. It answers questions but has no grounding output
format. LLaVA-NeXT (anyres, CLIP) extends this family in llava_next.py.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.models.registry import RegistryError
from vlmprobe.models.vlm import (
    ProcessorVLMAdapter,
    offline_tokenizer,
    prompt_words,
    token_positions,
)

# The interleave checkpoints' Qwen chat format for one image and one question.
TEMPLATE = "<|im_start|>user <image>\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


class LlavaAdapter(ProcessorVLMAdapter):
    template = TEMPLATE
    point_kinds = ("vision", "projector", "llm")
    # The feature selection the family's token layout is written for: `full` hands the projector
    # every tower token, right for SigLIP; LLaVA-NeXT's `default` drops CLIP's CLS token.
    feature_select_strategy: ClassVar[str] = "full"

    def model_class(self) -> type:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def layer_counts(self, config: Any) -> dict[str, int]:
        strategy, layer = config.vision_feature_select_strategy, config.vision_feature_layer
        if strategy != self.feature_select_strategy or not isinstance(layer, int) or layer == 0:
            raise RegistryError(
                f"model {self.entry.name!r}: vision_feature_select_strategy {strategy!r} / "
                f"vision_feature_layer {layer!r} are not supported by the {self.entry.family} "
                f"family: it handles {self.feature_select_strategy!r} with one tower layer (a "
                f"nonzero int). Fix: use the family that matches the checkpoint (llava: SigLIP, "
                f"'full'; llava_next: CLIP anyres, 'default') in {self.entry.path}."
            )
        return {"vision": config.vision_config.num_hidden_layers,
                "llm": config.text_config.num_hidden_layers}

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.language_model.layers

    def setup(self, model: nn.Module, pretrained: tuple[str, dict[str, Any]] | None) -> None:
        self.config = model.config
        self.processor = self.checkpoint_processor(pretrained)

    def offline_processor(self) -> Any:
        """The processor for random weights: the tower's own input size, an in-memory tokenizer."""
        from transformers import LlavaProcessor, SiglipImageProcessor

        ids = {"<image>": self.config.image_token_id}
        free = iter(i for i in range(64) if i not in ids.values())
        ids.update({token: next(free) for token in CHAT_TOKENS})
        tokenizer = offline_tokenizer(ids, [*prompt_words(self.prompt), "user", "assistant"],
                                      pad_token="<|endoftext|>")
        vision = self.config.vision_config
        return LlavaProcessor(
            image_processor=SiglipImageProcessor(
                size={"height": vision.image_size, "width": vision.image_size}),
            tokenizer=tokenizer,
            patch_size=vision.patch_size,
            vision_feature_select_strategy=self.feature_select_strategy,
        )

    def point_module(self, model: nn.Module, point: str) -> nn.Module:
        kind = self.entry.points[point]["kind"]
        if kind == "vision":
            tower = model.model.vision_tower
            layers = getattr(tower, "vision_model", tower).encoder.layers  # CLIP in 5.x: no level
            # The projector reads hidden_states[k]; hidden_states[0] is the embeddings.
            k = self.config.vision_feature_layer
            return layers[k] if k < 0 else layers[k - 1]
        if kind == "projector":
            return model.model.multi_modal_projector
        return self.llm_module(model, point)

    def grid_side(self) -> int:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size  # the patch conv drops the remainder

    def geometry(self, point: str, image_size: tuple[int, int]) -> TokenGeometry:
        side = self.grid_side()
        return TokenGeometry.single_grid(image_size, side, side)

    def encoder_tokens(self, point: str, output: Any, inputs: dict[str, Any]) -> torch.Tensor:
        tokens = output[0] if isinstance(output, tuple | list) else output
        side = self.grid_side()
        if tokens.shape[1] != side * side:
            raise ValueError(
                f"model {self.entry.name!r}, point {point!r}: {tokens.shape[1]} tokens per "
                f"image, expected the {side}x{side} patch grid: under 'full' a tower with a CLS "
                f"token (CLIP) hands it to the LLM too, which the llava family does not place. "
                f"Fix: use a checkpoint whose tower has no CLS token (SigLIP)."
            )
        return tokens

    def image_token_index(self, inputs: dict[str, Any]) -> torch.Tensor:
        positions = token_positions(inputs["input_ids"] == self.config.image_token_id)
        side = self.grid_side()
        if positions.shape[1] != side * side:
            raise ValueError(
                f"model {self.entry.name!r}: {positions.shape[1]} image tokens in the prompt, "
                f"expected {side}x{side} = {side * side}. Fix: the processor's patch_size and "
                f"vision_feature_select_strategy must match the model config "
                f"({self.config.vision_config.patch_size}, {self.feature_select_strategy!r})."
            )
        return positions
