"""Qwen2.5-VL (transformers Qwen2_5_VLForConditionalGeneration): the baseline.

Point kinds: `vision` (a vision block's output at patch resolution, `layer` 1-based or -1),
`merger` (after the 2x2 patch merger, the LLM's token grid) and `llm`. The vision tower runs
blocks on window-permuted merge units; both vision kinds are restored to row-major order.
Asked to ground an object it writes JSON with `bbox_2d` in absolute pixels of its input.

The vision tower's attention runs through `packed_window_attention` (registered with
transformers' attention interface, the library itself untouched): under SDPA, transformers
launches one attention call per window (16 windows per 448-px image, for each of 32 blocks) and
the GPU waits on the host; one call per run of equal-length windows gives the same outputs.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

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

# transformers passes a packed sequence's boundaries (cu_seqlens) only to an implementation
# whose name says flash; this one runs torch SDPA.
PACKED_ATTENTION = "flash_packed_sdpa_vlmprobe"


class WindowLengths:
    """Lengths of a packed sequence's windows, read from the device once per boundary tensor:
    every block of one forward pass gets the same `cu_seqlens` object, so this is one host sync
    per pass instead of one per block."""

    def __init__(self) -> None:
        self.seen: list[tuple[weakref.ref, list[int]]] = []

    def __call__(self, cu_seqlens: torch.Tensor) -> list[int]:
        for ref, lengths in self.seen:
            if ref() is cu_seqlens:
                return lengths
        lengths = cu_seqlens.diff().tolist()
        self.seen = [(weakref.ref(cu_seqlens), lengths), *self.seen[:1]]  # windows, full
        return lengths


window_lengths = WindowLengths()


def packed_window_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                            cu_seq_lens_q: torch.Tensor, scaling: float | None = None,
                            dropout: float = 0.0, **_: Any) -> tuple[torch.Tensor, None]:
    """Attention within each window of a packed (1, H, N, D) sequence, as transformers' SDPA
    path computes it window by window, but with the windows of each run of equal lengths
    stacked into one batch. Returns (1, N, H, D), as the per-window path concatenates it."""
    outputs, offset, lengths = [], 0, window_lengths(cu_seq_lens_q)
    run_start = 0
    for i in range(1, len(lengths) + 1):
        if i < len(lengths) and lengths[i] == lengths[run_start]:
            continue
        n, length = i - run_start, lengths[run_start]
        span = slice(offset, offset + n * length)
        q, k, v = (t[0, :, span].unflatten(1, (n, length)).transpose(0, 1)
                   for t in (query, key, value))
        out, _ = sdpa_attention_forward(module, q, k, v, attention_mask=None, scaling=scaling,
                                        dropout=dropout, is_causal=False)
        outputs.append(out.reshape(1, n * length, *out.shape[2:]))
        offset, run_start = offset + n * length, i
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(PACKED_ATTENTION, packed_window_attention)


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
        if self.vision_config._attn_implementation == "sdpa":
            self.vision_config._attn_implementation = PACKED_ATTENTION
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
