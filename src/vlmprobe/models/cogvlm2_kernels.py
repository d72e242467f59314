"""The same maths as CogVLM2's two GPU-only kernels, for where they cannot run.

The published CogVLM2 code calls xformers' `memory_efficient_attention` in its vision tower
(no CPU kernel; xformers wheels are built for one torch version each) and a Triton rotary
kernel in its language model (CUDA only). Where they cannot run, vlmprobe puts these in their
place, in the published modules' namespaces, and records that it did:

- attention: `torch.nn.functional.scaled_dot_product_attention` on the (B, L, H, D) layout
  xformers uses (SDPA wants (B, H, L, D));
- rotary: the GPT-NeoX rotation the Triton kernel computes (non-interleaved: the first and
  second halves of the rotary dims rotate as pairs), in place on q and k as the kernel does.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_SUBSTITUTE = ("vision attention: torch SDPA in place of xformers "
                        "memory_efficient_attention (same maths)")
ROTARY_SUBSTITUTE = "rotary embedding: torch in place of the Triton kernel (same maths)"


def memory_efficient_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attn_bias: Any = None, p: float = 0.0,
                               scale: float | None = None, **_: Any) -> torch.Tensor:
    """xformers' `memory_efficient_attention` on (B, L, H, D) tensors, through SDPA."""
    if attn_bias is not None:
        raise NotImplementedError("the CogVLM2 substitute takes no attention bias; the "
                                  "published vision tower passes none")
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                         value.transpose(1, 2), dropout_p=p, scale=scale)
    return out.transpose(1, 2)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     interleaved: bool = False, inplace: bool = False, **_: Any) -> torch.Tensor:
    """The Triton kernel's rotation: x (B, H, L, D); cos, sin (B, L, R/2), R <= D."""
    if interleaved:
        raise NotImplementedError("the CogVLM2 substitute rotates halves (interleaved=False), "
                                  "as the published model does")
    half = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # over heads
    x0, x1 = x[..., :half], x[..., half:2 * half]
    rotated = torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    if inplace:
        x[..., :2 * half] = rotated
        return x
    return torch.cat([rotated, x[..., 2 * half:]], dim=-1)


def xformers_works(device: torch.device) -> bool:
    """Whether the installed xformers (if any) runs its attention on `device`."""
    stand_in = getattr(sys.modules.get("xformers"), "vlmprobe_stand_in", False)
    if device.type != "cuda" or stand_in or not is_installed("xformers"):
        return False
    try:
        import xformers.ops as xops

        q = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.bfloat16)
        xops.memory_efficient_attention(q, q, q)
        return True
    except Exception:  # noqa: BLE001 - a broken extension fails in many ways; all mean "no"
        return False


def stand_in_module(name: str, **attributes: Any) -> types.ModuleType:
    """An importable module (with a spec, as importlib's checks want) of `attributes`."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    module.__path__ = []  # a package, so its submodules resolve from sys.modules
    module.__doc__ = f"vlmprobe's stand-in for {name} (vlmprobe.models.cogvlm2_kernels)"
    module.vlmprobe_stand_in = True
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def is_installed(name: str) -> bool:
    return name in sys.modules or importlib.util.find_spec(name) is not None


def stand_in_modules() -> None:
    """Make `import xformers.ops` (and `import triton`, if absent) succeed, so the published
    code imports; the kernels themselves are replaced after loading (`use_substitutes`)."""
    if not is_installed("xformers"):
        ops = stand_in_module("xformers.ops",
                              memory_efficient_attention=memory_efficient_attention)
        sys.modules.update({"xformers": stand_in_module("xformers", ops=ops), "xformers.ops": ops})
    if not is_installed("triton"):
        language = stand_in_module("triton.language", constexpr=int)
        jit = lambda fn=None, **_: fn if fn is not None else (lambda f: f)  # noqa: E731
        sys.modules.update({"triton": stand_in_module("triton", jit=jit, language=language),
                            "triton.language": language})


def use_substitutes(model: nn.Module, device: torch.device) -> list[str]:
    """Point the published modules at the substitutes where the real kernels cannot run;
    return what was substituted (for the run's provenance)."""
    substituted = []
    vision_attention = model.model.vision.transformer.layers[0].attention
    visual = sys.modules[type(vision_attention).__module__]
    if hasattr(visual, "xops") and not xformers_works(device):
        visual.xops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
        substituted.append(ATTENTION_SUBSTITUTE)
    rotary = getattr(model.model.layers[0].self_attn, "rotary_emb", None)
    util = sys.modules[type(rotary).__module__] if rotary is not None else None
    if util is not None and hasattr(util, "apply_rotary_emb_func") and device.type != "cuda":
        util.apply_rotary_emb_func = apply_rotary_emb
        substituted.append(ROTARY_SUBSTITUTE)
    return substituted
