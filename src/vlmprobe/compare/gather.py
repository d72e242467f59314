"""Runs from `dvc exp show --json`: the workspace, the commits shown and their experiments.

`dvc exp show` drops list values (every 95% interval), so it only names the revisions: each
revision's metrics files are read whole from git (`git show REV:metrics/...`; they are
`cache: false`, so every commit and experiment holds them) and the workspace's from disk.
Each row's metrics files become a `Run` (see `vlmprobe.select.measure`). Rows with identical
metrics are one run (the workspace usually repeats the last experiment): the experiment's name
is kept over a commit's, a commit's over the workspace's. Rows without `metrics/probe.json`
measured nothing and are listed as skipped. Inference speed is relative to a run of the speed
baseline entry on the same machine, where one exists.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmprobe.dvc_run import run_dvc
from vlmprobe.models.registry import RegistryError, get_entry
from vlmprobe.select.measure import METRICS_FILES, Run, build_run, speed_ratio

PREFERENCE = {"experiment": 0, "commit": 1, "workspace": 2}  # which name a duplicate keeps
Reader = Callable[[str, str], dict[str, Any] | None]  # (revision, path) -> metrics, None if absent


@dataclass(frozen=True)
class Row:
    name: str
    origin: str  # experiment, commit or workspace
    rev: str
    params: dict[str, Any]
    metrics: dict[str, Any]  # metrics file path -> content


def exp_show(repo: Path) -> list[dict[str, Any]]:
    return json.loads(run_dvc(["exp", "show", "--json"], repo))


def git_reader(repo: Path) -> Reader:
    """Metrics files whole: from git at a revision, from disk for the workspace."""
    def read(rev: str, path: str) -> dict[str, Any] | None:
        if rev == "workspace":
            file = repo / path
            return json.loads(file.read_text()) if file.is_file() else None
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True,
                               text=True)
        return json.loads(shown.stdout) if shown.returncode == 0 else None
    return read


def _row(entry: dict[str, Any], name: str, origin: str, read: Reader) -> Row | None:
    data = entry.get("data") or {}
    if entry.get("error") or not data:
        return None
    rev = entry.get("rev", "")
    metrics = {path: read(rev, path) for path in METRICS_FILES.values()}
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    return Row(name, origin, rev, params, {p: m for p, m in metrics.items() if m is not None})


def rows(shown: list[dict[str, Any]], read: Reader) -> list[Row]:
    """Every row of `dvc exp show --json`, experiments first, duplicates merged."""
    found = []
    for top in shown:
        is_workspace = top.get("rev") == "workspace"
        name = "workspace" if is_workspace else top.get("name") or top.get("rev", "")[:7]
        row = _row(top, name, "workspace" if is_workspace else "commit", read)
        if row:
            found.append(row)
        for exp in top.get("experiments") or []:
            for rev in exp.get("revs") or []:
                label = rev.get("name") or exp.get("name") or rev.get("rev", "")[:7]
                row = _row(rev, label, "experiment", read)
                if row:
                    found.append(row)
    found.sort(key=lambda r: PREFERENCE[r.origin])
    unique, seen, names = [], set(), set()
    for row in found:
        key = json.dumps(row.metrics, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        name, n = row.name, 2
        while name in names:  # a branch and an experiment may share a name
            name, n = f"{row.name}-{n}", n + 1
        names.add(name)
        unique.append(Row(name, row.origin, row.rev, row.params, row.metrics))
    return unique


def _vlm(row: Row) -> str | None:
    probe = row.metrics.get(METRICS_FILES["probe"]) or {}
    return (probe.get("meta") or {}).get("vlm") or row.params.get("vlm")


def runs(found: list[Row], speed_baseline: str) -> tuple[list[Run], dict[str, str]]:
    """Runs from rows, and the rows skipped with why."""
    skipped, measured = {}, []
    for row in found:
        if METRICS_FILES["probe"] not in row.metrics:
            skipped[row.name] = f"no {METRICS_FILES['probe']} (the pipeline has not run there)"
        else:
            measured.append(row)
    baselines = [r.metrics.get(METRICS_FILES["extract"]) for r in measured
                 if _vlm(r) == speed_baseline]
    result = []
    for row in measured:
        vlm = _vlm(row) or "unknown"
        try:
            entry = get_entry(vlm)
        except RegistryError:
            entry = None
        files = {kind: row.metrics.get(path) for kind, path in METRICS_FILES.items()}
        result.append(build_run(row.name, vlm, entry, files,
                                _speed(files["extract"], baselines, speed_baseline)))
    return result, skipped


def _speed(extract: dict | None, baselines: list[dict | None], label: str) -> tuple:
    """The ratio against the first baseline run on the same machine; else the first reason."""
    if not baselines:
        return speed_ratio(extract, None, label)
    attempts = [speed_ratio(extract, b, label) for b in baselines if b is not None]
    return next((a for a in attempts if a[0] is not None),
                attempts[0] if attempts else speed_ratio(extract, None, label))
