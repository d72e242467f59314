"""What the remote code real checkpoints ship needs to run on transformers 5.x.

InternVL2 and CogVLM2 publish their modeling code with the checkpoint (`trust_remote_code`).
That code was written for transformers 4.3x-4.4x; vlmprobe runs it unmodified and mends, from
outside, only what the newer library no longer gives it:

- `post_init()`: the InternVL2 code of the release period never calls it, and transformers 5.x
  reads attributes it sets (`all_tied_weights_keys`) while loading.
- `generate`: 5.x no longer puts it on every `PreTrainedModel`, and its generation loop no
  longer speaks the legacy tuple cache (`past_key_values` as tuples of tensors) that this code
  returns and expects back; the CogVLM2 code also calls the removed
  `_extract_past_from_model_output`. `LegacyCacheGeneration` is a greedy decoder over exactly
  that protocol, calling the published `prepare_inputs_for_generation` and (where it has one)
  `_update_model_kwargs_for_generation`.

Each mend is recorded in the run's provenance (`published_code_mends`), so a result says what
ran.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

POST_INIT_MEND = "post_init() called after the published __init__, which does not call it"
GENERATION_MEND = ("generate: vlmprobe's greedy decoder over the published legacy tuple cache "
                   "(transformers 5.x's generate has neither)")


def class_with_post_init(cls: type) -> type:
    """`cls`, or a subclass that calls `post_init()` after an `__init__` that did not."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, *args, **kwargs)
        if not hasattr(self, "all_tied_weights_keys"):
            self.post_init()
            self.vlmprobe_mends = [POST_INIT_MEND]

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


class LegacyCacheGeneration:
    """Greedy `generate` for published code that keeps its cache as tuples of tensors.

    Mixed in after the published class, so every method that class defines wins; this fills in
    only what transformers 5.x removed. Semantics follow transformers' `generate`: it returns
    the prompt ids followed by the new ones (only the new ones when the prompt came as
    `inputs_embeds`); a sequence that has produced an eos continues with the pad id.
    """

    def _extract_past_from_model_output(self, outputs: Any, standardize_cache_format: bool = False
                                        ) -> tuple[str, Any]:
        return "past_key_values", outputs.past_key_values

    def _update_model_kwargs_for_generation(self, outputs: Any, model_kwargs: dict[str, Any],
                                            is_encoder_decoder: bool = False,
                                            standardize_cache_format: bool = False
                                            ) -> dict[str, Any]:
        model_kwargs["past_key_values"] = outputs.past_key_values
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((len(mask), 1))], 1)
        return model_kwargs

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, *,
                 inputs_embeds: torch.Tensor | None = None, max_new_tokens: int = 20,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 do_sample: bool = False, num_beams: int = 1,
                 generation_config: Any = None, **model_kwargs: Any) -> torch.Tensor:
        if do_sample or num_beams != 1:
            raise ValueError(
                f"vlmprobe's generation for this published code is greedy only (do_sample="
                f"{do_sample}, num_beams={num_beams}); vlmprobe asks every model greedily."
            )
        for unused in ("output_hidden_states", "use_cache"):
            model_kwargs.pop(unused, None)
        if eos_token_id is None and generation_config is not None:
            eos_token_id = generation_config.eos_token_id
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else
                           list(eos_token_id or []))
        reference = inputs_embeds if inputs_embeds is not None else input_ids
        batch, device = reference.shape[0], reference.device
        prompt = (input_ids if input_ids is not None
                  else torch.empty((batch, 0), dtype=torch.long, device=device))
        sequence = prompt
        pad = torch.tensor(0 if pad_token_id is None else pad_token_id, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        model_kwargs["past_key_values"] = None
        for step in range(max_new_tokens):
            inputs = self.prepare_inputs_for_generation(
                sequence, inputs_embeds=inputs_embeds if step == 0 else None, **model_kwargs
            )
            inputs["use_cache"] = True
            outputs = self(**inputs, return_dict=True)
            token = outputs.logits[:, -1].argmax(-1)
            token = torch.where(finished, pad, token)
            sequence = torch.cat([sequence, token[:, None]], 1)
            finished |= torch.isin(token, eos.to(device))
            if bool(finished.all()):
                break
            model_kwargs = self._update_model_kwargs_for_generation(outputs, model_kwargs)
        return sequence


def add_legacy_generation(module: nn.Module) -> bool:
    """Give a published model `LegacyCacheGeneration` if it has no `generate` (and the hooks
    the loop calls); True if it did."""
    if hasattr(module, "generate") or not hasattr(module, "prepare_inputs_for_generation"):
        return False
    cls = type(module)
    module.__class__ = type(cls.__name__, (cls, LegacyCacheGeneration),
                            {"__module__": cls.__module__})
    return True


def mends_of(model: nn.Module) -> list[str]:
    """The mends made while the published model was built (see `class_with_post_init`)."""
    return list(getattr(model, "vlmprobe_mends", []))
