"""Reading and validating `params.yaml`.

A stage sees only the params it declares in `dvc.yaml`: `load_params` returns just those keys,
so reading an undeclared param fails loudly instead of going stale silently (DVC re-runs a
stage only when a declared param changes). `tests/test_dvc_yaml.py` checks that each stage
module's `PARAMS` equals its `dvc.yaml` declaration.

The schema is the project's committed params.yaml (git HEAD): its keys, and only those, are
valid, so a key added there is covered without a second list to keep in step. A misspelled key
would otherwise be ignored silently (the stage never reads it), so an unknown key, and a
missing one, is an error naming the section's valid keys.
"""

from __future__ import annotations

import difflib
import re
import subprocess
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from vlmprobe.errors import VlmprobeError

PARAMS_FILE = Path("params.yaml")
# Registry entry names become parts of output paths (dvc.yaml's `results/p4/${vlm}-...`), so
# only plain identifiers: `../../x` must never reach a path.
NAME = re.compile(r"[A-Za-z0-9_]+")


class ParamsError(VlmprobeError, ValueError):
    """A param is missing, unknown, of the wrong type or out of range, or the file is malformed."""


def parse_params(text: str, source: Path | str) -> dict[str, Any]:
    """The mapping in params text; malformed YAML is one line naming file, line and column."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else str(source)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ParamsError(f"{where}: malformed YAML: {problem}. Fix: correct that line "
                          "(`key: value`, nested keys indented by spaces, no tabs).") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections (`vlm: ...`, `data: ...`), "
                          f"got a {type(raw).__name__}. Fix: restore the file's layout.")
    return raw


def read_params_file(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found: run from the project root (where dvc.yaml is).")
    return parse_params(path.read_text(), path)


@cache
def committed_params(project_root: Path) -> dict[str, Any] | None:
    """The params.yaml committed at `project_root`'s git HEAD (the schema); None outside a git
    checkout or before params.yaml is committed, where no schema can be derived."""
    try:
        shown = subprocess.run(["git", "-C", str(project_root), "show", "HEAD:./params.yaml"],
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return parse_params(shown.stdout, f"{project_root}/params.yaml at git HEAD")


def _example(name: str, default: Any) -> str:
    return yaml.safe_dump({name: default}, default_flow_style=True, width=10_000).strip()[1:-1]


def key_errors(raw: dict[str, Any], schema: dict[str, Any],
               sections: Iterable[str] | None = None, prefix: str = "") -> list[str]:
    """Every key of `raw` that `schema` lacks and every schema key `raw` lacks, within the
    dotted `sections` (all when None). Lists are values, not sections: not descended into."""
    if sections is not None:
        errors = []
        for key in sections:
            head, _, rest = key.partition(".")
            if head not in schema:
                continue  # a key the code declares but the schema lacks: the code's to fix
            if head not in raw:
                errors += _missing(prefix + head, schema[head])
            elif rest and isinstance(schema[head], dict) and isinstance(raw[head], dict):
                errors += key_errors(raw[head], schema[head], [rest], f"{prefix}{head}.")
            else:
                errors += _section_errors(prefix + head, raw[head], schema[head])
        return errors
    errors = []
    valid = list(schema)
    for name in raw:
        if name not in schema:
            section = f"`{prefix[:-1]}`" if prefix else "the top level"
            close = difflib.get_close_matches(str(name), valid, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else "."
            errors.append(f"params.yaml: unknown key `{prefix}{name}`{hint} Valid keys of "
                          f"{section}: {', '.join(valid)}. Fix: rename or remove it (a key "
                          "new to params.yaml is valid once committed: the schema is "
                          "params.yaml at git HEAD).")
    for name, default in schema.items():
        if name not in raw:
            errors += _missing(prefix + name, default)
        else:
            errors += _section_errors(prefix + name, raw[name], default)
    return errors


def _section_errors(key: str, value: Any, default: Any) -> list[str]:
    if not isinstance(default, dict):
        return []  # a value: its stage checks its type and range
    if not isinstance(value, dict):
        return [f"params.yaml: `{key}` = {value!r} must be a section with the keys "
                f"{', '.join(default)}. Fix: restore it from `git show HEAD:params.yaml`."]
    return key_errors(value, default, prefix=f"{key}.")


def _missing(key: str, default: Any) -> list[str]:
    parent, _, name = key.rpartition(".")
    under = f"under `{parent}:`" if parent else "at the top level"
    return [f"params.yaml: `{key}` is missing. Fix: add it back {under}, e.g. "
            f"`{_example(name, default)}` (the committed value)."]


def check_keys(raw: dict[str, Any], schema: dict[str, Any] | None,
               sections: Iterable[str] | None = None) -> None:
    """Refuse unknown and missing keys (see `key_errors`); no schema, no check."""
    errors = key_errors(raw, schema, sections) if schema is not None else []
    if errors:
        raise ParamsError("\n".join(errors))


def _fix_hint(key: str, example: Any) -> str:
    return f"Fix: edit params.yaml or run `dvc exp run -S {key}={example}`."


def load_params(keys: Sequence[str], path: Path | str = PARAMS_FILE,
                schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load `path` and return a nested dict holding only `keys` (dotted, e.g. `data.seed`),
    after refusing unknown or missing keys in them against `schema` (default: the committed
    params.yaml of `path`'s project)."""
    path = Path(path)
    raw = read_params_file(path)
    check_keys(raw, committed_params(path.parent.resolve()) if schema is None else schema, keys)
    selected: dict[str, Any] = {}
    for key in keys:
        node: Any = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ParamsError(f"{path}: `{key}` is missing. Fix: add it back (its committed "
                                  "value: `git show HEAD:params.yaml`).")
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
            raise ParamsError(
                f"params.yaml: `{key}` is missing. Fix: add it back (its committed value: `git "
                f"show HEAD:params.yaml`). If it is there, the stage must declare it in dvc.yaml "
                f"and its PARAMS.")
        node = node[part]
    return node


def require_name(params: dict[str, Any], key: str) -> str:
    """A registry entry name (`vlm`, `video_vae`): a plain identifier (see NAME)."""
    value = get(params, key)
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ParamsError(
            f"params.yaml: {key} = {value!r} is not a registry entry name: expected a plain "
            f"identifier (letters, digits, _), as it becomes part of output paths. "
            + _fix_hint(key, "<a name from `vlmprobe models`>")
        )
    return value


def require_int(params: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = get(params, key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ParamsError(
            f"params.yaml: {key} = {value!r} is invalid; expected an integer in [{lo}, {hi}]. "
            + _fix_hint(key, lo)
        )
    return value


def require_bool(params: dict[str, Any], key: str) -> bool:
    value = get(params, key)
    if not isinstance(value, bool):
        raise ParamsError(f"params.yaml: {key} = {value!r} is invalid; expected true or false. "
                          + _fix_hint(key, "false"))
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


NAME_KEYWORDS = {"all": "`all`", "deepest": "`deepest`", "none": "`none` (run it nowhere)"}


def resolve_names(value: Any, key: str, valid: list[str] | None,
                  keywords: tuple[str, ...] = ("all", "deepest", "none")) -> list[str] | str:
    """The one resolver of names (points, controls) in params: a non-empty list of names from
    `valid`, kept in `valid`'s order (points: depth order), or one of `keywords`: `all`,
    `deepest` (the last of `valid`: the deepest point), `none` (no name, said outright: an
    empty list is refused as more often a slip than a choice). With `valid` None (not known
    yet) only the form is checked, and a keyword is returned as is."""
    if value in keywords and isinstance(value, str):
        if valid is None:
            return value
        return {"all": list(valid), "deepest": list(valid)[-1:], "none": []}[value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        choices = ", ".join(valid) if valid is not None else "names (ids)"
        words = ", ".join(NAME_KEYWORDS[k] for k in keywords)
        raise ParamsError(f"params.yaml: {key} = {value!r} is invalid; expected {words} or a "
                          f"non-empty list of: {choices}. Fix: edit params.yaml.")
    if valid is None:
        return value
    unknown = [v for v in value if v not in valid]
    if unknown:
        raise ParamsError(
            f"params.yaml: {key} names {', '.join(map(repr, unknown))}; valid choices: "
            f"{', '.join(valid)} (or {', '.join(f'`{k}`' for k in keywords)}). Fix: edit "
            f"params.yaml or run `dvc exp run -S '{key}=[{valid[-1]}]'`."
        )
    return [v for v in valid if v in value]


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
