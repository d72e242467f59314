"""Capture named module outputs with forward hooks, stopping the pass early.

Once every requested module has produced its output the forward pass is aborted, so nothing
past the deepest requested point is computed (the baukit / nnsight pattern).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


class _StopForward(Exception):
    """Raised inside a hook to abandon the rest of the forward pass."""


def capture_outputs(modules: dict[str, nn.Module], run: Callable[[], Any]) -> dict[str, Any]:
    """Call `run()` with hooks on `modules`; return {name: that module's first output}."""
    captured: dict[str, Any] = {}
    names_by_module: dict[int, list[str]] = {}
    for name, module in modules.items():
        names_by_module.setdefault(id(module), []).append(name)

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        for name in names_by_module[id(module)]:
            captured.setdefault(name, output)
        if len(captured) == len(modules):
            raise _StopForward

    handles = [
        module.register_forward_hook(hook)
        for module in {id(m): m for m in modules.values()}.values()
    ]
    try:
        run()
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(modules) - set(captured))
    if missing:
        raise RuntimeError(f"the forward pass never reached: {', '.join(missing)}")
    return captured
