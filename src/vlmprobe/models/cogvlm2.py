"""CogVLM2 (remote code `CogVLMForCausalLM`; no native transformers class).

Point kinds: `vision` (EVA2-CLIP's output after its 2x2 stride-2 conv: the patch grid the LLM
sees, before the GLU projection) and `llm` (decoder layers, at the vision-token positions: the
visual-expert stream). The image is resized to the vision tower's square input; its tokens in
the prompt are boi, the patches row-major, eoi; boi and eoi are not image regions.
Generation goes through the remote code's own `build_conversation_input_ids` (its chat template
and image transform); asked to ground an object it writes `[[x0,y0,x1,y1]]` in 0-1000
coordinates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.models import cogvlm2_kernels
from vlmprobe.models.published_code import GENERATION_MEND, add_legacy_generation
from vlmprobe.models.vlm import VLMAdapter, offline_tokenizer, prompt_words, token_positions

TEMPLATE = "Question: {prompt} Answer:"  # the code's "chat" template (words for offline tokenizers)
VISION_TOKEN_TYPE = 1


class CogVLM2Adapter(VLMAdapter):
    remote_code = True
    preload_modules = ("PatchEmbedding",)  # reads position_embedding.weight (visual.py)
    # vocab_size stays: the published code hard-codes padding_idx 128002.
    tiny_config = {
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_multi_query_heads": 2, "num_hidden_layers": 4,
        "vision_config": {"image_size": 112, "patch_size": 14, "hidden_size": 32,
                          "intermediate_size": 64, "num_hidden_layers": 3, "num_heads": 2,
                          "num_positions": 65},  # (112 / 14)^2 patches + CLS
    }
    point_kinds = ("vision", "llm")
    box_format = "0-1000"
    grounding_template = ("Find the location of the {object}. Answer with its bounding box as "
                          "[[x0,y0,x1,y1]].")

    def model_class(self) -> type:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def layer_counts(self, config: Any) -> dict[str, int]:
        return {"vision": config.vision_config["num_hidden_layers"],
                "llm": config.num_hidden_layers}

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def published_class(self, config: Any, location: str, extra: dict[str, Any]) -> type:
        cogvlm2_kernels.stand_in_modules()  # the published code imports xformers and triton
        return super().published_class(config, location, extra)

    def setup(self, model: nn.Module, pretrained: tuple[str, dict[str, Any]] | None) -> None:
        from transformers import AutoTokenizer

        vision = model.config.vision_config
        self.grid_side = vision["image_size"] // vision["patch_size"] // 2  # after the 2x2 conv
        # The code's own prompt and image transform, for extraction as for generation.
        self.conversation_inputs = model.build_conversation_input_ids
        if pretrained is not None:
            self.mends += cogvlm2_kernels.use_substitutes(model, next(model.parameters()).device)
            if add_legacy_generation(model):
                self.mends.append(GENERATION_MEND)
            location, kwargs = pretrained
            self.tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        else:
            config = model.config
            self.tokenizer = offline_tokenizer(
                {"<bos>": config.bos_token_id, "<pad>": config.pad_token_id},
                prompt_words(TEMPLATE.format(prompt=self.prompt)),
                bos_token="<bos>", pad_token="<pad>",
            )

    def conversations(self, images: np.ndarray, prompts: list[str], device: torch.device
                      ) -> dict[str, Any]:
        """One batch through the code's `build_conversation_input_ids`, left-padded."""
        samples = [
            self.conversation_inputs(self.tokenizer, query=prompt, history=[],
                                     images=[Image.fromarray(image)], template_version="chat")
            for image, prompt in zip(images, prompts, strict=True)
        ]
        batch = left_padded(samples, self.tokenizer.pad_token_id or 0, device)
        # The published patch embedding does not cast: pixels come in the model's dtype.
        batch["images"] = [[s["images"][0].to(device, self.dtype)] for s in samples]
        return batch

    def prepare(self, images: np.ndarray, device: torch.device) -> dict[str, Any]:
        return self.conversations(images, [self.prompt] * len(images), device)

    def answer(self, model: nn.Module, images: np.ndarray, prompts: list[str],
               max_new_tokens: int, device: torch.device) -> list[str]:
        batch = self.conversations(images, prompts, device)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:],
                                           skip_special_tokens=True)

    def image_token_index(self, inputs: dict[str, Any]) -> torch.Tensor:
        vision = token_positions(inputs["token_type_ids"] == VISION_TOKEN_TYPE)
        return vision[:, 1:-1]  # boi, eoi

    def point_module(self, model: nn.Module, point: str) -> nn.Module:
        if self.entry.points[point]["kind"] == "vision":
            return model.model.vision.conv
        return self.llm_module(model, point)

    def encoder_tokens(self, point: str, output: Any, inputs: dict[str, Any]) -> torch.Tensor:
        return output.flatten(2).transpose(1, 2)  # (B, D, g, g) -> (B, g*g, D), row-major

    def geometry(self, point: str, image_size: tuple[int, int]) -> TokenGeometry:
        return TokenGeometry.single_grid(image_size, self.grid_side, self.grid_side)


def left_padded(samples: list[dict[str, torch.Tensor]], pad_id: int, device: torch.device
                ) -> dict[str, torch.Tensor]:
    """One batch of conversations, left-padded so every answer starts at the same column;
    padding is language-type and masked out."""
    width = max(len(s["input_ids"]) for s in samples)
    fills = {"input_ids": pad_id, "token_type_ids": 0, "attention_mask": 0}
    return {
        key: torch.stack([F.pad(s[key], (width - len(s[key]), 0), value=fill)
                          for s in samples]).to(device)
        for key, fill in fills.items()
    }
