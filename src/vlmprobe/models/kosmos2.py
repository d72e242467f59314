"""Kosmos-2 (transformers Kosmos2ForConditionalGeneration): the grounding-specialised VLM.

A CLIP-style ViT (a CLS token, then the patches row-major; the processor resizes the whole image
to the tower's square input, no crop), a connector, and a decoder-only LM whose vocabulary holds
1024 location tokens. Asked `<grounding><phrase> the red circle</phrase>`, it continues with
`<object><patch_index_0044><patch_index_0863></object>`: the box's corner cells on a 32x32 grid,
which `Kosmos2Processor.post_process_generation` turns into normalised boxes.

Point kinds, and the geometry each one honestly has:

- `vision`: a tower layer's output (`layer` 1-based or -1, the layer the connector reads). CLS
  is dropped; the rest is the (image_size // patch_size)^2 patch grid over the whole image
  (16x16 for patch14-224): `TokenGeometry.single_grid`.
- `connector`: the image-to-text projection's output, `latent_query_num` tokens (64). NOT a
  patch grid. `Kosmos2ImageToTextProjection` projects every tower token (CLS included), then
  `latent_query_num` learned query vectors (a plain parameter: no position, no 2-D init) attend,
  in one unmasked cross-attention, over all projected tokens and themselves. Each output token
  is a mixture over the whole image, and the output does not change when the tower tokens are
  reordered: nothing in the code ties query i to a region, so reading the 64 as an 8x8 grid
  would invent a layout. The geometry states what the code does: every token covers the whole
  image (`pooled_geometry`: `latent_query_num` 1x1 grids, each the full image). A probe that
  maps tokens to regions finds no layout here by construction; what location the queries carry
  (the model does decode boxes from them) is not a per-token layout, and needs a whole-image
  read-out to measure.
- `llm`: a decoder layer's output at the image positions (`image_embeds_position_mask`), which
  hold the same latent queries: the same whole-image geometry. The image block comes first
  (`<s><image>` queries `</image>` text), so under causal attention these tokens do not depend
  on the prompt.

Generation: Kosmos-2 numbers positions by counting non-pad tokens in the prompt, but in each
cached decoding step from the cache length alone, so a left-padded row would be shifted by its
padding. `answer` therefore batches only prompts of equal length (no padding). Answers are
decoded keeping the tag and location tokens; a grounding request (one that starts with
`<grounding>`) gets its continuation with them, which `parse_grounding` reads through the
processor's post-processing; any other prompt is asked in Kosmos-2's question format and gets
the processor's cleaned text.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import nn

from vlmprobe.extract.geometry import Grid, TokenGeometry
from vlmprobe.models.box_text import usable_box
from vlmprobe.models.registry import RegistryError
from vlmprobe.models.vlm import VLMAdapter, offline_tokenizer, prompt_words, token_positions

# How the Kosmos-2 paper and model card ask a question (its zero-shot VQA format).
TEMPLATE = "Question: {prompt} Answer:"
# The offline tokenizer's unknown token: id 3, as <unk> in the published tokenizer (after <s>,
# <pad>, </s>); the processor gives the image placeholders the ids after it.
UNK = "[UNK]"
SPACE = "\u2581"  # sentencepiece's word-start mark


def pooled_geometry(image_size: tuple[int, int], n_tokens: int) -> TokenGeometry:
    """`n_tokens` tokens that each cover the whole image: pooled tokens with no layout."""
    h, w = image_size
    whole = Grid(1, 1, (0.0, 0.0, float(w), float(h)))
    return TokenGeometry(image_size=(h, w), grids=(whole,) * n_tokens)


class Kosmos2Adapter(VLMAdapter):
    point_kinds = ("vision", "connector", "llm")
    box_format = "kosmos2-locations"
    # The model card's referring-expression request: the phrase, then the model writes <object>.
    grounding_template = "<grounding><phrase> the {object}</phrase>"
    # What `vlmprobe doctor` shrinks in a published config: widths and depths. The tower input,
    # the 64 latent queries and the full vocabulary stay as published (`vocab_size_key` None: a
    # tokenizer loaded alone may lack the 1035 tag and location tokens Kosmos2Processor adds,
    # so its length would cut them off).
    tiny_config = {
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2},
        "text_config": {"embed_dim": 64, "ffn_dim": 128, "layers": 4, "attention_heads": 4},
    }

    def model_class(self) -> type:
        from transformers import Kosmos2ForConditionalGeneration

        return Kosmos2ForConditionalGeneration

    def layer_counts(self, config: Any) -> dict[str, int]:
        return {"vision": config.vision_config.num_hidden_layers,
                "llm": config.text_config.layers}

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.text_model.model.layers

    # -- processor -------------------------------------------------------------------------
    def setup(self, model: nn.Module, pretrained: tuple[str, dict[str, Any]] | None) -> None:
        self.config = model.config
        self.n_queries = self.config.latent_query_num
        self.processor = self.checkpoint_processor(pretrained)
        self.check_image_processor()
        tokenizer = self.processor.tokenizer
        kept = [*self.processor.tag_tokens, *location_tokens(self.processor)]
        # Decoding drops the tokenizer's control tokens (<s>, </s>, <pad>) but never the tags
        # and location tokens the post-processing reads, however the tokenizer marks them.
        self.dropped_ids = set(tokenizer.all_special_ids) - set(
            tokenizer.convert_tokens_to_ids(kept))

    def offline_processor(self) -> Any:
        """The processor for random weights: an in-memory word tokenizer with Kosmos-2's special
        ids (Kosmos2Processor itself adds the tag and location tokens after them, as it does to
        the published tokenizer) and a CLIP image processor sized to the tower."""
        from tokenizers import decoders, pre_tokenizers
        from transformers import CLIPImageProcessor, Kosmos2Processor

        text = self.config.text_config
        ids = {"<s>": text.bos_token_id, "<pad>": text.pad_token_id, "</s>": text.eos_token_id}
        ids[UNK] = next(i for i in range(len(ids) + 1) if i not in ids.values())
        words = [*prompt_words(self.prompt), *TEMPLATE.format(prompt="").split()]
        tokenizer = offline_tokenizer(ids, [SPACE, *(SPACE + w for w in words)],
                                      bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        # Words carry their leading space as the published sentencepiece tokenizer's do, so
        # tag and location tokens decode glued to their neighbours, as post-processing reads.
        backend = tokenizer.backend_tokenizer
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE)
        backend.decoder = decoders.Metaspace(replacement=SPACE)
        side = self.config.vision_config.image_size
        processor = Kosmos2Processor(
            image_processor=CLIPImageProcessor(size={"height": side, "width": side},
                                               do_center_crop=False),
            tokenizer=tokenizer,
        )
        if len(processor.tokenizer) > text.vocab_size:
            raise RegistryError(
                f"model {self.entry.name!r}: the offline tokenizer has {len(processor.tokenizer)} "
                f"tokens (special, prompt words, Kosmos-2's tag and 1024 location tokens), more "
                f"than text_config.vocab_size {text.vocab_size}. Fix: raise "
                f"weights.config.text_config.vocab_size in {self.entry.path}, or shorten the "
                f"entry's prompt."
            )
        return processor

    def check_image_processor(self) -> None:
        """The geometry assumes the whole image resized to the tower's square input."""
        processor = self.processor.image_processor
        side = self.config.vision_config.image_size
        size = processor.size
        size = size if isinstance(size, dict) else vars(size)
        if getattr(processor, "do_center_crop", False) or (
                size.get("height"), size.get("width")) != (side, side):
            raise RegistryError(
                f"model {self.entry.name!r}: the image processor resizes to {dict(size)!r} "
                f"(center crop {getattr(processor, 'do_center_crop', None)}), not the whole "
                f"image to the tower's {side}x{side}; the kosmos2 family's token geometry "
                f"assumes the latter, as the published Kosmos-2 preprocessing does. Fix: set "
                f"size {{height: {side}, width: {side}}} and do_center_crop false in the "
                f"checkpoint's preprocessor_config.json."
            )

    def encode(self, texts: list[str], images: np.ndarray, device: torch.device
               ) -> dict[str, torch.Tensor]:
        """The processor's batch for one text per image (all texts of one token length)."""
        inputs = self.processor(text=texts, images=list(images), return_tensors="pt",
                                num_image_tokens=self.n_queries)
        return {k: v.to(device, self.dtype) if v.is_floating_point() else v.to(device)
                for k, v in inputs.items()}

    def request(self, prompt: str) -> str:
        """The text the model sees: a grounding request as it is, anything else as a question."""
        return prompt if self.is_grounding(prompt) else TEMPLATE.format(prompt=prompt)

    def is_grounding(self, prompt: str) -> bool:
        return prompt.lstrip().startswith(self.processor.grd_token)

    def prepare(self, images: np.ndarray, device: torch.device) -> dict[str, Any]:
        return self.encode([self.request(self.prompt)] * len(images), images, device)

    # -- generation ------------------------------------------------------------------------
    def answer(self, model: nn.Module, images: np.ndarray, prompts: list[str],
               max_new_tokens: int, device: torch.device) -> list[str]:
        texts = [self.request(p) for p in prompts]
        encoded = [self.encode([text], images[i:i + 1], device) for i, text in enumerate(texts)]
        rows_of: dict[int, list[int]] = defaultdict(list)
        for i, inputs in enumerate(encoded):
            rows_of[inputs["input_ids"].shape[1]].append(i)  # equal lengths: no padding
        tokenizer = self.processor.tokenizer
        answers = [""] * len(prompts)
        for rows in rows_of.values():
            batch = {key: torch.cat([encoded[i][key] for i in rows]) for key in encoded[rows[0]]}
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    num_beams=1, pad_token_id=tokenizer.pad_token_id)
            for i, ids in zip(rows, output[:, batch["input_ids"].shape[1]:], strict=True):
                answers[i] = self.decode(ids.tolist(), grounding=self.is_grounding(prompts[i]))
        return answers

    def decode(self, ids: list[int], grounding: bool) -> str:
        """An answer's text: with its tag and location tokens for a grounding request (what
        the post-processing reads), the processor's cleaned text otherwise."""
        text = self.processor.tokenizer.decode([i for i in ids if i not in self.dropped_ids],
                                               skip_special_tokens=False)
        if grounding:
            return self.processor.post_process_generation(text, cleanup_and_extract=False)
        return self.processor.post_process_generation(text, cleanup_and_extract=True)[0]

    def parse_grounding(self, answer: str, image_size: tuple[int, int]) -> np.ndarray | None:
        """The first box of the first entity the processor's post-processing finds in `answer`,
        as xyxy pixels of the (H, W) image (the model saw the whole image, resized)."""
        if not hasattr(self, "processor"):
            raise RuntimeError(f"model {self.entry.name!r}: parse_grounding reads the "
                               f"processor's post-processing. Fix: load the model first.")
        _, entities = self.processor.post_process_generation(answer, cleanup_and_extract=True)
        boxes = [box for _name, _span, entity_boxes in entities for box in entity_boxes]
        if not boxes:
            return None
        h, w = image_size
        return usable_box(np.asarray(boxes[0], dtype=float) * [w, h, w, h], image_size)

    # -- points ----------------------------------------------------------------------------
    def grid_side(self) -> int:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size  # the patch conv drops the remainder

    def point_module(self, model: nn.Module, point: str) -> nn.Module:
        spec = self.entry.points[point]
        if spec["kind"] == "vision":
            layers = model.vision_model.model.encoder.layers
            layer = spec.get("layer", -1)
            return layers[-1] if layer == -1 else layers[layer - 1]
        if spec["kind"] == "connector":
            return model.image_to_text_projection
        return self.llm_module(model, point)

    def encoder_tokens(self, point: str, output: Any, inputs: dict[str, Any]) -> torch.Tensor:
        if self.entry.points[point]["kind"] == "connector":
            return output[0]  # (latent queries, attention weights)
        side = self.grid_side()
        if output.shape[1] != 1 + side * side:
            raise ValueError(
                f"model {self.entry.name!r}, point {point!r}: {output.shape[1]} tower tokens "
                f"per image, expected CLS + {side}x{side} patches. Fix: the processor must "
                f"resize to the tower's input ({self.config.vision_config.image_size} px)."
            )
        return output[:, 1:]

    def image_token_index(self, inputs: dict[str, Any]) -> torch.Tensor:
        positions = token_positions(inputs["image_embeds_position_mask"].bool())
        if positions.shape[1] != self.n_queries:
            raise ValueError(
                f"model {self.entry.name!r}: {positions.shape[1]} image positions in the prompt, "
                f"expected latent_query_num = {self.n_queries}. Fix: pass num_image_tokens = "
                f"latent_query_num to the processor."
            )
        return positions

    def geometry(self, point: str, image_size: tuple[int, int]) -> TokenGeometry:
        if self.entry.points[point]["kind"] == "vision":
            side = self.grid_side()
            return TokenGeometry.single_grid(image_size, side, side)
        return pooled_geometry(image_size, self.n_queries)


def location_tokens(processor: Any) -> list[str]:
    """The processor's location tokens, by the names it gives them."""
    return [f"<patch_index_{i:04d}>" for i in range(processor.num_patch_index_tokens)]
