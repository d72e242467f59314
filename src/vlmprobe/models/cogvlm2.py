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
from vlmprobe.models.vlm import VLMAdapter, offline_tokenizer, prompt_words, token_positions

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEMPLATE = "USER: {prompt} ASSISTANT:"
VISION_TOKEN_TYPE = 1


class CogVLM2Adapter(VLMAdapter):
    remote_code = True
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

    def setup(self, model: nn.Module, pretrained: tuple[str, dict[str, Any]] | None) -> None:
        from transformers import AutoTokenizer

        vision = model.config.vision_config
        self.input_px = vision["image_size"]
        self.grid_side = vision["image_size"] // vision["patch_size"] // 2  # after the 2x2 conv
        if pretrained is not None:
            location, kwargs = pretrained
            self.tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        else:
            config = model.config
            self.tokenizer = offline_tokenizer(
                {"<bos>": config.bos_token_id, "<pad>": config.pad_token_id},
                prompt_words(TEMPLATE.format(prompt=self.prompt)),
                bos_token="<bos>", pad_token="<pad>",
            )

    def pixels(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, S, S) normalised as EVA2-CLIP expects."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(self.input_px,) * 2, mode="bicubic", antialias=True)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def prepare(self, images: np.ndarray, device: torch.device) -> dict[str, Any]:
        n_vision = self.grid_side**2 + 2  # boi + patches + eoi
        text = self.tokenizer(TEMPLATE.format(prompt=self.prompt), add_special_tokens=False)
        pad = self.tokenizer.pad_token_id or 0
        ids = [self.tokenizer.bos_token_id] + [pad] * n_vision + text["input_ids"]
        types = [0] + [VISION_TOKEN_TYPE] * n_vision + [0] * len(text["input_ids"])
        batch = len(images)
        pixels = self.pixels(images).to(device)
        return {
            "input_ids": torch.tensor([ids] * batch, device=device),
            "token_type_ids": torch.tensor([types] * batch, device=device),
            "attention_mask": torch.ones(batch, len(ids), dtype=torch.long, device=device),
            "images": [[p] for p in pixels],
        }

    def answer(self, model: nn.Module, images: np.ndarray, prompts: list[str],
               max_new_tokens: int, device: torch.device) -> list[str]:
        samples = [
            model.build_conversation_input_ids(self.tokenizer, query=prompt, history=[],
                                               images=[Image.fromarray(image)],
                                               template_version="chat")
            for image, prompt in zip(images, prompts, strict=True)
        ]
        batch = left_padded(samples, self.tokenizer.pad_token_id or 0, device)
        batch["images"] = [[s["images"][0].to(device, model.dtype)] for s in samples]
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
