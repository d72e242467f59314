"""`kill -9` mid-extraction, rerun: it continues from the last complete shard and the final
stores are byte-identical to an uninterrupted run's; after a change to the pixels, the model code
or the weights, the rerun starts clean instead."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vlmprobe.stages.extract as extract_stage
from conftest import run, stage_command, tool_env
from test_extract_engine import stage_project
from test_models_vlm import CPU
from vlmprobe.data.dataset import load_all_images
from vlmprobe.extract import digests
from vlmprobe.extract.engine import extract_points
from vlmprobe.extract.store import FeatureStore
from vlmprobe.models.registry import RegistryEntry, adapter_for, get_entry

SETTINGS = {"batch_size": 2, "shard_size": 2}
STAGE = stage_command("extract")


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


def invert_images(images_dir: Path) -> None:
    """Every PNG's pixels inverted in place; the instances JSON stays byte-identical."""
    paths = list(images_dir.rglob("*.png"))
    assert paths, f"no PNG under {images_dir}"
    for path in paths:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        Image.fromarray(255 - pixels).save(path)


def test_inverted_pixels_after_kill_start_clean(tmp_path):
    project = stage_project(tmp_path / "p", "qwen2_5_vl_tiny", **SETTINGS)
    kill_after_first_shards(project, 2)
    invert_images(project / "data/images")
    rerun = run(STAGE, project)
    assert "extract-images-qwen2_5_vl_tiny: an interrupted run's scratch store is stale " \
           "(changed: pixels); starting clean" in rerun.stdout
    extracted = int(rerun.stdout.split("extracted ")[1].split()[0])  # images stage
    assert extracted == 10, "the rerun kept shards of the old pixels"


EDITED_ADAPTER = """
from vlmprobe.models.pixels import PixelsAdapter

class EditedPixels(PixelsAdapter):
    def point_tokens(self, point, output, inputs):
        return output * {scale}
"""


class Interrupted(Exception):
    """Stands for a kill after every shard was written, before the stores were published."""


def test_changed_adapter_code_starts_clean(tmp_path, monkeypatch, capsys):
    """An adapter module edited between an interrupted run and its rerun: no old shard is kept."""
    project = stage_project(tmp_path / "p", "pixels", **SETTINGS)
    monkeypatch.chdir(project)
    source = tmp_path / "edited_pixels.py"

    def run_stage_with_adapter(scale: int) -> None:
        source.write_text(EDITED_ADAPTER.format(scale=scale))
        # A vlmprobe module name, so the identity hashes it like a family module.
        name = "vlmprobe.models.edited_pixels"
        spec = importlib.util.spec_from_file_location(name, source)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        monkeypatch.setattr(extract_stage, "adapter_for", module.EditedPixels)
        extract_stage.main(STAGE[3:])

    def interrupt(work: Path, out: Path) -> None:
        raise Interrupted

    with monkeypatch.context() as m:
        m.setattr(extract_stage, "publish", interrupt)
        with pytest.raises(Interrupted):
            run_stage_with_adapter(scale=1)
    capsys.readouterr()
    run_stage_with_adapter(scale=2)
    printed = capsys.readouterr().out
    assert "(changed: code (vlmprobe.models.edited_pixels)); starting clean" in printed
    features = FeatureStore.open(project / "data/features").load("patches")
    _, images = load_all_images(project / "data/images")
    pixels = adapter_for(get_entry("pixels"))
    unscaled = extract_points(pixels, pixels.load(project, CPU), images, ["patches"], CPU)
    np.testing.assert_allclose(features, 2 * unscaled["patches"].numpy(), rtol=1e-3,
                               err_msg="the rerun kept shards of the old adapter code")


def local_checkpoint_identity(checkpoint: Path, cache: Path) -> dict:
    entry = RegistryEntry(name="local_x", family="dinov2", display_name="x", points={"a": {}},
                          weights={"source": "local", "path": str(checkpoint)})
    return adapter_for(entry).code_and_weights_identity(checkpoint, cache)


def test_weights_identity_hashes_bytes_and_remembers_digests(tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(b"\0" * 1000)
    cache = tmp_path / "scratch/file-hashes.json"
    before = local_checkpoint_identity(checkpoint, cache)
    assert set(before["weights"]) == {"config.json", "model.safetensors"}
    assert set(before["remote_code"]) == {"checkpoint"}

    # Unchanged files are not read again: the digests come from the cache.
    def no_rehash(path: Path) -> str:
        raise AssertionError(f"{path} was hashed again although it did not change")

    with monkeypatch.context() as m:
        m.setattr(digests, "_sha256", no_rehash)
        assert local_checkpoint_identity(checkpoint, cache) == before

    # Same size, mtime put back: only the bytes changed, and the identity sees it.
    stat = weights.stat()
    weights.write_bytes(b"\1" + b"\0" * 999)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = local_checkpoint_identity(checkpoint, cache)
    assert after["weights"]["model.safetensors"] != before["weights"]["model.safetensors"]
    assert after["weights"]["config.json"] == before["weights"]["config.json"]
