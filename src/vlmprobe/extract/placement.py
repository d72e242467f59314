"""A model larger than one card, split over devices with accelerate (`extract.device_map`).

The model is built or loaded on the CPU in its target dtype, then `accelerate` places whole
blocks (a model's `_no_split_modules`) on the GPUs in order, then the CPU, then disk, within
`max_memory` per device, and moves each block's inputs to its device as the pass runs. The
engine's hooks, early exit and token checks are unchanged: each point's tokens are copied to
the host from whichever device holds them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmprobe.params import ParamsError

SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")


def require_max_memory(value: Any) -> dict[int | str, str]:
    """`extract.max_memory`: {GPU index or `cpu`: size such as `40GiB`}, checked."""
    if value in (None, {}):
        return {}
    if not isinstance(value, dict):
        raise ParamsError(f"params.yaml: extract.max_memory = {value!r} must be a mapping of "
                          "device (a GPU index or cpu) to a size, e.g. {0: 40GiB, cpu: 200GiB}.")
    checked: dict[int | str, str] = {}
    for device, size in value.items():
        if not (device == "cpu" or (isinstance(device, int) and device >= 0)):
            raise ParamsError(f"params.yaml: extract.max_memory has device {device!r}; "
                              "devices are GPU indices (0, 1, ...) or cpu.")
        if not (isinstance(size, str) and SIZE.match(size)):
            raise ParamsError(f"params.yaml: extract.max_memory.{device} = {size!r} is not a "
                              "size such as 40GiB or 500MB.")
        checked[device] = size
    return checked


def dispatch(model: nn.Module, max_memory: dict[int | str, str], offload_dir: Path,
             dtype: torch.dtype, preload: tuple[str, ...] = ()) -> tuple[nn.Module, dict]:
    """`model` (on the CPU) split over the devices within `max_memory` (default: what each
    device has free), the rest offloaded to `offload_dir`; and the device map chosen.

    `preload`: module classes that read a child's weights without calling the child (the
    adapter's `preload_modules`); accelerate loads such a module's weights whole.
    """
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(
        model, max_memory=max_memory or None, dtype=dtype,
        no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []))
    offload_dir.mkdir(parents=True, exist_ok=True)
    model = dispatch_model(model, device_map=device_map, offload_dir=str(offload_dir),
                           preload_module_classes=list(preload) or None)
    return model, device_map


def devices_used(device_map: dict[str, Any]) -> dict[str, int]:
    """How many top-level placements went to each device (for the run's record)."""
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return counts
