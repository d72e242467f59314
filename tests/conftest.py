"""Shared fixtures: offline environment and throwaway copies of the project as git repos."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

ROOT = Path(__file__).resolve().parents[1]

# Small enough for CI on 2 cores, large enough that every split has each class.
SMALL_PARAMS = {
    "data.shapes.n_train": 48,
    "data.shapes.n_val": 12,
    "data.shapes.n_test": 16,
    "data.moving_shapes.n_train": 16,
    "data.moving_shapes.n_val": 8,
    "data.moving_shapes.n_test": 8,
    "probe.bootstrap": 200,
    # Trained probes and adapters: a few steps prove the plumbing; the bands are checked on the
    # default run, not here.
    "probe.dense.steps": 20,
    "probe.dense.eval_every": 10,
    "probe.detr.steps": 20,
    "probe.detr.eval_every": 10,
    "probe.reconstruction.steps": 10,
    "probe.reconstruction.eval_every": 5,
    "align.interval_rounds": 20,
    "reconstruct.warmup_epochs": 1,
    "reconstruct.epochs": 0,
    "reconstruct.bootstrap": 100,
    "reconstruct.detector.steps": 20,
    "reconstruct.detector.eval_every": 10,
}


# Quicker still, where a test needs finished outputs but no trained probe: the trained probes
# off at the model's points (a brief decoder on the pixels control only), so spatial IoU,
# LPIPS and mAP are "not measured"; the bbox probe still runs and ranks. Moving-shapes clips of
# 4 frames, not 8: most of a real model's extraction time is the clip frames.
QUICK_PARAMS = {**{f"probe.{probe}.{key}": "none" for probe in ("detr", "dense", "reconstruction")
                   for key in ("points", "controls")},
                "probe.reconstruction.controls": ["pixels"], "probe.reconstruction.steps": 50,
                "probe.reconstruction.eval_every": 25,
                "reconstruct.warmup_epochs": 1, "reconstruct.bootstrap": 200,
                "data.moving_shapes.n_frames": 4}

# Over SMALL_PARAMS, for a model family's whole pipeline (test_extract_pipeline.py), where what
# differs per family is the extract and ground stages: every stage runs, every point is
# extracted and bbox-probed beside the bbox controls, and each trained probe (dense, DETR-style,
# reconstruction) trains once at the deepest point on the family's tokens; their controls, the
# dense probe at the other points, the second seed and the temporal probe's controls are off.
# Those run through DVC, on SMALL_PARAMS, in test_pipeline.py's experiments and
# test_data_pipeline.py's COCO fixture (and on a tiny store in test_probe_stage.py).
FAMILY_PARAMS = {"probe.dense.points": "deepest", "probe.seeds": 1,
                 **{f"probe.{probe}.controls": "none"
                    for probe in ("dense", "detr", "reconstruction", "temporal")}}


def tool_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for subprocesses: this interpreter's venv first on PATH, offline."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", GIT_TERMINAL_PROMPT="0")
    env.setdefault("GIT_AUTHOR_NAME", "vlmprobe tests")
    env.setdefault("GIT_AUTHOR_EMAIL", "tests@vlmprobe.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "vlmprobe tests")
    env.setdefault("GIT_COMMITTER_EMAIL", "tests@vlmprobe.invalid")
    return env


def run(
    cmd: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command in `cwd`, returning its output; on failure show it in the assertion."""
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(env), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
            f"\n--- stderr\n{result.stderr[-4000:]}"
        )
    return result


def stage_args(name: str) -> list[str]:
    """The arguments dvc.yaml's `name` stage passes its module: every path it reads or writes
    (the stages have no default paths; they are written in dvc.yaml alone)."""
    cmd = shlex.split(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]["cmd"])
    assert cmd[:3] == ["python", "-m", f"vlmprobe.stages.{name}"], cmd
    return cmd[3:]


def stage_command(name: str) -> list[str]:
    """dvc.yaml's command for stage `name`, run with this interpreter."""
    return [sys.executable, "-m", f"vlmprobe.stages.{name}", *stage_args(name)]


def set_params(params_file: Path, overrides: dict[str, object]) -> None:
    params = yaml.safe_load(params_file.read_text())
    for key, value in overrides.items():
        node = params
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(dest: Path, overrides: dict[str, object] | None = None) -> Path:
    """A copy of the project's tracked files as a fresh git repo with one commit.

    Generated outputs (dvc.lock, metrics, results, plots) are left out, as in a clean start.
    """
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    skip = ("dvc.lock", "metrics/", "results/", "plots/")
    for name in filter(None, files):
        if name.startswith(skip) or not (ROOT / name).exists():
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    set_params(dest / "params.yaml", {**SMALL_PARAMS, **(overrides or {})})
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "initial"], dest)
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small, clean copy of the project (git repo, DVC initialised, nothing run)."""
    return make_project(tmp_path / "project")
