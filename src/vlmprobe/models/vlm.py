"""What the four VLM families share: building the model, validating points, LLM-layer tokens.

A VLM entry's `weights.source` is `hub`/`local` (a pretrained checkpoint) or `random` (the
family's real architecture class from `weights.config`, random weights, seeded, no download:
the `_tiny` and `_random` entries). Remote-code families take the class from a local code
directory (`weights.code_dir`, a path inside this package or absolute) under the same
`trust_remote_code` + pinned-revision rule as a hub checkpoint.

Points are `{kind: ..., layer: ...}` locators. Every family has `llm` points: the output of
decoder layer `layer` (1-based, as `hidden_states[layer]`; -1 = the last layer, before the final
norm), keeping only the image-token positions, in grid order. Other kinds are family-specific;
a non-`llm` point with a `layer` indexes the vision encoder's layers the same way.

Every VLM family generates: `generate` answers one prompt per image, greedily, in the family's
own chat format (a pretrained processor's chat template where it has one).
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from vlmprobe.entries import safetensors_kwargs
from vlmprobe.models.base import (
    ModelAdapter,
    WeightsUnavailable,
    dtype_for,
    hub_lacks_revision,
    remote_code_kwargs,
    resolve_pretrained,
    unknown_revision,
)
from vlmprobe.models.published_code import class_with_post_init, mends_of
from vlmprobe.models.registry import RegistryError

PACKAGE_DIR = Path(__file__).parent
DEFAULT_PROMPT = "Describe the image."


def deep_update(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, nested dicts key by key."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


def offline_tokenizer(special_ids: dict[str, int], words: list[str], **special_roles: str):
    """A word-level tokenizer built in memory, for random-weight entries (no download).

    `special_ids` pins each special token to the id the model config expects; plain words get
    the lowest free ids. `special_roles` names e.g. pad_token="<|endoftext|>".
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(special_ids)
    free = (i for i in range(len(vocab) + len(words) + 1) if i not in vocab.values())
    for word in [*words, "[UNK]"]:
        vocab.setdefault(word, next(free))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        additional_special_tokens=list(special_ids),
        **special_roles,
    )


def prompt_words(prompt: str) -> list[str]:
    return prompt.replace(".", " .").lower().split()


def gather_positions(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden (B, S, D), index (B, T) -> (B, T, D)."""
    index = index.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, index)


def token_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions of the True entries of a (B, S) mask; every row must have T of them."""
    counts = mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"images in one batch have different token counts: {counts.tolist()}")
    return mask.nonzero()[:, 1].reshape(mask.shape[0], -1)


def chat_text(processor: Any, prompt: str, template: str) -> str:
    """The model's prompt for one image and `prompt`: the processor's own chat template where
    the checkpoint ships one, else the family's `template` (offline tokenizers have none)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user",
                     "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return template.format(prompt=prompt)


def processor_generate(model: nn.Module, processor: Any, texts: list[str], images: np.ndarray,
                       max_new_tokens: int, device: torch.device) -> list[str]:
    """Greedy `model.generate` on a processor's batch; decoder-only, so prompts pad on the left
    and every answer starts at the same column."""
    inputs = processor(text=texts, images=list(images), return_tensors="pt", padding=True,
                       padding_side="left").to(device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=processor.tokenizer.pad_token_id)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1]:],
                                  skip_special_tokens=True)


class VLMAdapter(ModelAdapter):
    """Loading, point validation and `llm` points; families fill in the rest."""

    generates = True
    remote_code: ClassVar[bool] = False
    point_kinds: ClassVar[tuple[str, ...]] = ("llm",)
    # What `vlmprobe doctor` changes in a checkpoint's config to shrink it (merged key by key):
    # sizes and depths only, so the code runs as published on a CPU in seconds.
    tiny_config: ClassVar[dict[str, Any]] = {}
    # Where the config holds the LLM's vocabulary size (shrunk to a small tokenizer's length),
    # or None where the code needs the full vocabulary.
    vocab_size_key: ClassVar[tuple[str, ...] | None] = None
    # Module classes whose forward reads a child's weights without calling the child: split
    # over devices (`extract.device_map: auto`), accelerate must load them whole.
    preload_modules: ClassVar[tuple[str, ...]] = ()
    # The field of a full forward pass's output (`output_hidden_states=True`) that holds the
    # layers the `llm` points index: an encoder-decoder names its encoder's.
    llm_hidden_states: ClassVar[str] = "hidden_states"

    # -- family-specific -------------------------------------------------------------------
    @abstractmethod
    def model_class(self) -> type:
        """The transformers class (native families) or Auto class (remote-code families)."""

    @abstractmethod
    def layer_counts(self, config: Any) -> dict[str, int]:
        """Depth of each layered stack the points index, e.g. {"vision": 32, "llm": 28}."""

    @abstractmethod
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language model's decoder layers."""

    @abstractmethod
    def image_token_index(self, inputs: dict[str, Any]) -> torch.Tensor:
        """(B, T) sequence positions of the image's spatial tokens, in geometry order."""

    @abstractmethod
    def setup(self, model: nn.Module, pretrained: tuple[str, dict[str, Any]] | None) -> None:
        """Build the processor/tokenizer: from the checkpoint (`pretrained` = location and
        from_pretrained kwargs), or offline for random weights (`pretrained` None)."""

    @abstractmethod
    def answer(self, model: nn.Module, images: np.ndarray, prompts: list[str],
               max_new_tokens: int, device: torch.device) -> list[str]:
        """`generate` for one batch, under inference mode."""

    # -- shared ----------------------------------------------------------------------------
    def generate(self, model: nn.Module, images: np.ndarray, prompts: list[str],
                 max_new_tokens: int, device: torch.device) -> list[str]:
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images: one per image")
        with torch.inference_mode():
            answers = self.answer(model, images, prompts, max_new_tokens, device)
        return [a.strip() for a in answers]

    def offline_processor(self) -> Any:
        """The processor for random weights, built in memory (no download); a family that
        builds its processor with `checkpoint_processor` defines it."""
        raise NotImplementedError(f"the {self.entry.family} family builds no offline processor")

    def checkpoint_processor(self, pretrained: tuple[str, dict[str, Any]] | None) -> Any:
        """The checkpoint's own processor (`pretrained`: its location and from_pretrained
        kwargs), or for random weights the family's `offline_processor()`."""
        if pretrained is None:
            return self.offline_processor()
        from transformers import AutoProcessor

        location, kwargs = pretrained
        return AutoProcessor.from_pretrained(location, revision=kwargs.get("revision"))

    def save_preprocessing(self, directory: Path) -> None:
        """Save the tokenizer (or processor) `setup` built, as a checkpoint ships it."""
        (getattr(self, "processor", None) or self.tokenizer).save_pretrained(str(directory))

    @property
    def prompt(self) -> str:
        return str(self.entry.options.get("prompt", DEFAULT_PROMPT))

    def _source(self) -> str:
        return self.entry.weights.get("source", "")

    def _code_dir(self) -> Path:
        code_dir = Path(self.entry.weights["code_dir"])
        return code_dir if code_dir.is_absolute() else PACKAGE_DIR / code_dir

    def model_config(self, project_root: Path) -> Any:
        """The model config, without touching weights."""
        from transformers import AutoConfig

        weights = self.entry.weights
        overrides = weights.get("config") or {}
        if self._source() == "random":
            if self.remote_code:
                code_dir = self._code_dir()
                base = AutoConfig.from_pretrained(
                    str(code_dir), **remote_code_kwargs(self.entry, str(code_dir))
                )
                return type(base).from_dict(deep_update(base.to_dict(), overrides))
            return self.model_class().config_class(**overrides)
        if weights.get("needs_conversion"):
            raise WeightsUnavailable(
                f"model {self.entry.name!r}: {weights['repo_id']} cannot be loaded as published: "
                f"{weights['needs_conversion']}."
            )
        location, extra = resolve_pretrained(self.entry, project_root)
        kwargs = remote_code_kwargs(self.entry, location) if self.remote_code else {}
        try:
            return AutoConfig.from_pretrained(location, **extra, **kwargs)
        except OSError as e:
            if hub_lacks_revision(e):
                raise unknown_revision(self.entry) from e
            raise WeightsUnavailable(
                f"model {self.entry.name!r}: no config for {location!r} "
                f"{extra.get('revision', '')} offline ({e}). Fix: put the checkpoint in the hub "
                f"cache (HF_HUB_CACHE) or point a `source: local` entry's weights.path at it."
            ) from e

    def check_points(self, points: list[str], project_root: Path) -> None:
        counts = self.layer_counts(self.model_config(project_root))
        for point in points:
            spec = self.entry.points[point]
            kind = spec.get("kind")
            if kind not in self.point_kinds:
                raise RegistryError(
                    f"{self.entry.path}: point {point!r} has kind {kind!r}; the "
                    f"{self.entry.family} family has kinds {', '.join(self.point_kinds)}"
                )
            if "layer" not in spec:
                continue
            stack = "llm" if kind == "llm" else "vision"
            layer, depth = spec.get("layer"), counts[stack]
            if not isinstance(layer, int) or not (layer == -1 or 1 <= layer <= depth):
                raise RegistryError(
                    f"{self.entry.path}: point {point!r} asks for {stack} layer {layer!r}, but "
                    f"model {self.entry.name!r} has {depth} {stack} layers (valid: 1..{depth} or "
                    f"-1 for the last). Valid points of this entry: {', '.join(self.entry.points)}."
                )

    def load(self, project_root: Path, device: torch.device,
             dtype: torch.dtype | None = None) -> nn.Module:
        config = self.model_config(project_root)
        self.dtype = dtype or dtype_for(device)
        self.mends: list[str] = []  # what vlmprobe changed around published code, for provenance
        if self._source() == "random":
            torch.manual_seed(int(self.entry.weights.get("seed", 0)))
            extra = {"trust_remote_code": True} if self.remote_code else {}
            with torch.device(device):
                if self.remote_code:
                    model = self.model_class().from_config(config, dtype=self.dtype, **extra)
                else:
                    model = self.model_class()._from_config(config, dtype=self.dtype)
            pretrained = None
        else:
            location, extra = resolve_pretrained(self.entry, project_root)
            model_class = self.model_class()
            if self.remote_code:
                extra.update(remote_code_kwargs(self.entry, location))  # or refuses the code
                model_class = self.published_class(config, location, extra)
            try:
                model = model_class.from_pretrained(
                    location, config=config, dtype=self.dtype, **extra,
                    **safetensors_kwargs(self.entry)
                )
            except OSError as e:
                if hub_lacks_revision(e):
                    raise unknown_revision(self.entry) from e
                raise WeightsUnavailable(
                    f"model {self.entry.name!r}: cannot load weights of {location!r} "
                    f"{extra.get('revision', '')} ({e}). Only safetensors weights load unless "
                    f"the entry sets weights.allow_pickle_weights: true. Fix: put the checkpoint "
                    f"in the hub cache (HF_HUB_CACHE) or point a `source: local` entry at it."
                ) from e
            model = model.to(device)
            self.mends += mends_of(model)
            pretrained = (location, extra)
        self.setup(model, pretrained)
        return model.eval()

    def published_class(self, config: Any, location: str, extra: dict[str, Any]) -> type:
        """The checkpoint's own model class (its remote code), with `post_init` made sure of:
        the code of some releases never calls it, and transformers 5.x needs what it sets."""
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        reference = config.auto_map[self.model_class().__name__]
        cls = get_class_from_dynamic_module(reference, location, revision=extra.get("revision"))
        return class_with_post_init(cls)

    def weights_provenance(self, project_root: Path) -> dict[str, Any]:
        record = {k: v for k, v in self.entry.weights.items() if k != "config"}
        if getattr(self, "mends", None):
            record["published_code_mends"] = list(self.mends)
        if self._source() == "random":
            record["label"] = "RANDOM WEIGHTS (architecture only; no trained model)"
        return record

    def llm_module(self, model: nn.Module, point: str) -> nn.Module:
        layers = self.decoder_layers(model)
        layer = self.entry.points[point]["layer"]
        return layers[-1] if layer == -1 else layers[layer - 1]

    def llm_tokens(self, output: Any, inputs: dict[str, Any]) -> torch.Tensor:
        hidden = output[0] if isinstance(output, tuple | list) else output
        return gather_positions(hidden, self.image_token_index(inputs))

    def point_tokens(self, point: str, output: Any, inputs: dict[str, Any]) -> torch.Tensor:
        if self.entry.points[point]["kind"] == "llm":
            return self.llm_tokens(output, inputs)
        return self.encoder_tokens(point, output, inputs)

    @abstractmethod
    def encoder_tokens(self, point: str, output: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """Tokens (B, T, D) of a non-LLM point, in geometry order."""


class ProcessorVLMAdapter(VLMAdapter):
    """A family whose transformers processor builds every input from one prompt template."""

    template: ClassVar[str]  # the family's prompt around {prompt}, with its image placeholder

    def prepare(self, images: np.ndarray, device: torch.device) -> dict[str, Any]:
        # The prompt the model sees in use: its chat template, default system turn included.
        text = chat_text(self.processor, self.prompt, self.template)
        inputs = self.processor(
            text=[text] * len(images), images=list(images), return_tensors="pt", padding=True
        )
        return {k: v.to(device, self.dtype) if v.is_floating_point() else v.to(device)
                for k, v in inputs.items()}

    def answer(self, model: nn.Module, images: np.ndarray, prompts: list[str],
               max_new_tokens: int, device: torch.device) -> list[str]:
        texts = [chat_text(self.processor, p, self.template) for p in prompts]
        return processor_generate(model, self.processor, texts, images, max_new_tokens, device)
