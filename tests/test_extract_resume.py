"""`kill -9` mid-extraction, rerun: it continues from the last complete shard and the final
stores are byte-identical to an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import run, tool_env
from test_extract_engine import stage_project

SETTINGS = {"batch_size": 2, "shard_size": 2}
STAGE = [sys.executable, "-m", "vlmprobe.stages.extract"]


def store_bytes(project: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(project)): path.read_bytes()
        for out in ("data/features", "data/clip_features")
        for path in sorted((project / out).rglob("*"))
        if path.is_file()
    }


def kill_after_first_shards(project: Path, n_shards: int) -> None:
    """Start the stage and SIGKILL it once `n_shards` shards of the image store exist."""
    process = subprocess.Popen(STAGE, cwd=project, env=tool_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if len(list((project / ".vlmprobe").glob("extract-images-*/Q5/shard-*"))) >= n_shards:
                os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the stage ended before it could be killed"


def test_resume_after_kill_is_byte_identical(tmp_path):
    reference = stage_project(tmp_path / "reference", "qwen2_5_vl_tiny", **SETTINGS)
    run(STAGE, reference)

    interrupted = stage_project(tmp_path / "interrupted", "qwen2_5_vl_tiny", **SETTINGS)
    kill_after_first_shards(interrupted, 2)
    assert not (interrupted / "data/features").exists()
    resumed = run(STAGE, interrupted)
    extracted = int(resumed.stdout.split("extracted ")[1].split()[0])  # images stage
    assert extracted < 10, "the resumed run recomputed shards that were complete"
    assert store_bytes(interrupted) == store_bytes(reference)
