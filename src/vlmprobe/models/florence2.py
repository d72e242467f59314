"""Florence-2 (transformers Florence2ForConditionalGeneration): a DaViT tower, a BART encoder.

The plan's grounding-specialised pivot: a sequence-to-sequence model trained to write boxes as
location tokens. The processor resizes each image whole to the tower's square input (768 px for
the published checkpoints); DaViT's four stages (stride 4, 2, 2, 2) leave a 24x24 grid. The
projector adds 2-D position embeddings and puts one extra token first, the mean of the grid;
the 1 + 24x24 projected tokens fill the prompt's image positions (first, before `<s>` and the
text) and enter the BART **encoder** with the text. The decoder never holds image tokens.

Point kinds, every one a row-major grid covering the whole image:
- `vision`: a DaViT block's output (`layer` 1-based over the blocks of all stages in order, -1
  the last; no `layer`: the tower's output, the last block), on its stage's grid (the last
  stage's is the tower's final stride, 32 px);
- `projector`: after the multi-modal projector, the pooled first token dropped;
- `llm`: an encoder layer's output at the image-token positions (pooled token dropped). The
  last encoder layer's output is what the decoder cross-attends to.

Prompts are Florence-2's own: a task token (`<CAPTION>`, `<CAPTION_TO_PHRASE_GROUNDING>`...)
that the processor expands into its sentence, or plain text (a question) passed as it is.
Grounding answers are a phrase followed by `<loc_*>` tokens (thousandths of the image), parsed
by the processor's own post-processing.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.models.box_text import usable_box
from vlmprobe.models.registry import RegistryError
from vlmprobe.models.vlm import VLMAdapter, token_positions

GROUNDING_TASK = "<CAPTION_TO_PHRASE_GROUNDING>"
LOCATION_BINS = 1000  # <loc_0> .. <loc_999>, as the processor quantises
DEFAULT_IMAGE_SIZE = 768  # the published processors' square input; entries may set image_size
# BART's structural tokens; the offline tokenizer pins them to the config's ids where it has one.
BART_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
IMAGE_TOKEN = "<image>"
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # the published preprocessor's normalisation
IMAGENET_STD = [0.229, 0.224, 0.225]


def conv_side(n: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution over `n` pixels (PyTorch's Conv2d arithmetic)."""
    return (n + 2 * padding - kernel) // stride + 1


class Florence2Adapter(VLMAdapter):
    point_kinds = ("vision", "projector", "llm")
    box_format = "florence2-locations"
    grounding_template = GROUNDING_TASK + "{object}"  # the processor: "Locate the phrases ..."
    llm_hidden_states = "encoder_hidden_states"  # the image tokens are in the BART encoder
    vocab_size_key = ("text_config", "vocab_size")
    # The published layout kept (4 DaViT stages, their strides, 12x12-token windows, ids);
    # sizes and depths cut.
    tiny_config: ClassVar[dict[str, Any]] = {
        "vision_config": {"embed_dim": [8, 16, 24, 32], "num_heads": [1, 2, 2, 4],
                          "num_groups": [1, 2, 2, 4], "depths": [1, 1, 2, 1],
                          "projection_dim": 32, "drop_path_rate": 0.0},
        "text_config": {"d_model": 32, "encoder_layers": 3, "decoder_layers": 2,
                        "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                        "encoder_ffn_dim": 64, "decoder_ffn_dim": 64},
    }

    def model_class(self) -> type:
        from transformers import Florence2ForConditionalGeneration

        return Florence2ForConditionalGeneration

    def layer_counts(self, config: Any) -> dict[str, int]:
        text = config.text_config
        if config.vision_config.projection_dim != text.d_model:
            raise RegistryError(
                f"model {self.entry.name!r}: vision_config.projection_dim "
                f"{config.vision_config.projection_dim} != text_config.d_model {text.d_model}: "
                f"the projected image tokens must have the encoder's width. Fix: make them equal "
                f"in {self.entry.path}."
            )
        if not 0 <= config.image_token_id < text.vocab_size:
            raise RegistryError(
                f"model {self.entry.name!r}: image_token_id {config.image_token_id} is not an id "
                f"of the text vocabulary (vocab_size {text.vocab_size}). Fix: set "
                f"text_config.vocab_size above it in {self.entry.path} (the published "
                f"conversions have 51328 for image_token_id 51289)."
            )
        return {"vision": sum(config.vision_config.depths), "llm": text.encoder_layers}

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language-model layers the `llm` points index: the BART encoder's (where the
        image tokens are)."""
        return model.model.language_model.encoder.layers

    def vision_blocks(self, model: nn.Module) -> list[nn.Module]:
        return [block for stage in model.model.vision_tower.blocks for block in stage]

    # -- processor -------------------------------------------------------------------------
    def setup(self, model: nn.Module, pretrained: tuple[str, dict[str, Any]] | None) -> None:
        self.config = model.config
        self.processor = self.checkpoint_processor(pretrained)
        settings = self.processor.image_processor.to_dict()
        size = dict(settings.get("size") or {})
        crops = settings.get("do_center_crop") and settings.get("crop_size") != size
        if crops or set(size) != {"height", "width"}:
            raise RegistryError(
                f"model {self.entry.name!r}: the image processor resizes to {size}, then crops "
                f"to {settings.get('crop_size') if crops else 'nothing'}; the florence2 family "
                f"places tokens on an image resized whole to height x width, uncropped, as the "
                f"published Florence-2 processors do. Fix: use such a preprocessor."
            )
        tokenizer = self.processor.tokenizer
        # Dropped from answers: what frames a sequence, not what the model says in it (the
        # location tokens are special tokens too, and must survive decoding).
        self.framing_ids = {tokenizer.bos_token_id, tokenizer.eos_token_id,
                            tokenizer.pad_token_id,
                            self.config.text_config.decoder_start_token_id} - {None}

    def offline_processor(self) -> Any:
        """The processor for random weights, built in memory: a byte-level BPE tokenizer as
        BART's (no merges: every byte one token), with the location tokens and the image token
        at the config's id; an image processor at the entry's input size."""
        from tokenizers import pre_tokenizers
        from transformers import BartTokenizer, CLIPImageProcessor, Florence2Processor

        text = self.config.text_config
        ids = {"<s>": text.bos_token_id, "<pad>": text.pad_token_id,
               "</s>": text.eos_token_id, IMAGE_TOKEN: self.config.image_token_id}
        ids = {token: i for token, i in ids.items() if i is not None}
        locations = [f"<loc_{i}>" for i in range(LOCATION_BINS)]
        rest = [t for t in BART_SPECIALS if t not in ids]
        rest += sorted(pre_tokenizers.ByteLevel.alphabet()) + locations
        free = (i for i in range(len(ids) + len(rest)) if i not in ids.values())
        vocab = {**ids, **{token: next(free) for token in rest}}
        if max(vocab.values()) >= text.vocab_size:
            raise RegistryError(
                f"model {self.entry.name!r}: the offline tokenizer needs ids up to "
                f"{max(vocab.values())} (bytes, {LOCATION_BINS} location tokens, {IMAGE_TOKEN}), "
                f"text_config.vocab_size is {text.vocab_size}. Fix: raise it in {self.entry.path}."
            )
        tokenizer = BartTokenizer(vocab=vocab, merges=[],
                                  extra_special_tokens={"image_token": IMAGE_TOKEN})
        tokenizer.add_tokens(locations, special_tokens=True)  # special, as the published ones
        size = int(self.entry.options.get("image_size", DEFAULT_IMAGE_SIZE))
        rows, cols = self.stage_grid(-1, (size, size))
        images = CLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False,
                                    image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                                    image_seq_length=1 + rows * cols)
        # The processor's parsers refuse a post-processing type its config does not name.
        return Florence2Processor(image_processor=images, tokenizer=tokenizer,
                                  post_processor_config={"phrase_grounding": {},
                                                         "pure_text": {}})

    # -- geometry --------------------------------------------------------------------------
    def stage_of(self, point: str) -> int:
        """The DaViT stage (0-based) whose grid holds the point: the last but for a `vision`
        point at an earlier block."""
        vision = self.config.vision_config
        spec = self.entry.points[point]
        layer = spec.get("layer", -1) if spec["kind"] == "vision" else -1
        if layer == -1:
            return len(vision.depths) - 1
        ends = np.cumsum(vision.depths)
        return int(np.searchsorted(ends, layer))  # block `layer` (1-based) ends in this stage

    def input_size(self) -> tuple[int, int]:
        size = self.processor.image_processor.size
        return int(size["height"]), int(size["width"])  # checked in `setup`

    def stage_grid(self, stage: int, size: tuple[int, int] | None = None) -> tuple[int, int]:
        """(rows, cols) after the patch convolutions of stages 0..`stage` (-1: all) on the
        processor's input, or on `size` (H, W)."""
        vision = self.config.vision_config
        rows, cols = size or self.input_size()
        last = len(vision.depths) - 1 if stage == -1 else stage
        for s in range(last + 1):
            conv = (vision.patch_size[s], vision.patch_stride[s], vision.patch_padding[s])
            rows, cols = conv_side(rows, *conv), conv_side(cols, *conv)
        return rows, cols

    def geometry(self, point: str, image_size: tuple[int, int]) -> TokenGeometry:
        # The image is resized whole to the square input: one grid covers it, whatever its size.
        return TokenGeometry.single_grid(image_size, *self.stage_grid(self.stage_of(point)))

    # -- points ----------------------------------------------------------------------------
    def point_module(self, model: nn.Module, point: str) -> nn.Module:
        spec = self.entry.points[point]
        if spec["kind"] == "vision":
            blocks = self.vision_blocks(model)
            layer = spec.get("layer", -1)
            return blocks[-1] if layer == -1 else blocks[layer - 1]
        if spec["kind"] == "projector":
            return model.model.multi_modal_projector
        return self.llm_module(model, point)

    def encoder_tokens(self, point: str, output: Any, inputs: dict[str, Any]) -> torch.Tensor:
        rows, cols = self.stage_grid(self.stage_of(point))
        if self.entry.points[point]["kind"] == "vision":
            tokens = output.flatten(2).transpose(1, 2)  # (B, C, rows, cols) -> row-major
        else:
            tokens = output[:, 1:]  # the projector puts the grid's mean first
        if tokens.shape[1] != rows * cols:
            raise ValueError(
                f"model {self.entry.name!r}, point {point!r}: {tokens.shape[1]} tokens, expected "
                f"the {rows}x{cols} grid of a {self.input_size()} input. Fix: the processor's "
                f"image size must be the one the model is fed."
            )
        return tokens

    def image_token_index(self, inputs: dict[str, Any]) -> torch.Tensor:
        positions = token_positions(inputs["input_ids"] == self.config.image_token_id)
        rows, cols = self.stage_grid(-1)
        if positions.shape[1] != 1 + rows * cols:
            raise ValueError(
                f"model {self.entry.name!r}: {positions.shape[1]} image tokens in the prompt, "
                f"expected 1 + {rows}x{cols} (the pooled token, then the grid). Fix: the image "
                f"processor's image_seq_length must be {1 + rows * cols} for a "
                f"{self.input_size()} input."
            )
        return positions[:, 1:]

    # -- inputs, forward, answers ----------------------------------------------------------
    def processor_inputs(self, images: np.ndarray, texts: list[str],
                         device: torch.device) -> dict[str, torch.Tensor]:
        inputs = self.processor(text=texts, images=list(images), return_tensors="pt",
                                padding=True)
        return {k: v.to(device, self.dtype) if v.is_floating_point() else v.to(device)
                for k, v in inputs.items()}

    def prepare(self, images: np.ndarray, device: torch.device) -> dict[str, Any]:
        return self.processor_inputs(images, [self.prompt] * len(images), device)

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        # Every point lies in the tower or the encoder; a pass run to the end feeds the decoder
        # its start token only.
        start = torch.full((len(inputs["input_ids"]), 1),
                           self.config.text_config.decoder_start_token_id,
                           device=inputs["input_ids"].device)
        return model(**inputs, decoder_input_ids=start)

    def answer(self, model: nn.Module, images: np.ndarray, prompts: list[str],
               max_new_tokens: int, device: torch.device) -> list[str]:
        inputs = self.processor_inputs(images, prompts, device)
        # Encoder-decoder: `generate` returns the decoder's tokens only, no prompt to cut off.
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                num_beams=1)
        return [self.decode(row) for row in output.tolist()]

    def decode(self, ids: list[int]) -> str:
        """An answer's text: location tokens kept, the sequence's framing (`</s><s>`, padding)
        left out."""
        return self.processor.tokenizer.decode([i for i in ids if i not in self.framing_ids],
                                               skip_special_tokens=False,
                                               clean_up_tokenization_spaces=False)

    def parse_grounding(self, answer: str, image_size: tuple[int, int]) -> np.ndarray | None:
        """The first box of the phrase-grounding answer, by the processor's post-processing
        (location tokens dequantised to pixels of a (W, H) image), as xyxy pixels."""
        h, w = image_size
        parsed = self.processor.post_process_generation(text=answer, task=GROUNDING_TASK,
                                                        image_size=(w, h))[GROUNDING_TASK]
        boxes = parsed.get("bboxes") or []
        return usable_box(boxes[0], image_size) if boxes else None
