"""Reading and validating `params.yaml`.

A stage sees only the params it declares in `dvc.yaml`: `load_params` returns just those keys,
so reading an undeclared param fails loudly instead of going stale silently (DVC re-runs a
stage only when a declared param changes). `tests/test_dvc_yaml.py` checks that each stage
module's `PARAMS` equals its `dvc.yaml` declaration.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = Path("params.yaml")


class ParamsError(ValueError):
    """A param is missing, of the wrong type or out of range."""


def _fix_hint(key: str, example: Any) -> str:
    return f"Fix: edit params.yaml or run `dvc exp run -S {key}={example}`."


def load_params(keys: Sequence[str], path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    """Load `path` and return a nested dict holding only `keys` (dotted, e.g. `data.seed`)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found: run from the project root (where dvc.yaml is).")
    with path.open() as f:
        raw = yaml.safe_load(f) or {}
    selected: dict[str, Any] = {}
    for key in keys:
        node: Any = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ParamsError(f"{path}: `{key}` is missing; the stage declares it in dvc.yaml.")
            node = node[part]
        target = selected
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = node
    return selected


def get(params: dict[str, Any], key: str) -> Any:
    """Look up a dotted key in a nested params dict."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"`{key}` was not loaded: declare it in the stage's PARAMS.")
        node = node[part]
    return node


def require_int(params: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = get(params, key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ParamsError(
            f"params.yaml: {key} = {value!r} is invalid; expected an integer in [{lo}, {hi}]. "
            + _fix_hint(key, lo)
        )
    return value


def require_float(params: dict[str, Any], key: str, lo: float, hi: float) -> float:
    value = get(params, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ParamsError(
            f"params.yaml: {key} = {value!r} is invalid; expected a number in [{lo}, {hi}]. "
            + _fix_hint(key, lo)
        )
    return float(value)


def require_choice(params: dict[str, Any], key: str, choices: Iterable[str]) -> str:
    value = get(params, key)
    choices = sorted(choices)
    if value not in choices:
        raise ParamsError(
            f"params.yaml: {key} = {value!r} is not one of: {', '.join(choices)}. "
            + _fix_hint(key, choices[0] if choices else "...")
        )
    return value


def require_float_list(params: dict[str, Any], key: str, lo: float, hi: float) -> list[float]:
    value = get(params, key)
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        or not all(lo <= v <= hi for v in value)
    ):
        raise ParamsError(
            f"params.yaml: {key} = {value!r} is invalid; expected a non-empty list of numbers "
            f"in [{lo}, {hi}]. Fix: edit params.yaml."
        )
    return [float(v) for v in value]
