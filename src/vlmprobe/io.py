"""Atomic file output: a reader never sees a half-written file, an interrupted run leaves none."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlmprobe.errors import MissingInput
from vlmprobe.params import NAME


def umask() -> int:
    """The process's umask (mkstemp and mkdtemp ignore it: their files are 0600, 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~umask())  # mkstemp creates 0600; give the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


METRIC_DIGITS = 4  # digits kept in metrics: float noise below this never shows up in a diff


def rounded(obj: Any, digits: int = METRIC_DIGITS) -> Any:
    """`obj` with every float (in nested dicts and lists) rounded to `digits`."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj


class NonFiniteJSON(ValueError):
    """A NaN or inf was about to be written to a JSON file."""


def nonfinite_paths(obj: Any, path: str = "") -> list[str]:
    """Key paths (`points.L5.map50`, `ci95[1]`) of every NaN or inf float in nested dicts and
    lists."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [path or "(top level)"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in nonfinite_paths(v, f"{path}.{k}" if path
                                                                    else str(k))]
    if isinstance(obj, list | tuple):
        return [p for i, v in enumerate(obj) for p in nonfinite_paths(v, f"{path}[{i}]")]
    return []


def write_json(path: Path | str, obj: Any) -> None:
    """Write `obj` as JSON; refuse NaN and inf, the last line of defence that keeps a broken
    computation from being stored as a number (Python's json would write the non-standard
    `NaN`, which other readers reject or take as a score)."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError as e:
        bad = nonfinite_paths(obj)
        if not bad:
            raise
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteJSON(
            f"refusing to write {path}: non-finite number at {shown}. NaN/inf is not valid "
            "JSON and would be read as a result. Fix: the code that produced these values must "
            "refuse non-finite input (vlmprobe.metrics.finite.require_finite) or record the "
            "result as invalid with its reason instead of a number."
        ) from e
    write_text(path, text + "\n")


def read_json(path: Path | str) -> Any:
    with Path(path).open() as f:
        return json.load(f)


def recorded_model(record: Any, source: Path | str) -> str:
    """The registry entry name `record` says its data is of (`vlm` of a feature store's
    manifest or of a metrics file's `meta`, read from `source`): the model of every stage
    downstream of extract, which takes it from its inputs, not from the `vlm` param."""
    name = record.get("vlm") if isinstance(record, dict) else None
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise MissingInput(f"{source} names no model (`vlm` = {name!r}, expected a registry "
                           "entry name): it was not written by this version's stages. Fix: "
                           "`dvc repro` (it re-runs the stages that write it).")
    return name


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary directory; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~umask())
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
